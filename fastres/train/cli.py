"""Train a fused ResNet: ``python -m fastres.train`` (see ``--help``); the command line only.

With no arguments it trains the paper's ResNet-20 on scikit-learn's bundled handwritten digits (no
download) in a few minutes on a CPU. Under ``torchrun`` it trains with DistributedDataParallel
(nccl on GPUs, gloo on CPUs). ``--experiment`` runs one of the paper's experiments
(:mod:`fastres.train.experiments`): ``degradation`` (Fig. 6: plain nets get worse with depth, ResNets do
not), ``responses`` (Fig. 7: the std of the layer responses, and per-layer gradient norms) and
``shortcuts`` (Table 3: shortcut options A, B, C).

One run's loop and checkpoints live in :mod:`fastres.train.trainer`, the figures in :mod:`fastres.train.plots`.
A user error (unknown arch, missing data, batch size 1, an --out that cannot be written, an --out that
already holds a checkpoint, --cuda-graphs without a CUDA GPU) stops with a one-line message and exit
status 2 before anything is written.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import List, Optional

import torch

import fastres
from fastres.kernels.cli import OneLineParser as _Parser
from fastres.train import data as fdata
from fastres.train.experiments import EXPERIMENTS
from fastres.train.trainer import ARCHS, DEFAULTS, Dist, UserError, train

log = logging.getLogger("fastres.train")


# ----------------------------------------------------------------------------------------- arguments

def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fastres.train",
        description="Train a ResNet with fastres's fused conv + BatchNorm (+ add) (+ ReLU) layers. "
                    "With no arguments: ResNet-20 on scikit-learn's handwritten digits, a few minutes "
                    "on a CPU. Several processes: torchrun --nproc_per_node N -m fastres.train ...",
        epilog="The schedule is the paper's: SGD, momentum 0.9, weight decay 1e-4, lr divided by 10 at "
               "50% and 75% of training. Outputs in --out: log.csv (per epoch: the lr it started with, train and "
               "test loss and error, seconds, images/s), curves.png, checkpoint.pt.")
    p.add_argument("--arch", default="resnet20", metavar="ARCH",
                   help=f"the model (default resnet20): {', '.join(ARCHS)} (resnet18..152 are "
                        "fastres.FusedResNetXX)")
    p.add_argument("--data", default="digits", choices=fdata.DATASETS,
                   help="(default digits) digits: scikit-learn's bundled 8x8 digits, resized (no download); "
                        "cifar10: the python pickle batches in --data-dir; imagefolder: --data-dir/train/<class>/*.png "
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
                   help="initial learning rate (default 0.1, the paper's; every --experiment on digits: 0.02, "
                        "as 0.1 blows the 56-layer nets up in the few hundred steps the digits give)")
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
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each training step (forward, loss, backward, SGD step) from one CUDA graph "
                        "(fastres.GraphedStep). Needs a CUDA GPU and one process; not with --compile or --amp "
                        "fp16. A graph has fixed shapes: an epoch's last, partial batch runs eagerly (nothing is "
                        "dropped: the same images as without the flag). The lr is baked into a graph (SGD reads "
                        "a tensor lr on the host): the step is captured again whenever the schedule changes the "
                        "lr, at most 4 times a run (plus once after --resume); each capture's 3 warm-up steps "
                        "do not count (weights, BatchNorm statistics, momentum and data order are kept)")
    p.add_argument("--sync-bn", action="store_true",
                   help="convert BatchNorm to SyncBatchNorm (needs GPUs). NOTE: while training across "
                        "several processes, fastres then runs each conv and SyncBatchNorm UNFUSED "
                        "(exact, but without the fused kernels); evaluation stays fused")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: 0 for in-memory data; imagefolder: min(4, cores - 1))")
    p.add_argument("--out", default=None, help="output folder (default: runs/<arch>-<data>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out/checkpoint.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even though --out already holds a checkpoint (it is replaced)")
    p.add_argument("--shortcut", choices=("A", "B", "C"), default=None,
                   help="the ResNet's shortcut option (default: the arch's own, A for resnet20..1202, B for "
                        "resnet18..152): A zero-padding, B projections where the shape changes, C all projections")
    p.add_argument("--experiment", choices=tuple(EXPERIMENTS), default=None,
                   help="in --out (default runs/<experiment>-<data>), each net in its own folder. degradation: "
                        "train plain20, plain56, resnet20, resnet56 and plot their errors side by side (the "
                        "paper's Figure 6). responses: the same four nets (--resume reuses those of a "
                        "degradation run in the same --out), then the std of each 3x3 layer's response on the "
                        "test set (after BN, before addition and ReLU: Figure 7) and per-layer gradient norms "
                        "at initialisation and after training. shortcuts: --arch with shortcut options A, B "
                        "and C, one seed and schedule (the paper's Table 3)")
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
        a.lr = 0.02 if a.experiment is not None and a.data == "digits" else 0.1
    if not 0 <= a.warmup_epochs < a.epochs:
        raise UserError(f"--warmup-epochs must be at least 0 and less than --epochs ({a.epochs}), "
                        f"got {a.warmup_epochs}")
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads must be at least 1, got {a.threads}")
    if a.lr <= 0 or not math.isfinite(a.lr):
        raise UserError(f"--lr must be a positive number, got {a.lr}")
    if a.shortcut is not None and a.arch.startswith("plain") and a.experiment is None:
        raise UserError(f"--shortcut {a.shortcut}: {a.arch} is a plain net, it has no shortcuts")
    if a.cuda_graphs and a.compile:
        raise UserError("--cuda-graphs and --compile: choose one (torch.compile(mode='reduce-overhead') makes its "
                        "own CUDA graphs)")
    if a.cuda_graphs and a.amp == "fp16":
        raise UserError("--cuda-graphs does not run --amp fp16: its GradScaler checks for infs on the host every "
                        "step, which a CUDA graph cannot; use --amp bf16")
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


def check_cuda_graphs(a: argparse.Namespace, dist: Dist) -> None:
    """--cuda-graphs needs a CUDA device and a single process: say so before anything runs."""
    if not a.cuda_graphs:
        return
    if a.device == "cpu":
        raise UserError("--cuda-graphs needs a CUDA GPU: it does not run with --device cpu")
    if dist.device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU: none is available here (torch.cuda.is_available() is False)")
    if dist.world > 1:
        raise UserError(f"--cuda-graphs runs in one process, not {dist.world}: DistributedDataParallel's gradient "
                        "all-reduce is not captured (drop --cuda-graphs or torchrun)")


def main(argv: Optional[List[str]] = None):
    """Run as the command line would, raising UserError (and fdata.DataError) for bad input."""
    a = finish_args(parser().parse_args(argv))
    dist = Dist(a.device)
    check_cuda_graphs(a, dist)
    set_threads(a.threads, dist)
    dist.start()
    try:
        return EXPERIMENTS[a.experiment](a, dist) if a.experiment else train(a, dist)
    finally:
        dist.stop()


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at emit time, not the stream current when the first cli() ran:
    a caller that swaps sys.stdout between runs (pytest's capture, a notebook, contextlib.redirect_stdout)
    must not leave the handler writing to a closed file."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def cli(argv: Optional[List[str]] = None) -> int:
    if not log.handlers:
        handler = _StdoutHandler()
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
    except KeyboardInterrupt as e:
        saved = getattr(e, "fastres_saved", None)
        print(f"fastres.train: interrupted; epoch {saved[0]} is in {saved[1]} (--resume {saved[1]} continues)"
              if saved else "fastres.train: interrupted: no epoch finished; nothing saved", file=sys.stderr)
        return 130
    return 0
