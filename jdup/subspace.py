"""Subspace (basis) estimators for null-space projection: which directions an update must not move.

* :func:`gradient_basis`: orthonormal basis of ``k`` clean mini-batch gradients (gradient space, UPGP "G2"),
  per parameter leaf or over all leaves, kept by an energy threshold.
* :func:`representation_basis` / :func:`covariance_basis`: GPM basis of a layer's clean token inputs
  (representation space), from the activations or from an accumulated uncentred covariance.
* :func:`inflora_init` / :func:`inflora_from_covariance`: an InfLoRA down-projection inside the complement of the
  clean input subspace.
* :func:`energy_rank`, :func:`rank_cap`: the rank rules.

Every basis is zero-padded to a fixed width so that the projection transform in :mod:`jdup.optim` can replace it
without changing a shape. This module imports only jax and numpy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "energy_rank",
    "gradient_basis",
    "representation_basis",
    "covariance_basis",
    "inflora_init",
    "inflora_from_covariance",
    "rank_cap",
]


def energy_rank(singular_values: jax.Array, energy_eps: float) -> jax.Array:
    """GPM energy rule: the smallest ``j`` with ``sum_{i<=j} s_i^2 >= eps * sum_i s_i^2`` (``0`` if all zero).

    Args:
      singular_values: ``[m]`` non-negative, sorted in decreasing order.
      energy_eps: fraction of energy to keep, in ``(0, 1]``.

    Returns:
      ``[]`` int32 rank.
    """
    e = jnp.square(singular_values.astype(jnp.float32))
    total = jnp.sum(e)
    cum = jnp.cumsum(e)
    # Tiny relative slack so that eps=1 keeps every non-zero direction despite float rounding.
    k = jnp.sum(cum < energy_eps * total * (1.0 - 1e-6)) + 1
    nonzero = jnp.sum(e > total * 1e-12)
    return jnp.where(total > 0, jnp.minimum(k, nonzero), 0).astype(jnp.int32)


def _orth_basis(mat: jax.Array, energy_eps: float, width: int, max_keep: int) -> tuple[jax.Array, jax.Array]:
    """Left singular vectors of ``mat [m, n]`` that carry ``energy_eps`` of its energy, zero-padded to ``width``."""
    u, s, _ = jnp.linalg.svd(mat.astype(jnp.float32), full_matrices=False)
    k = jnp.minimum(energy_rank(s, energy_eps), max_keep)
    keep = jnp.arange(u.shape[1]) < k
    u = u * keep[None, :]
    if u.shape[1] < width:
        u = jnp.pad(u, ((0, 0), (0, width - u.shape[1])))
    return u[:, :width], k


def gradient_basis(
    grads_stack: Any,
    energy_eps: float = 0.99,
    *,
    per_block: bool = True,
    max_rank: int | None = None,
    normalize: bool = True,
) -> tuple[Any, Any]:
    """Gradient-space basis (docs/upgp-method.md §5.2 G2): orthonormal basis of ``k`` clean gradients, energy threshold ``eps``.

    Each of the ``k`` gradients (mini-batch gradients of the retain loss on normal samples) is flattened, unit-
    normalised (per block when ``per_block``), stacked as columns ``G [n, k]``, and ``U`` = the leading left
    singular vectors of ``G`` keeping ``energy_eps`` of ``sum sigma^2``, zero-padded to ``max_rank`` columns.

    Args:
      grads_stack: pytree of gradients with a leading sample axis ``k`` on every leaf.
      energy_eps: energy fraction to keep (spec default 0.99 for gradients).
      per_block: one basis per leaf (``"block"`` mode) or one over all leaves concatenated (``"global"`` mode).
      max_rank: padded width (default ``k``). Must match the transform's ``max_rank``.
      normalize: unit-normalise each gradient column before the SVD.

    Returns:
      ``(bases, ranks)``: bases in the layout of :attr:`NullSpaceState.bases` for the matching mode (a pytree of
      ``[leaf.size, max_rank]`` float32, or one ``[P, max_rank]``), and the kept ranks (pytree of / one int32).
    """
    leaves = jax.tree.leaves(grads_stack)
    if not leaves:
        raise ValueError("grads_stack has no leaves")
    k = int(leaves[0].shape[0])
    width = k if max_rank is None else int(max_rank)

    def columns(x):
        g = jnp.asarray(x, jnp.float32).reshape(k, -1).T  # [n, k]
        if normalize:
            g = g / jnp.maximum(jnp.linalg.norm(g, axis=0, keepdims=True), 1e-30)
        return g

    if per_block:
        pairs = jax.tree.map(lambda x: _orth_basis(columns(x), energy_eps, width, width), grads_stack)
        treedef = jax.tree.structure(grads_stack)
        flat = treedef.flatten_up_to(pairs)
        return (
            jax.tree.unflatten(treedef, [p[0] for p in flat]),
            jax.tree.unflatten(treedef, [p[1] for p in flat]),
        )
    g = jnp.concatenate([jnp.asarray(x, jnp.float32).reshape(k, -1) for x in leaves], axis=1).T  # [P, k]
    if normalize:
        g = g / jnp.maximum(jnp.linalg.norm(g, axis=0, keepdims=True), 1e-30)
    return _orth_basis(g, energy_eps, width, width)


def representation_basis(
    activations: jax.Array,
    energy_eps: float = 0.97,
    *,
    weights: jax.Array | None = None,
    max_rank: int | None = None,
    min_free: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Representation-space (GPM) basis of a layer's clean inputs.

    ``U`` = leading eigenvectors of the uncentred token covariance ``C = X^T diag(w) X`` keeping ``energy_eps`` of
    its trace (the same directions as the left singular vectors of ``X^T``, since ``sigma^2 = lambda``).

    Args:
      activations: ``[N, d]`` clean token inputs of the layer (or ``[..., d]``; leading axes are flattened).
      energy_eps: energy fraction (spec: 0.97 for encoders, 0.95 for Llama-class models).
      weights: optional ``[N]`` (or matching leading shape) 0/1 mask, e.g. the attention mask, so padding is
        excluded.
      max_rank: padded width (default ``d``).
      min_free: cap the rank at ``d - min_free`` so that some directions always stay trainable.

    Returns:
      ``(U [d, max_rank] float32, rank [] int32)``.
    """
    x = jnp.asarray(activations, jnp.float32)
    d = x.shape[-1]
    x = x.reshape(-1, d)
    if weights is not None:
        x = x * jnp.asarray(weights, jnp.float32).reshape(-1, 1)
    # Covariance and eigh in float32 at HIGHEST precision (docs/upgp-method.md §7: keep reductions in f32).
    cov = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return covariance_basis(cov, energy_eps, max_rank=max_rank, min_free=min_free)


def covariance_basis(
    cov: jax.Array, energy_eps: float = 0.97, *, max_rank: int | None = None, min_free: int = 0
) -> tuple[jax.Array, jax.Array]:
    """:func:`representation_basis` from an accumulated uncentred covariance ``sum x x^T [d, d]``.

    Args:
      cov: ``[d, d]`` symmetric positive semi-definite matrix.
      energy_eps: energy fraction of the trace to keep.
      max_rank: padded width (default ``d``).
      min_free: cap the rank at ``d - min_free``.

    Returns:
      ``(U [d, max_rank] float32, rank [] int32)``.
    """
    cov = jnp.asarray(cov, jnp.float32)
    d = cov.shape[0]
    lam, vec = jnp.linalg.eigh(0.5 * (cov + cov.T))
    lam, vec = lam[::-1], vec[:, ::-1]
    width = d if max_rank is None else int(max_rank)
    k = jnp.minimum(energy_rank(jnp.sqrt(jnp.maximum(lam, 0.0)), energy_eps), max(d - min_free, 0))
    k = jnp.minimum(k, width)
    vec = vec * (jnp.arange(d) < k)[None, :]
    if d < width:
        vec = jnp.pad(vec, ((0, 0), (0, width - d)))
    return vec[:, :width], k.astype(jnp.int32)


def inflora_init(
    basis: jax.Array,
    forget_inputs: jax.Array,
    rank: int,
    *,
    weights: jax.Array | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """InfLoRA-style fixed LoRA down-projection inside the complement of the clean input subspace (docs/upgp-method.md §6.3 (b)).

    ``A`` = the top-``rank`` left singular directions of ``(I - U U^T) X_b^T`` (where the flagged inputs differ
    from clean ones), with orthonormal columns and ``U^T A = 0`` to float32 rounding. If the projected forget
    inputs span fewer than ``rank`` directions, the rest is filled with random complement directions. Freeze
    ``A`` and train only the up-projection ``B``: then ``U^T (A B) = 0`` for every ``B`` -- clean inputs in
    ``span(U)`` keep their pre-activations exactly, whatever the optimizer.

    Args:
      basis: ``[d, k]`` orthonormal/zero-column clean-input basis (from :func:`representation_basis`).
      forget_inputs: ``[N, d]`` (or ``[..., d]``) token inputs of the flagged set at this module.
      rank: LoRA rank ``r`` (must be ``<= d - rank(U)``).
      weights: optional 0/1 mask over the leading axes of ``forget_inputs`` (padding).
      key: PRNG key for the random fill (default ``jax.random.key(0)``).

    Returns:
      ``A [d, rank]`` float32 with orthonormal columns orthogonal to ``span(U)``.
    """
    d = basis.shape[0]
    x = jnp.asarray(forget_inputs, jnp.float32).reshape(-1, d)
    if weights is not None:
        x = x * jnp.asarray(weights, jnp.float32).reshape(-1, 1)
    cov = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return inflora_from_covariance(basis, cov, rank, key=key)


def inflora_from_covariance(
    basis: jax.Array, forget_cov: jax.Array, rank: int, *, key: jax.Array | None = None
) -> jax.Array:
    """:func:`inflora_init` from the uncentred forget-input covariance ``X_b^T X_b [d, d]`` (streaming use).

    Args:
      basis: ``[d, k]`` clean-input basis.
      forget_cov: ``[d, d]`` sum of ``x x^T`` over the flagged tokens at this module.
      rank: LoRA rank ``r``.
      key: PRNG key for the random complement fill.

    Returns:
      ``A [d, rank]`` float32, orthonormal columns, ``U^T A = 0``.
    """
    u = jnp.asarray(basis, jnp.float32)
    d = u.shape[0]

    def perp(m):  # (I - U U^T) m, for m [d, c]
        return m - u @ jnp.matmul(u.T, m, precision=jax.lax.Precision.HIGHEST)

    cov = jnp.asarray(forget_cov, jnp.float32)
    cov = perp(perp(cov).T)  # P C P
    # Ridge on the complement only: every complement direction gets a positive eigenvalue, span(U) stays at 0,
    # so the top-r eigenvectors lie in the complement even when the forget inputs are low-rank.
    key = jax.random.key(0) if key is None else key
    noise = perp(jax.random.normal(key, (d, d), jnp.float32))
    ridge = 1e-4 * (jnp.trace(cov) / d + 1e-6)
    cov = cov + ridge * jnp.matmul(noise, noise.T, precision=jax.lax.Precision.HIGHEST) / d
    _, vec = jnp.linalg.eigh(cov)
    a = perp(vec[:, ::-1][:, :rank])
    q, _ = jnp.linalg.qr(a)
    return perp(q)


def rank_cap(d: int, lora_rank: int, min_free: int = 16) -> int:
    """docs/upgp-method.md §5.3: cap ``k <= d - max(min_free, 4 r)`` so some directions always remain trainable."""
    return max(d - max(min_free, 4 * lora_rank), 0)
