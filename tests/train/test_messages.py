"""What python -m fastres.train tells the user: the interrupt message (which epoch is saved, and where),
the data-loading worker count from the cores, and a one-epoch curve that can be seen."""
import os

import pytest

from fastres.train import cli as ftrain
from fastres.train import plots as fplots
from fastres.train import trainer as ftrainer

ARGS = ["--data", "synthetic", "--limit-train", "32", "--image-size", "8", "--batch-size", "16", "--epochs", "2",
        "--threads", "1", "--no-progress"]


def _interrupt_at(monkeypatch, when):
    """KeyboardInterrupt at the `when`-th call of Trainer.train_epoch (0-based), as a SIGINT there would."""
    real, calls = ftrainer.Trainer.train_epoch, []

    def train_epoch(self, epoch):
        calls.append(epoch)
        if len(calls) > when:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(ftrainer.Trainer, "train_epoch", train_epoch)


def test_interrupt_in_the_first_epoch_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 0)
    out = tmp_path / "run"
    assert ftrain.cli(ARGS + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "fastres.train: interrupted: no epoch finished; nothing saved", err
    assert not out.exists()  # no empty run folder left behind


def test_interrupt_names_the_epoch_in_the_checkpoint(tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 1)
    out = tmp_path / "run"
    assert ftrain.cli(ARGS + ["--out", str(out)]) == 130
    ckpt = os.path.join(str(out), "checkpoint.pt")
    assert capsys.readouterr().err.strip() == (f"fastres.train: interrupted; epoch 1 is in {ckpt} "
                                               f"(--resume {ckpt} continues)")
    assert os.path.exists(ckpt)


def test_interrupt_while_saving_names_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    # epoch 2 finished training but its checkpoint was never written: epoch 1 is what the file holds
    real, saves = ftrainer.atomic_save, []

    def save(obj, path):
        saves.append(obj["epoch"])
        if obj["epoch"] == 2:
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(ftrainer, "atomic_save", save)
    out = tmp_path / "run"
    assert ftrain.cli(ARGS + ["--out", str(out)]) == 130
    assert saves == [1, 2]
    assert "interrupted; epoch 1 is in " in capsys.readouterr().err


@pytest.mark.parametrize("cores, data, expected", [(1, "imagefolder", 0), (2, "imagefolder", 1),
                                                   (3, "imagefolder", 2), (16, "imagefolder", 4),
                                                   (16, "digits", 0), (16, "synthetic", 0)])
def test_default_workers_from_the_cores(monkeypatch, cores, data, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert ftrainer.default_workers(data) == expected


def test_one_epoch_curve_is_visible(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(fplots, "_save", lambda fig, path: figs.append(fig))
    fplots.plot({"resnet20": [dict(epoch=1, train_error=0.5, test_error=0.4)]}, str(tmp_path / "c.png"), "t")
    (ax,) = figs[0].axes
    assert [line.get_marker() for line in ax.lines] == ["o", "o"]  # one point each: a marker, not a line
    assert list(ax.get_xticks()) == [1] and ax.get_xlim() == (0.5, 1.5)
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "error (%)" and ax.get_legend() is not None
