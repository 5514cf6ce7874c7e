"""Dropout masks from a counter-based hash: statistically the same as ``jax.random.bernoulli``, far cheaper on CPU.

A training step of a LoRA student draws about ten dropout masks per transformer layer (embeddings, attention
probabilities, two residual branches, one per adapter), tens of millions of Bernoulli draws per step. With
jax's default threefry-2x32 (20 rounds per pair of words) that is about a quarter of an unlearning step on
XLA:CPU; ``rbg`` / ``unsafe_rbg`` keys are slower still there (XLA's RngBitGenerator).

:func:`keep_mask` instead takes two 32-bit words from the key (one threefry block per mask, not per element) and
hashes the element counter with them::

    h = mix(mix(i XOR s0) + s1),    keep  ⇔  h < round(p_keep · 2^32)

``mix`` is the ``lowbias32`` integer finaliser (C. Wellons; full avalanche, bias ≈ 0.17 ‰), a bijection of the
32-bit words, so for a fixed key the ``h`` of distinct elements are distinct and the keep rate is exact up to
``2^-32``; fresh keys (``fold_in(key, step)``, ``nnx.Rngs`` streams) give unrelated masks. Counter-based
generators (Philox, threefry itself) work the same way with more rounds. ``tests/test_dropout.py`` checks the
keep rate, independence of neighbouring elements and of masks from different keys, and per-position rates.

``JDUP_DROPOUT_RNG=threefry`` (read when a step is traced) switches back to ``jax.random.bernoulli``, for
comparisons.

:func:`leading_rows` (a trace-time context): inside it, a mask for a tensor with fewer rows (axis ``-2``) than
``rows`` is the first rows of the mask the same key draws for the ``rows``-row tensor. A layer that computes only
its first position(s) (the last encoder layer at [CLS]) then drops exactly what the full computation drops; with
the hash only the kept elements are hashed.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

__all__ = ["keep_mask", "dropout", "impl", "leading_rows"]

_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def impl() -> str:
    """``"hash"`` (default) or ``"threefry"`` (``JDUP_DROPOUT_RNG=threefry``)."""
    v = os.environ.get("JDUP_DROPOUT_RNG", "hash").strip().lower()
    return "threefry" if v in ("threefry", "jax", "bernoulli") else "hash"


def _mix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_M1)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(_M2)
    return h ^ (h >> 16)


_ROWS = threading.local()


@contextlib.contextmanager
def leading_rows(rows: int) -> Iterator[None]:
    """Masks drawn inside the block (at trace time) for a tensor ``[..., r, d]`` with ``r < rows`` are the first
    ``r`` rows of the mask of ``[..., rows, d]`` with the same key (tensors with ``rows`` rows are unaffected).

    Args:
      rows: the number of rows (axis ``-2``) of the full computation.
    """
    prev = getattr(_ROWS, "rows", None)
    _ROWS.rows = int(rows)
    try:
        yield
    finally:
        _ROWS.rows = prev


def keep_mask(key: jax.Array, keep_prob: float, shape, full_shape=None) -> jax.Array:
    """Boolean mask of ``shape``, each element ``True`` with probability ``keep_prob``, independently.

    Args:
      key: a ``jax.random.key`` (any implementation; may be traced).
      keep_prob: a Python float in ``[0, 1]``.
      shape: the mask shape.
      full_shape: the mask is the leading block ``[:shape[0], :shape[1], ...]`` of the mask of ``full_shape``
        (same rank, every dimension at least ``shape``'s); default ``shape``, or inside :func:`leading_rows`
        ``shape`` with ``rows`` rows.
    """
    shape = tuple(int(d) for d in shape)
    if full_shape is None:
        rows = getattr(_ROWS, "rows", None)
        full_shape = shape
        if rows is not None and len(shape) >= 2 and shape[-2] < rows:
            full_shape = shape[:-2] + (rows, shape[-1])
    full_shape = tuple(int(d) for d in full_shape)
    if len(full_shape) != len(shape) or any(f < s for f, s in zip(full_shape, shape, strict=True)):
        raise ValueError(f"full_shape {full_shape} does not contain shape {shape}")
    n = math.prod(full_shape)
    if impl() == "threefry" or n >= 2**32:
        full = jax.random.bernoulli(key, keep_prob, full_shape)
        return full if full_shape == shape else full[tuple(slice(0, s) for s in shape)]
    if keep_prob >= 1.0:
        return jnp.ones(shape, bool)
    if keep_prob <= 0.0:
        return jnp.zeros(shape, bool)
    seed = jax.random.bits(key, (2,), jnp.uint32)
    if full_shape == shape:
        idx = jax.lax.iota(jnp.uint32, n).reshape(shape)
    else:  # the flat positions of the leading block in the full mask: only those elements are hashed
        strides = [math.prod(full_shape[d + 1 :]) for d in range(len(shape))]
        idx = sum(
            jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(st) for d, st in enumerate(strides)
        )
    h = _mix32(_mix32(idx ^ seed[0]) + seed[1])
    return h < jnp.uint32(min(round(keep_prob * 2**32), 2**32 - 1))


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout of ``x`` at ``rate`` (``rate`` a Python float; ``0`` returns ``x``)."""
    if rate <= 0.0:
        return x
    keep = 1.0 - rate
    m = keep_mask(key, keep, x.shape)
    return jnp.where(m, x / keep, 0).astype(x.dtype)
