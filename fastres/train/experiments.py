"""The paper's experiments, as ``python -m fastres.train --experiment NAME``.

* ``degradation`` (Fig. 6): plain20, plain56, resnet20, resnet56 trained alike; their error curves.
* ``responses`` (Fig. 7): the same four nets (an earlier degradation run in the same --out is reused
  with --resume), then the std of every 3x3 layer's response on the test set (after BN, before the
  addition and the ReLU: :mod:`fastres.train.probes`), and each 3x3 layer's weight-gradient norm at
  initialisation and after training.
* ``shortcuts`` (Table 3): one --arch with shortcut options A (zero-padding), B (projections where the
  shape changes) and C (all projections), same seed and schedule; parameters and final errors.

Each net trains in its own folder under --out (log.csv, curves.png, checkpoint.pt), so --resume
continues an interrupted experiment; every folder is checked before anything trains.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Dict, List

import torch
from torch.utils.data import DataLoader

from fastres.train import data as fdata
from fastres.train import plots, probes
from fastres.train.trainer import Dist, UserError, build_model, check_out_dir, train, write_rows

log = logging.getLogger("fastres.train")

DEGRADATION_ARCHS = ("plain20", "plain56", "resnet20", "resnet56")
SHORTCUT_OPTIONS = ("A", "B", "C")
GRADIENT_BATCH = 256  # training images in the batch whose gradients are measured
# The paper's Table 3 (ImageNet validation, ResNet-34, 10-crop top-1 error).
PAPER_TABLE3 = {"A": 25.03, "B": 24.52, "C": 24.19}


def _subruns(a: argparse.Namespace, name: str, overrides: Dict[str, Dict]) -> Dict[str, argparse.Namespace]:
    """One namespace per net, folder --out/<key>; every folder is checked before anything trains."""
    if a.resume not in (None, "auto"):
        raise UserError(f"--experiment {name}: give --resume without a path (each net resumes from its own "
                        "folder in --out)")
    subs = {}
    for key, over in overrides.items():
        out = os.path.join(a.out, key)
        resume = "auto" if a.resume and os.path.exists(os.path.join(out, "checkpoint.pt")) else None
        check_out_dir(out, resume, a.overwrite)
        subs[key] = argparse.Namespace(**{**vars(a), "out": out, "resume": resume, "experiment": None, **over})
    return subs


def _pct(h: Dict) -> str:
    return f"{100 * h['train_error']:.1f}%/{100 * h['test_error']:.1f}%"


# ------------------------------------------------------------------------------------ degradation
def degradation(a: argparse.Namespace, dist: Dist) -> Dict[str, List[Dict]]:
    """The paper's Figure 6: plain20/56 (left) and resnet20/56 (right), train (dashed) and test error."""
    data = fdata.load(a.data, a.data_dir, a.image_size, a.limit_train)
    subs = _subruns(a, "degradation", {arch: {"arch": arch, "shortcut": None} for arch in DEGRADATION_ARCHS})
    runs = {}
    for arch, sub in subs.items():
        if dist.main:
            log.info("degradation experiment: training %s", arch)
        runs[arch] = train(sub, dist, data)["history"]
    if dist.main:
        path = os.path.join(a.out, "degradation.png")
        plots.plot_degradation(runs, path, a.data)
        final = ", ".join(f"{k} {_pct(v[-1])}" for k, v in runs.items())
        log.info("done: degradation experiment on %s, final train/test error: %s; figure %s", a.data, final, path)
    return runs


# -------------------------------------------------------------------------------------- responses
def _gradient_batch(data: fdata.Data, device: torch.device):
    x, y = next(iter(DataLoader(data.train, min(GRADIENT_BATCH, len(data.train)), shuffle=False)))
    return x.to(device), y.to(device)


def _test_images(data: fdata.Data, a: argparse.Namespace, device: torch.device):
    from tqdm import tqdm

    loader = DataLoader(data.test, max(a.batch_size, 64), shuffle=False)
    for x, _ in tqdm(loader, desc="responses", unit="batch", leave=False, dynamic_ncols=True,
                     disable=True if a.no_progress else None):
        yield x.to(device)


def responses(a: argparse.Namespace, dist: Dist) -> Dict:
    """The paper's Figure 7 (response std per 3x3 layer) and per-layer gradient norms, init and trained.
    Returns {"stds": {arch: [std by layer]}, "grads": {arch: {"init"|"trained": [norm by layer]}},
    "histories": {arch: history}}."""
    data = fdata.load(a.data, a.data_dir, a.image_size, a.limit_train)
    subs = _subruns(a, "responses", {arch: {"arch": arch, "shortcut": None} for arch in DEGRADATION_ARCHS})
    gx, gy = _gradient_batch(data, dist.device)
    stds, grads, histories = {}, {}, {}
    for arch, sub in subs.items():
        if dist.main:
            log.info("responses experiment: %s %s", "resuming" if sub.resume else "training", arch)
        torch.manual_seed(sub.seed)  # the Trainer's initial weights: same seed, same constructor
        init = build_model(arch, data.num_classes).to(dist.device)
        r = train(sub, dist, data)
        model = r["model"].eval()
        histories[arch] = r["history"]
        grads[arch] = {"init": probes.grad_norms(init, gx, gy), "trained": probes.grad_norms(model, gx, gy)}
        stds[arch] = probes.response_stds(model, _test_images(data, a, dist.device))
    if dist.main:
        write_rows(os.path.join(a.out, "responses.csv"), ["arch", "layer", "std"],
                   [{"arch": k, "layer": i + 1, "std": f"{s:.6g}"} for k, v in stds.items() for i, s in enumerate(v)])
        write_rows(os.path.join(a.out, "gradients.csv"), ["arch", "when", "layer", "grad_norm"],
                   [{"arch": k, "when": w, "layer": i + 1, "grad_norm": f"{g:.6g}"}
                    for k, by in grads.items() for w, v in by.items() for i, g in enumerate(v)])
        plots.plot_responses(stds, os.path.join(a.out, "responses.png"), a.data)
        plots.plot_gradients(grads, os.path.join(a.out, "gradients.png"), a.data)
        for line in responses_summary(stds, grads, histories):
            log.info("%s", line)
        log.info("outputs in %s: responses.csv, responses.png, gradients.csv, gradients.png", a.out)
    return {"stds": stds, "grads": grads, "histories": histories}


def responses_summary(stds: Dict[str, List[float]], grads: Dict[str, Dict[str, List[float]]],
                      histories: Dict[str, List[Dict]]) -> List[str]:
    """The measured findings, next to the paper's."""
    mean = {k: sum(v) / len(v) for k, v in stds.items()}
    lines = ["response std (after BN, before addition and ReLU), mean over the 3x3 layers: "
             + ", ".join(f"{k} {m:.3f}" for k, m in mean.items())
             + "  [final train/test error: " + ", ".join(f"{k} {_pct(h[-1])}" for k, h in histories.items()) + "]"]
    res = {k: m for k, m in mean.items() if k.startswith("resnet")}
    plain = {k: m for k, m in mean.items() if k.startswith("plain")}
    if res and plain:
        holds = max(res.values()) < min(plain.values())
        lines.append("paper (Fig. 7, CIFAR-10): ResNets have generally smaller responses than their plain "
                     f"counterparts. Measured: {'holds' if holds else 'does NOT hold'} (every ResNet's mean std "
                     f"{'below' if holds else 'not below'} every plain net's)")
    if "resnet20" in mean and "resnet56" in mean:
        deeper = "holds" if mean["resnet56"] < mean["resnet20"] else "does NOT hold"
        lines.append(f"paper: the deeper ResNet has smaller responses. Measured: resnet56 {mean['resnet56']:.3f} "
                     f"vs resnet20 {mean['resnet20']:.3f} ({deeper})")
    parts = []
    for k, by in grads.items():
        for w, g in by.items():
            parts.append(f"{k} {w} {min(g):.2g}..{max(g):.2g} (layer 1 / last {g[0] / g[-1]:.2g})")
    lines.append("paper (section 4.1): with BN the plain nets' backward gradients have healthy norms, so their "
                 "difficulty is not vanishing gradients. Measured 3x3 weight-gradient norms, min..max over "
                 "layers: " + "; ".join(parts))
    return lines


# -------------------------------------------------------------------------------------- shortcuts
def shortcuts(a: argparse.Namespace, dist: Dist) -> Dict:
    """The paper's Table 3: --arch with shortcut options A, B and C, one seed and schedule. Returns
    {"params": {option: n}, "histories": {option: history}}."""
    if a.arch.startswith("plain"):
        raise UserError(f"--experiment shortcuts compares the shortcuts of a ResNet; {a.arch} has none "
                        "(try --arch resnet20)")
    data = fdata.load(a.data, a.data_dir, a.image_size, a.limit_train)
    subs = _subruns(a, "shortcuts", {o: {"shortcut": o} for o in SHORTCUT_OPTIONS})
    params, histories = {}, {}
    for option, sub in subs.items():
        if dist.main:
            log.info("shortcuts experiment: %s %s with option %s", "resuming" if sub.resume else "training",
                     a.arch, option)
        r = train(sub, dist, data)
        params[option] = sum(p.numel() for p in r["model"].parameters())
        histories[option] = r["history"]
    if dist.main:
        write_rows(os.path.join(a.out, "shortcuts.csv"), ["option", "parameters", "train_error", "test_error"],
                   [{"option": o, "parameters": params[o], "train_error": f"{h[-1]['train_error']:.6g}",
                     "test_error": f"{h[-1]['test_error']:.6g}"} for o, h in histories.items()])
        plots.plot_shortcuts(histories, params, os.path.join(a.out, "shortcuts.png"), a.arch, a.data)
        log.info("shortcut options on %s, final train/test error: %s", a.arch, ", ".join(
            f"{o} ({params[o] / 1e6:.3f}M parameters) {_pct(h[-1])}" for o, h in histories.items()))
        log.info("paper (Table 3, ResNet-34 on ImageNet, top-1 10-crop error): %s: B slightly better than A "
                 "(A's zero-padded channels learn no residual), C marginally better than B (more parameters); "
                 "the differences are small, so projections are not essential",
                 ", ".join(f"{o} {e}%" for o, e in PAPER_TABLE3.items()))
        log.info("outputs in %s: shortcuts.csv, shortcuts.png", a.out)
    return {"params": params, "histories": histories}


EXPERIMENTS = {"degradation": degradation, "responses": responses, "shortcuts": shortcuts}
