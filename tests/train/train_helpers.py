"""Helpers the train tests share."""
import pytest

from fastres.train import cli as ftrain
from fastres.train import trainer as ftrainer


def run_cut_after_first_checkpoint(monkeypatch, args) -> None:
    """python -m fastres.train `args`, stopped by a KeyboardInterrupt right after its first checkpoint was
    written (atomic_save wrapped for the run, put back after it)."""
    real_save = ftrainer.atomic_save

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ftrainer, "atomic_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ftrain.main(args)
    monkeypatch.setattr(ftrainer, "atomic_save", real_save)
