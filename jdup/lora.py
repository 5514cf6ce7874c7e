"""LoRA adapters for jdup's NNX classifiers: add by module name, split trainable/frozen state, merge exactly.

DUP (docs/dup-method.md §3.3) adapts the attention projections of a backdoored classifier with PEFT's
``LoraConfig(r=32, lora_alpha=64, lora_dropout=0.1)`` and trains a full copy of the classification head. This
module reproduces that in Flax NNX:

* :class:`LoRALinear` wraps an ``nnx.Linear`` ``W`` (``kernel [in, out]``) and computes
  ``y = x·W + b + (α/r)·dropout(x)·A·B`` with ``A [in, r]`` (PEFT's default init, kaiming-uniform with
  ``a=√5``, i.e. ``U(−1/√in, 1/√in)``) and ``B [r, out] = 0``, both ``nnx.LoRAParam``. ``flax.nnx.LoRA`` has no
  ``α/r`` scale and no dropout, hence this wrapper.
* :func:`add_lora` walks the model graph and replaces every ``nnx.Linear`` attribute whose name is in ``targets``
  (default: the model class's ``LORA_TARGETS``), and replaces the top-level head modules (``HEAD``) by fresh
  copies, so training the head never touches the original model.
* :func:`trainable_filter` / :func:`split_trainable` give exactly the adapter and head parameters as the
  differentiated state; everything else is frozen.
* :func:`merge` folds ``W ← W + (α/r)·A·B`` into fresh base kernels and returns a model of the original class
  (exportable with ``jdup.models.save_pretrained``).

LoRA dropout. jdup's models call their linear layers as ``layer(x)`` without dropout arguments, so the adapters
read their dropout switch from :func:`lora_dropout`, a context manager used *inside* the traced train step::

    with lora_dropout(key):            # key: a jax.random.key, traced is fine
        logits = model(ids, mask, deterministic=False, rngs=rngs).logits

Each adapter folds its own call index into ``key``, so masks differ across layers. A caller that passes
``deterministic=False, rngs=...`` straight to :meth:`LoRALinear.__call__` gets the same behaviour.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdup import dropout as _dropout_lib

__all__ = [
    "LoRALinear",
    "add_lora",
    "default_targets",
    "head_names",
    "lora_dropout",
    "merge",
    "split_trainable",
    "trainable_filter",
    "count_params",
]


# ---------------------------------------------------------------------------------------------------------------
# Dropout context (trace-time; thread-local so concurrent traces do not interfere).

_CTX = threading.local()


@contextlib.contextmanager
def lora_dropout(key: jax.Array | None) -> Iterator[None]:
    """Turn LoRA dropout on for every adapter called inside the ``with`` block.

    Args:
      key: a typed ``jax.random.key`` (may be traced). ``None`` turns dropout off (the default outside the block).
    """
    prev = getattr(_CTX, "state", None)
    _CTX.state = None if key is None else [key, 0]
    try:
        yield
    finally:
        _CTX.state = prev


def _next_context_key() -> jax.Array | None:
    state = getattr(_CTX, "state", None)
    if state is None:
        return None
    key = _dropout_lib.counter_seed(state[0], state[1])
    state[1] += 1
    return key


# ---------------------------------------------------------------------------------------------------------------
# The adapter.


def peft_a_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """PEFT's default ``lora_A`` init in Flax layout ``[in, r]``: ``U(−1/√in, 1/√in)``.

    PEFT calls ``kaiming_uniform_(A, a=√5)`` on the torch weight ``[r, in]`` (fan_in = in), whose bound is
    ``√(6/((1+a²)·fan_in)) = 1/√in``.
    """
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(nnx.Module):
    """``base(x) + (alpha/rank)·dropout(x) @ lora_a @ lora_b``.

    Args:
      base: the wrapped ``nnx.Linear`` (kept as is; its ``kernel``/``bias`` stay ``nnx.Param`` and frozen).
      rank: LoRA rank ``r``.
      alpha: LoRA ``α``; the branch is scaled by ``α/r`` (PEFT convention).
      dropout: dropout rate on the branch input (PEFT ``lora_dropout``).
      rngs: ``nnx.Rngs`` with a ``params`` stream (initialises ``lora_a``).
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float = 0.0, *, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        in_features, out_features = base.kernel.shape
        pdtype = base.kernel[...].dtype
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = float(alpha) / int(rank)
        self.dropout_rate = float(dropout)
        self.lora_a = nnx.LoRAParam(peft_a_init(rngs.params(), (in_features, rank), pdtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), pdtype))

    def delta(self) -> jax.Array:
        """The weight update ``(α/r)·A·B`` in kernel layout ``[in, out]``."""
        return (self.lora_a[...] @ self.lora_b[...]) * self.scale

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        y = self.base(x)
        h = x
        key = None
        if self.dropout_rate > 0.0:
            if deterministic is False and rngs is not None:
                key = _dropout_lib.next_seed(rngs.dropout) if isinstance(rngs, nnx.Rngs) else rngs
            elif deterministic is None:
                key = _next_context_key()
        if key is not None:
            h = _dropout_lib.dropout(h, self.dropout_rate, key)
        a = self.lora_a[...].astype(h.dtype)
        b = self.lora_b[...].astype(h.dtype)
        return y + ((h @ a) @ b) * jnp.asarray(self.scale, h.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Insertion, filters, merge.


def default_targets(model: nnx.Module) -> tuple[str, ...]:
    """The model class's ``LORA_TARGETS`` (DUP's choice per family), or ``()`` if it has none."""
    return tuple(getattr(type(model), "LORA_TARGETS", ()))


def head_names(model: nnx.Module) -> tuple[str, ...]:
    """Names of the top-level head submodules (``HEAD`` class attribute), ``()`` if none."""
    return tuple(getattr(type(model), "HEAD", ()))


def add_lora(
    model: nnx.Module,
    *,
    rank: int = 32,
    alpha: float = 64.0,
    dropout: float = 0.1,
    targets: Iterable[str] | None = None,
    train_head: bool = True,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """Return a copy of ``model`` whose target linear layers carry LoRA adapters.

    The input model is not modified: base weights are shared (they are never updated), the head modules are
    deep-copied (so training the head copy leaves ``model`` intact), and new ``LoRALinear`` nodes hold the
    adapters. Linear layers *inside* the head are not adapted (the head is trained in full).

    Args:
      model: a jdup classifier (``nnx.Module`` with ``LORA_TARGETS``/``HEAD`` class attributes).
      rank, alpha, dropout: LoRA ``r``, ``α`` (scale ``α/r``) and dropout on the adapter input.
      targets: attribute names of the ``nnx.Linear`` layers to adapt (exact name match on the last path
        part); ``None`` uses ``LORA_TARGETS``.
      train_head: copy the head modules so they can be trained (:func:`trainable_filter` includes them).
      rngs: ``nnx.Rngs`` for ``lora_a``; defaults to ``nnx.Rngs(0)``.

    Returns:
      The adapted model (same class as ``model``).

    Raises:
      ValueError: if no linear layer matches ``targets``.
    """
    targets = default_targets(model) if targets is None else tuple(targets)
    heads = set(head_names(model))
    rngs = nnx.Rngs(0) if rngs is None else rngs
    n_wrapped = [0]

    def f(path, node):
        if not path:
            return node
        name = str(path[-1])
        in_head = str(path[0]) in heads
        if isinstance(node, nnx.Linear) and name in targets and not in_head:
            n_wrapped[0] += 1
            return LoRALinear(node, rank, alpha, dropout, rngs=rngs)
        if train_head and len(path) == 1 and name in heads and isinstance(node, nnx.Module):
            return nnx.clone(node)
        return node

    out = nnx.recursive_map(f, model)
    if targets and n_wrapped[0] == 0:
        raise ValueError(f"no nnx.Linear named any of {targets} in {type(model).__name__}")
    return out


def trainable_filter(model: nnx.Module, train_head: bool = True):
    """NNX filter selecting the differentiated parameters: every ``nnx.LoRAParam`` plus the head's params.

    Args:
      model: the adapted model (only its class's ``HEAD`` is read).
      train_head: include the head parameters.
    """
    heads = set(head_names(model)) if train_head else set()

    def in_head(path, value) -> bool:
        return bool(path) and str(path[0]) in heads

    if not heads:
        return nnx.LoRAParam
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, in_head))


def split_trainable(model: nnx.Module, train_head: bool = True):
    """``(graphdef, trainable_state, frozen_state)``; ``nnx.merge(graphdef, trainable, frozen)`` rebuilds it.

    The trainable state holds exactly the adapter and (optionally) head parameters; this is the pytree that gets
    differentiated and held in optimizer state.
    """
    return nnx.split(model, trainable_filter(model, train_head), ...)


def count_params(state) -> int:
    """Number of scalars in a state / pytree."""
    return int(sum(x.size for x in jax.tree.leaves(state)))


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base layer: ``kernel ← kernel + (α/r)·A·B``; return a plain model.

    The merged model has the original class and no ``LoRAParam``; merged kernels are new arrays (the shared base
    weights of the un-adapted model are left untouched). Merging is exact up to float rounding of one add.
    """

    def f(path, node):
        if isinstance(node, LoRALinear):
            base = nnx.clone(node.base)
            k = base.kernel[...]
            base.kernel[...] = (k.astype(jnp.float32) + node.delta().astype(jnp.float32)).astype(k.dtype)
            return base
        return node

    return nnx.recursive_map(f, model)
