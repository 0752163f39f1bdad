"""One report for convert() and unfuse(): what each changed (module name, what) and what it left
alone (module name, why). Stored on the model as ``model.fastres_report``, logged at INFO on the
"fastres" logger, printed when asked."""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Tuple

import torch.nn as nn

from fastres.models import plan_guard

__all__ = ["Report", "ConversionReport", "UnfuseReport", "finish", "join"]

log = logging.getLogger("fastres")


@dataclasses.dataclass
class Report:
    """changed: (module name, what was done); left_alone: (module name, why)."""

    changed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    left_alone: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    title = "fastres"
    verb = "changed"

    def __str__(self) -> str:
        lines = [f"{self.title}: {self.verb} {len(self.changed)}, left alone {len(self.left_alone)}"]
        lines += [f"  {self.verb:<11} {name or '<model>'}: {what}" for name, what in self.changed]
        lines += [f"  left alone  {name or '<model>'}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


plan_guard.inert(Report)   # (no forward reads it: a converted model's frozen plan stays guarded)


class ConversionReport(Report):
    """What convert() fused (``fused``: module name, what) and left alone (module name, why)."""

    title, verb = "fastres.convert", "fused"

    @property
    def fused(self) -> List[Tuple[str, str]]:
        return self.changed


class UnfuseReport(Report):
    """What unfuse() restored (``restored``: module name, old class -> new class) and left alone."""

    title, verb = "fastres.unfuse", "restored"

    @property
    def restored(self) -> List[Tuple[str, str]]:
        return self.changed


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def finish(model: nn.Module, report: Report, verbose: bool) -> nn.Module:
    """Store, log and (verbose) print the report; return the model."""
    object.__setattr__(model, "fastres_report", report)
    log.info("%s", report)
    if verbose:
        print(report)
    return model
