"""Building blocks shared by every model family (encoder, decoder, BART): one copy of each.

* :func:`dropout` -- inverted dropout with :mod:`jdup.dropout`'s hash masks (``JDUP_DROPOUT_RNG=threefry`` switches
  every family back to ``jax.random.bernoulli``); a no-op when ``deterministic`` or the rate is 0.
* :func:`linear`, :func:`embed` -- ``nnx.Linear`` / ``nnx.Embed`` with the transformers ``normal(0, std)`` init.
* :class:`LayerNorm` (float32 statistics, parameters under ``.norm``) and :class:`RMSNorm` (``.weight``).
* Attention pieces in the heads-major ``[B, H, T, d]`` layout XLA:CPU runs fastest
  (``benchmarks/bench_attention.py``): :func:`split_heads`, :func:`attend` (scores, additive bias, float32
  softmax, dropout, context; grouped-query attention with a ``[B, kv, g, T, d]`` query), :func:`merge_heads`;
  masks as additive float32 biases: :func:`padding_bias`, :func:`mask_bias`, :func:`causal_mask`.
* :class:`ClassificationHead` -- ``out_proj(dropout(tanh(dense(dropout(x)))))`` (RoBERTa and BART heads).

Numerics: compute runs in the modules' ``dtype``; LayerNorm/RMSNorm statistics and the attention softmax are
float32 whatever that dtype is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jdup import dropout as _dropout_lib

#: ``hidden_act`` / ``activation_function`` names of ``config.json`` -> functions (as transformers' ACT2FN).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def dropout(x: jax.Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout (hash masks, :func:`jdup.dropout.dropout`); a no-op when ``deterministic`` or ``rate == 0``.

    Raises:
      ValueError: dropout is on but no ``rngs`` (with a ``dropout`` stream) was given.
    """
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("deterministic=False needs rngs=nnx.Rngs(dropout=...) at call time")
    return _dropout_lib.dropout(x, rate, _dropout_lib.next_seed(rngs.dropout))


def remat_call(fn, module: nnx.Module, *args, rngs: nnx.Rngs | None = None):
    """``fn(module, *args, rngs)`` rematerialised in the backward pass (``jax.checkpoint``): the layer's
    activations are recomputed instead of kept, for memory.

    Written with ``nnx.split`` / ``nnx.merge`` around a pure function rather than ``nnx.remat``: the module's
    variables go in as values and only the dropout stream's counter comes back out (the same masks as without
    remat), so it also works where the module's parameters are another transform's tracers (a LoRA student inside
    the unlearning step's gradient), where ``nnx.remat``'s write-back of the module state fails.
    """
    graphdef, state = nnx.split(module)
    rgd, rstate = nnx.split(rngs) if rngs is not None else (None, ())

    def pure(state, rstate, *a):
        r = nnx.merge(rgd, rstate) if rngs is not None else None
        out = fn(nnx.merge(graphdef, state), *a, r)
        return out, (nnx.state(r) if r is not None else rstate)

    out, rstate = jax.checkpoint(pure)(state, rstate, *args)
    if rngs is not None:
        nnx.update(rngs, rstate)
    return out


def linear(d_in: int, d_out: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    """``nnx.Linear`` (``kernel [in, out]``) with a ``normal(0, std)`` kernel and zero bias."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_init=nnx.initializers.normal(std),
    )


def embed(n: int, dim: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """``nnx.Embed`` of ``n`` rows with a ``normal(0, std)`` init."""
    return nnx.Embed(
        n, dim, dtype=dtype, param_dtype=param_dtype, embedding_init=nnx.initializers.normal(std), rngs=rngs
    )


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics and arithmetic whatever the compute dtype; output in ``dtype``.

    Parameters are ``norm.scale`` and ``norm.bias`` (an inner ``nnx.LayerNorm``).
    """

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm = nnx.LayerNorm(
            dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` with float32 statistics; output in the compute dtype."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return jnp.broadcast_to(self.weight[...].astype(self.dtype), y.shape) * y  # explicit: rank promotion off


# ---------------------------------------------------------------------------------------------------------------
# attention


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """``[batch, seq]`` 1/0 mask -> additive float32 ``[batch, 1, 1, seq]`` bias (0 or the float32 minimum)."""
    m = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(m, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def mask_bias(mask: jax.Array) -> jax.Array:
    """``[batch, query, key]`` bool (True = may attend) -> additive float32 ``[batch, 1, query, key]`` bias."""
    return jnp.where(mask[:, None], 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def causal_mask(t: int) -> jax.Array:
    """``[t, t]`` bool, True where key position <= query position."""
    return jnp.tril(jnp.ones((t, t), bool))


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """``[B, T, heads * d]`` -> heads-major ``[B, heads, T, d]``."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(ctx: jax.Array) -> jax.Array:
    """Inverse of :func:`split_heads`: ``[B, H, T, d]`` (or grouped ``[B, kv, g, T, d]``) -> ``[B, T, H * d]``."""
    if ctx.ndim == 5:
        b, kv, g, t, d = ctx.shape
        return ctx.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g * d)
    b, h, t, d = ctx.shape
    return ctx.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    *,
    rate: float,
    deterministic: bool,
    rngs: nnx.Rngs | None,
) -> jax.Array:
    """Scaled dot-product attention on heads-major operands.

    Args:
      q: ``[B, H, Q, d]``, or ``[B, kv, g, Q, d]`` for grouped-query attention (query head ``kv_head * g + group``,
        as transformers' ``repeat_kv``).
      k: ``[B, H, S, d]`` (``[B, kv, S, d]`` when grouped).
      v: like ``k``.
      bias: additive float32 bias broadcastable to the scores ``[B, H, Q, S]`` (``[B, kv, g, Q, S]``).
      rate: dropout rate on the attention probabilities.
      deterministic: no dropout when True.
      rngs: ``nnx.Rngs`` with a ``dropout`` stream (when dropout is on).

    Returns:
      The context, shaped like ``q`` with ``v``'s dtype.
    """
    if q.ndim == 5:
        qk, pv = "bhgqd,bhkd->bhgqk", "bhgqk,bhkd->bhgqd"
    else:
        qk, pv = "bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"
    scores = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(scores + bias, axis=-1)
    probs = dropout(probs, rate, deterministic, rngs).astype(v.dtype)
    return jnp.einsum(pv, probs, v)


class ClassificationHead(nnx.Module):
    """``out_proj(dropout(tanh(dense(dropout(x)))))``: RoBERTa's ``classifier`` and BART's ``classification_head``."""

    def __init__(self, dim: int, num_labels: int, rate: float, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.rate = rate
        self.dense = linear(dim, dim, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_proj = linear(dim, num_labels, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs) -> jax.Array:
        x = jnp.tanh(self.dense(dropout(x, self.rate, deterministic, rngs)))
        return self.out_proj(dropout(x, self.rate, deterministic, rngs))
