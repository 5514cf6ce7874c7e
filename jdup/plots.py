"""Every figure jdup draws (Matplotlib, Agg backend), each written atomically through :func:`jdup.atomic.save_figure`.

* detection (``jdup detect``): :func:`roc_plot`, :func:`score_histogram`;
* a run (``jdup run``): :func:`before_after_bars`;
* a sweep (``jdup report``): :func:`asr_vs_cacc`, :func:`auroc_bars`, :func:`roc_panels`.

The functions take plain numbers and labels (no stage results, no sweep records); the callers pick them out.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from jdup import atomic
from jdup import metrics as metrics_lib


def preload() -> None:
    """Import Matplotlib (about 0.6 s) in a background thread, so that a caller who will draw after a long
    computation (``jdup detect``'s passes release the GIL while XLA runs) does not wait for the import then. Safe to
    call more than once; drawing before the import has finished simply waits for it (Python's import lock)."""
    global _PRELOAD
    if _PRELOAD is None:
        _PRELOAD = threading.Thread(target=_plt, name="jdup-plots-preload", daemon=True)
        _PRELOAD.start()


_PRELOAD: threading.Thread | None = None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """The one way a figure is written: laid out, cropped, 120 dpi, atomically; then closed."""
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120, bbox_inches="tight")
    _plt().close(fig)


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


def before_after_bars(metrics: Mapping[str, float], path: str) -> None:
    """Bars of CACC / ASR / RA before (backdoored) and after (purified) unlearning, for the names that have both
    ``<name>_before`` and ``<name>_after`` in ``metrics``."""
    plt = _plt()
    names = [n for n in ("cacc", "asr", "ra") if f"{n}_before" in metrics and f"{n}_after" in metrics]
    before = [metrics[f"{n}_before"] for n in names]
    after = [metrics[f"{n}_after"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="backdoored", color="#c44e52")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="purified", color="#4c72b0")
    for x, b, a in zip(xs, before, after, strict=True):
        ax.text(x - 0.2, b + 0.01, f"{b:.2f}", ha="center", fontsize=8)
        ax.text(x + 0.2, a + 0.01, f"{a:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [n.upper() for n in names])
    ax.set_ylim(0, 1.1)
    ax.set_title("before / after unlearning")
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def asr_vs_cacc(
    victims: Sequence[tuple[float, float]],
    points: Sequence[tuple[str, str, float, float]],
    path: str,
) -> None:
    """ASR against CACC after unlearning: one colour per method, one marker per attack; victims as grey crosses.

    Args:
      victims: ``(cacc, asr)`` of each backdoored victim.
      points: ``(method, attack, cacc, asr)`` of each unlearned cell.
      path: PNG file to write.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = sorted({p[0] for p in points})
    attacks = sorted({p[1] for p in points})
    markers = "os^DvP*X<>"
    cmap = plt.get_cmap("tab10")
    for i, (cacc, asr) in enumerate(victims):
        ax.scatter(cacc, asr, marker="x", color="0.5", s=30, label="backdoored victim" if i == 0 else None)
    for mi, m in enumerate(methods):
        for ai, a in enumerate(attacks):
            pts = [(p[2], p[3]) for p in points if p[0] == m and p[1] == a]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(
                    xs,
                    ys,
                    color=cmap(mi % 10),
                    marker=markers[ai % len(markers)],
                    s=28,
                    alpha=0.8,
                    label=f"{m} | {a}",
                )
    ax.set_xlabel("CACC (test-clean accuracy)")
    ax.set_ylabel("ASR (test-poison → target)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("after unlearning: lower-right is better")
    ax.legend(fontsize=6, loc="upper left", ncol=1 if len(methods) * len(attacks) < 12 else 2)
    _save(fig, path)


def auroc_bars(values: Mapping[tuple[str, str], Sequence[float]], path: str) -> None:
    """Mean ± std (sample std) detection AUROC per attack, one bar per model.

    Args:
      values: ``{(attack, model): [AUROC, ...]}`` (NaNs are left out).
      path: PNG file to write.
    """
    plt = _plt()
    attacks = sorted({a for a, _ in values})
    models = sorted({m for _, m in values})
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(attacks) * max(1, len(models)) ** 0.5 + 2), 3.6))
    width = 0.8 / len(models)
    for mi, m in enumerate(models):
        means, stds = [], []
        for a in attacks:
            vals = [v for v in values.get((a, m), ()) if not np.isnan(v)]
            means.append(float(np.mean(vals)) if vals else 0.0)
            stds.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)  # sample std, as the tables
        xs = np.arange(len(attacks)) + (mi - (len(models) - 1) / 2) * width
        ax.bar(xs, means, width=width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(np.arange(len(attacks)), attacks)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_ylabel("AUROC (test-detect)")
    ax.set_title("detection AUROC per attack")
    ax.legend(fontsize=7)
    _save(fig, path)


def roc_panels(
    curves: Mapping[str, Sequence[tuple[str, Sequence[float], Sequence[float]]]], path: str
) -> None:
    """One panel per attack with its ROC curves.

    Args:
      curves: ``{attack: [(label, fpr, tpr), ...]}`` (panels in sorted attack order).
      path: PNG file to write.
    """
    plt = _plt()
    attacks = sorted(curves)
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.4 * len(attacks), 3.4), squeeze=False)
    for ax, a in zip(axes[0], attacks, strict=True):
        for label, fpr, tpr in curves[a]:
            ax.plot(fpr, tpr, lw=1.2, label=label)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_title(a)
        ax.set_xlabel("FPR (clean flagged)")
        ax.set_ylabel("TPR (poison flagged)")
        ax.legend(fontsize=5, loc="lower right")
    _save(fig, path)
