"""python -m fastres.train: the default run shortened, each data format, resume, 2 gloo processes,
the degradation experiment at a tiny size, and bad input (exit status 2, a message, no traceback)."""
import csv
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import run_cut_after_first_checkpoint

from fastres.train import cli as ftrain
from fastres.train import data as fdata
from fastres.train import trainer as ftrainer

# One thread per process: on a busy shared CPU, OpenMP threads competing for cores cost several-fold.
THREADS = ["--threads", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_default_run_shortened(tmp_path):
    """The no-argument run's code path (ResNet-20 on the digits), 1 epoch on 256 images."""
    out = str(tmp_path / "run")
    r = ftrain.main(["--epochs", "1", "--limit-train", "256", "--out", out, *THREADS])
    rows = read_csv(os.path.join(out, "log.csv"))
    assert [int(r_["epoch"]) for r_ in rows] == [1]
    assert 0.0 <= float(rows[0]["test_error"]) <= 1.0 and np.isfinite(float(rows[0]["train_loss"]))
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The checkpoint holds the trained weights: evaluating them reproduces the logged test error.
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["args"]["arch"] == "resnet20"
    model = ftrainer.build_model("resnet20", 10)
    model.load_state_dict(ckpt["model"])
    model.eval()
    test = fdata.digits(16).test
    x, y = test.tensors
    with torch.no_grad():
        err = (model(x).argmax(1) != y).float().mean().item()
    assert err == pytest.approx(float(rows[0]["test_error"]), abs=1e-6)
    assert r["test_error"] == pytest.approx(err, abs=1e-6)


def test_paper_schedule():
    lrs = [ftrainer.lr_at(step, 100, 0.1) for step in range(100)]
    assert lrs[:50] == [0.1] * 50
    assert lrs[50:75] == pytest.approx([0.01] * 25) and lrs[75:] == pytest.approx([0.001] * 25)
    warm = [ftrainer.lr_at(step, 100, 0.1, warmup=10) for step in (0, 9, 10)]
    assert warm == pytest.approx([0.01, 0.01, 0.1])
    a = ftrain.finish_args(ftrain.parser().parse_args([]))
    assert (a.arch, a.data, a.lr, a.momentum, a.weight_decay, a.warmup_epochs) == (
        "resnet20", "digits", 0.1, 0.9, 1e-4, 0)


def test_digits_split_is_fixed_and_normalised():
    a, b = fdata.digits(16), fdata.digits(16)
    assert len(a.train) == 1437 and len(a.test) == 360
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    x = a.train.tensors[0]
    assert x.shape == (1437, 3, 16, 16)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert sorted(torch.bincount(a.test.tensors[1]).tolist())[0] >= 30  # stratified: every digit present


def test_augment_crops_and_flips():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = fdata.augment(x, pad=2, flip=True)
    assert y.shape == x.shape
    # Every image is a shifted (and maybe mirrored) window of its zero-padded original.
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):
        found = any(torch.equal(y[i], c) for dy in range(5) for dx in range(5)
                    for c in (xp[i, :, dy:dy + 8, dx:dx + 8], xp[i, :, dy:dy + 8, dx:dx + 8].flip(2)))
        assert found, i
    assert not torch.equal(y, x)


def write_cifar(root, n_train=16, n_test=8):
    """The python CIFAR-10 layout with tiny random batches; returns the test labels."""
    rng = np.random.default_rng(1)
    os.makedirs(root)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f)
    return batch


def test_cifar10_pickle_batches(tmp_path):
    root = str(tmp_path / "cifar-10-batches-py")
    test_batch = write_cifar(root)
    d = fdata.load("cifar10", str(tmp_path))  # the folder holding cifar-10-batches-py also works
    assert len(d.train) == 80 and len(d.test) == 8
    x, y = d.test.tensors
    assert x.shape == (8, 3, 32, 32) and y.tolist() == test_batch[b"labels"]
    # Channel-major pixels: pixel (0, 0) of the red plane is byte 0, of the green plane byte 1024.
    raw = torch.tensor(test_batch[b"data"][0].astype(np.float32) / 255).view(3, 32, 32)
    train_raw = np.concatenate([pickle.load(open(os.path.join(root, f"data_batch_{i}"), "rb"))[b"data"]
                                for i in range(1, 6)]).reshape(-1, 3, 32 * 32).astype(np.float32) / 255
    mean, std = train_raw.mean(axis=(0, 2)), train_raw.std(axis=(0, 2), ddof=1)
    expect = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(x[0], expect, rtol=1e-4, atol=1e-4)

    out = str(tmp_path / "run")
    ftrain.main(["--data", "cifar10", "--data-dir", root, "--epochs", "1", "--batch-size", "16",
                 "--out", out, *THREADS])
    assert len(read_csv(os.path.join(out, "log.csv"))) == 1


def test_cifar10_malformed_batch(tmp_path):
    root = str(tmp_path / "c")
    write_cifar(root)
    with open(os.path.join(root, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(fdata.DataError, match=r"data_batch_3.*\(N, 3072\)"):
        fdata.load("cifar10", root)
    os.remove(os.path.join(root, "test_batch"))
    with pytest.raises(fdata.DataError, match="lacks test_batch"):
        fdata.load("cifar10", root)


def write_images(root, classes=("cat", "dog"), per_class=6):
    from PIL import Image

    rng = np.random.default_rng(2)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            size = (10 + i, 12)  # mixed sizes: every image is resized
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(os.path.join(root, c, f"{i}.png"))


def test_imagefolder_train_val(tmp_path):
    write_images(str(tmp_path / "train"))
    write_images(str(tmp_path / "val"), per_class=2)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = fdata.load("imagefolder", str(tmp_path), size=16)
    assert d.num_classes == 2 and len(d.train) == 12 and len(d.test) == 4
    x, label = d.test[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label == 1

    out = str(tmp_path / "run")
    ftrain.main(["--data", "imagefolder", "--data-dir", str(tmp_path), "--image-size", "16", "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--out", out, *THREADS])
    assert len(read_csv(os.path.join(out, "log.csv"))) == 1


def test_unreadable_image_is_a_clear_error(tmp_path, capsys):
    write_images(str(tmp_path / "train"), per_class=3)
    write_images(str(tmp_path / "val"), per_class=1)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    code = ftrain.cli(["--data", "imagefolder", "--data-dir", str(tmp_path), "--image-size", "8", "--epochs",
                       "1", "--batch-size", "8", "--workers", "1", "--out", str(tmp_path / "run"), *THREADS])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("fastres.train: error: cannot read image ") and "broken.png" in err


def test_imagefolder_single_tree_and_errors(tmp_path):
    write_images(str(tmp_path / "all"), classes=("a", "b", "c"), per_class=5)
    d = fdata.load("imagefolder", str(tmp_path / "all"), size=8)
    assert d.num_classes == 3 and len(d.train) + len(d.test) == 15 and len(d.test) == 3
    with pytest.raises(fdata.DataError, match="does not exist"):
        fdata.load("imagefolder", str(tmp_path / "missing"), size=8)
    os.makedirs(tmp_path / "empty" / "only")
    with pytest.raises(fdata.DataError, match="at least 2"):
        fdata.load("imagefolder", str(tmp_path / "empty"), size=8)


def test_resume_continues_as_if_uninterrupted(tmp_path, monkeypatch):
    args = ["--data", "synthetic", "--limit-train", "64", "--image-size", "8", "--batch-size", "16",
            "--epochs", "2", *THREADS]
    full = ftrain.main(args + ["--out", str(tmp_path / "full")])

    # Interrupt the second run right after its first checkpoint was written.
    run_cut_after_first_checkpoint(monkeypatch, args + ["--out", str(tmp_path / "cut")])
    assert [f for f in os.listdir(tmp_path / "cut") if f.startswith(".tmp")] == []
    resumed = ftrain.main(args + ["--out", str(tmp_path / "cut"), "--resume"])

    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    for (k, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    r = ftrain.main(["--data", "synthetic", "--limit-train", "48", "--image-size", "8", "--batch-size", "8",
                     "--epochs", "1", "--device", "cpu", "--out", out, *THREADS])
    torch.save({"params": {k: v for k, v in r["model"].named_parameters()}, "history": r["history"]},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_keep_identical_parameters(tmp_path):
    out, res = str(tmp_path / "run"), str(tmp_path / "res")
    os.makedirs(res)
    mp.spawn(_rank, args=(2, _free_port(), out, res), nprocs=2, join=True)
    r0 = torch.load(os.path.join(res, "rank0.pt"), weights_only=False)
    r1 = torch.load(os.path.join(res, "rank1.pt"), weights_only=False)
    torch.manual_seed(0)
    init = dict(ftrainer.build_model("resnet20", 10).named_parameters())
    moved = 0
    for k, p in r0["params"].items():
        torch.testing.assert_close(p, r1["params"][k], rtol=0, atol=0, msg=k)
        moved += not torch.equal(p, init[k])
    assert moved > len(init) // 2  # it trained: 3 steps of 8 images on each rank
    def metrics(r):  # all-reduced over the ranks, so equal on both; timings are per rank
        return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in r["history"]]

    assert metrics(r0) == metrics(r1) and len(metrics(r0)) == 1
    assert len(read_csv(os.path.join(out, "log.csv"))) == 1  # written by rank 0 only, once


def test_degradation_experiment_tiny(tmp_path):
    out = str(tmp_path / "deg")
    runs = ftrain.main(["--experiment", "degradation", "--limit-train", "32", "--image-size", "8",
                        "--batch-size", "16", "--epochs", "1", "--out", out, *THREADS])
    assert list(runs) == ["plain20", "plain56", "resnet20", "resnet56"]
    for arch in runs:
        assert len(read_csv(os.path.join(out, arch, "log.csv"))) == 1
    with open(os.path.join(out, "degradation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastres.train", *args, *THREADS], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet21"], "unknown --arch 'resnet21': expected one of resnet20"),
    (["--data", "cifar10", "--data-dir", "/nonexistent/cifar"], "CIFAR-10 folder /nonexistent/cifar does not exist"),
    (["--data", "imagefolder"], "--data imagefolder needs --data-dir"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    p = run_cli(*args, "--out", str(tmp_path / "out"))
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pt")


def test_unwritable_out_and_existing_checkpoint(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    p = run_cli("--out", str(blocker / "run"))
    assert p.returncode == 2 and "is not a writable folder" in p.stderr and "Traceback" not in p.stderr

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"an earlier run")
    p = run_cli("--out", str(out))
    assert p.returncode == 2 and "already exists: pass --resume" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("--out", str(out), "--resume")
    assert p.returncode == 2 and "is not a fastres checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert (out / "checkpoint.pt").read_bytes() == b"an earlier run"


def test_default_out_never_reuses_an_earlier_run(tmp_path, monkeypatch):
    from fastres.train.cli import default_out

    monkeypatch.chdir(tmp_path)
    assert default_out("resnet20-digits", fresh=True) == os.path.join("runs", "resnet20-digits")
    os.makedirs(os.path.join("runs", "resnet20-digits"))
    open(os.path.join("runs", "resnet20-digits", "checkpoint.pt"), "w").close()
    assert default_out("resnet20-digits", fresh=True) == os.path.join("runs", "resnet20-digits-2")
    assert default_out("resnet20-digits", fresh=False) == os.path.join("runs", "resnet20-digits")


def test_log_follows_stdout_between_runs(tmp_path):
    # A notebook or a test harness swaps sys.stdout between two cli() calls and closes the old one: the
    # second run must log to the new stdout, not print "--- Logging error ---" for a closed file.
    import contextlib
    import io
    argv = ["--data", "imagefolder", "--data-dir", str(tmp_path), "--image-size", "8", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "run"), *THREADS]
    write_images(str(tmp_path / "train"), per_class=3)
    write_images(str(tmp_path / "val"), per_class=1)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")  # fails fast, after the banner
    outs, errs = [], io.StringIO()
    for _ in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errs):
            assert ftrain.cli(argv) == 2
        outs.append(out.getvalue())
        out.close()
    assert all("CPU thread" in o for o in outs), outs
    assert "Logging error" not in errs.getvalue() and "Traceback" not in errs.getvalue(), errs.getvalue()
