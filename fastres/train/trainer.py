"""One training run of ``python -m fastres.train``: processes, model, loop, evaluation, checkpoints.

Every epoch a run writes to its --out: log.csv (one row per epoch; its lr is the one the epoch started
with, train loss/error the mean over its images, test loss/error after it), curves.png (train and test error)
and checkpoint.pt (written to a temporary file, then renamed over the old one, so a crash never leaves
a half-written checkpoint). Everything the user can get wrong is checked before anything is written,
and raises :class:`UserError`.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

import fastres
from fastres.models.registry import get_model, list_models
from fastres.train import data as fdata
from fastres.train.graphed import GraphedTrainStep
from fastres.train.plots import plot

log = logging.getLogger("fastres.train")

# The nets of the model registry (fastres.models.list_models), in its order: the CIFAR ones first.
CIFAR_ARCHS = list_models("cifar", ordered=False)
IMAGENET_ARCHS = list_models("imagenet", ordered=False)
ARCHS = CIFAR_ARCHS + IMAGENET_ARCHS
# Per data set: epochs, batch size (per process).
DEFAULTS = {"digits": (10, 64), "cifar10": (164, 128), "imagefolder": (90, 64), "synthetic": (1, 64)}
CSV_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "seconds", "images_per_s"]


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


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
def build_model(arch: str, num_classes: int, shortcut: Optional[str] = None) -> nn.Module:
    """The net `arch` with `num_classes` outputs; `shortcut` ("A", "B", "C") overrides the arch's own
    shortcut option (None keeps it: A for the CIFAR ResNets, B for the ImageNet ones)."""
    kw = {"num_classes": num_classes} if shortcut is None else {"num_classes": num_classes, "shortcut": shortcut}
    return get_model(arch, **kw)


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


def default_workers(data: str) -> int:
    """Data-loading processes: 0 for in-memory data; for files, up to 4 but one core fewer than this
    process may use (so that 2 cores get 1 worker and DataLoader has nothing to warn about)."""
    if data != "imagefolder":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


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


def write_rows(path: str, fields: List[str], rows: List[Dict]) -> None:
    """Write `rows` as a CSV with these columns, atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_csv(history: List[Dict], path: str) -> None:
    write_rows(path, CSV_FIELDS, history)


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
    except Exception as e:  # noqa: BLE001 - torch's message would advise weights_only=False: not here
        why = f"no {e} entry" if isinstance(e, (KeyError, TypeError)) else "not a torch.save file of plain values"
        raise UserError(f"--resume: {path} is not a fastres checkpoint ({why}; fastres.train writes "
                        "checkpoint.pt in its --out)") from None
    if (arch, data) != (a.arch, a.data):
        raise UserError(f"--resume: {path} is a {arch} run on {data}, not {a.arch} on {a.data}")
    shortcut = state["args"].get("shortcut")
    if shortcut != getattr(a, "shortcut", None):
        raise UserError(f"--resume: {path} is a run with --shortcut {shortcut}, not {getattr(a, 'shortcut', None)}")
    return state


class Trainer:
    """One training run as the arguments describe; everything is checked before anything is written."""

    def __init__(self, a: argparse.Namespace, dist: Dist, data: Optional[fdata.Data] = None):
        self.a, self.dist = a, dist
        self.created_out = not os.path.exists(a.out)
        self.ckpt_path = check_out_dir(a.out, a.resume, a.overwrite)
        try:
            self._setup(a, dist, data)
        except BaseException:
            self.drop_empty_out()
            raise

    def drop_empty_out(self) -> None:
        """A start that failed (or was interrupted before an epoch finished) leaves no empty run folder."""
        try:
            if self.created_out and self.dist.main and not os.listdir(self.a.out):
                os.rmdir(self.a.out)
        except OSError:
            pass

    def _setup(self, a: argparse.Namespace, dist: Dist, data: Optional[fdata.Data]) -> None:
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
        self.saved_epoch, self.saved_path = 0, None  # the last checkpoint written or resumed from (0: none)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            if a.amp == "fp16" and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.start_epoch, self.history = state["epoch"], state["history"]
            self.saved_epoch, self.saved_path = self.start_epoch, resume_path
            if dist.main:
                log.info("resumed %s at epoch %d of %d", resume_path, self.start_epoch, a.epochs)
        self.net = self.model
        if dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        if a.compile:
            self.net = torch.compile(self.net)
        # --cuda-graphs (one process, no --compile or fp16: the command line checks): see fastres.train.graphed
        graphs = getattr(a, "cuda_graphs", False)
        self.graphed = GraphedTrainStep(self.model, self.opt, self.amp_dtype) if graphs else None
        self._loaders(per_rank)

    def _model(self) -> nn.Module:
        a, dist = self.a, self.dist
        model = build_model(a.arch, self.data.num_classes, getattr(a, "shortcut", None))
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
        workers = a.workers if a.workers is not None else default_workers(a.data)
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
            if i == 0:
                first_lr = lr  # the lr logged: the one the epoch started with
            x = x.to(dist.device, non_blocking=True)
            y = y.to(dist.device, non_blocking=True)
            x = fdata.augment(x, self.data.pad, self.data.flip).contiguous(memory_format=self.fmt)
            if self.graphed is not None and len(y) == a.batch_size:
                out, loss = self.graphed(x, y)  # replayed from a CUDA graph (a partial batch runs eagerly)
            else:
                out, loss = self.step(x, y)
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
        return dict(epoch=epoch + 1, lr=float(f"{first_lr:.6g}"), train_loss=loss_sum / seen, train_error=wrong / seen,
                    test_loss=test_loss, test_error=test_error, seconds=round(time.time() - t0, 2),
                    images_per_s=round(seen / train_time, 1))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """One eager training step; returns (output, loss)."""
        with self.autocast():
            out = self.net(x)
            loss = F.cross_entropy(out.float(), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return out, loss

    def save(self) -> None:
        a = self.a
        write_csv(self.history, os.path.join(a.out, "log.csv"))
        plot({a.arch: self.history}, os.path.join(a.out, "curves.png"), f"{a.arch} on {a.data}")
        atomic_save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "scaler": self.scaler.state_dict() if a.amp == "fp16" else None,
                     "epoch": self.history[-1]["epoch"], "history": self.history, "args": vars(a),
                     "fastres_version": fastres.__version__}, self.ckpt_path)
        self.saved_epoch, self.saved_path = self.history[-1]["epoch"], self.ckpt_path  # once it is in place

    def run(self) -> Dict:
        a, dist = self.a, self.dist
        if dist.main:
            log.info("%s on %s: %d epochs x %d steps of %d images per process (%d process%s), device %s, "
                     "backend %s, %d CPU thread%s, %.2fM parameters", a.arch, self.data.description, a.epochs,
                     self.steps_per_epoch, a.batch_size, dist.world, "es" if dist.world > 1 else "",
                     f"{dist.device}{' with CUDA graphs' if self.graphed else ''}", a.backend,
                     torch.get_num_threads(), "s" if torch.get_num_threads() > 1 else "",
                     sum(p.numel() for p in self.model.parameters()) / 1e6)
        t_start = time.time()
        try:
            self._epochs()
        except KeyboardInterrupt as e:
            # what the command line tells the user: the last epoch whose checkpoint was written, if any (an
            # interrupt while epoch N is being evaluated or saved leaves epoch N-1 there)
            e.fastres_saved = (self.saved_epoch, self.saved_path) if self.saved_epoch else None
            self.drop_empty_out()
            raise
        seconds = time.time() - t_start
        final = self.history[-1]
        if dist.main and self.graphed is not None:
            log.info("--cuda-graphs: the step was captured %d times (at lr %s)", len(self.graphed.lrs),
                     ", ".join(f"{lr:.4g}" for lr in self.graphed.lrs))
        if dist.main:
            log.info("done: %s on %s: test accuracy %.2f%% (error %.2f%%) after %d epochs; %.1fs this run; "
                     "outputs in %s (log.csv, curves.png, checkpoint.pt)", a.arch, a.data,
                     100 * (1 - final["test_error"]), 100 * final["test_error"], final["epoch"], seconds, a.out)
        return {"model": self.model, "history": self.history, "test_error": final["test_error"],
                "seconds": seconds, "out": a.out}


    def _epochs(self) -> None:
        a, dist = self.a, self.dist
        for epoch in range(self.start_epoch, a.epochs):
            row = self.train_epoch(epoch)
            self.history.append(row)
            if dist.main:
                log.info("epoch %d/%d  lr %.4g  train loss %.4f error %.2f%%  test loss %.4f error %.2f%%  "
                         "%.0f img/s  %.1fs", row["epoch"], a.epochs, row["lr"], row["train_loss"],
                         100 * row["train_error"], row["test_loss"], 100 * row["test_error"],
                         row["images_per_s"], row["seconds"])
                self.save()


def train(a: argparse.Namespace, dist: Dist, data: Optional[fdata.Data] = None) -> Dict:
    """One training run; returns {"model", "history", "test_error", "seconds", "out"}."""
    return Trainer(a, dist, data).run()


