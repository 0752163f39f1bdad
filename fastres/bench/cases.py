"""The benchmark rows: every comparison of one level ("models", "blocks", "ops") that a Setup asks for.

A :class:`Case` is one row: a contender (``fastres-<backend>``, ``fastres-<backend>+compile``) and the
baseline it is compared to (``eager``, ``compile``), both built on the same weights and inputs and timed
in the same run, alternately (fastres/bench/timing.py). Row names:

* models: ``resnet18 train b16 64px nchw``, ``resnet50 infer b8 64px channels_last`` ...;
* blocks: ``basic-layer1.0 train b16 64px nchw`` ...;
* ops: ``host conv3x3-bn-relu 2x8x4x4 fwd`` (the per-op host-overhead row), and where the Setup asks for
  them ResNet-50's conv shapes, ``<kind> <Cin>x<H>x<W>-<Cout>k<k>s<stride>-<epilogue>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from fastres.bench.baselines import EVAL_ONLY, FREEZING, ORT, onnx_missing
from fastres.bench.config import Setup, compile_wanted, elt_size, is_compiled, is_fastres, is_graphed
from fastres.bench.models import BLOCKS, make_block, make_model
from fastres.bench.ops import HOST_KINDS, OP_KINDS, make_host, make_op, op_cost, resnet50_conv_shapes

LEVELS = ("models", "blocks", "ops")
CPU_BLOCKS_QUICK = ("bottleneck-layer1.0", "basic-layer1.0")


@dataclass
class Case:
    """One row: `build(provider)` makes the zero-argument callable of `provider` for this row; nbytes, flops
    and images per call turn a time into GB/s, TFLOP/s, images/s. `representative` rows get the
    torch.compile pair under compile="some"."""

    level: str
    name: str
    provider: str
    baseline: str
    build: Callable[[str], Callable[[], object]]
    representative: bool = False
    nbytes: int = 0
    flops: int = 0
    images: int = 0

    @property
    def settle(self) -> int:
        """Untimed calls before each timed round (fastres/bench/timing.py): 1 where onnxruntime's thread pool
        and torch's take turns, else 0."""
        return 1 if ORT in (self.provider, self.baseline) else 0

    @property
    def id(self) -> str:
        return f"{self.name}-{self.provider}-vs-{self.baseline}".replace(" ", "-")

    def skip_reason(self, setup: Setup) -> Optional[str]:
        eval_row = self.level == "models" and " infer " in f" {self.name} "
        if self.provider.endswith("+frozen") and not eval_row:
            return "fastres.frozen is an inference mode: model-level eval rows only"
        pair = (self.provider, self.baseline)
        if any(is_graphed(p) for p in pair) and not (setup.gpu and self.level == "models"
                                                     and " train " in f" {self.name} "):
            return "CUDA graphs (fastres.GraphedStep): model-level training rows on a GPU only"
        for p in pair:
            if p in EVAL_ONLY and not (eval_row and not setup.gpu):
                return f"{p} is a CPU inference baseline: model-level eval rows on a CPU only"
        if is_compiled(self.provider) or is_compiled(self.baseline) or FREEZING in pair:
            # compile+freezing compiles one forward graph (seconds): every eval row unless compile='none'
            why = compile_wanted(setup, self.representative or FREEZING in pair)
            if why is not None:
                return why
        if ORT in pair:
            why = onnx_missing()
            if why is None and setup.quick and not self.representative:
                why = ("onnxruntime limited to the representative rows in quick mode (an export each); "
                       "FASTRES_BENCH_QUICK=0 times every eval row")
            if why is not None:
                return why
        if self.level == "ops" and not self.name.startswith("host"):
            if self.name.startswith("bn_act") and self.provider == "fastres-torch":
                return "the torch backend has no separate BN op (BN runs inside conv_bn_act)"
            if is_fastres(self.provider) and is_compiled(self.provider):
                return ("no torch.compile form of the fastres conv-shape op cases "
                        "(models, blocks and host rows have one)")
        return None

    def make_pair(self) -> Tuple[Callable[[], object], Callable[[], object]]:
        """(contender, baseline) callables, built now (compiling happens on their first call)."""
        return self.build(self.provider), self.build(self.baseline)

    def rates(self, seconds: float) -> dict:
        out = {}
        if self.nbytes:
            out["GB/s"] = self.nbytes / seconds / 1e9
        if self.flops:
            out["TFLOP/s"] = self.flops / seconds / 1e12
        if self.images:
            out["images/s"] = self.images / seconds
        return out


def _rows(setup: Setup, level: str, archs: Optional[Sequence[str]]):
    """(name, build, representative, nbytes, flops, images) for each row of `level`, before the pairs."""
    if level == "models":
        for spec in setup.models:
            if archs and spec.arch not in archs:
                continue
            for fmt in spec.formats:
                rep = fmt in spec.compile_formats
                train = (spec.train_batch,) if spec.train_batch else ()
                for mode, batches in (("train", train), ("infer", spec.infer_batches)):
                    for b in batches:
                        yield (f"{spec.arch} {mode} b{b} {spec.image}px {fmt}",
                               lambda p, a=spec.arch, m=mode, b=b, i=spec.image, f=fmt:
                                   make_model(a, m, b, p, setup, image=i, fmt=f),
                               rep, 0, 0, b)
    elif level == "blocks":
        names = CPU_BLOCKS_QUICK if setup.quick and not setup.gpu else tuple(BLOCKS)
        formats = setup.block_formats[:1] if setup.quick else setup.block_formats
        for name in names:
            for fmt in formats:
                for mode in ("train", "infer"):
                    rep = name == "basic-layer1.0" and fmt == formats[0]
                    yield (f"{name} {mode} b{setup.block_batch} {setup.block_image}px {fmt}",
                           lambda p, n=name, m=mode, f=fmt: make_block(n, m, p, setup, fmt=f),
                           rep, 0, 0, setup.block_batch)
    elif level == "ops":
        n, c, hw = setup.host_batch
        for kind in HOST_KINDS:
            yield (f"host conv3x3-bn-relu {n}x{c}x{hw}x{hw} {kind}", lambda p, k=kind: make_host(k, p, setup),
                   kind == "fwd", 0, 0, 0)
        if setup.op_shapes:
            for i, s in enumerate(resnet50_conv_shapes(setup.op_image, setup.width_div)):
                for kind in OP_KINDS:
                    if kind == "bn_act" and s.epilogue != "add_relu":
                        continue
                    nbytes, flops = op_cost(kind, s, setup.op_batch, elt_size(setup))
                    yield (f"{kind} {s.id}", lambda p, k=kind, s=s: make_op(k, s, p, setup),
                           i == 0 and kind == "train_fwd", nbytes, flops, 0)
    else:
        raise ValueError(f"unknown level {level!r}: expected one of {', '.join(LEVELS)}")


def cases(setup: Setup, level: str, archs: Optional[Sequence[str]] = None) -> List[Case]:
    """Every comparison of one level for every (contender, baseline) pair of `setup`; `archs` limits the
    models level to those architectures."""
    out: List[Case] = []
    for name, build, rep, nbytes, flops, images in _rows(setup, level, archs):
        if setup.only and not any(o in name for o in setup.only):
            continue
        out += [Case(level, name, p, b, build, rep, nbytes, flops, images) for p, b in setup.pairs]
    return out
