"""Tests of kernels/conv.py: the Triton implicit-GEMM conv and its epilogues.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
tiny shapes, fp32 and fp16. bf16 and the ResNet-50 shapes run only on a GPU: test_conv_gpu.py.
Every reference is F.conv2d in float64 on the very inputs the kernel saw; outputs are poisoned.
"""
import pytest
import torch
from conv_helpers import DEV, RESNET50_CASES, _block_m, _check_stats, _close, _rand, _ref, merge_stats

triton = pytest.importorskip("triton")
from fastres.kernels import conv as kconv  # noqa: E402
from fastres.kernels import conv_kernel as ck  # noqa: E402
from fastres.kernels.conv import conv2d_nhwc, conv2d_nhwc_supports  # noqa: E402

# (N, Cin, H, W, Cout, (kh, kw), stride, padding, dilation). Cin 3, 5, 17, 40 are zero-padded to 16, 16,
# 32, 48 channels by the host (several K-steps per tap for 17, 40); Cin 64 is one 64-channel K-step per tap.
SHAPES = [
    (1, 3, 13, 13, 8, (7, 7), (2, 2), (3, 3), (1, 1)),    # stem-like 7x7/2, Cin 3: space-to-depth, 4x4 over 16
    (2, 2, 11, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1)),     # space-to-depth, odd padded height
    (1, 4, 9, 10, 5, (2, 5), (2, 2), (0, 2), (1, 1)),     # space-to-depth, even/odd filter, padding on w only
    (1, 3, 12, 11, 6, (7, 7), (1, 1), (3, 3), (1, 1)),    # 7x7 stride 1, Cin 3: 49 taps (64-bit tap mask)
    (2, 5, 9, 11, 17, (3, 3), (1, 1), (1, 1), (1, 1)),    # 3x3, odd channels, M = 198: 2 row tiles, tail 70
    (2, 17, 7, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1)),     # 1x1, Cin 17: 2 K-steps, no padding (unmasked loads)
    (2, 16, 9, 9, 40, (1, 1), (2, 2), (0, 0), (1, 1)),    # 1x1 stride 2 (downsample), 2 column tiles, Cout tail
    (1, 5, 10, 9, 3, (3, 3), (2, 2), (1, 1), (1, 1)),     # 3x3 stride 2, odd sizes
    (1, 64, 6, 7, 40, (3, 3), (1, 1), (1, 1), (1, 1)),    # 3x3, Cin 64 (a ResNet width), Cout tail
    (1, 64, 9, 8, 33, (1, 1), (2, 2), (0, 0), (1, 1)),    # 1x1 stride 2, Cin 64
    (1, 40, 6, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1)),     # Cin 40 -> 48: three 16-channel K-steps per tap
    (2, 3, 8, 8, 6, (3, 3), (1, 1), (2, 2), (2, 2)),      # dilation 2
    (1, 4, 7, 9, 5, (1, 3), (1, 2), (0, 2), (1, 1)),      # non-square kernel, stride, padding
    (1, 3, 9, 10, 4, (3, 3), (1, 1), (1, 2), (2, 1)),     # unequal dilation and padding per axis
    (1, 3, 3, 3, 1, (3, 3), (1, 1), (0, 0), (1, 1)),      # M = 1, Cout = 1: one row, one channel
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"k{s[5][0]}{s[5][1]}s{s[6][0]}")
def test_conv_matches_float64(poison, shape, fmt, dtype):
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    x = _rand(n, cin, h, w, dtype=dtype, fmt=fmt)
    wt = _rand(cout, cin, *k, dtype=dtype)
    out, part = conv2d_nhwc(x, wt, stride=stride, padding=padding, dilation=dilation, want_stats=True)
    ref, mag = _ref(x, wt, None, stride, padding, dilation)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out, ref, dtype, mag)
    _check_stats(part, ref, mag, _block_m())


EPILOGUES = {
    "bias": dict(bias=torch.float16),
    "scale_shift": dict(scale=True, shift=True),
    "scale_only": dict(scale=True),
    "shift_relu": dict(shift=True, relu=True),
    "residual_nchw": dict(residual=torch.contiguous_format),
    "residual_nhwc_relu": dict(residual=torch.channels_last, relu=True),
    "relu": dict(relu=True),
    "all": dict(bias=torch.float64, scale=True, shift=True, residual=torch.channels_last, relu=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("epi", list(EPILOGUES), ids=list(EPILOGUES))
def test_epilogue(poison, epi, dtype):
    opt = EPILOGUES[epi]
    n, cin, h, w, cout = 1, 6, 9, 8, 19     # M = 72: one partial tile (masked rows), Cout 19: partial columns
    x = _rand(n, cin, h, w, dtype=dtype, fmt=torch.channels_last)
    wt = _rand(cout, cin, 3, 3, dtype=dtype)
    # parameters in mixed float dtypes: the kernel uses them in fp32
    bias = _rand(cout, dtype=opt["bias"]) if "bias" in opt else None
    scale = (torch.rand(cout, device=DEV) + 0.5).double() if opt.get("scale") else None
    shift = _rand(cout) if opt.get("shift") else None
    res = _rand(n, cout, h, w, dtype=dtype, fmt=opt["residual"]) if "residual" in opt else None
    relu = opt.get("relu", False)
    out, part = conv2d_nhwc(x, wt, bias, stride=1, padding=1, scale=scale, shift=shift, residual=res,
                            relu=relu, want_stats=True)
    v, mag = _ref(x, wt, bias, 1, 1, 1)
    y = v
    if scale is not None:
        y = y * scale.double()[None, :, None, None]
    if shift is not None:
        y = y + shift.double()[None, :, None, None]
    if res is not None:
        y = y + res.double()
    if relu:
        y = torch.relu(y)
        assert (y == 0).any() and (y > 0).any()
    ymag = mag * (scale.abs().max().item() if scale is not None else 1.0)
    ymag += shift.abs().max().item() if shift is not None else 0.0
    ymag += res.abs().max().item() if res is not None else 0.0
    _close(out, y, dtype, ymag)
    _check_stats(part, v, mag, _block_m())   # statistics are of conv + bias, before the epilogue


def test_no_stats_returns_none(poison):
    x, wt = _rand(1, 3, 5, 5), _rand(4, 3, 3, 3)
    out, part = conv2d_nhwc(x, wt, padding=(1, 1))
    assert part is None
    ref, mag = _ref(x, wt, None, 1, 1, 1)
    _close(out, ref, torch.float32, mag)


def test_int_conv_args(poison):
    x, wt = _rand(2, 4, 7, 7), _rand(6, 4, 3, 3)
    out, _ = conv2d_nhwc(x, wt, stride=2, padding=1, dilation=1)
    ref, mag = _ref(x, wt, None, 2, 1, 1)
    _close(out, ref, torch.float32, mag)


def test_merge_stats_plain():
    """merge_stats on partials built in torch from uneven chunks matches var_mean of the whole."""
    v = torch.randn(157, 7, dtype=torch.float64) * 3 + 5
    chunks = torch.split(v, [64, 64, 29])
    part = torch.stack([torch.stack([torch.full((7,), float(len(c)), dtype=torch.float64), c.mean(0),
                                     ((c - c.mean(0)) ** 2).sum(0)]) for c in chunks]).float()
    mean, var, cnt = merge_stats(part)
    var_ref, mean_ref = torch.var_mean(v, dim=0, correction=0)
    assert torch.all(cnt == 157) and mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(T, 3, C\)"):
        merge_stats(torch.zeros(4, 2, 7))


def test_supports():
    x, wt = _rand(1, 4, 6, 6), _rand(8, 4, 3, 3)
    assert conv2d_nhwc_supports(x, wt, (1, 1), (1, 1), (1, 1), 1) is None
    assert conv2d_nhwc_supports(x, wt, 2, 0, 1, 1) is None
    assert conv2d_nhwc_supports(x, _rand(8, 2, 3, 3), 1, 1, 1, 2) == "groups=2"
    assert conv2d_nhwc_supports(x.double(), wt.double(), 1, 1, 1, 1) == "dtype float64"
    assert "weight dtype" in conv2d_nhwc_supports(x, wt.half(), 1, 1, 1, 1)
    assert "padding" in conv2d_nhwc_supports(x, wt, 1, -1, 1, 1)
    assert "stride" in conv2d_nhwc_supports(x, wt, 0, 1, 1, 1)
    assert "channels" in conv2d_nhwc_supports(x, _rand(8, 5, 3, 3), 1, 1, 1, 1)
    assert "empty output" in conv2d_nhwc_supports(_rand(1, 4, 2, 2), wt, 1, 0, 1, 1)
    if DEV == "cpu":
        assert conv2d_nhwc_supports(x.bfloat16(), wt.bfloat16(), 1, 1, 1, 1) == \
            "bfloat16 under the Triton interpreter"
    else:
        assert conv2d_nhwc_supports(x.bfloat16(), wt.bfloat16(), 1, 1, 1, 1) is None
        assert "cpu" in conv2d_nhwc_supports(x.cpu(), wt.cpu(), 1, 1, 1, 1)


def test_supports_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(kconv, "interpreter_active", lambda: False)
    x, wt = _rand(1, 4, 6, 6, device="cpu"), _rand(8, 4, 3, 3, device="cpu")
    assert conv2d_nhwc_supports(x, wt, 1, 1, 1, 1) == "cpu tensors without TRITON_INTERPRET=1"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        conv2d_nhwc(x, wt, padding=1)


def test_bad_inputs():
    x, wt = _rand(2, 4, 6, 6), _rand(8, 4, 3, 3)
    with pytest.raises(ValueError, match=r"4-D input \(N, Cin, H, W\), got 3-D"):
        conv2d_nhwc(x[0], wt)
    with pytest.raises(ValueError, match=r"4-D weight \(Cout, Cin, kh, kw\), got 2-D"):
        conv2d_nhwc(x, wt[:, :, 0, 0])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        conv2d_nhwc(x.double(), wt.double())
    with pytest.raises(TypeError, match="weight of the input's dtype torch.float32, got torch.float16"):
        conv2d_nhwc(x, wt.half())
    with pytest.raises(ValueError, match=r"input with 5 channels .* got input of shape \(2, 4, 6, 6\)"):
        conv2d_nhwc(x, _rand(8, 5, 3, 3))
    with pytest.raises(ValueError, match=r"bias of shape \(8,\), got \(7,\)"):
        conv2d_nhwc(x, wt, _rand(7))
    with pytest.raises(ValueError, match=r"scale of shape \(8,\), got \(8, 1\)"):
        conv2d_nhwc(x, wt, scale=_rand(8, 1))
    with pytest.raises(TypeError, match="shift to be a floating-point tensor, got torch.int64"):
        conv2d_nhwc(x, wt, shift=torch.ones(8, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match=r"residual of shape \(2, 8, 4, 4\) \(the conv output\), got \(2, 8, 6, 6\)"):
        conv2d_nhwc(x, wt, residual=_rand(2, 8, 6, 6))
    with pytest.raises(TypeError, match="residual of the input's dtype torch.float32, got torch.float16"):
        conv2d_nhwc(x, wt, residual=_rand(2, 8, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
        conv2d_nhwc(x, wt, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="does not cover this call: padding"):
        conv2d_nhwc(x, wt, padding=-1)


# ---------------------------------------------------------------------------------------------
# operands: the weight consumed in place or re-laid once, the input padded to 16 channels

def test_channels_last_weight_is_used_in_place():
    wt = _rand(8, 32, 3, 3, fmt=torch.channels_last)
    mat = kconv._weight_matrix(wt, 32)
    assert mat.data_ptr() == wt.data_ptr() and mat.shape == (8, 3, 3, 32) and mat.is_contiguous()


@pytest.mark.parametrize("edit", ["in_place", "data", "fused_adam"])
def test_weight_relayout_sees_every_change(poison, edit):
    """The re-laid weight is never reused across calls: an edit the version counter misses (through
    `.data`, or as a fused optimizer writes) reaches the next conv."""
    x = _rand(1, 16, 6, 6, fmt=torch.channels_last)
    wt = _rand(8, 16, 3, 3)                         # NCHW weight: needs the (Cout, kh, kw, Cin) re-layout
    first, _ = conv2d_nhwc(x, wt, padding=1)
    version = wt._version
    if edit == "in_place":
        with torch.no_grad():
            wt.mul_(-2.0)
    elif edit == "data":
        wt.data.mul_(-2.0)                          # .data has its own version counter: wt's does not move
    else:                                           # a fused optimizer step: the version counter stays
        wt.grad = torch.randn_like(wt)
        torch.optim.Adam([wt], lr=0.5, fused=True).step()
    if edit == "data":
        assert wt._version == version
    again = kconv._weight_matrix(wt, 16)
    torch.testing.assert_close(again, wt.permute(0, 2, 3, 1), rtol=0, atol=0)
    out, _ = conv2d_nhwc(x, wt, padding=1)           # the conv sees the new values
    ref, mag = _ref(x, wt, None, 1, 1, 1)
    _close(out, ref, torch.float32, mag)
    assert not torch.allclose(out, first)


def test_weight_and_input_channel_padding():
    wt = _rand(4, 3, 7, 7, fmt=torch.channels_last)
    mat = kconv._weight_matrix(wt, 16)
    assert mat.shape == (4, 7, 7, 16) and mat.is_contiguous()
    torch.testing.assert_close(mat[..., :3], wt.permute(0, 2, 3, 1), rtol=0, atol=0)
    assert torch.all(mat[..., 3:] == 0)
    x = _rand(2, 3, 5, 4)
    xp = kconv._input_nhwc(x, 16)
    assert xp.shape == (2, 16, 5, 4) and xp.stride(1) == 1
    assert torch.equal(xp[:, :3], x) and torch.all(xp[:, 3:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_channels_last_weight_conv(poison, dtype):
    x = _rand(1, 32, 7, 6, dtype=dtype, fmt=torch.channels_last)
    wt = _rand(20, 32, 3, 3, dtype=dtype, fmt=torch.channels_last)
    out, part = conv2d_nhwc(x, wt, stride=2, padding=1, want_stats=True)
    ref, mag = _ref(x, wt, None, 2, 1, 1)
    _close(out, ref, dtype, mag)
    _check_stats(part, ref, mag, _block_m())


# ---------------------------------------------------------------------------------------------
# launch plan: config pruning, bucketed autotune key (the report tool's variants: test_report_variants.py)

@pytest.mark.parametrize("elem", [2, 4], ids=["16bit", "fp32"])
def test_pruned_configs_fit(elem):
    for cin, h, cout, k, s in RESNET50_CASES:
        cin_p = kconv._cin_p(cin)
        for limit in (ck.MAX_SHARED_SM90, 166912):          # H100/H200, A100
            cfgs = ck.prune_configs(ck.GPU_CONFIGS, cin_p, cout, elem, limit)
            assert cfgs, f"no config for Cin {cin} Cout {cout} ({elem}-byte data, {limit} B shared)"
            for c in cfgs:
                bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
                assert cin_p % bk == 0 and bn <= max(64, triton.next_power_of_2(cout))
                assert ck.shared_bytes(ck.BLOCK_M_GPU, bn, bk, c.num_stages, elem) <= limit
                assert ck.BLOCK_M_GPU * bn // (32 * c.num_warps) <= ck.ACC_REGS_MAX


def test_autotune_key_is_bucketed():
    assert "M" not in ck._conv_kernel_tuned.keys and "M_KEY" in ck._conv_kernel_tuned.keys
    g = [kconv._geometry(n, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1)) for n in (170, 256, 400)]
    assert g[0]["M_KEY"] == g[1]["M_KEY"] == triton.next_power_of_2(256 * 56 * 56) < g[2]["M_KEY"]


def test_warmup_restores_model_state():
    from fastres.kernels.warmup import warmup
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model[0].weight.grad = torch.randn_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad = model[0].weight.grad.clone()
    warmup(model, torch.randn(2, 3, 5, 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model[0].weight.grad, grad) and model[1].weight.grad is None
    assert model.training
