"""Detection scores as pure ``fit`` / ``score`` pairs (DUP's Mahalanobis + spectral scores, and DAN).

Every scorer is a :class:`Scorer`, a NamedTuple of pure functions in the style of optax's
``GradientTransformation``:

* ``fit(features [N, L, D], labels [N]) -> state`` (a NamedTuple of arrays; no Python objects inside, so it can
  be passed to and returned from ``jax.jit``);
* ``score(state, features [B, L, D]) -> [B]`` (higher = more suspicious);
* ``score_layers(state, features [B, L, D]) -> [B, L_sel]`` (the per-layer scores before aggregation).

Host-side fusion of these scores (robust z-scores, tail probabilities, rank ensembles) is in :mod:`jdup.fusion`.

``features`` are pooled hidden states, one row per sample and one slot per layer (DUP uses the outputs of layers
1..L, i.e. Hugging Face ``hidden_states[1:]``; slot ``l`` here is ``hidden_states[l + 1]``). This module imports
only JAX and NumPy, so it is usable from other JAX code without the rest of jdup.

Numerics (see :func:`shrunk_gaussian`): the covariance is centred before it is formed and every matmul runs at
``Precision.HIGHEST``; the precision matrix is never formed for scoring: ``MD² = ‖L⁻¹(x − μ)‖²`` with ``L`` the
Cholesky factor of the shrunk covariance, applied by a triangular solve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
Agg = Literal["mean", "max", "min", "sum"]


class Scorer(NamedTuple):
    """A pair of pure functions (plus the per-layer variant of ``score``).

    Attributes:
      fit: ``(features [N, L, D], labels [N] | None) -> state``.
      score: ``(state, features [B, L, D]) -> [B]``.
      score_layers: ``(state, features [B, L, D]) -> [B, L_sel]``.
    """

    fit: Callable[..., Any]
    score: Callable[..., Array]
    score_layers: Callable[..., Array]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _xp(*xs: Any) -> Any:
    """The array namespace of a decision function: NumPy when every input is a host array or number (the host-side
    float64 decision of :func:`jdup.detect.decide`, computed exactly as NumPy does), else ``jax.numpy`` (device
    arrays, tracers under ``jit``)."""
    host = all(isinstance(x, (np.ndarray, np.generic, float, int)) for x in xs)
    return np if host else jnp


def _matmul(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=HIGHEST)


def aggregate(x: Array, agg: Agg = "mean", axis: int = -1) -> Array:
    """Reduces per-layer scores: ``"mean"`` (DUP's default), ``"max"`` (DUP's fallback, DAN), ``"min"``, ``"sum"``.
    NumPy in, NumPy out; JAX otherwise (as every decision function below)."""
    xp = _xp(x)
    if agg == "mean":
        return xp.mean(x, axis=axis)
    if agg == "max":
        return xp.max(x, axis=axis)
    if agg == "min":
        return xp.min(x, axis=axis)
    if agg == "sum":
        return xp.sum(x, axis=axis)
    raise ValueError(f"unknown aggregation {agg!r}; use mean, max, min or sum")


def layer_indices(spec: str | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """DUP's layer-selection helper: a named range or an explicit list, as 0-based slots of the feature axis.

    Args:
      spec: ``None``/``"all"`` (every layer), ``"first_half"`` ``[0, L/2)``, ``"middle"`` ``[L/4, 3L/4)``,
        ``"last_half"``, ``"last_quarter"``, ``"last_three_layers"``, ``"last_layer"``, or a list of ints
        (negative ints count from the end; out-of-range entries are an error rather than silently dropped).
      num_layers: ``L``.

    Returns:
      A sorted tuple of distinct layer slots.
    """
    n = num_layers
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return tuple(range(n))
    if isinstance(spec, str):
        ranges = {
            "first_half": range(0, n // 2),
            "middle": range(n // 4, (3 * n) // 4),
            "last_half": range(n // 2, n),
            "last_quarter": range((3 * n) // 4, n),
            "last_three_layers": range(max(0, n - 3), n),
            "last_layer": range(n - 1, n),
        }
        if spec not in ranges:
            raise ValueError(
                f"unknown layer selection {spec!r}; use all, {', '.join(ranges)} or a list of ints"
            )
        return tuple(ranges[spec])
    out = []
    for i in spec:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise ValueError(f"layer {i} is out of range for {n} layers")
        out.append(j)
    return tuple(sorted(set(out)))


def _num_classes(labels: Array, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    try:
        return int(np.max(np.asarray(labels))) + 1
    except jax.errors.ConcretizationTypeError:
        raise ValueError("num_classes must be given when labels are traced (inside jit)") from None


# ---------------------------------------------------------------------------------------------------------------
# Shrunk Gaussian


class Gaussian(NamedTuple):
    """A Gaussian with a Cholesky-factored covariance.

    Attributes:
      mean: ``[..., D]``.
      chol: ``[..., D, D]`` lower-triangular ``L`` with ``L Lᵀ = Σ``.
    """

    mean: Array
    chol: Array


def shrunk_covariance(
    x: Array, shrinkage: float = 0.1, *, center: Array | None = None, weights: Array | None = None
) -> tuple[Array, Array]:
    """Mean and shrunk MLE covariance, as ``sklearn.covariance.ShrunkCovariance(shrinkage).fit(x)``.

    ``Σ = (1 − s)·S + s·(tr S / d)·I`` with ``S = (1/n) Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ`` (divide by n).

    Args:
      x: ``[N, D]`` samples.
      shrinkage: ``s`` in ``[0, 1]`` (sklearn's default is 0.1).
      center: rows to subtract instead of the mean (``[N, D]`` or ``[D]``), e.g. each sample's class mean for a
        tied within-class covariance. The returned mean is still the sample mean.
      weights: optional ``[N]`` 0/1 row weights (0 = padding row, ignored).

    Returns:
      ``(mean [D], cov [D, D])`` in the dtype of ``x``.
    """
    d = x.shape[-1]
    w = jnp.ones(x.shape[:1], x.dtype) if weights is None else weights.astype(x.dtype)
    n = jnp.sum(w)
    mean = _matmul(w, x) / n
    xc = (x - jnp.broadcast_to(mean if center is None else center, x.shape)) * w[:, None]
    s = _matmul(xc.T, xc) / n
    mu = jnp.trace(s) / d
    cov = (1.0 - shrinkage) * s + shrinkage * mu * jnp.eye(d, dtype=x.dtype)
    return mean, cov


def _host_gaussian(
    x: np.ndarray, center: np.ndarray, w: np.ndarray, shrinkage: float
) -> tuple[np.ndarray, np.ndarray]:
    x64 = np.asarray(x, np.float64)
    w64 = np.asarray(w, np.float64)[..., None]  # [..., N, 1]
    d = x64.shape[-1]
    n = w64.sum(axis=-2)  # [..., 1]
    mean = (x64 * w64).sum(axis=-2) / n
    c64 = mean[..., None, :] if center is None else np.asarray(center, np.float64)
    xc = (x64 - c64) * w64
    s = np.einsum("...ni,...nj->...ij", xc, xc) / n[..., None]
    mu = np.trace(s, axis1=-2, axis2=-1) / d
    cov = (1.0 - shrinkage) * s + shrinkage * mu[..., None, None] * np.eye(d)
    return mean.astype(x.dtype), np.linalg.cholesky(cov).astype(x.dtype)


def shrunk_gaussian(
    x: Array,
    shrinkage: float = 0.1,
    *,
    center: Array | None = None,
    weights: Array | None = None,
    fit_dtype: Literal["float32", "float64"] = "float32",
) -> Gaussian:
    """Fits a shrunk Gaussian and factors its covariance (Cholesky); batched over leading axes of ``x``.

    Why two precisions: shrinkage keeps ``cond(Σ) ≤ 1 + ((1 − s)/s)·λ_max(S)/mean λ(S)`` (≈ 10–1e3 for encoder
    [CLS] features, up to ~1e5 for LLM residual streams with outlier dimensions). A float32 Cholesky is backward
    stable, and because scores are computed as ``‖L⁻¹δ‖²`` (a triangular solve, never an explicit inverse) the
    relative error of an MD grows like ``sqrt(cond)·ε`` rather than ``cond·ε``; on well-conditioned data this
    matches ``ShrunkCovariance().precision_`` to ~1e-6 (see tests). ``fit_dtype="float64"`` runs the small
    ``d×d`` fit in NumPy float64 on the host through ``jax.pure_callback`` (still jit-compatible, no global
    ``jax_enable_x64`` needed) and returns float32 factors: use it for badly conditioned features (LLMs).

    Args:
      x: ``[..., N, D]``.
      shrinkage: sklearn ``ShrunkCovariance`` shrinkage.
      center: optional ``[..., N, D]`` (or broadcastable) rows to subtract instead of the mean.
      weights: optional ``[N]`` 0/1 row weights (padding rows 0), shared by all leading axes.
      fit_dtype: ``"float32"`` (on device, HIGHEST matmul precision) or ``"float64"`` (host NumPy).

    Returns:
      :class:`Gaussian` with ``mean [..., D]`` and ``chol [..., D, D]`` in ``x.dtype``.
    """
    batch, (n, d) = x.shape[:-2], x.shape[-2:]
    w = jnp.ones((n,), x.dtype) if weights is None else weights.astype(x.dtype)
    xs = x.reshape((-1, n, d))
    cs = None if center is None else jnp.broadcast_to(center, x.shape).reshape(xs.shape)
    if fit_dtype == "float64":
        out = (
            jax.ShapeDtypeStruct(xs.shape[:1] + (d,), x.dtype),
            jax.ShapeDtypeStruct(xs.shape[:1] + (d, d), x.dtype),
        )
        if cs is None:
            host = lambda a, ww: _host_gaussian(a, None, ww, shrinkage)
            mean, chol = jax.pure_callback(host, out, xs, w, vmap_method="sequential")
        else:
            host = lambda a, c, ww: _host_gaussian(a, c, ww, shrinkage)
            mean, chol = jax.pure_callback(host, out, xs, cs, w, vmap_method="sequential")
    elif fit_dtype == "float32":
        if cs is None:
            mean, cov = jax.vmap(lambda a: shrunk_covariance(a, shrinkage, weights=w))(xs)
        else:
            mean, cov = jax.vmap(lambda a, c: shrunk_covariance(a, shrinkage, center=c, weights=w))(xs, cs)
        chol = jnp.linalg.cholesky(cov)
    else:
        raise ValueError(f"fit_dtype must be float32 or float64, got {fit_dtype!r}")
    return Gaussian(mean.reshape(batch + (d,)), chol.reshape(batch + (d, d)))


def mahalanobis_sq(g: Gaussian, x: Array) -> Array:
    """Squared Mahalanobis distance ``δᵀΣ⁻¹δ = ‖L⁻¹δ‖²`` of each row of ``x [B, D]`` (one Gaussian)."""
    y = solve_triangular(g.chol, (x - jnp.broadcast_to(g.mean, x.shape)).T, lower=True)
    return jnp.sum(y * y, axis=0)


def mahalanobis_distance(g: Gaussian, x: Array) -> Array:
    """``sqrt(relu(δᵀΣ⁻¹δ))`` of each row of ``x [B, D]``, as DUP computes it."""
    return jnp.sqrt(jnp.maximum(mahalanobis_sq(g, x), 0.0))


def precision_matrix(g: Gaussian) -> Array:
    """The precision ``Σ⁻¹ = L⁻ᵀL⁻¹`` (for inspection and tests; scoring never forms it)."""
    d = g.chol.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=g.chol.dtype), g.chol.shape)
    linv = solve_triangular(g.chol, eye, lower=True)
    return _matmul(jnp.swapaxes(linv, -1, -2), linv)


# ---------------------------------------------------------------------------------------------------------------
# Calinski-Harabasz layer ranking


def calinski_harabasz(
    features: Array, labels: Array, num_classes: int | None = None, *, mask: Array | None = None
) -> Array:
    """Calinski–Harabasz score of every layer at once, as ``sklearn.metrics.calinski_harabasz_score``.

    ``CH = [tr(B)/(K − 1)] / [tr(W)/(n − K)]``, ``tr(B) = Σₖ nₖ‖cₖ − c‖²``, ``tr(W) = Σᵢ ‖xᵢ − c_{yᵢ}‖²``, with
    ``K`` the number of classes present. Like sklearn, ``CH = 1`` when ``tr(W) = 0``; with fewer than two classes
    present it is 0 (sklearn raises; DUP's ranking then keeps layer order).

    Args:
      features: ``[N, L, D]``.
      labels: ``[N]`` ints in ``[0, num_classes)``.
      num_classes: static class count (inferred from concrete ``labels`` if omitted).
      mask: optional ``[N]`` bool; rows with False are ignored (padding).

    Returns:
      ``[L]`` scores (dtype of ``features``).
    """
    c = _num_classes(labels, num_classes)
    dtype = features.dtype
    w = jnp.ones(labels.shape, dtype) if mask is None else mask.astype(dtype)
    onehot = jax.nn.one_hot(labels, c, dtype=dtype) * w[:, None]  # [N, C]
    counts = onehot.sum(0)  # [C]
    n = w.sum()
    sums = jnp.einsum("nc,nld->cld", onehot, features, precision=HIGHEST)  # [C, L, D]
    means = sums / jnp.maximum(counts, 1.0)[:, None, None]
    overall = jnp.einsum("n,nld->ld", w, features, precision=HIGHEST) / n  # [L, D]
    tr_b = jnp.einsum("c,cl->l", counts, jnp.sum((means - overall[None]) ** 2, axis=-1))
    resid = features - means[labels]  # [N, L, D]
    tr_w = jnp.einsum("n,nl->l", w, jnp.sum(resid * resid, axis=-1))
    k = jnp.sum(counts > 0).astype(dtype)
    ratio = tr_b * (n - k) / jnp.where(tr_w == 0, 1.0, tr_w * (k - 1.0))
    ch = jnp.where(tr_w == 0, 1.0, ratio)
    return jnp.where(k < 2, 0.0, ch).astype(dtype)


def top_layers(ch: Array, top_k: int | None, candidates: Sequence[int]) -> Array:
    """The ``top_k`` candidate layers by descending score; ties keep ascending layer order (stable, as DUP).

    ``top_k`` None or ≤ 0 keeps every candidate (in ascending order). Static output length.
    """
    cand = jnp.asarray(candidates, jnp.int32)
    if not top_k or top_k <= 0:
        return cand
    k = min(int(top_k), len(candidates))
    _, pos = jax.lax.top_k(ch[cand], k)  # lax.top_k breaks ties by the lower index
    return cand[pos]


# ---------------------------------------------------------------------------------------------------------------
# DUP: class-agnostic Mahalanobis on the top-k CH layers


class MahalanobisState(NamedTuple):
    """Fitted state of :func:`mahalanobis`.

    Attributes:
      layers: ``[K]`` int32 selected layer slots, best CH first.
      mean: ``[K, D]`` per-layer means.
      chol: ``[K, D, D]`` Cholesky factors of the per-layer shrunk covariances.
      ch: ``[L]`` CH score of every layer (``-inf`` for non-candidates; zeros if no labels were given).
    """

    layers: Array
    mean: Array
    chol: Array
    ch: Array


def mahalanobis(
    shrinkage: float = 0.1,
    top_k: int | None = 3,
    agg: Agg = "mean",
    layers: str | Sequence[int] | None = None,
    num_classes: int | None = None,
    fit_dtype: Literal["float32", "float64"] = "float32",
) -> Scorer:
    """DUP's Mahalanobis scorer: one class-agnostic shrunk Gaussian per selected layer, distances averaged.

    ``fit`` ranks the candidate layers by Calinski–Harabasz on the (labelled) calibration features, keeps the
    ``top_k`` and fits a Gaussian **only for those** (labels are used for the ranking, never for the Gaussian).
    ``score`` is ``agg_l sqrt(relu(δ_lᵀ P_l δ_l))``.

    Args:
      shrinkage: ShrunkCovariance shrinkage (0.1).
      top_k: number of layers kept (3); None or ≤ 0 keeps every candidate.
      agg: how per-layer distances are combined (``"mean"``; DUP uses ``"max"`` for any other string).
      layers: candidate layers (``md_layers``; see :func:`layer_indices`), default all.
      num_classes: static class count for the CH ranking (inferred from concrete labels if omitted).
      fit_dtype: see :func:`shrunk_gaussian`.
    """

    def fit(features: Array, labels: Array | None = None, mask: Array | None = None) -> MahalanobisState:
        n_layers = features.shape[1]
        cand = layer_indices(layers, n_layers)
        use_all = not top_k or top_k <= 0
        if labels is None or use_all:
            if not use_all and top_k < len(cand):
                raise ValueError(
                    "labels are needed to rank layers (top_k); pass top_k=None to use all candidates"
                )
            ch = jnp.zeros((n_layers,), features.dtype)
            sel = jnp.asarray(cand, jnp.int32)
        else:
            ch_all = calinski_harabasz(features, labels, num_classes, mask=mask)
            is_cand = jnp.zeros((n_layers,), bool).at[jnp.asarray(cand)].set(True)
            ch = jnp.where(is_cand, ch_all, -jnp.inf)
            sel = top_layers(ch, top_k, cand)
        x = jnp.swapaxes(features[:, sel, :], 0, 1)  # [K, N, D]
        g = shrunk_gaussian(x, shrinkage, weights=mask, fit_dtype=fit_dtype)
        return MahalanobisState(sel, g.mean, g.chol, ch)

    def score_layers(state: MahalanobisState, features: Array) -> Array:
        x = jnp.swapaxes(features[:, state.layers, :], 0, 1)  # [K, B, D]
        d = jax.vmap(lambda m, c, xs: mahalanobis_distance(Gaussian(m, c), xs))(state.mean, state.chol, x)
        return d.T  # [B, K]

    def score(state: MahalanobisState, features: Array) -> Array:
        return aggregate(score_layers(state, features), agg)

    return Scorer(fit, score, score_layers)


# ---------------------------------------------------------------------------------------------------------------
# DUP: spectral (inter-layer transition) score


class SpectralState(NamedTuple):
    """Fitted state of :func:`spectral` (nothing is fitted: just the layer slots used).

    Attributes:
      layers: ``[M]`` int32 layer slots in ascending order (``ss_layers``).
    """

    layers: Array


def spectral_ratio(f: Array, method: Literal["gram", "svd"] = "gram") -> Array:
    """``σ₁ / Σσᵢ`` of the layer-difference matrix ``Δ = diff(f, axis=0)`` of ONE sample (``f: [M, D]``).

    ``"gram"`` takes the singular values as ``sqrt(eigvalsh(Δ Δᵀ))`` from the ``(M−1)×(M−1)`` Gram matrix (exact
    in exact arithmetic since ``rank Δ ≤ M − 1``; cheap, batched, no ``D``-sized SVD). In float32 a singular value
    far below σ₁ carries an absolute error of about ``sqrt(ε)·σ₁``; this is negligible for the ratio unless Δ is
    nearly rank-deficient. ``"svd"`` uses ``jnp.linalg.svd`` of Δ (absolute error ``ε·σ₁``). Returns 0 when
    ``Σσ = 0`` (as DUP).
    """
    if f.shape[0] < 2:
        raise ValueError("the spectral score needs at least 2 layers")
    d = jnp.diff(f, axis=0)
    if method == "gram":
        g = _matmul(d, d.T)
        s = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(g), 0.0))
    elif method == "svd":
        s = jnp.linalg.svd(d, compute_uv=False)
    else:
        raise ValueError(f"unknown spectral method {method!r}; use gram or svd")
    tot = jnp.sum(s)
    return jnp.where(tot > 0, jnp.max(s) / jnp.where(tot > 0, tot, 1.0), 0.0).astype(f.dtype)


def spectral(layers: str | Sequence[int] | None = None, method: Literal["gram", "svd"] = "gram") -> Scorer:
    """DUP's per-sample spectral score ``σ₁/Σσ`` over the layers ``ss_layers`` (default all; ≥ 2 needed).

    Nothing is fitted (labels are ignored); ``score_layers`` returns ``[B, 1]``.
    """

    def fit(features: Array, labels: Array | None = None, mask: Array | None = None) -> SpectralState:
        sel = layer_indices(layers, features.shape[1])
        if len(sel) < 2:
            raise ValueError(f"the spectral score needs at least 2 layers, got {list(sel)}")
        return SpectralState(jnp.asarray(sel, jnp.int32))

    def score(state: SpectralState, features: Array) -> Array:
        return jax.vmap(lambda f: spectral_ratio(f, method))(features[:, state.layers, :])

    def score_layers(state: SpectralState, features: Array) -> Array:
        return score(state, features)[:, None]

    return Scorer(fit, score, score_layers)


# ---------------------------------------------------------------------------------------------------------------
# Normalisation, fusion, threshold: the decision of jdup.detect. Each function computes with NumPy when its inputs
# are NumPy arrays or numbers (what jdup.detect passes: float64 host scalars of the scoring pass) and with
# jax.numpy otherwise (usable under jit).


class ZStats(NamedTuple):
    """Mean and population std (``ddof=0``) of clean validation scores, per column."""

    mean: Array
    std: Array


def fit_zscore(x: Array, axis: int = 0, min_std: float = 1e-6, mask: Array | None = None) -> ZStats:
    """Mean/std (ddof 0) along ``axis``; a std below ``min_std`` is replaced by 1 (as DUP)."""
    xp = _xp(x) if mask is None else _xp(x, mask)
    if mask is None:
        mean = xp.mean(x, axis=axis)
        std = xp.std(x, axis=axis)
    else:
        w = (
            xp.expand_dims(mask.astype(x.dtype), tuple(range(1, x.ndim)))
            if axis == 0
            else mask.astype(x.dtype)
        )
        n = xp.sum(w, axis=axis)
        mean = xp.sum(x * w, axis=axis) / n
        std = xp.sqrt(xp.sum(w * (x - xp.expand_dims(mean, axis)) ** 2, axis=axis) / n)
    return ZStats(mean, xp.where(std < min_std, xp.ones_like(std), std))


def zscore(stats: ZStats, x: Array) -> Array:
    """``(x − mean) / std`` (broadcast along the last axes)."""
    xp = _xp(x, stats.mean, stats.std)
    return (x - xp.broadcast_to(stats.mean, x.shape)) / xp.broadcast_to(stats.std, x.shape)


def fuse(z_md: Array, z_ss: Array, alpha: float = 0.9) -> Array:
    """DUP's weighted fusion ``α·z_MD + (1 − α)·z_SS``."""
    return alpha * z_md + (1.0 - alpha) * z_ss


def threshold_at_frr(scores: Array, frr: float = 0.05) -> Array:
    """The ``100·(1 − frr)``-th percentile (linear interpolation, as ``np.percentile``) of clean scores."""
    return threshold_at_percentile(scores, (1.0 - frr) * 100.0)


def threshold_at_percentile(scores: Array, q: float) -> Array:
    """The ``q``-th percentile (linear interpolation) of ``scores`` (DUP's purification mode: of the scored set)."""
    return _xp(scores).percentile(scores, q, method="linear")


def flag(scores: Array, threshold: Array) -> Array:
    """``scores > threshold`` (strict, as DUP)."""
    return scores > threshold


# ---------------------------------------------------------------------------------------------------------------
# DAN baseline


class DanState(NamedTuple):
    """Fitted state of :func:`dan`.

    Attributes:
      layers: ``[K]`` int32 layer slots used.
      means: ``[K, C, D]`` class means per layer.
      present: ``[C]`` bool, classes seen in calibration (absent ones never win the minimum).
      chol: ``[K, D, D]`` Cholesky factor of the tied (within-class) shrunk covariance per layer.
      zstats: per-layer standardisation (``[K]`` mean/std of clean validation scores; identity until
        :func:`dan_calibrate`).
    """

    layers: Array
    means: Array
    present: Array
    chol: Array
    zstats: ZStats


def dan(
    shrinkage: float = 0.1,
    layers: str | Sequence[int] | None = None,
    agg: Agg = "max",
    num_classes: int | None = None,
    squared: bool = True,
    fit_dtype: Literal["float32", "float64"] = "float32",
) -> Scorer:
    """DAN (Chen et al., 2022): class-conditional Gaussians with a tied shrunk covariance, per layer.

    Per layer ``l``: ``s_l(x) = min_k (x − c_{l,k})ᵀ Σ_l⁻¹ (x − c_{l,k})`` (squared MD unless ``squared=False``),
    standardised per layer with clean validation statistics (:func:`dan_calibrate`), then aggregated over layers
    (``agg``, ``"max"`` by default as in the DAN paper). This is the correct form; the DUP repository's copy
    standardises the scored set with the wrong statistics (docs/dup-method.md §10.13), which is not reproduced.

    Args:
      shrinkage: shrinkage of the tied covariance.
      layers: layers used (default all).
      agg: aggregation over standardised layer scores.
      num_classes: static class count (inferred from concrete labels if omitted).
      squared: squared distances (DAN) or ``sqrt`` distances.
      fit_dtype: see :func:`shrunk_gaussian`.
    """

    def fit(features: Array, labels: Array, mask: Array | None = None) -> DanState:
        sel = jnp.asarray(layer_indices(layers, features.shape[1]), jnp.int32)
        c = _num_classes(labels, num_classes)
        x = jnp.swapaxes(features[:, sel, :], 0, 1)  # [K, N, D]
        onehot = jax.nn.one_hot(labels, c, dtype=x.dtype)
        if mask is not None:
            onehot = onehot * mask.astype(x.dtype)[:, None]
        counts = onehot.sum(0)
        means = jnp.einsum("nc,knd->kcd", onehot, x, precision=HIGHEST) / jnp.maximum(counts, 1.0)[None, :, None]
        g = shrunk_gaussian(x, shrinkage, center=means[:, labels, :], weights=mask, fit_dtype=fit_dtype)
        k = sel.shape[0]
        ident = ZStats(jnp.zeros((k,), x.dtype), jnp.ones((k,), x.dtype))
        return DanState(sel, means, counts > 0, g.chol, ident)

    def score_layers(state: DanState, features: Array) -> Array:
        """Raw (unstandardised) per-layer scores ``[B, K]``."""
        x = jnp.swapaxes(features[:, state.layers, :], 0, 1)  # [K, B, D]

        def one_layer(means, chol, xs):
            d2 = jax.vmap(lambda mu: mahalanobis_sq(Gaussian(mu, chol), xs))(means)  # [C, B]
            d2 = jnp.where(state.present[:, None], d2, jnp.inf)
            d2 = jnp.min(d2, axis=0)
            return d2 if squared else jnp.sqrt(jnp.maximum(d2, 0.0))

        return jax.vmap(one_layer)(state.means, state.chol, x).T

    def score(state: DanState, features: Array) -> Array:
        return dan_aggregate(state.zstats, score_layers(state, features), agg)

    return Scorer(fit, score, score_layers)


def dan_calibrate(state: DanState, val_layer_scores: Array, mask: Array | None = None) -> DanState:
    """Stores the per-layer mean/std of clean validation scores (``[N_V, K]`` from ``score_layers``)."""
    return state._replace(zstats=fit_zscore(val_layer_scores, axis=0, mask=mask))


def dan_aggregate(stats: ZStats, layer_scores: Array, agg: Agg = "max") -> Array:
    """Standardises ``[B, K]`` per-layer scores with ``stats`` and aggregates them over layers."""
    return aggregate(zscore(stats, layer_scores), agg)
