"""Benchmarks: fastres (each available backend) against eager PyTorch and torch.compile, in one run.

    python -m fastres.bench            # a size that suits the machine: tiny on a CPU, ResNet-50 batch 256 bf16 on a GPU
    python -m fastres.bench --quick    # smoke run
    python -m fastres.bench --levels ops,blocks,models --json out.json

This module holds the cases that benchmarks/ (pytest-benchmark) and the command line share:

* providers: ``fastres-<backend>`` for each backend that can run on the device (on a CPU only torch:
  the Triton interpreter's timings mean nothing), ``eager`` (plain PyTorch; channels_last + autocast
  bf16 on a GPU, like fastres there) and ``compile`` (torch.compile of the eager code);
* op cases over every distinct conv shape of ResNet-50 (:func:`resnet50_conv_shapes`): training forward,
  forward + backward, inference with BN folded, and BN (+ add) (+ ReLU) alone, with the bytes each case
  must move and the FLOPs it must do, for GB/s and TFLOP/s;
* block cases (Bottleneck, BasicBlock; training step and inference) and model cases (ResNet-50 and
  ResNet-18: training step = forward, backward, SGD step; inference).

Timing: every figure is wall time around `reps` calls after `warmup` calls, read with
:func:`sync_timer`, which waits for the GPU first (so it is GPU time plus launch overhead, as a
training loop sees it). CPU figures are CPU figures and are labelled with the device.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def sync_timer() -> float:
    """time.perf_counter() after the GPU has finished queued work (pytest --benchmark-timer)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def environment(device: torch.device) -> dict:
    from fastres.parity import environment as env

    return env(device)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What a benchmark run measures on: device, dtype, sizes and which providers."""

    device: torch.device
    autocast: Optional[torch.dtype]  # bf16 on a GPU, None (fp32) on a CPU
    channels_last: bool
    op_image: int          # ResNet-50 input size the op shapes come from
    op_batch: int
    width_div: int         # op shapes' channels divided by this (1 on a GPU)
    block_image: int
    block_batch: int
    model_image: int
    train_batch: Dict[str, int]
    infer_batches: Tuple[int, ...]
    warmup: int
    reps: int
    compile: str           # "all", "some" or "none": which cases get a torch.compile provider
    providers: List[str] = field(default_factory=list)
    only: Tuple[str, ...] = ()  # keep only cases whose name contains one of these (empty: all)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def fastres_backends(device: torch.device) -> List[str]:
    """fastres backends worth timing on `device`: those available there; on a CPU only torch."""
    from fastres import backend

    if device.type != "cuda":
        return ["torch"]
    return [b for b in ("triton", "cuda", "torch") if backend.available(b)[0]]


def make_setup(device: Optional[str] = None, quick: bool = False, compile: Optional[str] = None) -> Setup:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        s = Setup(dev, torch.bfloat16, True, op_image=224, op_batch=64, width_div=1, block_image=224,
                  block_batch=64, model_image=224, train_batch={"resnet50": 256, "resnet18": 256},
                  infer_batches=(1, 32, 256), warmup=5, reps=20, compile=compile or "all")
        if quick:
            s.op_batch, s.block_batch, s.train_batch = 16, 16, {"resnet50": 32, "resnet18": 32}
            s.infer_batches, s.warmup, s.reps = (1, 32), 2, 5
    else:
        s = Setup(dev, None, False, op_image=64, op_batch=2, width_div=8, block_image=64, block_batch=2,
                  model_image=32, train_batch={"resnet50": 2, "resnet18": 4}, infer_batches=(1, 4, 16),
                  warmup=1, reps=5, compile=compile or "some")
        if quick:
            s.model_image, s.train_batch, s.infer_batches, s.reps = 32, {"resnet50": 2, "resnet18": 2}, (1,), 2
            s.op_image, s.block_image = 32, 32
            s.compile = compile or "none"
    s.providers = [f"fastres-{b}" for b in fastres_backends(dev)] + ["eager", "compile"]
    return s


def setup_from_env() -> Setup:
    """The Setup of a pytest run (benchmarks/): FASTRES_BENCH_DEVICE, FASTRES_BENCH_QUICK=1,
    FASTRES_BENCH_COMPILE=all|some|none, FASTRES_BENCH_PROVIDERS=comma-separated subset,
    FASTRES_BENCH_ONLY=comma-separated substrings of case names to keep (e.g. "train_fwd ,resnet50")."""
    env = os.environ.get
    s = make_setup(env("FASTRES_BENCH_DEVICE") or None, env("FASTRES_BENCH_QUICK") == "1",
                   env("FASTRES_BENCH_COMPILE") or None)
    if env("FASTRES_BENCH_ONLY"):
        s.only = tuple(env("FASTRES_BENCH_ONLY").split(","))
    if env("FASTRES_BENCH_PROVIDERS"):
        s.providers = [p for p in s.providers if p in env("FASTRES_BENCH_PROVIDERS").split(",")]
    return s


def compile_wanted(setup: Setup, representative: bool) -> Optional[str]:
    """None when the compile provider runs this case, else why not (the skip reason)."""
    if setup.compile == "all" or (setup.compile == "some" and representative):
        return None
    if setup.compile == "none":
        return "torch.compile provider off (compile='none'); FASTRES_BENCH_COMPILE / --compile all|some turns it on"
    return ("torch.compile limited to representative cases here (compile='some': compiling every case takes "
            "minutes on a CPU); set FASTRES_BENCH_COMPILE=all (or --compile all) to time every case")


def _ctx(setup: Setup, provider: str):
    """The context a provider's call runs in: its fastres backend, and autocast on a GPU."""
    import contextlib

    import fastres

    stack = contextlib.ExitStack()
    if provider.startswith("fastres-"):
        stack.enter_context(fastres.use_backend(provider.split("-", 1)[1]))
    if setup.autocast is not None:
        stack.enter_context(torch.autocast(setup.device.type, dtype=setup.autocast))
    return stack


_COMPILED: Dict[tuple, Tuple[nn.Module, Callable]] = {}


def compiled_module(key: tuple, module: nn.Module) -> Tuple[nn.Module, Callable]:
    """(module, torch.compile(module)), compiled once per key per process (compiling is the slow part);
    a later call with the same key gets the first module back, so its optimizer steps what runs."""
    if key not in _COMPILED:
        _compiled_eager()  # raises the recompile limit
        _COMPILED[key] = (module, torch.compile(module, dynamic=False))
    return _COMPILED[key]


def _fmt(setup: Setup):
    return torch.channels_last if setup.channels_last else torch.contiguous_format


def _elt(setup: Setup) -> int:
    return 2 if setup.autocast is not None else 4


# ----------------------------------------------------------------------------------------------------
# Op level
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvShape:
    cin: int
    cout: int
    k: int
    stride: int
    pad: int
    h: int
    w: int
    epilogue: str  # "relu" (conv1/conv2, stem), "add_relu" (a block's last conv), "bn" (downsample)

    @property
    def id(self) -> str:
        return f"{self.cin}x{self.h}x{self.w}-{self.cout}k{self.k}s{self.stride}-{self.epilogue}"

    def out_hw(self) -> Tuple[int, int]:
        return ((self.h + 2 * self.pad - self.k) // self.stride + 1, (self.w + 2 * self.pad - self.k) // self.stride + 1)


def resnet50_conv_shapes(image: int = 224, width_div: int = 1) -> List[ConvShape]:
    """Every distinct conv of torchvision's ResNet-50 at `image`x`image` input, with the epilogue its
    BN is followed by; channels divided by `width_div` (not the 3 input channels) for tiny CPU runs."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    epilogue = {}
    for name, m in model.named_modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            for c in ("conv1", "conv2"):
                epilogue[getattr(m, c)] = "relu"
            epilogue[m.conv3] = "add_relu"
            if m.downsample is not None:
                epilogue[m.downsample[0]] = "bn"
    epilogue[model.conv1] = "relu"
    seen: Dict[ConvShape, None] = {}

    def hook(mod, inp, _out):
        x = inp[0]
        d = lambda c: c if c == 3 else max(1, c // width_div)  # noqa: E731
        seen.setdefault(ConvShape(d(mod.in_channels), d(mod.out_channels), mod.kernel_size[0], mod.stride[0],
                                  mod.padding[0], x.shape[2], x.shape[3], epilogue[mod]), None)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image, image))
    for h in hooks:
        h.remove()
    return list(seen)


OP_KINDS = ("train_fwd", "train_fwdbwd", "infer", "bn_act")


def op_cost(kind: str, s: ConvShape, batch: int, elt: int) -> Tuple[int, int]:
    """(bytes, FLOPs) the op must move and compute at least: inputs read once, outputs written once
    (forward+backward: also the gradients read and written; BN statistics need one extra read of z)."""
    ho, wo = s.out_hw()
    nin, nout = batch * s.cin * s.h * s.w, batch * s.cout * ho * wo
    wsz = s.cout * s.cin * s.k * s.k
    flops = 2 * nout * s.cin * s.k * s.k
    res = nout if s.epilogue == "add_relu" else 0
    if kind == "bn_act":  # read z twice (stats, apply), read residual, write y
        return (3 * nout + res) * elt, 0
    if kind == "infer":
        return (nin + wsz + nout + res) * elt, flops
    fwd = nin + wsz + nout + res
    if kind == "train_fwd":
        return fwd * elt, flops
    # backward: read dy, x, w, z (and the saved mask, ignored); write dx, dw (and dres)
    return (fwd + nout + nin + wsz + nout + nin + wsz + res) * elt, 3 * flops


def make_op(kind: str, s: ConvShape, provider: str, setup: Setup, seed: int = 0) -> Callable[[], object]:
    """A zero-argument callable running one op case for `provider` on fresh random inputs."""
    from fastres.ops import conv_bn_act

    dev, fmt = setup.device, _fmt(setup)
    g = torch.Generator(device=dev).manual_seed(seed)  # inputs made on the device: fast for big shapes
    ho, wo = s.out_hw()
    act_dt = torch.float32 if setup.autocast is None else setup.autocast

    def rnd(*shape, dtype=torch.float32, grad=False, layout=True):
        t = torch.randn(*shape, generator=g, device=dev).to(dtype)
        if layout and t.dim() == 4:
            t = t.contiguous(memory_format=fmt)
        return t.requires_grad_(grad)

    train = kind in ("train_fwd", "train_fwdbwd")
    need_grad = kind == "train_fwdbwd"
    # master weights fp32 (autocast casts them); activations in the compute dtype
    x = rnd(setup.op_batch, s.cin, s.h, s.w, dtype=act_dt, grad=need_grad)
    w = rnd(s.cout, s.cin, s.k, s.k).mul_((s.cin * s.k * s.k) ** -0.5).requires_grad_(need_grad)
    gamma, beta = rnd(s.cout, grad=need_grad), rnd(s.cout, grad=need_grad)
    rm, rv = rnd(s.cout), torch.rand(s.cout, generator=g, device=dev).add_(0.5)
    res = rnd(setup.op_batch, s.cout, ho, wo, dtype=act_dt, grad=need_grad) if s.epilogue == "add_relu" else None
    relu = s.epilogue != "bn"
    dy = rnd(setup.op_batch, s.cout, ho, wo, dtype=act_dt)
    inputs = [t for t in (x, w, gamma, beta, res) if t is not None]

    if kind == "bn_act":
        z = rnd(setup.op_batch, s.cout, ho, wo, dtype=act_dt)
        if provider.startswith("fastres-"):
            name = provider.split("-", 1)[1]
            if name == "triton":
                from fastres.kernels import batchnorm as impl
            elif name == "cuda":
                from fastres.backends import cuda as impl
            else:
                raise LookupError("the torch backend has no separate BN op (it runs inside conv_bn_act)")

            def fn():
                mean, invstd = impl.bn_stats(z, rm, rv, 0.1, 1e-5)
                return impl.bn_apply(z, mean, invstd, gamma, beta, res, relu, True)[0]
            return fn
        op = _compiled_eager() if provider == "compile" else eager_op
        return lambda: op("bn_act", z, None, None, gamma, beta, rm, rv, res, 1, 0, relu)

    if kind == "infer":  # eager / compile run the deployed form: BN folded into the conv's weight and bias
        scale = gamma * torch.rsqrt(rv + 1e-5)
        wf, bf = (w * scale[:, None, None, None]).detach(), (beta - rm * scale).detach()
    if provider.startswith("fastres-"):
        def run():
            with _ctx(setup, provider):
                return conv_bn_act(x, w, None, gamma, beta, rm, rv, res, stride=s.stride, padding=s.pad,
                                   training=train, relu=relu)
    else:
        op = _compiled_eager() if provider == "compile" else eager_op
        args = ("infer", x, wf, bf, None, None, None, None) if kind == "infer" else ("train", x, w, None, gamma, beta, rm, rv)

        def run():
            with _ctx(setup, provider):
                return op(*args, res, s.stride, s.pad, relu)

    if kind == "infer":
        def no_grad_run():
            with torch.no_grad():
                return run()
        return no_grad_run
    if kind == "train_fwd":
        return run

    def fwdbwd():
        return torch.autograd.grad(run(), inputs, dy)
    return fwdbwd


def eager_op(kind: str, x: Tensor, w: Optional[Tensor], bias: Optional[Tensor], gamma: Optional[Tensor],
             beta: Optional[Tensor], rm: Optional[Tensor], rv: Optional[Tensor], res: Optional[Tensor],
             stride: int, pad: int, relu: bool) -> Tensor:
    """The eager PyTorch form of an op case: "train" conv + BN (batch statistics), "infer" conv with BN
    folded into (w, bias), "bn_act" BN alone on x; then (+ res) (+ ReLU)."""
    y = x if kind == "bn_act" else F.conv2d(x, w, bias, stride, pad)
    if kind != "infer":
        y = F.batch_norm(y, rm, rv, gamma, beta, True, 0.1, 1e-5)
    y = y if res is None else y + res
    return F.relu(y) if relu else y


_EAGER_COMPILED: List[Callable] = []


def _compiled_eager() -> Callable:
    """torch.compile(eager_op), one per process: dynamo specialises it per shape and kind; the
    recompile limit is raised so that the ~60 op cases do not fall back to eager."""
    if not _EAGER_COMPILED:
        import torch._dynamo.config as dc

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(getattr(dc, name), 512))
        _EAGER_COMPILED.append(torch.compile(eager_op, dynamic=False))
    return _EAGER_COMPILED[0]


# ----------------------------------------------------------------------------------------------------
# Block and model level
# ----------------------------------------------------------------------------------------------------
BLOCKS = {  # name -> (arch, layer path, input channels, input size divisor of the image)
    "bottleneck-layer1.0": ("resnet50", "layer1.0", 64, 4),
    "bottleneck-layer3.1": ("resnet50", "layer3.1", 1024, 16),
    "basic-layer1.0": ("resnet18", "layer1.0", 64, 4),
    "basic-layer2.0": ("resnet18", "layer2.0", 64, 4),
}
FUSED_NAMES = {"resnet18": "FusedResNet18", "resnet34": "FusedResNet34", "resnet50": "FusedResNet50",
               "resnet101": "FusedResNet101", "resnet152": "FusedResNet152"}


def build_model(arch: str, provider: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision's model (eager, compile) or fastres' (fastres-*), with the same weights."""
    import torchvision

    torch.manual_seed(seed)
    ref = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if not provider.startswith("fastres-"):
        return ref
    from fastres.models import resnet

    fused = getattr(resnet, FUSED_NAMES[arch])(num_classes=num_classes)
    fused.load_state_dict(ref.state_dict())
    return fused


def _submodule(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


class _Step:
    """One training step of `module` (forward, loss, backward, SGD step) or one inference call."""

    def __init__(self, module: nn.Module, x: Tensor, target: Optional[Tensor], setup: Setup, provider: str,
                 mode: str, key: tuple):
        self.setup, self.provider, self.mode = setup, provider, mode
        fmt = _fmt(setup)
        module = module.to(setup.device, memory_format=fmt).train(mode == "train")
        self.module, self.fwd = compiled_module(key, module) if provider == "compile" else (module, module)
        self.x, self.target = x.to(setup.device).contiguous(memory_format=fmt), target
        self.opt = (torch.optim.SGD(self.module.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
                    if mode == "train" else None)

    def __call__(self):
        if self.mode != "train":
            with torch.no_grad(), _ctx(self.setup, self.provider):
                return self.fwd(self.x)
        self.opt.zero_grad(set_to_none=True)
        with _ctx(self.setup, self.provider):
            out = self.fwd(self.x)
        if self.target is None:  # a block: a loss that touches every output element
            loss = out.float().square().mean()
        else:
            loss = F.cross_entropy(out.float(), self.target)
        loss.backward()
        self.opt.step()
        return loss


def make_block(name: str, mode: str, provider: str, setup: Setup, seed: int = 0) -> _Step:
    arch, path, cin, div = BLOCKS[name]
    block = copy.deepcopy(_submodule(build_model(arch, provider, seed=seed), path))
    g = torch.Generator().manual_seed(seed)
    hw = setup.block_image // div
    x = torch.randn(setup.block_batch, cin, hw, hw, generator=g)
    if setup.autocast is not None:  # inside a network a block's input is the previous block's output
        x = x.to(setup.autocast)
    return _Step(block, x, None, setup, provider, mode, ("block", name, mode, setup.block_batch))


def make_model(arch: str, mode: str, batch: int, provider: str, setup: Setup, seed: int = 0) -> _Step:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, setup.model_image, setup.model_image, generator=g)
    target = torch.randint(0, 1000, (batch,), generator=g).to(setup.device)
    return _Step(build_model(arch, provider, seed=seed), x, target, setup, provider, mode,
                 ("model", arch, mode, batch))


def peak_memory(fn: Callable, setup: Setup) -> Optional[float]:
    """Peak GPU memory of one call in MiB (None on a CPU, where PyTorch does not track it)."""
    if not setup.gpu:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(setup.device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(setup.device) / 2**20


def measure(fn: Callable, setup: Setup) -> List[float]:
    """Seconds per call, one figure per rep, after `warmup` calls."""
    for _ in range(setup.warmup):
        fn()
    times = []
    for _ in range(setup.reps):
        t0 = sync_timer()
        fn()
        times.append(sync_timer() - t0)
    return times


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One comparison: `make()` builds the callable for `provider`; nbytes / flops / images per call
    turn its time into GB/s, TFLOP/s, images/s. `representative` cases get torch.compile under
    compile="some"."""

    level: str
    name: str
    provider: str
    make: Callable[[], Callable]
    representative: bool = False
    nbytes: int = 0
    flops: int = 0
    images: int = 0

    @property
    def id(self) -> str:
        return f"{self.name}-{self.provider}".replace(" ", "-")

    def skip_reason(self, setup: Setup) -> Optional[str]:
        if self.provider == "compile":
            return compile_wanted(setup, self.representative)
        if self.level == "ops" and self.name.startswith("bn_act") and self.provider == "fastres-torch":
            return "the torch backend has no separate BN op (BN runs inside conv_bn_act)"
        return None

    def rates(self, seconds: float) -> dict:
        out = {}
        if self.nbytes:
            out["GB/s"] = self.nbytes / seconds / 1e9
        if self.flops:
            out["TFLOP/s"] = self.flops / seconds / 1e12
        if self.images:
            out["images/s"] = self.images / seconds
        return out


def cases(setup: Setup, level: str, archs: Tuple[str, ...] = ("resnet50", "resnet18")) -> List[Case]:
    """Every comparison of one level ("ops", "blocks", "models") for every provider of `setup`."""
    out: List[Case] = []
    P = setup.providers
    if level == "models":
        for arch in archs:
            b = setup.train_batch.get(arch, max(setup.train_batch.values()))
            out += [Case(level, f"{arch} train b{b}", p, (lambda a=arch, p=p, b=b: make_model(a, "train", b, p, setup)),
                         False, images=b) for p in P]
            for b in setup.infer_batches:
                rep = setup.gpu and arch == archs[-1] and b == setup.infer_batches[0]  # one compile, on a GPU only
                out += [Case(level, f"{arch} infer b{b}", p, (lambda a=arch, p=p, b=b: make_model(a, "infer", b, p, setup)),
                             rep, images=b) for p in P]
    elif level == "blocks":
        for name in BLOCKS:
            for mode in ("train", "infer"):
                rep = mode == "infer" and name == "basic-layer1.0"
                out += [Case(level, f"{name} {mode}", p, (lambda n=name, m=mode, p=p: make_block(n, m, p, setup)),
                             rep, images=setup.block_batch) for p in P]
    elif level == "ops":
        for i, s in enumerate(resnet50_conv_shapes(setup.op_image, setup.width_div)):
            for kind in OP_KINDS:
                if kind == "bn_act" and s.epilogue != "add_relu":
                    continue
                nbytes, flops = op_cost(kind, s, setup.op_batch, _elt(setup))
                out += [Case(level, f"{kind} {s.id}", p, (lambda k=kind, s=s, p=p: make_op(k, s, p, setup)),
                             i == 0 and kind == "train_fwd", nbytes=nbytes, flops=flops) for p in P]
    else:
        raise ValueError(f"unknown level {level!r}: expected ops, blocks or models")
    return [c for c in out if not setup.only or any(o in c.name for o in setup.only)]


def run_cli(setup: Setup, levels: List[str], archs: List[str], progress: bool = True) -> List[dict]:
    todo = [c for level in levels for c in cases(setup, level, tuple(archs))]
    try:
        from tqdm import tqdm
        todo_it = tqdm(todo, disable=not progress, file=sys.stderr, desc="fastres.bench")
    except ImportError:
        todo_it = todo
    rows = []
    for c in todo_it:
        row = dict(level=c.level, case=c.name, provider=c.provider)
        why = c.skip_reason(setup)
        if why is None:
            try:
                fn = c.make()
                times = measure(fn, setup)
                med = statistics.median(times)
                row.update(median_ms=med * 1e3, min_ms=min(times) * 1e3, peak_mem_mib=peak_memory(fn, setup),
                           **c.rates(med))
            except Exception as e:  # a provider that cannot run a case is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        else:
            row["skipped"] = why
        rows.append(row)
    return rows


def table(rows: List[dict], baseline: str = "eager") -> str:
    """Plain-text table: one line per case and provider, with the speed-up over `baseline`."""
    base = {r["case"]: r.get("median_ms") for r in rows if r["provider"] == baseline}
    head = f"{'case':<46} {'provider':<15} {'median ms':>10} {'rate':>18} {'peak MiB':>9} {'vs ' + baseline:>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['case']:<46} {r['provider']:<15} {'error: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        b = base.get(r["case"])
        ratio = f"{b / r['median_ms']:.2f}x" if b else "-"
        mem = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else "-"
        unit = next((u for u in ("images/s", "GB/s", "TFLOP/s") if u in r), None)
        rate = f"{r[unit]:.1f} {unit}" if unit else "-"
        lines.append(f"{r['case']:<46} {r['provider']:<15} {r['median_ms']:10.3f} {rate:>18} {mem:>9} {ratio:>9}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastres.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (smoke run)")
    p.add_argument("--levels", default="models", help="comma-separated: ops, blocks, models (default models)")
    p.add_argument("--arch", default="resnet50", help="models level: comma-separated archs (resnet18 with --quick)")
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    p.add_argument("--compile", choices=["all", "some", "none"], default=os.environ.get("FASTRES_BENCH_COMPILE"),
                   help="which cases get a torch.compile provider (default: all on a GPU, some on a CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="models level: training batch size")
    p.add_argument("--json", metavar="OUT", default="fastres-bench.json")
    a = p.parse_args(argv)
    setup = make_setup(a.device, a.quick, a.compile)
    if a.batch_size:
        setup.train_batch = {k: a.batch_size for k in setup.train_batch}
    if a.providers:
        wanted = a.providers.split(",")
        unknown = set(wanted) - set(setup.providers)
        if unknown:
            p.error(f"providers {sorted(unknown)} are not available here; available: {setup.providers}")
        setup.providers = wanted
    levels, archs = a.levels.split(","), a.arch.split(",")
    if a.quick and a.arch == p.get_default("arch"):
        archs = ["resnet18"]
    env = environment(setup.device)
    print(f"fastres.bench on {env['device']} ({env['device_type']}), torch {env['torch']}, triton {env['triton']}, "
          f"{'autocast ' + str(setup.autocast) if setup.autocast else 'fp32'}, {env['date']}")
    rows = run_cli(setup, levels, archs)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(environment=env, setup={k: str(v) for k, v in vars(setup).items()}, results=rows), f,
                      indent=1)
        print(f"wrote {a.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
