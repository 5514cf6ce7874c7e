"""Detection plots (Matplotlib, Agg backend): ROC curve and score histograms of clean vs poisoned rows."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jdup import atomic
from jdup import metrics as metrics_lib


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    atomic.save_figure(fig, path, dpi=120, bbox_inches="tight")


def roc_plot(
    is_poison, scores, path: str, *, title: str = "", extra: Mapping[str, np.ndarray] | None = None
) -> None:
    """Writes the ROC curve of ``scores`` (poison positive) to ``path``; ``extra`` adds curves (e.g. MD only).

    Args:
      is_poison: ``[N]`` ground-truth poison flags.
      scores: ``[N]`` detector scores (higher = more suspicious).
      path: PNG file to write (atomically).
      title: figure title.
      extra: optional ``{label: scores}`` drawn as dashed curves.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    curves = {"fused": scores, **(extra or {})}
    for i, (name, s) in enumerate(curves.items()):
        fpr, tpr, _ = metrics_lib.roc_curve(is_poison, s)
        auc = metrics_lib.auroc(is_poison, s)
        ax.plot(
            fpr, tpr, lw=2 if i == 0 else 1, ls="-" if i == 0 else "--", label=f"{name} (AUROC {auc:.3f})"
        )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate (clean rows flagged)")
    ax.set_ylabel("true positive rate (poison rows flagged)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def score_histogram(
    scores, is_poison, threshold: float, path: str, *, title: str = "", bins: int = 50
) -> None:
    """Writes overlaid histograms of clean vs poisoned rows' scores with the threshold line to ``path``."""
    plt = _plt()
    s = np.asarray(scores, np.float64)
    y = np.asarray(is_poison).astype(bool)
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    finite = s[np.isfinite(s)]
    edges = np.histogram_bin_edges(finite if finite.size else np.zeros(1), bins=bins)
    ax.hist(s[~y], bins=edges, alpha=0.6, label=f"clean ({int((~y).sum())})", color="#4c72b0")
    ax.hist(s[y], bins=edges, alpha=0.6, label=f"poisoned ({int(y.sum())})", color="#c44e52")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax.set_xlabel("detection score (higher = more suspicious)")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)
