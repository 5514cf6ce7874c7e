"""Metrics (docs/dup-method.md §7): AUROC, FRR/FAR, precision/recall/F1, post-filter CACC/ASR; accuracy and ASR.

Plain NumPy on host arrays (these run once per evaluation on ``[N]`` vectors). Conventions: poison is the
positive class; a higher score means more suspicious; ``flags`` is the detector's boolean decision.
"""

from __future__ import annotations

import numpy as np


def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (as ``scipy.stats.rankdata(method='average')``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    # boundaries of runs of equal values
    starts = np.concatenate([[0], np.nonzero(xs[1:] != xs[:-1])[0] + 1])
    ends = np.concatenate([starts[1:], [len(x)]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(is_poison, scores) -> float:
    """Area under the ROC curve (poison positive, ties averaged), as ``sklearn.metrics.roc_auc_score``.

    Computed with the Mann–Whitney rank statistic. Returns ``nan`` if only one class is present (sklearn raises;
    DUP's code reports 0.0 there, which reads like a perfect inverted detector).
    """
    y = np.asarray(is_poison).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.shape} labels vs {s.shape} scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(is_poison, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score (descending), starting at (0, 0), for plots."""
    y = np.asarray(is_poison).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fps / max(int((~y).sum()), 1)]
    return fpr, tpr, np.r_[np.inf, s[last]]


def _ratio(a: int, b: int) -> float:
    return float(a) / float(b) if b else float("nan")


def accuracy(preds, labels) -> float:
    """Fraction of ``preds == labels`` (0.0 for an empty set)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if preds.size else 0.0


def attack_success_rate(preds, target: int) -> float:
    """ASR: fraction of (triggered, non-target) rows predicted as ``target`` (0.0 for an empty set)."""
    preds = np.asarray(preds)
    return float((preds == target).mean()) if preds.size else 0.0


def trigger_success_rate(clean_preds, poison_preds, target: int) -> float:
    """ASR caused by the trigger alone, on paired rows (triggered row ``i`` is a copy of clean row ``i``).

    Among the pairs whose clean copy is *not* predicted as ``target``, the fraction whose triggered copy is. A
    model sends some triggered rows to the target only because it already sends their clean copies there (its own
    error on clean non-target rows); plain ASR counts those, this rate does not. ``nan`` when no clean copy is kept
    off the target.
    """
    clean, poison = np.asarray(clean_preds), np.asarray(poison_preds)
    if clean.shape != poison.shape:
        raise ValueError(f"paired predictions differ in shape: {clean.shape} vs {poison.shape}")
    keep = clean != target
    return float((poison[keep] == target).mean()) if keep.any() else float("nan")


def confusion(is_poison, flags) -> dict[str, int]:
    """``{"tp", "fp", "tn", "fn"}`` with poison as the positive class."""
    y = np.asarray(is_poison).astype(bool).ravel()
    f = np.asarray(flags).astype(bool).ravel()
    return {
        "tp": int(np.sum(y & f)),
        "fp": int(np.sum(~y & f)),
        "tn": int(np.sum(~y & ~f)),
        "fn": int(np.sum(y & ~f)),
    }


def detection_metrics(is_poison, flags, scores=None) -> dict[str, float]:
    """FRR = FP/(FP+TN), FAR = FN/(FN+TP), precision, recall, F1 (and AUROC if ``scores`` are given).

    FRR/FAR are ``nan`` when undefined (no clean / no poison rows); precision, recall and F1 are 0 when undefined
    (sklearn's ``zero_division`` default).
    """
    c = confusion(is_poison, flags)
    precision = _ratio(c["tp"], c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = _ratio(c["tp"], c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    out = {
        "frr": _ratio(c["fp"], c["fp"] + c["tn"]),
        "far": _ratio(c["fn"], c["fn"] + c["tp"]),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        **c,
    }
    if scores is not None:
        out["auroc"] = auroc(is_poison, scores)
    return out


def post_filter_accuracy(preds, labels, flags, mask=None) -> float:
    """Accuracy where every flagged sample counts as wrong (DUP replaces its label by an impossible class).

    On clean rows this is the post-filter CACC; on poison rows (whose label is the target) the post-filter ASR.
    """
    p = np.asarray(preds).ravel()
    y = np.asarray(labels).ravel()
    f = np.asarray(flags).astype(bool).ravel()
    m = np.ones_like(f) if mask is None else np.asarray(mask).astype(bool).ravel()
    n = int(m.sum())
    return _ratio(int(np.sum((p == y) & ~f & m)), n)


def filtered_cacc_asr(preds, labels, flags, is_poison) -> dict[str, float]:
    """Post-filter CACC (clean rows) and ASR (poison rows), plus the unfiltered values, for a mixed scored set.

    Args:
      preds: ``[N]`` predicted classes of the (unpurified) model.
      labels: ``[N]`` file labels (the target label on poison rows).
      flags: ``[N]`` detector decisions.
      is_poison: ``[N]`` ground-truth poison flags.
    """
    y = np.asarray(is_poison).astype(bool).ravel()
    none = np.zeros_like(y)
    return {
        "cacc_filtered": post_filter_accuracy(preds, labels, flags, ~y),
        "asr_filtered": post_filter_accuracy(preds, labels, flags, y),
        "cacc": post_filter_accuracy(preds, labels, none, ~y),
        "asr": post_filter_accuracy(preds, labels, none, y),
    }
