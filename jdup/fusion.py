"""Host-side (NumPy) fusion of detector scores: robust z-scores, Gaussian tail fusion, rank ensembles.

Every function takes per-row scores (higher = more suspicious unless stated) and returns per-row scores or flags;
nothing here touches a model. Used by :mod:`jdup.detect` (``method: fisher`` and ``ensemble``) and
:mod:`jdup.sensitivity` (UPGP's per-class robust z and low-tail flag rule).

``fisher`` (jdup's default detector, docs/detection.md "Default detector"): each component score ``s_i``
(DUP's aggregated Mahalanobis distance, DUP's spectral ratio) becomes a robust z-score against the clean
validation rows, ``z_i = (s_i - median_i) / (1.4826 MAD_i)``; under a Gaussian reading of the clean tail its
upper-tail probability is ``p_i = 1 - Φ(z_i)``, and the fused score is Fisher's combination ``-Σ log p_i``. A
row far out on any one component gets a large score (unlike a weighted mean of z-scores, where a component with
a small weight cannot raise the score much), and an uninformative component adds only about ``log 2`` of noise
per row. The threshold is the ``1 - frr`` quantile of the validation rows' fused scores, as for DUP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax.scipy.special import log_ndtr


def robust_fit(ref: np.ndarray) -> tuple[float, float]:
    """``(median, 1.4826 · MAD)`` of reference scores (falls back to the standard deviation when the MAD is 0)."""
    ref = np.asarray(ref, np.float64)
    med = float(np.median(ref))
    mad = 1.4826 * float(np.median(np.abs(ref - med)))
    if mad <= 1e-12:
        mad = float(np.std(ref)) + 1e-12
    return med, mad


def upper_tail_logp(z: np.ndarray) -> np.ndarray:
    """``log(1 - Φ(z))``, the log upper-tail probability of a standard normal, stable far into the tail."""
    z = np.asarray(z, np.float64)
    return np.asarray(log_ndtr(-z.astype(np.float32)), np.float64)


def fisher_scores(components: Sequence[np.ndarray], n_ref: int) -> np.ndarray:
    """Fisher's combination of Gaussian tail probabilities of robust z-scores.

    Args:
      components: ``[n_ref + N]`` arrays, one per component score (higher = more suspicious), whose first
        ``n_ref`` rows are the clean reference (validation) rows.
      n_ref: number of leading reference rows the median/MAD of each component are fitted on.

    Returns:
      ``[n_ref + N]`` float64 fused scores ``-Σ_i log(1 - Φ(z_i))`` (higher = more suspicious).
    """
    out = None
    for s in components:
        s = np.asarray(s, np.float64)
        med, mad = robust_fit(s[:n_ref])
        t = -upper_tail_logp((s - med) / mad)
        out = t if out is None else out + t
    return out


def robust_z(
    scores: np.ndarray,
    labels: np.ndarray,
    ref_scores: np.ndarray | None = None,
    ref_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Per-class robust z-score ``(s - median_c) / (1.4826 MAD_c)`` (docs/dup-method.md §4.3).

    The median and MAD of class ``c`` come from the reference rows of that class when given (known-clean rows
    scored the same way), else from the scored rows themselves. A reference matters when the scored set is
    heavily poisoned: in the DUP benchmark sets about half the target-class rows are poisoned, which drags the
    in-set median between the two groups and inflates the MAD.

    Args:
      scores, labels: ``[N]`` scores and given labels of the scored rows.
      ref_scores, ref_labels: optional ``[M]`` reference (clean) scores and labels.

    Returns:
      ``[N]`` float64 z-scores.
    """
    s = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    z = np.zeros_like(s)
    for c in np.unique(labels):
        i = labels == c
        ref = s[i]
        if ref_scores is not None:
            r = np.asarray(ref_scores, np.float64)[np.asarray(ref_labels) == c]
            if len(r) >= 5:
                ref = r
        med, mad = robust_fit(ref)
        z[i] = (s[i] - med) / mad
    return z


def flag_low_tail(
    z: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    min_frac: float = 0.005,
    max_frac: float = 0.5,
    fit: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Flag the low-z tail of the suspected target class (docs/dup-method.md §4.3-4.4).

    A working backdoor makes the victim predict the row's given (target) label and the perturbation barely moves
    that fit: a poisoned row sits just below its class's clean sensitivity, at ``s >= 0``. Rows the victim gets
    wrong fall on the other side: the label flip *lowers* their loss (``s < 0``), the extreme low tail of ``z`` of
    whichever class has them (on the SST-2 BadNets MiniLM victim all non-target rows below ``-2.5`` were
    misclassified, and the former rule, the largest fraction of rows below ``-threshold``, chose that class: FAR
    1.0). So with ``fit`` (the victim predicts the given label) only fitted rows count, for the class and the flags.

    The target class is the one whose (fitted) rows lie furthest below the clean median on average, the largest
    ``mean(max(0, -z))``: it sees a shifted bulk (the DUP sets are about half poison in the target class, mostly at
    ``-2.5 < z < 0``) as well as a heavy tail. Its rows below ``-threshold`` are flagged, their count clipped to
    ``[min_frac, max_frac]`` of all rows (the lowest z first).

    Args:
      z: ``[N]`` robust z-scores (:func:`robust_z`; low = suspicious).
      labels: ``[N]`` given labels.
      threshold: flag rows with ``z < -threshold``.
      min_frac, max_frac: bounds on the flagged fraction of ``N``.
      fit: optional ``[N]`` bool, the victim predicts the row's given label (default: every row counts).

    Returns:
      ``(flags [N] bool, target_class)``.
    """
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels)
    n = len(z)
    ok = np.ones(n, bool) if fit is None else np.asarray(fit, bool)
    classes = np.unique(labels)
    below = np.maximum(0.0, -z)
    depth = [below[(labels == c) & ok].mean() if np.any((labels == c) & ok) else -1.0 for c in classes]
    target = int(classes[int(np.argmax(depth))])
    in_c = np.flatnonzero((labels == target) & ok)
    order = in_c[np.argsort(z[in_c], kind="stable")]
    count = int(np.sum(z[in_c] < -threshold))
    count = int(np.clip(count, int(np.ceil(min_frac * n)), int(np.floor(max_frac * n))))
    count = min(count, len(in_c))
    flags = np.zeros(n, bool)
    flags[order[:count]] = True
    return flags, target


def ensemble_scores(
    scores: Sequence[np.ndarray],
    calib: np.ndarray | None = None,
    weights: Sequence[float] | None = None,
    standardize: bool = True,
    rank: bool = False,
) -> np.ndarray:
    """Average of robustly standardised suspicion scores (each: higher = more suspicious).

    Each score is mapped to ``(x - median) / (1.4826 MAD)`` with the median/MAD taken on the calibration rows
    ``calib`` (e.g. known-clean rows; default: all rows), so scores on different scales (Mahalanobis distances,
    loss changes, cosines) count equally.

    Args:
      scores: sequence of ``[N]`` arrays.
      calib: optional boolean mask or index array of calibration rows.
      weights: optional per-score weights (default equal).
      rank: average rank fractions in ``[0, 1)`` instead (scale-free, insensitive to heavy tails; on the SST-2
        badnets MiniLM victim DUP+UPGP: rank 0.891 vs robust-z 0.805 AUROC).
      standardize: ``False`` averages the scores as given -- right when each is already a z-score against its
        own clean calibration rows (DUP's fused score, ``UPGPDetection.scores``).

    Returns:
      ``[N]`` float64 ensemble score (higher = more suspicious).
    """
    out = None
    weights = [1.0] * len(scores) if weights is None else list(weights)
    for s, w in zip(scores, weights, strict=True):
        s = np.asarray(s, np.float64)
        if rank:
            s = np.argsort(np.argsort(s, kind="stable"), kind="stable") / len(s)
        elif standardize:
            ref = s if calib is None else s[calib]
            med = np.median(ref)
            mad = 1.4826 * np.median(np.abs(ref - med)) + 1e-12
            s = (s - med) / mad
        t = w * s
        out = t if out is None else out + t
    return out / float(sum(weights))
