"""The CPU inference baselines beyond eager PyTorch, each built once per row from the plain-PyTorch model
(torchvision's) and called with no arguments like the other providers' Steps:

* ``onnxruntime``: the model exported to ONNX once when the row is built (torch.onnx.export with
  ``dynamo=True``: the torch.export-based exporter, onnxscript behind it, torch's default since 2.9; the
  TorchScript one, ``dynamo=False``, is deprecated), run by ``onnxruntime.InferenceSession`` on the
  CPUExecutionProvider with ``intra_op_num_threads = torch.get_num_threads()`` and every graph optimization
  (ORT_ENABLE_ALL), on the row's input as an NCHW float32 numpy array. ONNX has one layout, so the NCHW and
  the channels_last rows feed ONNX Runtime the same NCHW array. Its worker threads do not spin-wait
  (session.intra_op.allow_spinning=0): spinning keeps the cores busy after each run, and the next torch call
  of the alternating benchmark ran 2.3x slower for it (eager ResNet-50 b8 64 px on 2 cores: 29 ms alone,
  67 ms right after an ONNX Runtime call, 38 ms on the second), while ONNX Runtime alone ran as fast without
  spinning (18.1 vs 18.2 ms). Optional: onnxruntime, onnx and onnxscript
  (``pip install onnxruntime onnx onnxscript``, or the ``bench`` extra); without them the row is skipped.
* ``compile+freezing``: torch.compile of the plain model with ``torch._inductor.config.freezing = True``
  (parameters become constants: BatchNorm folded into the convolutions, oneDNN weight prepacking), eval
  mode only. It compiles when the row is built; the flag is set around each call (so that a recompile
  freezes too) and restored after it.

Both are inference baselines: model-level eval rows (no_grad) on a CPU only.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn

from fastres.bench.config import raise_recompile_limit

ORT = "onnxruntime"
FREEZING = "compile+freezing"
EVAL_ONLY = (ORT, FREEZING)
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")


@functools.lru_cache(maxsize=None)
def onnx_missing() -> Optional[str]:
    """None when ONNX export and ONNX Runtime can run here, else the skip reason (naming the install)."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    return (f"{' and '.join(missing)} not importable: pip install onnxruntime onnx onnxscript "
            "(or pip install -e .[bench]) to time the onnxruntime rows")


def ort_session(model_proto: bytes, threads: Optional[int] = None):
    """An InferenceSession on the CPU: `threads` intra-op threads (default torch's), every graph optimization,
    no spin-waiting."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")   # see the module docstring
    return ort.InferenceSession(model_proto, so, providers=["CPUExecutionProvider"])


def export_onnx(module: nn.Module, x: torch.Tensor) -> bytes:
    """`module` (eval mode) exported for input `x` with the dynamo exporter, as a serialized ModelProto."""
    with torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    return program.model_proto.SerializeToString()


class OnnxRuntimeCall:
    """The plain model under ONNX Runtime: exported and loaded once, then one session.run per call."""

    def __init__(self, module: nn.Module, x: torch.Tensor):
        why = onnx_missing()
        if why is not None:
            raise LookupError(why)
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise LookupError(f"{ORT} is a CPU fp32 baseline (got a {x.dtype} tensor on {x.device})")
        x = x.detach().contiguous()   # NCHW: ONNX's one layout, whatever the row's format
        self.session = ort_session(export_onnx(module.eval(), x))
        self.feed = {self.session.get_inputs()[0].name: x.numpy()}

    def __call__(self):
        return self.session.run(None, self.feed)[0]


def _freezing_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class FreezingCall:
    """torch.compile of the plain model with inductor's freezing, compiled (one call) when built.

    Dynamo keeps compiled graphs per code object, across module instances, and its guards do not see
    inductor's freezing flag: compiling ``module`` itself would reuse a plain compile row's graph of the
    same class and shapes (then nothing is frozen), and a later plain row would reuse a frozen one (with
    this instance's weights baked in). So the freezing graph is compiled from its own function,
    :func:`_freezing_forward`, after clearing dynamo's caches (a previous freezing row of another instance)."""

    def __init__(self, module: nn.Module, x: torch.Tensor):
        if x.device.type != "cpu":
            raise LookupError(f"{FREEZING} is a CPU inference baseline here (got a tensor on {x.device})")
        raise_recompile_limit()
        self.module, self.x = module.eval(), x
        torch.compiler.reset()
        self.fn = torch.compile(_freezing_forward, dynamic=False)
        self()

    def __call__(self):
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.fn(self.module, self.x)


__all__ = ["ORT", "FREEZING", "EVAL_ONLY", "onnx_missing", "ort_session", "export_onnx", "OnnxRuntimeCall",
           "FreezingCall"]
