"""The paper's Fig. 7 and Table 3 experiments (python -m fastres.train --experiment responses / shortcuts):
the response capture against a float64 manual forward, the gradient norms against manual autograd,
and tiny runs of both commands writing well-formed files."""
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastres.models.cifar import CifarResNet
from fastres.models.resnet import ZeroPadShortcut
from fastres.train import cli as ftrain
from fastres.train import probes
from fastres.train import trainer as ftrainer

THREADS = ["--threads", "1", "--no-progress"]
TINY = ["--limit-train", "32", "--image-size", "8", "--batch-size", "16", "--epochs", "1", *THREADS]
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def small_net(shortcut):
    """An 8-layer CIFAR net (7 3x3 layers) in float64 with random BN parameters and running statistics,
    so that eval-mode BN is far from the identity."""
    net = CifarResNet(8, num_classes=5, shortcut=shortcut).double()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net


def manual_forward(net, x, training=False):
    """The net's forward written out with functional ops; returns (logits, the 3x3 layers' responses:
    after BN, before the addition and the ReLU)."""
    def bn(h, m):
        if training:
            return F.batch_norm(h, None, None, m.weight, m.bias, True, 0.0, m.eps)
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    def conv(h, c):
        return F.conv2d(h, c.weight, None, c.stride, c.padding)

    responses = [bn(conv(x, net.conv1), net.bn1)]
    h = F.relu(responses[-1])
    for stage in (net.layer1, net.layer2, net.layer3):
        for blk in stage:
            r1 = bn(conv(h, blk.conv1), blk.bn1)
            r2 = bn(conv(F.relu(r1), blk.conv2), blk.bn2)
            responses += [r1, r2]
            if blk.shortcut is None:
                short = torch.zeros_like(r2)
            elif blk.downsample is None:
                short = h
            elif isinstance(blk.downsample, ZeroPadShortcut):
                sub = h[:, :, ::blk.stride, ::blk.stride]
                short = torch.cat([sub, sub.new_zeros(sub.shape[0], r2.shape[1] - sub.shape[1], *sub.shape[2:])], 1)
            else:
                short = bn(conv(h, blk.downsample[0]), blk.downsample[1])
            h = F.relu(r2 + short)
    return F.linear(h.mean((2, 3)), net.fc.weight, net.fc.bias), responses


@pytest.mark.parametrize("shortcut", ["A", "B", "C", None])
def test_captured_responses_are_the_post_bn_pre_addition_outputs(shortcut):
    net = small_net(shortcut).eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    want_logits, want = manual_forward(net, x)
    logits, got = probes.capture_responses(net, x)
    # The manual forward is the net's own forward (fused path): same logits.
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-10)
    assert len(got) == len(want) == 7 == len(probes.layers_3x3(net))
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"layer {i + 1}")
    # ... and not what comes after: a response has negative values (before the ReLU), and a block's
    # second response is not the block's output (after the addition and the ReLU).
    assert all((g < 0).any() for g in got)
    with torch.no_grad():
        block_out = net.layer1[0](F.relu(want[0]))
    assert not torch.allclose(got[2], block_out)
    # The probe leaves nothing behind: no hooks, the net still runs the same.
    assert not net._forward_pre_hooks and not any(b._forward_pre_hooks for b in net.modules())
    torch.testing.assert_close(net(x), want_logits, rtol=1e-10, atol=1e-10)


def test_capture_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        probes.capture_responses(small_net("A").train(), torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_response_stds_over_batches():
    net = small_net(None).eval()
    batches = [torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randn(3, 3, 8, 8, dtype=torch.float64)]
    stds = probes.response_stds(net, batches)
    per_batch = [manual_forward(net, b)[1] for b in batches]
    for i, s in enumerate(stds):
        every_value = torch.cat([r[i].flatten() for r in per_batch])
        assert s == pytest.approx(every_value.std().item(), rel=1e-9), i


def test_grad_norms_match_manual_autograd():
    net = small_net("B")
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (8,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = probes.grad_norms(net, x, y)
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():  # ran on a copy: running statistics untouched
        assert torch.equal(v, before[k]), k
    F.cross_entropy(manual_forward(net, x, training=True)[0], y).backward()
    want = [conv.weight.grad.norm().item() for _, conv, _ in probes.layers_3x3(net)]
    assert got == pytest.approx(want, rel=1e-9)


def test_responses_experiment_tiny_and_resumed(tmp_path):
    out = str(tmp_path / "resp")
    r = ftrain.main(["--experiment", "responses", "--out", out, *TINY])
    rows = read_csv(os.path.join(out, "responses.csv"))
    layers = {"plain20": 19, "plain56": 55, "resnet20": 19, "resnet56": 55}
    assert list(rows[0]) == ["arch", "layer", "std"]
    for arch, n in layers.items():
        mine = [row for row in rows if row["arch"] == arch]
        assert [int(row["layer"]) for row in mine] == list(range(1, n + 1))
        assert all(float(row["std"]) > 0 and math.isfinite(float(row["std"])) for row in mine)
        assert len(r["stds"][arch]) == n and len(read_csv(os.path.join(out, arch, "log.csv"))) == 1
    grads = read_csv(os.path.join(out, "gradients.csv"))
    assert list(grads[0]) == ["arch", "when", "layer", "grad_norm"]
    assert len(grads) == 2 * sum(layers.values()) and {g["when"] for g in grads} == {"init", "trained"}
    assert all(float(g["grad_norm"]) > 0 and math.isfinite(float(g["grad_norm"])) for g in grads)
    assert is_png(os.path.join(out, "responses.png")) and is_png(os.path.join(out, "gradients.png"))

    # Without --resume the trained nets are not replaced; with it they are reused as they are (no
    # training), and the measurement repeats exactly. A degradation run's folders are the same.
    with pytest.raises(ftrainer.UserError, match="already exists"):
        ftrain.main(["--experiment", "responses", "--out", out, *TINY])
    stamps = {a: os.stat(os.path.join(out, a, "checkpoint.pt")).st_mtime_ns for a in layers}
    again = ftrain.main(["--experiment", "responses", "--out", out, "--resume", *TINY])
    assert again["stds"] == r["stds"] and again["grads"] == r["grads"]
    assert stamps == {a: os.stat(os.path.join(out, a, "checkpoint.pt")).st_mtime_ns for a in layers}
    deg = ftrain.main(["--experiment", "degradation", "--out", out, "--resume", *TINY])
    assert deg == r["histories"]


def test_shortcuts_experiment_tiny(tmp_path):
    out = str(tmp_path / "sc")
    r = ftrain.main(["--experiment", "shortcuts", "--arch", "resnet20", "--out", out, *TINY])
    rows = read_csv(os.path.join(out, "shortcuts.csv"))
    assert list(rows[0]) == ["option", "parameters", "train_error", "test_error"]
    assert [row["option"] for row in rows] == ["A", "B", "C"]
    params = [int(row["parameters"]) for row in rows]
    assert params[0] < params[1] < params[2]
    assert params[0] == sum(p.numel() for p in ftrainer.build_model("resnet20", 10).parameters())
    for row in rows:
        assert 0 <= float(row["train_error"]) <= 1 and 0 <= float(row["test_error"]) <= 1
        ckpt = torch.load(os.path.join(out, row["option"], "checkpoint.pt"), weights_only=True)
        assert ckpt["args"]["shortcut"] == row["option"]
    assert r["params"] == dict(zip("ABC", params))
    assert is_png(os.path.join(out, "shortcuts.png"))
    with pytest.raises(ftrainer.UserError, match="has none"):
        ftrain.main(["--experiment", "shortcuts", "--arch", "plain20", "--out", str(tmp_path / "p"), *TINY])


def test_initial_weights_are_the_trainers(tmp_path):
    """responses measures 'init' gradients on build_model under the run's seed: the very weights the
    Trainer starts from."""
    from fastres.train import trainer

    a = ftrain.finish_args(ftrain.parser().parse_args(["--arch", "plain20", "--seed", "3", "--out",
                                                       str(tmp_path / "run"), *TINY]))
    start = trainer.Trainer(a, trainer.Dist("cpu")).model.state_dict()
    torch.manual_seed(3)
    rebuilt = ftrainer.build_model("plain20", 10).state_dict()
    for k, v in start.items():
        assert torch.equal(v, rebuilt[k]), k
    torch.manual_seed(4)
    assert not torch.equal(ftrainer.build_model("plain20", 10).conv1.weight, start["conv1.weight"])


def test_shortcut_flag_needs_a_resnet(tmp_path):
    with pytest.raises(ftrainer.UserError, match="plain net, it has no shortcuts"):
        ftrain.main(["--arch", "plain20", "--shortcut", "B", "--out", str(tmp_path / "p"), *TINY])
