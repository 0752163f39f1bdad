"""Training parity: a fused model and its plain-PyTorch twin, trained side by side from one seed.

    python -m fastres.parity --arch resnet20 --steps 200 --backend triton --device cuda
    python -m fastres.parity --arch resnet50 --image-size 224 --batch-size 32 --dtype bf16 --steps 50

Three runs see the same initial weights and the same synthetic batches, and train with SGD (momentum
0.9, weight decay 1e-4) and cross-entropy:

* ``fused``     - the fastres model (fastres.models) on the chosen backend, in the chosen dtype;
* ``reference`` - its twin that never touches fastres code: torchvision's ResNet for the ImageNet
  archs, :class:`CifarReference` (below) for the CIFAR archs; same dtype;
* ``oracle``    - the reference twin again, computed more exactly: float64 for an fp32 run, fp32 with
  TF32 off for a bf16 (autocast) run.

How the tolerances are justified: training amplifies rounding differences step after step, so no
fixed epsilon fits every arch, depth and step count. The reference run's distance from the oracle
measures how far correct PyTorch code drifts through rounding alone in this very run. A correct fused
implementation rounds differently but not worse, so we require, for each compared quantity,

    error(fused vs oracle) <= FACTOR * error(reference vs oracle) + floor

with FACTOR = 2 (the house rule of tests/numerics.py: a fused result may be at most about twice PyTorch's own
same-dtype error) and a floor of a few fp32 units in the last place (the loss, the parameters and
the running statistics are fp32 in every run, bf16 autocast included), for quantities whose reference
error happens to be near zero. Compared: the loss at every step (the worst step),
every parameter tensor and every running_mean / running_var buffer (relative L2 error), and
num_batches_tracked (exactly). A real bug (a wrong gradient, a wrong momentum) shows up as an error
many times the rounding drift; tests/test_parity.py proves the check catches two such bugs.

A limit of the method, measured: training on small batches is chaotic. On a CPU, resnet20 at batch 8,
16x16 images, the fp32-vs-float64 loss gap grows from 1e-7 to about 1e-3 within 10 steps and the
parameters of the two runs decorrelate within 30 (lr 0.002 to 0.05 alike). Once the reference itself
has drifted by O(1), the ratio test can only catch bugs that change training statistically (the loss
curve), not small ones. Each check therefore records whether it was still informative (reference
error below SATURATED); the report counts the saturated ones, and the tests use short runs where
none is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.bench.environment import environment, summary_line
from fastres.kernels.cli import OneLineParser as _Parser
from fastres.models.registry import get_model, list_models, model_info

Tensor = torch.Tensor

FACTOR = 2.0
# floors, in units of fp32's machine epsilon (1.2e-7)
LOSS_FLOOR_ULPS = 8.0
TENSOR_FLOOR_ULPS = 4.0
SATURATED = 0.1  # relative reference error above which a check no longer detects small bugs

# From the model registry: every CIFAR net (its reference twin is CifarReference below) and every
# ImageNet net that torchvision builds too (the twin).
CIFAR_ARCHS = {n: (model_info(n).depth, model_info(n).shortcut) for n in list_models("cifar")}
IMAGENET_ARCHS = {n: model_info(n).torchvision for n in list_models("imagenet") if model_info(n).torchvision}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# The plain-PyTorch CIFAR twin (paper section 4.2), state_dict keys identical to fastres.models.cifar.
# ----------------------------------------------------------------------------------------------------
class _RefBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, shortcut: Optional[str]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut, self.stride, self.planes = shortcut, stride, planes
        changes = stride != 1 or inplanes != planes
        self.downsample = None
        if shortcut == "B" and changes or shortcut == "C":
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def _residual(self, x: Tensor) -> Optional[Tensor]:
        if self.shortcut is None:
            return None
        if self.downsample is not None:
            return self.downsample(x)
        # option A: every stride-th pixel, zero channels appended at the end
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.planes - x.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        res = self._residual(x)
        return F.relu(out if res is None else out + res)


class CifarReference(nn.Module):
    """The 6n+2-layer CIFAR ResNet (or plain net, shortcut=None) in plain PyTorch, the parity twin of
    fastres.models.cifar.CifarResNet: same module names, so state_dicts load both ways."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: Optional[str] = "A") -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes_in, layers = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_RefBlock(planes_in, planes, stride if i == 0 else 1, shortcut))
                planes_in = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_pair(arch: str, num_classes: int = 10, seed: int = 0) -> Tuple[nn.Module, nn.Module]:
    """(fused model, reference twin) with identical weights and buffers, both in fp32 on the CPU."""
    torch.manual_seed(seed)
    if arch in CIFAR_ARCHS:
        depth, shortcut = CIFAR_ARCHS[arch]
        fused = get_model(arch, num_classes=num_classes)
        ref = CifarReference(depth, num_classes, shortcut)
        ref.load_state_dict(fused.state_dict(), strict=True)
    elif arch in IMAGENET_ARCHS:
        import torchvision

        ref = getattr(torchvision.models, IMAGENET_ARCHS[arch])(weights=None, num_classes=num_classes)
        fused = get_model(arch, num_classes=num_classes)
        fused.load_state_dict(ref.state_dict(), strict=True)
    else:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join([*CIFAR_ARCHS, *IMAGENET_ARCHS])}")
    return fused, ref


# ----------------------------------------------------------------------------------------------------
# Data and training
# ----------------------------------------------------------------------------------------------------
def synthetic_batches(steps: int, batch_size: int, image_size: int, num_classes: int, seed: int
                      ) -> List[Tuple[Tensor, Tensor]]:
    """`steps` (images, labels) batches on the CPU: Gaussian noise plus a per-class pattern, so that
    the loss has something to learn (it falls) and every step's inputs are fresh and non-trivial."""
    g = torch.Generator().manual_seed(seed + 1)
    patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)
    out = []
    for _ in range(steps):
        y = torch.randint(0, num_classes, (batch_size,), generator=g)
        x = torch.randn(batch_size, 3, image_size, image_size, generator=g) + patterns[y]
        out.append((x, y))
    return out


def train(model: nn.Module, batches, *, device: torch.device, dtype: torch.dtype, autocast: Optional[torch.dtype],
          lr: float, channels_last: bool = False) -> List[float]:
    """Train `model` in place on `batches` (SGD, momentum 0.9, weight decay 1e-4); the loss of every step.
    `dtype` is the parameter/input dtype; `autocast` a lower compute dtype (bf16) or None."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, dtype=dtype, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    losses = []
    for x, y in batches:
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        y = y.to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(x)
        loss = F.cross_entropy(out.to(dtype), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().to("cpu", torch.float64) if v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()}


class _NoTF32:
    """fp32 means fp32: TF32 off for matmuls and cuDNN convolutions while a parity run trains."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# Reference and oracle runs do not depend on the fastres backend: cached, so that comparing several
# backends in one process trains them once.
_CACHE: Dict[tuple, dict] = {}


def _twin_runs(key: tuple, ref_init: nn.Module, batches, device, dtype: str, lr: float, channels_last: bool,
               oracle: bool) -> dict:
    if key in _CACHE:
        return _CACHE[key]
    import copy

    runs = {}
    with _NoTF32():
        ref = copy.deepcopy(ref_init)
        runs["reference"] = (train(ref, batches, device=device, dtype=torch.float32,
                                   autocast=DTYPES[dtype] if dtype != "fp32" else None, lr=lr,
                                   channels_last=channels_last), _state(ref))
        if oracle:
            odt = torch.float64 if dtype == "fp32" else torch.float32
            orc = copy.deepcopy(ref_init)
            runs["oracle"] = (train(orc, batches, device=device, dtype=odt, autocast=None, lr=lr), _state(orc))
    _CACHE[key] = runs
    return runs


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(fused: Tuple[List[float], Dict[str, Tensor]], ref: Tuple[List[float], Dict[str, Tensor]],
            oracle: Tuple[List[float], Dict[str, Tensor]], eps: float, factor: float = FACTOR) -> dict:
    """The checks described in the module docstring. Returns {"passed", "checks": [...]}; each check
    has name, fused_err, reference_err, limit, ok."""
    checks = []

    def check(name, fe, re_, floor):
        limit = factor * re_ + floor
        checks.append(dict(name=name, fused_err=fe, reference_err=re_, limit=limit, ok=bool(fe <= limit),
                           saturated=bool(re_ > SATURATED)))

    (lf, sf), (lr_, sr), (lo, so) = fused, ref, oracle
    scale = max(1.0, max(abs(v) for v in lo))
    check("loss (worst step, abs)", max(abs(a - b) for a, b in zip(lf, lo)),
          max(abs(a - b) for a, b in zip(lr_, lo)), LOSS_FLOOR_ULPS * eps * scale)
    for k in so:
        if not so[k].is_floating_point():
            same = torch.equal(sf[k], so[k])
            checks.append(dict(name=k, fused_err=0.0 if same else 1.0, reference_err=0.0, limit=0.0, ok=same))
            continue
        check(k, _rel(sf[k], so[k]), _rel(sr[k], so[k]), TENSOR_FLOOR_ULPS * eps)
    finite = all(math.isfinite(v) for v in lf)
    if not finite:
        checks.append(dict(name="fused loss finite", fused_err=1.0, reference_err=0.0, limit=0.0, ok=False))
    return {"passed": all(c["ok"] for c in checks), "checks": checks,
            "saturated": sum(bool(c.get("saturated")) for c in checks)}


def run(arch: str = "resnet20", steps: int = 10, batch_size: int = 8, image_size: int = 32, dtype: str = "fp32",
        backend: str = "torch", device: str = "cpu", lr: float = 0.02, num_classes: int = 10, seed: int = 0,
        channels_last: Optional[bool] = None,
        perturb: Optional[Callable[[nn.Module], None]] = None) -> dict:
    """Train fused, reference and oracle; return the per-step losses, the comparison and the context.
    `perturb(fused_model)` is a hook for tests that plant a bug and check that parity catches it."""
    import fastres
    from fastres import backend as fb

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    dev = torch.device(device)
    if channels_last is None:
        channels_last = dev.type == "cuda"
    fused, ref_init = build_pair(arch, num_classes, seed)
    if perturb is not None:
        perturb(fused)
    batches = synthetic_batches(steps, batch_size, image_size, num_classes, seed)
    key = (arch, steps, batch_size, image_size, dtype, str(dev), lr, num_classes, seed, channels_last)
    twins = _twin_runs(key, ref_init, batches, dev, dtype, lr, channels_last, oracle=True)

    before = dict(fb.calls)
    with _NoTF32(), fastres.use_backend(backend):
        losses = train(fused, batches, device=dev, dtype=torch.float32,
                       autocast=DTYPES[dtype] if dtype != "fp32" else None, lr=lr, channels_last=channels_last)
    calls = {"/".join(k): v - before.get(k, 0) for k, v in fb.calls.items() if v != before.get(k, 0)}
    eps = torch.finfo(torch.float32).eps  # loss, parameters and running statistics are fp32 in every run
    result = compare((losses, _state(fused)), twins["reference"], twins["oracle"], eps)
    result.update(
        config=dict(arch=arch, steps=steps, batch_size=batch_size, image_size=image_size, dtype=dtype,
                    backend=backend, device=str(dev), lr=lr, num_classes=num_classes, seed=seed,
                    channels_last=channels_last, factor=FACTOR, loss_floor_ulps=LOSS_FLOOR_ULPS,
                    tensor_floor_ulps=TENSOR_FLOOR_ULPS,
                    oracle="float64" if dtype == "fp32" else "float32 (TF32 off)"),
        losses={"fused": losses, "reference": twins["reference"][0], "oracle": twins["oracle"][0]},
        calls=calls, environment=environment(dev))
    return result


def report(result: dict) -> str:
    """A human-readable summary: the worst checks first."""
    cfg = result["config"]
    lines = [f"parity {cfg['arch']} {cfg['dtype']} backend={cfg['backend']} device={cfg['device']} "
             f"steps={cfg['steps']} batch={cfg['batch_size']} image={cfg['image_size']}: "
             f"{'PASSED' if result['passed'] else 'FAILED'}",
             f"  fastres calls: {result['calls']}",
             f"  on {summary_line(result['environment'])}" if "environment" in result else "  on ?",
             f"  {'check':<40} {'fused err':>11} {'ref err':>11} {'limit':>11}  ratio"]
    worst = sorted(result["checks"], key=lambda c: -c["fused_err"] / max(c["limit"], 1e-300))
    for c in worst[:12]:
        ratio = c["fused_err"] / max(c["reference_err"], 1e-300) if c["reference_err"] else float("nan")
        lines.append(f"  {'' if c['ok'] else '!'}{c['name']:<40} {c['fused_err']:11.3e} {c['reference_err']:11.3e} "
                     f"{c['limit']:11.3e}  {ratio:.2f}")
    lf, lr_ = result["losses"]["fused"], result["losses"]["reference"]
    lines.append(f"  loss: first {lf[0]:.5f} last {lf[-1]:.5f} (reference {lr_[-1]:.5f}), "
                 f"{len(result['checks'])} checks, {result['saturated']} saturated (reference error > "
                 f"{SATURATED}: chaotic drift, these only catch gross bugs)")
    return "\n".join(lines)



def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Everything a run would otherwise trip over with a traceback, as one line (p.error)."""
    from fastres import backend as fb

    for name in ("steps", "batch_size", "num_classes"):
        low = 2 if name != "steps" else 1
        if getattr(a, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(a, name)}")
    if a.image_size is not None and a.image_size < 4:
        p.error(f"--image-size must be at least 4, got {a.image_size}")
    if not a.lr > 0 or not math.isfinite(a.lr):
        p.error(f"--lr must be a positive number, got {a.lr}")
    try:
        dev = torch.device(a.device)
    except (RuntimeError, ValueError):
        p.error(f"--device: {a.device!r} is not a device (cpu, cuda, cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA GPU is available here")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {a.device}: expected cpu or cuda")
    try:
        with fb.use_backend(a.backend):
            fb.resolve("conv_bn_act", dev)
    except (ValueError, fb.BackendUnavailableError) as e:
        p.error(f"--backend {a.backend}: {e}")


def main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog="python -m fastres.parity", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet20", choices=[n for n in list_models() if n in CIFAR_ARCHS
                                                          or n in IMAGENET_ARCHS],
                   help="the net (from fastres.models' registry; default resnet20)")
    p.add_argument("--steps", type=int, default=20, help="training steps of each run (default 20)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--image-size", type=int, default=None, help="default 32 (CIFAR archs) or 224")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16 = autocast, fp32 master weights")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "torch"],
                   help="fastres backend of the fused run (default auto: the best one for --device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (default 0.02)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic data (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights and data (default 0)")
    p.add_argument("--json", metavar="OUT", help="write the full result (per-step losses, checks) here")
    a = p.parse_args(argv)
    if a.backend == "triton" and a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    _check_args(p, a)
    image = a.image_size or (32 if a.arch in CIFAR_ARCHS else 224)
    result = run(a.arch, a.steps, a.batch_size, image, a.dtype, a.backend, a.device, a.lr, a.num_classes, a.seed)
    print(report(result))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
