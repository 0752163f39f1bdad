"""The figures of ``python -m fastres.train`` (matplotlib, Agg backend, PNG files).

Error curves: train error dashed, test error solid, in percent, per epoch. A history is the list of
per-epoch rows a training run logs (epoch, train_error, test_error, ...).
"""
from __future__ import annotations

from typing import Dict, List, Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(ax, name: str, hist: List[Dict], color: str) -> None:
    ep = [h["epoch"] for h in hist]
    # markers while there are few points (one epoch is one point: a line alone would not show it)
    mark = dict(marker="o", ms=4) if len(ep) <= 30 else {}
    ax.plot(ep, [100 * h["train_error"] for h in hist], "--", color=color, label=f"{name} train", **mark)
    ax.plot(ep, [100 * h["test_error"] for h in hist], "-", color=color, lw=2, label=f"{name} test", **mark)
    if ep and len(ep) <= 30:  # whole epochs on the axis, with room around a single point
        ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
        ax.set_xticks(ep if len(ep) <= 15 else ep[::2])


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot(curves: Dict[str, List[Dict]], path: str, title: str) -> None:
    """Train (dashed) and test (solid) error per epoch of one or more runs, in percent."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for i, (name, hist) in enumerate(curves.items()):
        _curves(ax, name, hist, f"C{i}")
    ax.set(xlabel="epoch", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_degradation(runs: Dict[str, List[Dict]], path: str, data: str) -> None:
    """The paper's Figure 6: plain nets on the left, ResNets on the right."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("plain", "resnet")):
        for i, (arch, hist) in enumerate((k, v) for k, v in runs.items() if k.startswith(kind)):
            _curves(ax, arch, hist, f"C{i}")
        ax.set(title=f"{'plain' if kind == 'plain' else 'ResNet'} ({data})", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Plain nets and ResNets of 20 and 56 layers: train error dashed, test error solid (paper Fig. 6)")
    _save(fig, path)


def _style(arch: str, i: int) -> Dict:
    """Plain nets dashed, ResNets solid; one colour per depth."""
    return {"ls": "--" if arch.startswith("plain") else "-", "color": f"C{i}", "lw": 1.5, "label": arch}


def _depth_colours(archs: Sequence[str]) -> Dict[str, int]:
    depths = sorted({"".join(c for c in a if c.isdigit()) for a in archs}, key=int)
    return {a: depths.index("".join(c for c in a if c.isdigit())) for a in archs}


def plot_responses(stds: Dict[str, List[float]], path: str, data: str) -> None:
    """The paper's Figure 7: the std of each 3x3 layer's response (after BN, before the addition and the
    ReLU) by layer index (top) and sorted by magnitude (bottom)."""
    fig, axes = _pyplot().subplots(2, 1, figsize=(7, 7))
    colour = _depth_colours(list(stds))
    for arch, s in stds.items():
        style = _style(arch, colour[arch])
        axes[0].plot(range(1, len(s) + 1), s, **style)
        axes[1].plot(range(1, len(s) + 1), sorted(s, reverse=True), **style)
    axes[0].set(xlabel="layer index (3x3 layers, from the input)", ylabel="std")
    axes[1].set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    values = [v for s in stds.values() for v in s if v > 0]
    wide = bool(values) and max(values) > 50 * min(values)  # a range this wide reads only on a log scale
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        if wide:
            ax.set_yscale("log")
    fig.suptitle(f"Std of the 3x3 layers' responses (after BN, before addition and ReLU)\n"
                 f"{data} test set; plain nets dashed, ResNets solid (paper Fig. 7)")
    _save(fig, path)


def plot_gradients(norms: Dict[str, Dict[str, List[float]]], path: str, data: str) -> None:
    """Per-layer gradient norms of the 3x3 convs' weights, at initialisation (left) and after training
    (right), log scale. `norms[arch][when]` is the list by layer index."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4), sharey=True)
    colour = _depth_colours(list(norms))
    for ax, when in zip(axes, ("init", "trained")):
        for arch, by_when in norms.items():
            g = by_when.get(when, [])
            ax.plot(range(1, len(g) + 1), g, **_style(arch, colour[arch]))
        ax.set(xlabel="layer index (3x3 layers, from the input)", yscale="log",
               title=f"{'at initialisation' if when == 'init' else 'after training'} ({data})")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("||dL/dW|| of the layer's conv weight")
    _save(fig, path)


def plot_shortcuts(runs: Dict[str, List[Dict]], params: Dict[str, int], path: str, arch: str, data: str) -> None:
    """The three shortcut options' error curves on one plot (the paper's Table 3 comparison)."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for i, (option, hist) in enumerate(runs.items()):
        _curves(ax, f"{option} ({params[option] / 1e6:.3f}M)", hist, f"C{i}")
    ax.set(xlabel="epoch", ylabel="error (%)",
           title=f"{arch} on {data}, shortcut options A, B, C (paper Table 3)\ntrain error dashed, test error solid")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
