"""What a benchmark run measures: the :class:`Setup` (device, sizes, memory formats, which comparisons,
how many rounds), for the command line (fastres/bench/cli.py) and the pytest suite (benchmarks/).

Every figure is a comparison, timed in one run: ``(contender, baseline)`` pairs, by default

* ``fastres-<backend>`` vs ``eager``: fastres' model or op against plain PyTorch (torchvision's ResNet-18/50,
  the plain-PyTorch ResNet-20 twin of fastres.parity, nn.Conv2d + nn.BatchNorm2d + nn.ReLU modules,
  F.conv2d + F.batch_norm), same weights, same inputs;
* on a CPU ``fastres-torch+compile`` vs ``compile``: both of them under torch.compile;
* on a CPU, model eval rows only, ``fastres-torch`` vs the inference baselines ``onnxruntime`` (the plain model
  exported to ONNX, run by ONNX Runtime) and ``compile+freezing`` (torch.compile with inductor's freezing):
  fastres/bench/baselines.py;
* on a GPU ``fastres-<backend>`` vs ``compile`` (Inductor, the competitor to beat).

Sizes: on a CPU real CPU sizes (ResNet-18 at 64 px batch 16, ResNet-50 at 64 px batch 8, ResNet-20 at 32 px
batch 32, and ResNet-50 inference at 224 px batch 1; NCHW and channels_last; fp32); on a GPU ResNet-50 /
ResNet-18 at 224 px, channels_last + autocast bf16. Quick mode (``quick=True``, FASTRES_BENCH_QUICK=1, or
CI=true) keeps a CI run short: few rounds, no torch.compile (nor compile+freezing), onnxruntime on the
representative rows only, ResNet-50 in NCHW only and not at 224 px on a CPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn


@dataclass
class ModelSpec:
    """One model row family: `arch` at `image` px, training step at `train_batch` (0: no training row),
    inference (eval mode, no_grad) at each of `infer_batches`, in each of `formats`; `compile_formats`: the
    formats whose rows get the torch.compile pair under compile="some" (and onnxruntime in quick mode)."""

    arch: str
    image: int
    train_batch: int
    infer_batches: Tuple[int, ...]
    formats: Tuple[str, ...]
    compile_formats: Tuple[str, ...] = ()


@dataclass
class Setup:
    """What a benchmark run measures on: device, dtype, sizes, comparisons and repetitions."""

    device: torch.device
    autocast: Optional[torch.dtype]   # bf16 on a GPU, None (fp32) on a CPU
    models: List[ModelSpec]
    pairs: List[Tuple[str, str]]      # (contender, baseline) provider names
    quick: bool = False
    warmup: int = 2                   # untimed calls of each provider before timing
    rounds: int = 10                  # timed rounds; each round times both providers, alternating
    round_s: float = 0.02             # a round repeats the call until it lasts about this long (tiny cases)
    tiny_rounds: int = 15             # rounds of a row whose call is shorter than round_s (cheap, and noisier)
    compile: str = "some"             # "all", "some" or "none": which rows get the torch.compile pair
    host_batch: Tuple[int, int, int] = (2, 8, 4)  # per-op host-overhead row: batch, channels, size
    op_shapes: bool = False           # ResNet-50 conv shapes at the op level (on by default on a GPU)
    op_image: int = 224
    op_batch: int = 64
    width_div: int = 1                # op shapes' channels divided by this (tests)
    block_image: int = 224
    block_batch: int = 64
    block_formats: Tuple[str, ...] = ("channels_last",)
    only: Tuple[str, ...] = ()        # keep only rows whose name contains one of these (empty: all)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def providers(self) -> List[str]:
        return list(dict.fromkeys(p for pair in self.pairs for p in pair))

    def model(self, arch: str, image: Optional[int] = None) -> Optional[ModelSpec]:
        return next((m for m in self.models if m.arch == arch and image in (None, m.image)), None)


def fastres_backends(device: torch.device) -> List[str]:
    """fastres backends worth timing on `device`: those available there; on a CPU only torch (the Triton
    interpreter's timings mean nothing)."""
    from fastres import backend

    if device.type != "cuda":
        return ["torch"]
    return [b for b in ("triton", "cuda", "torch") if backend.available(b)[0]]


def quick_requested() -> bool:
    """FASTRES_BENCH_QUICK=1, or CI=true without FASTRES_BENCH_QUICK=0."""
    flag = os.environ.get("FASTRES_BENCH_QUICK")
    if flag is not None and flag != "":
        return flag == "1"
    return os.environ.get("CI", "").lower() in ("true", "1")


def make_setup(device: Optional[str] = None, quick: bool = False, compile: Optional[str] = None) -> Setup:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = fastres_backends(dev)
    if dev.type == "cuda":
        cl = ("channels_last",)
        models = [ModelSpec("resnet50", 224, 256, (1, 32, 256), cl, cl),
                  ModelSpec("resnet18", 224, 256, (1, 32, 256), cl)]
        pairs = [(f"fastres-{b}", base) for base in ("eager", "compile") for b in backends]
        # CUDA graphs: the whole training step replayed (fastres.GraphedStep), fastres and torchvision alike
        pairs += [(f"fastres-{b}+graphs", GRAPHS) for b in backends]
        s = Setup(dev, torch.bfloat16, models, pairs, quick, warmup=5, rounds=20, round_s=1e-3,
                  compile=compile or "all", op_shapes=True)
        if quick:
            for m in s.models:
                m.train_batch, m.infer_batches = 32, (1, 32)
            s.op_batch, s.block_batch, s.warmup, s.rounds = 16, 16, 2, 5
        return s
    both = ("nchw", "channels_last")
    models = [ModelSpec("resnet18", 64, 16, (16,), both, both),
              ModelSpec("resnet50", 64, 8, (8,), both),
              ModelSpec("resnet20", 32, 32, (32,), both, ("nchw",)),
              ModelSpec("resnet50", 224, 0, (1,), both),   # inference only: one image at ImageNet size
              ModelSpec("resnet18", 224, 0, (1,), both)]
    # fastres-torch+frozen: eval inside fastres.frozen (BatchNorm folded once, oneDNN prepacking), model rows;
    # onnxruntime and compile+freezing: inference baselines, model eval rows (fastres/bench/baselines.py)
    # frozen against the inference baselines directly too: the comparison a CPU server would make
    pairs = [("fastres-torch", "eager"), ("fastres-torch+frozen", "eager"), ("fastres-torch+compile", "compile"),
             ("fastres-torch", "onnxruntime"), ("fastres-torch", "compile+freezing"),
             ("fastres-torch+frozen", "onnxruntime"), ("fastres-torch+frozen", "compile+freezing")]
    s = Setup(dev, None, models, pairs, quick, warmup=2, rounds=10, compile=compile or "some", op_image=64,
              op_batch=8, block_image=64, block_batch=16, block_formats=both)
    if quick:
        s.warmup, s.rounds, s.compile = 1, 3, compile or "none"
        s.models[1].formats = ("nchw",)
        s.models = [m for m in s.models if m.image <= 64]
    return s


def setup_from_env() -> Setup:
    """The Setup of a pytest run (benchmarks/): FASTRES_BENCH_DEVICE, FASTRES_BENCH_QUICK=1 (or CI=true),
    FASTRES_BENCH_COMPILE=all|some|none, FASTRES_BENCH_PROVIDERS=comma-separated contenders and baselines to
    keep, FASTRES_BENCH_ONLY=comma-separated substrings of row names to keep (e.g. "train_fwd ,resnet50"),
    FASTRES_BENCH_ROUNDS=N, FASTRES_BENCH_OP_SHAPES=1 (ResNet-50 conv shapes on a CPU too)."""
    env = os.environ.get
    s = make_setup(env("FASTRES_BENCH_DEVICE") or None, quick_requested(), env("FASTRES_BENCH_COMPILE") or None)
    if env("FASTRES_BENCH_ONLY"):
        s.only = tuple(env("FASTRES_BENCH_ONLY").split(","))
    if env("FASTRES_BENCH_PROVIDERS"):
        keep = env("FASTRES_BENCH_PROVIDERS").split(",")
        s.pairs = [pr for pr in s.pairs if pr[0] in keep and pr[1] in keep]
    if env("FASTRES_BENCH_ROUNDS"):
        s.rounds = int(env("FASTRES_BENCH_ROUNDS"))
    if env("FASTRES_BENCH_OP_SHAPES") == "1":
        s.op_shapes = True
    return s


def compile_wanted(setup: Setup, representative: bool) -> Optional[str]:
    """None when the torch.compile pair runs this row, else why not (the skip reason)."""
    if setup.compile == "all" or (setup.compile == "some" and representative):
        return None
    if setup.compile == "none":
        return ("torch.compile pair off (compile='none', the quick/CI mode); FASTRES_BENCH_COMPILE=some|all "
                "or --compile some|all turns it on")
    return ("torch.compile limited to representative rows (compile='some': compiling every row takes minutes "
            "on a CPU); FASTRES_BENCH_COMPILE=all or --compile all times every row")


GRAPHS = "graphs"   # the plain model's training step captured in one CUDA graph (fastres.GraphedStep)


def is_graphed(provider: str) -> bool:
    """Providers whose training step replays a CUDA graph: ``graphs``, ``fastres-<backend>+graphs``."""
    return provider == GRAPHS or provider.endswith("+graphs")


def is_fastres(provider: str) -> bool:
    return provider.startswith("fastres-")


def is_compiled(provider: str) -> bool:
    """Providers whose module runs under a plain torch.compile (compile+freezing compiles in its own Step)."""
    return provider == "compile" or provider.endswith("+compile")


def backend_of(provider: str) -> str:
    """"fastres-triton+compile" -> "triton" (and "fastres-torch+frozen" -> "torch")."""
    return provider.split("-", 1)[1].split("+", 1)[0]


def provider_context(setup: Setup, provider: str):
    """The context a provider's call runs in: its fastres backend, and autocast on a GPU."""
    import fastres

    stack = contextlib.ExitStack()
    if is_fastres(provider):
        stack.enter_context(fastres.use_backend(backend_of(provider)))
    if setup.autocast is not None:
        stack.enter_context(torch.autocast(setup.device.type, dtype=setup.autocast))
    return stack


def raise_recompile_limit() -> None:
    """Many rows compile the same forward code (one model class, several instances, formats and modes):
    raise dynamo's per-code recompile limit so that none falls back to eager."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 512))


def compiled(fn: Callable) -> Callable:
    raise_recompile_limit()
    return torch.compile(fn, dynamic=False)


def memory_format(fmt: str) -> torch.memory_format:
    return {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[fmt]


def elt_size(setup: Setup) -> int:
    return 2 if setup.autocast is not None else 4


def copy_weights(dst: nn.Module, src: nn.Module, rename: Optional[Dict[str, str]] = None) -> nn.Module:
    """dst gets src's parameters and buffers (strict: every key must match), so both run the same math."""
    state = src.state_dict()
    if rename:
        state = {rename.get(k, k): v for k, v in state.items()}
    dst.load_state_dict(state, strict=True)
    return dst


__all__ = ["ModelSpec", "Setup", "make_setup", "setup_from_env", "quick_requested", "compile_wanted",
           "fastres_backends", "provider_context", "compiled", "memory_format"]
