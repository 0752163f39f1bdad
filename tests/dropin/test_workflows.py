"""What users do to a model over time, on the default path and inside fastres.frozen: after each step
the fastres model's eval output equals a fresh torchvision model's with the same (current) state_dict.

Optimizers in their for-loop, foreach and fused forms (fused ones leave the version counter alone),
BatchNorm recalibration and SWA's update_bn (running statistics change in place without a version
bump), a linear probe on a frozen backbone, hooked probes such as torchinfo's train-mode summary,
gradient-free weight edits (through `.data`, `copy_` under no_grad, load_state_dict, assign=True),
EMA / SWA averaged copies, frozen and unfrozen BatchNorm, models made or copied under inference_mode.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from workflow_helpers import batch, check_eval, make, train_step

import fastres
from fastres.models import plan


@pytest.fixture(autouse=True)
def plans_early(monkeypatch):
    """Inside frozen, a compiled plan (fastres.models.plan) from the third call with one structure and
    shape instead of after a quarter of a second: every test here meets plans as well as the per-layer path."""
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)


OPTIMIZERS = {
    "sgd-for-loop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adam-for-loop": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
}


def mode(frozen: bool, model):
    return fastres.frozen(model) if frozen else contextlib.nullcontext()


# Every optimizer form under fastres.frozen (the mode with a fold that a step must invalidate); the
# default mode caches nothing, so one form there (CI time: each case ~6 s on 2 cores).
@pytest.mark.parametrize("opt,frozen", [(opt, True) for opt in OPTIMIZERS] + [("sgd-foreach", False)],
                         ids=[f"{opt}-frozen" for opt in OPTIMIZERS] + ["sgd-foreach-default"])
def test_train_validate_loop_with_every_optimizer_form(opt, frozen):
    model = make("basic")
    optimizer = OPTIMIZERS[opt](model.parameters())
    with mode(frozen, model):
        check_eval(model, "basic", what="before training")
        for epoch in range(3):
            for step in range(2):
                train_step(model, optimizer, seed=10 * epoch + step)
            check_eval(model, "basic", what=f"after epoch {epoch}")


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_bn_recalibration_and_swa_update_bn(arch, frozen):
    model = make(arch, "converted" if arch == "bottleneck" else "fused")
    with mode(frozen, model):
        check_eval(model, arch)
        model.train()
        with torch.no_grad():   # recalibration: train-mode forwards, no gradient, no optimizer
            for s in range(3):
                model(batch(20 + s) * 1.5 + 0.3)
        check_eval(model, arch, what="after recalibration")
        update_bn([batch(30 + s) for s in range(3)], model)   # SWA's: momentum=None, cumulative average
        check_eval(model, arch, what="after update_bn")


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
def test_linear_probe_on_a_frozen_backbone_with_bn_in_train_mode(frozen):
    model = make("basic")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    optimizer = torch.optim.AdamW(model.fc.parameters(), lr=1e-2, fused=True)
    with mode(frozen, model):
        for step in range(3):
            train_step(model, optimizer, seed=step)   # BN in train mode: running statistics move
            check_eval(model, "basic", what=f"probe step {step}")


def _hooked_train_forward(model):
    """What a summary tool does: a hook on every module, one train-mode forward without gradients."""
    handles = [m.register_forward_hook(lambda *a: None) for m in model.modules()]
    model.train()
    with torch.no_grad():
        model(batch(40))
    for h in handles:
        h.remove()


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
def test_hooked_summary_in_train_mode_then_eval(frozen):
    model = make("bottleneck")
    with mode(frozen, model):
        check_eval(model, "bottleneck")
        _hooked_train_forward(model)
        check_eval(model, "bottleneck", what="after a hooked train-mode forward")


def test_torchinfo_summary_in_train_mode_then_eval():
    torchinfo = pytest.importorskip("torchinfo", reason="torchinfo is not installed")
    model = make("basic")
    check_eval(model, "basic")
    torchinfo.summary(model, input_size=(BATCH_SUMMARY, 3, 64, 64), mode="train", verbose=0)
    check_eval(model, "basic", what="after torchinfo.summary(mode='train')")


BATCH_SUMMARY = 4


EDITS = {
    "data-in-place": lambda m: [p.data.mul_(0.9) for p in m.parameters()],
    "data-assign": lambda m: [setattr(p, "data", p.data * 1.1) for p in m.parameters()],
    "copy-no-grad": lambda m: _no_grad(lambda: [p.copy_(p * 0.8 + 0.01) for p in m.parameters()]),
    "buffers-no-grad": lambda m: _no_grad(lambda: [b.mul_(1.3) for n, b in m.named_buffers() if "running" in n]),
    "load-state-dict": lambda m: m.load_state_dict(make("basic", seed=5).state_dict()),
    "load-state-dict-assign": lambda m: m.load_state_dict(make("basic", seed=6).state_dict(), assign=True),
    "foreach-no-grad": lambda m: _no_grad(lambda: torch._foreach_mul_(list(m.parameters()), 0.95)),
}


def _no_grad(fn):
    with torch.no_grad():
        fn()


@pytest.mark.parametrize("edit", list(EDITS))
def test_gradient_free_weight_edits_are_seen_on_the_default_path(edit):
    model = make("basic")
    check_eval(model, "basic")
    EDITS[edit](model)
    check_eval(model, "basic", what=f"after {edit}")


@pytest.mark.parametrize("edit", list(EDITS))
def test_weight_edits_inside_frozen_are_seen_or_refreshed(edit):
    """fastres.frozen's contract: every edit refolds by construction except an in-place edit of a conv
    weight through `.data`, which no cache can see and which needs frozen.refresh(), as its docstring says."""
    model = make("basic")
    with fastres.frozen(model) as f:
        check_eval(model, "basic")
        EDITS[edit](model)
        if edit.startswith("data-in-place"):
            f.refresh()
        check_eval(model, "basic", what=f"after {edit}")


def test_frozen_drops_its_folds_on_exit():
    model = make("basic")
    with fastres.frozen(model):
        check_eval(model, "basic")
    for p in model.parameters():
        p.data.mul_(0.9)          # invisible to any cache: fine outside the context
    check_eval(model, "basic", what="after leaving frozen()")


def test_ema_and_swa_averaged_models():
    model = make("basic")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    swa = AveragedModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        train_step(model, optimizer, seed=step)
        ema.update_parameters(model)
        swa.update_parameters(model)
        check_eval(ema.module, "basic", what=f"EMA after step {step}")
    update_bn([batch(50 + s) for s in range(2)], swa)
    check_eval(swa.module, "basic", what="SWA after update_bn")


def test_frozen_then_unfrozen_batchnorm_fine_tuning():
    model = make("basic")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.requires_grad_(False)
    for step in range(2):
        train_step(model, optimizer, seed=step)
        for bn in bns:
            bn.eval()               # frozen BatchNorm inside a training model
        check_eval(model, "basic", what=f"frozen-BN step {step}")
    for bn in bns:
        bn.requires_grad_(True)
    for step in range(2):
        train_step(model, optimizer, seed=10 + step)   # BatchNorm trains again
        check_eval(model, "basic", what=f"unfrozen-BN step {step}")


@pytest.mark.parametrize("how", ["built", "deepcopied", "converted"])
def test_models_made_under_inference_mode_run_in_eval(how):
    with torch.inference_mode():
        if how == "built":
            model = fastres.FusedResNet18(num_classes=10)
        elif how == "deepcopied":
            model = copy.deepcopy(make("basic"))
        else:
            import torchvision
            model = fastres.convert(torchvision.models.resnet18(num_classes=10))
        model.eval()
        got = model(batch())
        with fastres.frozen(model):
            again = model(batch())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(again, got, rtol=1e-4, atol=1e-4 * got.abs().max().item())
    check_eval(model, "basic", what=f"model {how} under inference_mode")
