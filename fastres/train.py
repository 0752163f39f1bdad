"""Train a fused ResNet: ``python -m fastres.train`` (see ``--help``).

With no arguments it trains the paper's ResNet-20 on scikit-learn's bundled handwritten digits (no
download) in a few minutes on a CPU. Under ``torchrun`` it trains with DistributedDataParallel
(nccl on GPUs, gloo on CPUs). ``--experiment degradation`` redraws the paper's Figure 6: plain nets
get worse with depth, ResNets do not.

Every epoch it writes to --out: log.csv (one row per epoch), curves.png (train and test error) and
checkpoint.pt (written to a temporary file, then renamed over the old one, so a crash never leaves
a half-written checkpoint). A user error (unknown arch, missing data, batch size 1, an --out that
cannot be written, an --out that already holds a checkpoint) stops with a one-line message and exit
status 2 before anything is written.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

import fastres
from fastres import data as fdata

log = logging.getLogger("fastres.train")

CIFAR_ARCHS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
               "plain20", "plain32", "plain44", "plain56", "plain110"]
IMAGENET_ARCHS = {"resnet18": "FusedResNet18", "resnet34": "FusedResNet34", "resnet50": "FusedResNet50",
                  "resnet101": "FusedResNet101", "resnet152": "FusedResNet152",
                  "plain18": "plain18", "plain34": "plain34"}
ARCHS = CIFAR_ARCHS + list(IMAGENET_ARCHS)
# Per data set: epochs, batch size (per process).
DEFAULTS = {"digits": (10, 64), "cifar10": (164, 128), "imagefolder": (90, 64), "synthetic": (1, 64)}
DEGRADATION_ARCHS = ("plain20", "plain56", "resnet20", "resnet56")
CSV_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "seconds", "images_per_s"]


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


# ----------------------------------------------------------------------------------------- arguments
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastres.train",
        description="Train a ResNet with fastres's fused conv + BatchNorm (+ add) (+ ReLU) layers. "
                    "With no arguments: ResNet-20 on scikit-learn's handwritten digits, a few minutes "
                    "on a CPU. Several processes: torchrun --nproc_per_node N -m fastres.train ...",
        epilog="The schedule is the paper's: SGD, momentum 0.9, weight decay 1e-4, lr divided by 10 at "
               "50% and 75% of training. Outputs in --out: log.csv, curves.png, checkpoint.pt.")
    p.add_argument("--arch", default="resnet20", metavar="ARCH",
                   help=f"the model (default resnet20): {', '.join(ARCHS)} (resnet18..152 are "
                        "fastres.FusedResNetXX)")
    p.add_argument("--data", default="digits", choices=fdata.DATASETS,
                   help="(default digits) digits: scikit-learn's bundled 8x8 digits, resized (no download); cifar10: the "
                        "python pickle batches in --data-dir; imagefolder: --data-dir/train/<class>/*.png "
                        "and val/ (or one class-per-folder tree, split 80/20); synthetic: random tensors")
    p.add_argument("--data-dir", default=None, help="folder of the cifar10 or imagefolder data")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images to this size (default: digits 16, imagefolder 224, synthetic 32)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="use only N training images")
    p.add_argument("--epochs", type=int, default=None,
                   help="default per data set: " + ", ".join(f"{k} {v[0]}" for k, v in DEFAULTS.items()))
    p.add_argument("--batch-size", type=int, default=None,
                   help="per process; default per data set: " + ", ".join(f"{k} {v[1]}" for k, v in DEFAULTS.items()))
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default 0.1, the paper's; --experiment degradation on digits: "
                        "0.02, as 0.1 blows the 56-layer nets up in the few hundred steps the digits give)")
    p.add_argument("--warmup-epochs", type=int, default=0, metavar="E",
                   help="train the first E epochs at lr/10, as the paper warms ResNet-110 up for about 400 "
                        "steps, one CIFAR-10 epoch (default 0)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="(default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and augmentation (default 0)")
    p.add_argument("--backend", default="auto", choices=fastres.backend.BACKENDS,
                   help="fused-op backend (default auto: torch on CPU, the fastest built one on GPUs)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="(default auto) auto: CUDA when available (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process. Default: PyTorch's choice divided by the processes on this "
                        "machine, or 1 when the CPU is already busy (load average at least its core count: "
                        "competing OpenMP threads can be ten times slower than one)")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16"), help="autocast dtype (default: fp32)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true",
                   help="convert BatchNorm to SyncBatchNorm (needs GPUs). NOTE: while training across "
                        "several processes, fastres then runs each conv and SyncBatchNorm UNFUSED "
                        "(exact, but without the fused kernels); evaluation stays fused")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: 0 for in-memory data, 4 for imagefolder)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<arch>-<data>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out/checkpoint.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even though --out already holds a checkpoint (it is replaced)")
    p.add_argument("--experiment", choices=("degradation",), default=None,
                   help="degradation: train plain20, plain56, resnet20, resnet56 and plot their errors side "
                        "by side (the paper's Figure 6) in --out (default runs/degradation-<data>)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none either when stderr is not a terminal)")
    return p


def finish_args(a: argparse.Namespace) -> argparse.Namespace:
    """Fill per-data-set defaults and check everything that needs no data or files."""
    if a.arch not in ARCHS:
        raise UserError(f"unknown --arch {a.arch!r}: expected one of {', '.join(ARCHS)}")
    epochs, batch = DEFAULTS[a.data]
    a.epochs = epochs if a.epochs is None else a.epochs
    a.batch_size = batch if a.batch_size is None else a.batch_size
    if a.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {a.epochs}")
    if a.batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 for training: BatchNorm needs more than one "
                        f"value per channel, got {a.batch_size}")
    if a.limit_train is not None and a.limit_train < 2:
        raise UserError(f"--limit-train must be at least 2, got {a.limit_train}")
    if a.image_size is not None and a.image_size < 4:
        raise UserError(f"--image-size must be at least 4, got {a.image_size}")
    if a.lr is None:
        a.lr = 0.02 if a.experiment == "degradation" and a.data == "digits" else 0.1
    if not 0 <= a.warmup_epochs < a.epochs:
        raise UserError(f"--warmup-epochs must be at least 0 and less than --epochs ({a.epochs}), got {a.warmup_epochs}")
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads must be at least 1, got {a.threads}")
    if a.lr <= 0 or not math.isfinite(a.lr):
        raise UserError(f"--lr must be a positive number, got {a.lr}")
    if a.data in ("cifar10", "imagefolder") and not a.data_dir:
        raise UserError(f"--data {a.data} needs --data-dir DIR")
    if a.out is None:
        a.out = default_out(f"{a.experiment or a.arch}-{a.data}", fresh=not (a.resume or a.overwrite))
    return a


def default_out(name: str, fresh: bool) -> str:
    """runs/NAME, or, for a fresh run when that already holds an earlier run, the first free
    runs/NAME-2, -3, ... (so running the default command twice keeps both runs; --out picks a
    folder explicitly, --resume continues the run in runs/NAME)."""
    base = os.path.join("runs", name)
    out, k = base, 1
    while fresh and os.path.exists(out) and os.listdir(out):
        k += 1
        out = f"{base}-{k}"
    return out


# ------------------------------------------------------------------------------------ processes
class Dist:
    """This process's place among torchrun's processes (world 1 without torchrun)."""

    def __init__(self, device_choice: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
        if cuda and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available here")
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        self.started = False
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.started = True

    def stop(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()
            self.started = False

    def sum(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()


# ----------------------------------------------------------------------------------------- pieces
def build_model(arch: str, num_classes: int) -> nn.Module:
    if arch in IMAGENET_ARCHS:
        return getattr(importlib.import_module("fastres.models.resnet"), IMAGENET_ARCHS[arch])(
            num_classes=num_classes)
    return getattr(importlib.import_module("fastres.models.cifar"), arch)(num_classes=num_classes)


def check_out_dir(out: str, resume: Optional[str], overwrite: bool) -> str:
    """Make --out, prove it writable, and refuse to replace a checkpoint the user did not mean to."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--out {out} is not a writable folder ({e.strerror or e})") from None
    ckpt = os.path.join(out, "checkpoint.pt")
    if resume is None and os.path.exists(ckpt) and not overwrite:
        raise UserError(f"{ckpt} already exists: pass --resume to continue that run, --overwrite to "
                        "replace it, or another --out")
    return ckpt


def lr_at(step: int, total: int, base: float, warmup: int = 0) -> float:
    """The paper's schedule: base (base/10 for the first `warmup` steps), divided by 10 at 50% and again
    at 75% of the steps."""
    return base * 0.1 ** ((step < warmup) + (step >= 0.5 * total) + (step >= 0.75 * total))


def atomic_save(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_csv(history: List[Dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def plot(curves: Dict[str, List[Dict]], path: str, title: str) -> None:
    """Train (dashed) and test (solid) error per epoch of one or more runs, in percent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, hist) in enumerate(curves.items()):
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [100 * h["train_error"] for h in hist], "--", color=f"C{i}", label=f"{name} train")
        ax.plot(ep, [100 * h["test_error"] for h in hist], "-", color=f"C{i}", lw=2, label=f"{name} test")
    ax.set(xlabel="epoch", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ train
def evaluate(model: nn.Module, loader: DataLoader, dist: Dist, autocast) -> tuple:
    model.eval()
    loss_sum = wrong = n = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            with autocast():
                out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            wrong += (out.argmax(1) != y).sum().item()
            n += len(y)
    loss_sum, wrong, n = dist.sum([loss_sum, wrong, n])
    return loss_sum / max(n, 1), wrong / max(n, 1)


def load_checkpoint(path: str, a: argparse.Namespace) -> Dict:
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        arch, data = state["args"]["arch"], state["args"]["data"]
    except Exception as e:
        raise UserError(f"--resume: {path} is not a fastres.train checkpoint ({type(e).__name__}: {e})") from None
    if (arch, data) != (a.arch, a.data):
        raise UserError(f"--resume: {path} is a {arch} run on {data}, not {a.arch} on {a.data}")
    return state


class Trainer:
    """One training run as the arguments describe; everything is checked before anything is written."""

    def __init__(self, a: argparse.Namespace, dist: Dist, data: Optional[fdata.Data] = None):
        self.a, self.dist = a, dist
        self.ckpt_path = check_out_dir(a.out, a.resume, a.overwrite)
        resume_path = self.ckpt_path if a.resume == "auto" else a.resume
        state = load_checkpoint(resume_path, a) if resume_path is not None else None
        self.data = data or fdata.load(a.data, a.data_dir, a.image_size, a.limit_train)
        per_rank = math.ceil(len(self.data.train) / dist.world)
        if per_rank < 2:
            raise UserError(f"{len(self.data.train)} training images cannot be split over {dist.world} processes")
        try:
            fastres.set_backend(a.backend)
            fastres.backend.resolve("conv_bn_act", dist.device)
        except (ValueError, fastres.BackendUnavailableError) as e:
            raise UserError(f"--backend {a.backend}: {e}") from None
        if a.sync_bn and dist.world > 1 and dist.device.type != "cuda":
            raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU tensors")

        torch.manual_seed(a.seed)
        self.fmt = torch.channels_last if a.channels_last else torch.contiguous_format
        self.model = self._model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=a.lr, momentum=a.momentum,
                                   weight_decay=a.weight_decay)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[a.amp]
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=a.amp == "fp16")
        self.history: List[Dict] = []
        self.start_epoch = 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            if a.amp == "fp16" and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.start_epoch, self.history = state["epoch"], state["history"]
            if dist.main:
                log.info("resumed %s at epoch %d of %d", resume_path, self.start_epoch, a.epochs)
        self.net = self.model
        if dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        if a.compile:
            self.net = torch.compile(self.net)
        self._loaders(per_rank)

    def _model(self) -> nn.Module:
        a, dist = self.a, self.dist
        model = build_model(a.arch, self.data.num_classes)
        if a.sync_bn and dist.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if dist.main:
                log.info("--sync-bn: BatchNorm layers are now SyncBatchNorm; while training across %d "
                         "processes fastres runs each conv and SyncBatchNorm UNFUSED (exact statistics "
                         "over all processes, without the fused kernels); evaluation stays fused", dist.world)
        elif a.sync_bn and dist.main:
            log.info("--sync-bn has no effect in a single process: BatchNorm stays fused")
        return model.to(dist.device).to(memory_format=self.fmt)

    def _loaders(self, per_rank: int) -> None:
        a, dist, data = self.a, self.dist, self.data
        workers = a.workers if a.workers is not None else (4 if a.data == "imagefolder" else 0)
        pin = dist.device.type == "cuda"
        self.sampler = (DistributedSampler(data.train, dist.world, dist.rank, shuffle=True, seed=a.seed)
                        if dist.world > 1 else None)
        self.order = torch.Generator()
        self.train_loader = DataLoader(
            data.train, a.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            generator=self.order if self.sampler is None else None, num_workers=workers, pin_memory=pin,
            drop_last=per_rank % a.batch_size == 1)  # never a last batch of 1 (BatchNorm)
        self.test_loader = DataLoader(Subset(data.test, range(dist.rank, len(data.test), dist.world)),
                                      max(a.batch_size, 64), num_workers=workers, pin_memory=pin)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * a.epochs

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def train_epoch(self, epoch: int) -> Dict:
        from tqdm import tqdm

        a, dist = self.a, self.dist
        # Data order and augmentation depend only on (seed, epoch, rank): a resumed run sees what the
        # uninterrupted run would have seen.
        self.order.manual_seed(a.seed * 100_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        torch.manual_seed(a.seed * 100_003 + epoch * 1009 + dist.rank)
        self.net.train()
        t0 = time.time()
        loss_sum = wrong = seen = 0.0
        bar = tqdm(self.train_loader, desc=f"{a.arch} epoch {epoch + 1}/{a.epochs}", unit="batch", leave=False,
                   disable=True if not dist.main or a.no_progress else None, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            lr = lr_at(epoch * self.steps_per_epoch + i, self.total_steps, a.lr,
                       a.warmup_epochs * self.steps_per_epoch)
            for g in self.opt.param_groups:
                g["lr"] = lr
            x = x.to(dist.device, non_blocking=True)
            y = y.to(dist.device, non_blocking=True)
            x = fdata.augment(x, self.data.pad, self.data.flip).contiguous(memory_format=self.fmt)
            with self.autocast():
                out = self.net(x)
                loss = F.cross_entropy(out.float(), y)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            li = loss.item()
            if not math.isfinite(li):
                raise UserError(f"training diverged: loss {li} at epoch {epoch + 1} step {i + 1}; try a lower "
                                f"--lr (now {a.lr})" + (" or --amp bf16" if a.amp == "fp16" else ""))
            loss_sum += li * len(y)
            wrong += (out.detach().argmax(1) != y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{li:.3f}", img_s=f"{seen * dist.world / (time.time() - t0):.0f}")
        bar.close()
        loss_sum, wrong, seen = dist.sum([loss_sum, wrong, seen])
        train_time = time.time() - t0
        test_loss, test_error = evaluate(self.model, self.test_loader, dist, self.autocast)
        return dict(epoch=epoch + 1, lr=float(f"{lr:.6g}"), train_loss=loss_sum / seen, train_error=wrong / seen,
                    test_loss=test_loss, test_error=test_error, seconds=round(time.time() - t0, 2),
                    images_per_s=round(seen / train_time, 1))

    def save(self) -> None:
        a = self.a
        write_csv(self.history, os.path.join(a.out, "log.csv"))
        plot({a.arch: self.history}, os.path.join(a.out, "curves.png"), f"{a.arch} on {a.data}")
        atomic_save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "scaler": self.scaler.state_dict() if a.amp == "fp16" else None,
                     "epoch": self.history[-1]["epoch"], "history": self.history, "args": vars(a),
                     "fastres_version": fastres.__version__}, self.ckpt_path)

    def run(self) -> Dict:
        a, dist = self.a, self.dist
        if dist.main:
            log.info("%s on %s: %d epochs x %d steps of %d images per process (%d process%s), device %s, "
                     "backend %s, %.2fM parameters", a.arch, self.data.description, a.epochs,
                     self.steps_per_epoch, a.batch_size, dist.world, "es" if dist.world > 1 else "",
                     dist.device, a.backend, sum(p.numel() for p in self.model.parameters()) / 1e6)
        t_start = time.time()
        for epoch in range(self.start_epoch, a.epochs):
            row = self.train_epoch(epoch)
            self.history.append(row)
            if dist.main:
                log.info("epoch %d/%d  lr %.4g  train loss %.4f error %.2f%%  test loss %.4f error %.2f%%  "
                         "%.0f img/s  %.1fs", row["epoch"], a.epochs, row["lr"], row["train_loss"],
                         100 * row["train_error"], row["test_loss"], 100 * row["test_error"],
                         row["images_per_s"], row["seconds"])
                self.save()
        seconds = time.time() - t_start
        final = self.history[-1]
        if dist.main:
            log.info("done: %s on %s: test accuracy %.2f%% (error %.2f%%) after %d epochs; %.1fs this run; "
                     "outputs in %s (log.csv, curves.png, checkpoint.pt)", a.arch, a.data,
                     100 * (1 - final["test_error"]), 100 * final["test_error"], final["epoch"], seconds, a.out)
        return {"model": self.model, "history": self.history, "test_error": final["test_error"],
                "seconds": seconds, "out": a.out}


def train(a: argparse.Namespace, dist: Dist, data: Optional[fdata.Data] = None) -> Dict:
    """One training run; returns {"model", "history", "test_error", "seconds", "out"}."""
    return Trainer(a, dist, data).run()


# -------------------------------------------------------------------------------------- experiment
def degradation(a: argparse.Namespace, dist: Dist) -> Dict:
    """The paper's Figure 6: plain20/56 (left) and resnet20/56 (right), train (dashed) and test error."""
    data = fdata.load(a.data, a.data_dir, a.image_size, a.limit_train)
    if a.resume not in (None, "auto"):
        raise UserError("--experiment degradation: give --resume without a path (each net resumes "
                        "from its own folder in --out)")
    runs, subs, root = {}, {}, a.out
    for arch in DEGRADATION_ARCHS:  # check every output folder before training anything
        out = os.path.join(root, arch)
        resume = "auto" if a.resume and os.path.exists(os.path.join(out, "checkpoint.pt")) else None
        check_out_dir(out, resume, a.overwrite)
        subs[arch] = argparse.Namespace(**{**vars(a), "arch": arch, "out": out, "resume": resume,
                                           "experiment": None})
    for arch, sub in subs.items():
        if dist.main:
            log.info("degradation experiment: training %s", arch)
        runs[arch] = train(sub, dist, data)["history"]
    if dist.main:
        path = os.path.join(root, "degradation.png")
        plot_degradation(runs, path, a.data)
        final = ", ".join(f"{k} {100 * v[-1]['train_error']:.1f}%/{100 * v[-1]['test_error']:.1f}%"
                          for k, v in runs.items())
        log.info("done: degradation experiment on %s, final train/test error: %s; figure %s", a.data, final, path)
    return runs


def plot_degradation(runs: Dict[str, List[Dict]], path: str, data: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("plain", "resnet")):
        for i, (arch, hist) in enumerate((k, v) for k, v in runs.items() if k.startswith(kind)):
            ep = [h["epoch"] for h in hist]
            ax.plot(ep, [100 * h["train_error"] for h in hist], "--", color=f"C{i}", label=f"{arch} train")
            ax.plot(ep, [100 * h["test_error"] for h in hist], "-", color=f"C{i}", lw=2, label=f"{arch} test")
        ax.set(title=f"{'plain' if kind == 'plain' else 'ResNet'} ({data})", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Plain nets and ResNets of 20 and 56 layers: train error dashed, test error solid (paper Fig. 6)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def set_threads(threads: Optional[int], dist: Dist) -> None:
    if threads is None and dist.device.type == "cpu":
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, torch.get_num_threads() // dist.local_world)
        if threads > 1 and load >= cores:
            threads = 1
            if dist.main:
                log.info("the CPU is busy (load average %.1f on %d cores): 1 thread per process "
                         "(--threads N to choose)", load, cores)
    if threads is not None:
        torch.set_num_threads(threads)


def main(argv: Optional[List[str]] = None):
    """Run as the command line would, raising UserError (and fdata.DataError) for bad input."""
    a = finish_args(parser().parse_args(argv))
    dist = Dist(a.device)
    set_threads(a.threads, dist)
    dist.start()
    try:
        return degradation(a, dist) if a.experiment == "degradation" else train(a, dist)
    finally:
        dist.stop()


def cli(argv: Optional[List[str]] = None) -> int:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("fastres.train: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        main(argv)
    except (UserError, fdata.DataError) as e:
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: keep the message, not its traceback
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"fastres.train: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastres.train: interrupted; the last finished epoch is in the checkpoint (--resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
