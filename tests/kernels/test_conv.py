"""Tests of kernels/conv.py: the Triton implicit-GEMM conv and its epilogues.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
tiny shapes, fp32 and fp16. bf16 and the ResNet-50 shapes run only on a GPU (@pytest.mark.gpu).
Every reference is F.conv2d in float64 on the very inputs the kernel saw; outputs are poisoned.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastres.kernels import interpreter_active

pytest.importorskip("triton")
from fastres.kernels import conv as kconv  # noqa: E402
from fastres.kernels.conv import conv2d_nhwc, conv2d_nhwc_supports, merge_stats  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}

if DEV == "cpu" and not interpreter_active():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)


def _rand(*shape, dtype=torch.float32, fmt=torch.contiguous_format, device=DEV):
    return torch.randn(*shape, device=device).to(dtype).contiguous(memory_format=fmt)


def _ref(x, w, b, stride, padding, dilation):
    """(float64 conv2d (+ bias) of the exact inputs, its error scale). The scale is
    max(conv2d(|x|, |w|) + |b|): rounding errors of a dot product are relative to the sum of the
    magnitudes of its terms, not to its result (which cancellation can make arbitrarily small)."""
    xd, wd, bd = x.double(), w.double(), None if b is None else b.double()
    ref = F.conv2d(xd, wd, bd, stride, padding, dilation)
    mag = F.conv2d(xd.abs(), wd.abs(), None if bd is None else bd.abs(), stride, padding, dilation)
    return ref, mag.max().item()


def _close(out, ref, dtype, mag, what="output"):
    """|out - ref| <= tol * (|ref| + mag): relative to the element and to the error scale `mag`."""
    assert not torch.isnan(out).any(), f"{what}: NaN (poisoned element never written?)"
    err = (out.double() - ref).abs()
    bound = TOL[dtype] * (ref.abs() + mag)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max err "
                           f"{err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}, scale {mag:.3g}, "
                           f"tol {TOL[dtype]}")


def _check_stats(part, v_ref, mag, block_m, rtol=1e-5):
    """merge_stats(part) against float64 torch.var_mean of v_ref, and the per-tile counts.
    The statistics come from the fp32 accumulator, so each element of v carries an error of about
    e = rtol / 5 * mag (mag: the error scale from _ref); the mean then errs by at most e and the
    variance by about 2 * std * e.
    rtol: 1e-5 for fp32 accumulation with IEEE rounding (the interpreter, fp32 on a GPU); GPU tensor
    cores accumulating 16-bit products round less carefully, so those tests pass 1e-4 (still 40x
    finer than the bf16 rounding of the conv output itself)."""
    n, c, ho, wo = v_ref.shape
    m = n * ho * wo
    tiles = math.ceil(m / block_m)
    assert part.dtype == torch.float32 and tuple(part.shape) == (tiles, 3, c)
    assert not torch.isnan(part).any(), "statistics: NaN (poisoned element never written?)"
    counts = torch.tensor([min(block_m, m - t * block_m) for t in range(tiles)], dtype=torch.float32)
    torch.testing.assert_close(part[:, 0, :].cpu(), counts[:, None].expand(tiles, c), rtol=0, atol=0)
    mean, var, cnt = merge_stats(part)
    var_ref, mean_ref = torch.var_mean(v_ref, dim=(0, 2, 3), correction=0)
    assert torch.all(cnt == m)
    e = rtol / 5 * mag
    torch.testing.assert_close(mean.double(), mean_ref, rtol=0, atol=e)
    torch.testing.assert_close(var.double(), var_ref, rtol=rtol, atol=2 * e * var_ref.sqrt().max().item() + e * e)


def _block_m():
    return kconv.BLOCK_M_GPU if DEV == "cuda" else kconv.BLOCK_M_INTERPRETER


# (N, Cin, H, W, Cout, (kh, kw), stride, padding, dilation)
SHAPES = [
    (1, 3, 13, 13, 8, (7, 7), (2, 2), (3, 3), (1, 1)),    # stem-like 7x7 stride 2, Cin 3
    (2, 5, 9, 11, 17, (3, 3), (1, 1), (1, 1), (1, 1)),    # 3x3, odd channels, M = 198: 4 tiles, tail 6
    (2, 17, 7, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1)),     # 1x1, Cin 17 (K tail)
    (2, 16, 9, 9, 40, (1, 1), (2, 2), (0, 0), (1, 1)),    # 1x1 stride 2 (downsample), 2 column tiles
    (1, 5, 10, 9, 3, (3, 3), (2, 2), (1, 1), (1, 1)),     # 3x3 stride 2, odd sizes
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
    n, cin, h, w, cout = 2, 6, 9, 8, 19
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
    ymag += (shift.abs().max().item() if shift is not None else 0.0) + (res.abs().max().item() if res is not None else 0.0)
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
# GPU: real ResNet-50 shapes, batch 32, every dtype. The bound follows the project rule: at most
# twice the error of PyTorch's own same-dtype convolution against the float64 reference (or the
# dtype's tolerance, whichever is larger).

RESNET50 = [  # (Cin, H, W, Cout, k, stride, padding)
    (64, 56, 56, 64, 1, 1, 0),     # conv2_x 1x1 reduce
    (64, 56, 56, 64, 3, 1, 1),     # conv2_x 3x3
    (64, 56, 56, 256, 1, 1, 0),    # conv2_x 1x1 expand
    (128, 56, 56, 128, 3, 2, 1),   # conv3_1 3x3 stride 2
    (256, 56, 56, 512, 1, 2, 0),   # conv3_1 downsample
    (3, 224, 224, 64, 7, 2, 3),    # stem
]


def _gpu_check(out, x, wt, b, stride, padding, dtype, what):
    ref, mag = _ref(x, wt, b, stride, padding, 1)
    theirs = F.conv2d(x, wt, b, stride, padding)
    err = (out.double() - ref).abs().max().item()
    err_torch = (theirs.double() - ref).abs().max().item()
    bound = max(2 * err_torch, TOL[dtype] * ref.abs().max().item())
    assert not torch.isnan(out).any(), f"{what}: NaN"
    assert err <= bound, f"{what}: max err {err:.3g} > bound {bound:.3g} (torch's own error {err_torch:.3g})"
    return ref, mag


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", RESNET50, ids=lambda s: f"{s[0]}x{s[1]}-{s[3]}k{s[4]}s{s[5]}")
def test_gpu_resnet50_shapes(poison, monkeypatch, shape, dtype):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # fp32: full-precision products
    cin, h, w, cout, k, stride, padding = shape
    x = _rand(32, cin, h, w, dtype=dtype, fmt=torch.channels_last)
    wt = (_rand(cout, cin, k, k) / math.sqrt(cin * k * k)).to(dtype)
    out, part = conv2d_nhwc(x, wt, stride=stride, padding=padding, want_stats=True)
    ref, mag = _gpu_check(out, x, wt, None, stride, padding, dtype, "conv")
    _check_stats(part, ref, mag, kconv.BLOCK_M_GPU, rtol=1e-5 if dtype == torch.float32 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_inference_epilogue(poison, dtype):
    """Bottleneck conv3 at inference: folded BN (bias + scale/shift), residual, ReLU, batch 32."""
    x = _rand(32, 64, 56, 56, dtype=dtype, fmt=torch.channels_last)
    wt = (_rand(256, 64, 1, 1) / 8).to(dtype)
    bias, scale, shift = _rand(256), torch.rand(256, device=DEV) + 0.5, _rand(256)
    res = _rand(32, 256, 56, 56, dtype=dtype, fmt=torch.channels_last)
    out, part = conv2d_nhwc(x, wt, bias, scale=scale, shift=shift, residual=res, relu=True)
    assert part is None
    v, mag = _ref(x, wt, bias, 1, 0, 1)
    y = torch.relu(v * scale.double()[None, :, None, None] + shift.double()[None, :, None, None] + res.double())
    ymag = mag * scale.max().item() + shift.abs().max().item() + res.abs().max().item()
    _close(out, y, dtype, ymag)


@pytest.mark.gpu
def test_gpu_fp32_tf32(poison, monkeypatch):
    """With torch.backends.cudnn.allow_tf32 (PyTorch's default) fp32 runs on TF32 tensor cores."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x = _rand(32, 64, 56, 56, fmt=torch.channels_last)
    wt = _rand(64, 64, 3, 3) / 24
    out, _ = conv2d_nhwc(x, wt, padding=1)
    ref, mag = _ref(x, wt, None, 1, 1, 1)
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-3 * mag   # TF32 keeps 10 mantissa bits of each operand
