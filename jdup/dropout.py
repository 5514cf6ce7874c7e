"""Dropout masks from a counter-based hash: statistically the same as ``jax.random.bernoulli``, far cheaper on CPU.

A training step of a LoRA student draws about ten dropout masks per transformer layer (embeddings, attention
probabilities, two residual branches, one per adapter), tens of millions of Bernoulli draws per step. With
jax's default threefry-2x32 (20 rounds per pair of words) that is about a quarter of an unlearning step on
XLA:CPU; ``rbg`` / ``unsafe_rbg`` keys are slower still there (XLA's RngBitGenerator).

:func:`keep_mask` instead takes two 32-bit seed words per mask (derived from the key without threefry, below) and
hashes the element counter with them::

    h = mix(mix(i XOR s0) + s1),    keep  ⇔  h < round(p_keep · 2^32)

``mix`` is the ``lowbias32`` integer finaliser (C. Wellons; full avalanche, bias ≈ 0.17 ‰), a bijection of the
32-bit words, so for a fixed key the ``h`` of distinct elements are distinct and the keep rate is exact up to
``2^-32``; fresh keys (``fold_in(key, step)``, ``nnx.Rngs`` streams) give unrelated masks. Counter-based
generators (Philox, threefry itself) work the same way with more rounds. ``tests/test_dropout.py`` checks the
keep rate, independence of neighbouring elements and of masks from different keys, and per-position rates.

The two seed words of a mask come from the key's raw words without running threefry (:func:`seed_words`):
``s0 = mix(k0 ^ mix(c·φ + K0))``, ``s1 = mix(k1 ^ mix(s0 + K1))`` (further key words folded into ``s0``), where ``k``
are the key's words and ``c`` a mask counter. A model's layers take their masks from an ``nnx.Rngs`` ``dropout``
stream through :func:`next_seed`, which uses the stream's counter as ``c`` and advances it, exactly where
``stream()`` (a ``fold_in``, i.e. one threefry block) would. A training step draws one key per step
(``fold_in(key(seed), step)``) and every mask's seed from it with integer arithmetic only: threefry, unrolled
into ~20 rounds per call by XLA, was drawn twice per mask before (``fold_in`` + ``bits``) and cost 15-27 % of the
step's compile time on CPU (MiniLM, one padded length, three comparisons: 5.96 → 5.14 s, 4.64 → 3.93 s,
5.76 → 4.19 s).

``JDUP_DROPOUT_RNG=threefry`` (read when a step is traced) switches back to ``jax.random.bernoulli`` with
``stream()`` keys, for comparisons.

:func:`leading_rows` (a trace-time context): inside it, a mask for a tensor with fewer rows (axis ``-2``) than
``rows`` is the first rows of the mask the same key draws for the ``rows``-row tensor. A layer that computes only
its first position(s) (the last encoder layer at [CLS]) then drops exactly what the full computation drops; with
the hash only the kept elements are hashed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["keep_mask", "dropout", "impl", "leading_rows", "seed_words", "counter_seed", "next_seed"]

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_PHI = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters
_K0 = 0x243F6A88  # digits of pi: keep a zero key word from hashing to a fixed point
_K1 = 0x85A308D3


def impl() -> str:
    """``"hash"`` (default) or ``"threefry"`` (``JDUP_DROPOUT_RNG=threefry``)."""
    v = os.environ.get("JDUP_DROPOUT_RNG", "hash").strip().lower()
    return "threefry" if v in ("threefry", "jax", "bernoulli") else "hash"


# The hash is written with ``jax.lax`` primitives on ``uint32``: every ``jnp`` operator is a small jitted function
# of its own, and tracing a training step (forty masks, each hashed and seeded) through them cost 1-2 s per padded
# length.
def _mix32(h: jax.Array) -> jax.Array:
    h = lax.bitwise_xor(h, lax.shift_right_logical(h, np.uint32(16)))
    h = lax.mul(h, np.uint32(_M1))
    h = lax.bitwise_xor(h, lax.shift_right_logical(h, np.uint32(15)))
    h = lax.mul(h, np.uint32(_M2))
    return lax.bitwise_xor(h, lax.shift_right_logical(h, np.uint32(16)))


def _word(words: jax.Array, i: int) -> jax.Array:
    return lax.index_in_dim(words, i, keepdims=False)


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


def _is_typed_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def seed_words(key: jax.Array, counter=0) -> jax.Array:
    """``uint32 [2]``: the seed words of mask number ``counter`` drawn from ``key``, by integer hashing only.

    Args:
      key: a typed ``jax.random.key`` of any implementation (its raw words are read with ``key_data``), or
        already derived seed words (``uint32 [2]``, hashed again with ``counter``).
      counter: the mask's number (an int or a traced integer scalar); distinct counters give unrelated seeds.
    """
    raw = jax.random.key_data(key) if _is_typed_key(key) else jnp.asarray(key)
    return _seed_words(raw, jnp.asarray(counter))


@jax.jit
def _seed_words(raw: jax.Array, counter: jax.Array) -> jax.Array:
    words = lax.convert_element_type(lax.reshape(raw, (raw.size,)), np.uint32)
    c = lax.convert_element_type(counter, np.uint32)
    s0 = _mix32(
        lax.bitwise_xor(_word(words, 0), _mix32(lax.add(lax.mul(c, np.uint32(_PHI)), np.uint32(_K0))))
    )
    for j in range(2, words.shape[0]):  # keys with more than two words (rbg: four)
        s0 = _mix32(lax.bitwise_xor(s0, _word(words, j)))
    last = _word(words, 1 if words.shape[0] > 1 else 0)
    s1 = _mix32(lax.bitwise_xor(last, _mix32(lax.add(s0, np.uint32(_K1)))))
    return lax.concatenate([lax.broadcast(s0, (1,)), lax.broadcast(s1, (1,))], 0)


def counter_seed(key: jax.Array, counter) -> jax.Array:
    """The seed of mask number ``counter`` drawn from ``key``: :func:`seed_words` (integer hashing), or with
    ``JDUP_DROPOUT_RNG=threefry`` the typed key ``fold_in(key, counter)``."""
    return jax.random.fold_in(key, counter) if impl() == "threefry" else seed_words(key, counter)


def next_seed(stream) -> jax.Array:
    """The next mask seed of an ``nnx.Rngs`` stream (e.g. ``rngs.dropout``): :func:`counter_seed` of the stream's
    key and counter, then the counter advances, as calling the stream does (with ``JDUP_DROPOUT_RNG=threefry`` the
    result is what ``stream()`` returns)."""
    count = stream.count.get_value()
    out = counter_seed(stream.key.get_value(), count)
    # a whole-value set: ``count[...] += 1`` asks a tracer for its sharding, which costs ~0.1 s of tracing per call
    stream.count.set_value(count + 1)
    return out


def keep_mask(key: jax.Array, keep_prob: float, shape, full_shape=None) -> jax.Array:
    """Boolean mask of ``shape``, each element ``True`` with probability ``keep_prob``, independently.

    Args:
      key: a ``jax.random.key`` (any implementation; may be traced), or seed words from :func:`seed_words` /
        :func:`next_seed` (``uint32 [2]``, used as they are).
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
    typed = _is_typed_key(key)
    if typed and (impl() == "threefry" or n >= 2**32):
        full = jax.random.bernoulli(key, keep_prob, full_shape)
        return full if full_shape == shape else full[tuple(slice(0, s) for s in shape)]
    if keep_prob >= 1.0:
        return jnp.ones(shape, bool)
    if keep_prob <= 0.0:
        return jnp.zeros(shape, bool)
    if n >= 2**32:
        raise ValueError(f"a hash mask holds fewer than 2**32 elements; {full_shape} needs a typed key")
    seed = seed_words(key) if typed else lax.convert_element_type(jnp.asarray(key).reshape(2), np.uint32)
    return _hash_mask(seed, min(round(keep_prob * 2**32), 2**32 - 1), shape, full_shape)


# jitted (inlined by XLA): a training step traces forty masks of a handful of shapes, and each traced jnp/lax
# operation costs a fraction of a millisecond under autodiff; a cached inner trace is one operation per mask
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _hash_mask(seed: jax.Array, threshold: int, shape: tuple, full_shape: tuple) -> jax.Array:
    n = math.prod(full_shape)
    if full_shape == shape:
        idx = lax.reshape(lax.iota(np.uint32, n), shape)
    else:  # the flat positions of the leading block in the full mask: only those elements are hashed
        strides = [math.prod(full_shape[d + 1 :]) for d in range(len(shape))]
        idx = lax.mul(
            lax.broadcasted_iota(np.uint32, shape, 0), np.uint32(strides[0])
        )  # shape != full: rank >= 1
        for d in range(1, len(shape)):
            idx = lax.add(idx, lax.mul(lax.broadcasted_iota(np.uint32, shape, d), np.uint32(strides[d])))
    s0 = lax.broadcast(_word(seed, 0), shape)
    s1 = lax.broadcast(_word(seed, 1), shape)
    h = _mix32(lax.add(_mix32(lax.bitwise_xor(idx, s0)), s1))
    return lax.lt(h, lax.full(shape, threshold, np.uint32))


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout of ``x`` at ``rate`` (``rate`` a Python float; ``0`` returns ``x``)."""
    if rate <= 0.0:
        return x
    keep = 1.0 - rate
    m = keep_mask(key, keep, x.shape)
    return lax.select(m, lax.div(x, lax.full_like(x, keep)), lax.full_like(x, 0))
