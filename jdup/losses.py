"""Loss terms of DUP unlearning (docs/dup-method.md §3.4, §10.3), as pure functions of logits.

Every function takes an optional row ``mask`` (``[batch]``, 1 on real rows, 0 on padding rows added to reach a
fixed batch shape) and averages over real rows only, so a padded last batch gives the same value as torch on the
unpadded batch.

The forgetting term is written as the quantity to **minimise** (see :func:`forget_loss`):

* ``"kl"`` (faithful): ``−KL(p_T ‖ p_S)`` with ``reduction='batchmean'``; gradient ascent on the divergence from
  the backdoored teacher. Unbounded below (docs/dup-method.md §10.3).
* ``"kl_capped"``: ``−mean_i min(KL_i, cap)``; each sample stops pushing once its divergence reaches ``cap``.
* ``"suppress_target"``: ``mean_i −log(1 − p_S(y_t|x_i) + ε)``; bounded by ``−log ε``, pushes probability away
  from the (inferred) target label only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "FORGET_LOSSES",
    "cross_entropy",
    "forget_loss",
    "kl_per_example",
    "kl_batchmean",
    "suppress_target",
]

FORGET_LOSSES = ("kl", "kl_capped", "suppress_target")


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kl_per_example(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``KL(p_T ‖ p_S)`` per row, ``[batch]``, with ``p = softmax(logits / T)``.

    Computed in float32 from log-softmaxes: ``Σ_y p_T(y)·(log p_T(y) − log p_S(y))``.
    """
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_pt = jax.nn.log_softmax(t, axis=-1)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def kl_batchmean(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    mask: jax.Array | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """``torch.nn.KLDivLoss(reduction='batchmean')(log_softmax(s/T), softmax(t/T))`` over the real rows.

    Args:
      teacher_logits, student_logits: ``[batch, classes]``.
      mask: optional ``[batch]`` row mask.
      temperature: softmax temperature ``T`` (DUP: 1). No ``T²`` factor is applied.

    Returns:
      Scalar float32.
    """
    return _masked_mean(kl_per_example(teacher_logits, student_logits, temperature), mask)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean ``−log softmax(logits)[label]`` over the real rows (``torch.nn.CrossEntropyLoss()``)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _masked_mean(nll, mask)


def suppress_target(
    student_logits: jax.Array, target_label: int | jax.Array, mask: jax.Array | None = None, eps: float = 1e-4
) -> jax.Array:
    """Mean ``−log(1 − p_S(target) + eps)`` over the real rows (bounded above by ``−log eps``)."""
    p = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
    pt = jnp.take(p, jnp.asarray(target_label, jnp.int32), axis=-1)
    return _masked_mean(-jnp.log1p(-pt + eps), mask)


def forget_loss(
    kind: str,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    kl_cap: float = 2.0,
    target_label: int | jax.Array = 1,
    eps: float = 1e-4,
) -> jax.Array:
    """The forgetting term to **minimise** on a batch of flagged samples.

    Args:
      kind: ``"kl"`` (``−KL``, faithful), ``"kl_capped"`` (``−mean min(KL_i, kl_cap)``) or
        ``"suppress_target"`` (``mean −log(1 − p_S(target) + eps)``).
      student_logits, teacher_logits: ``[batch, classes]``.
      mask: optional ``[batch]`` row mask.
      temperature: softmax temperature of the KL variants.
      kl_cap: per-sample cap for ``"kl_capped"`` (nats).
      target_label: the backdoor target class for ``"suppress_target"``.
      eps: offset inside the log of ``"suppress_target"``.

    Returns:
      Scalar float32.
    """
    if kind == "kl":
        return -kl_batchmean(teacher_logits, student_logits, mask, temperature)
    if kind == "kl_capped":
        kl = kl_per_example(teacher_logits, student_logits, temperature)
        return -_masked_mean(jnp.minimum(kl, kl_cap), mask)
    if kind == "suppress_target":
        return suppress_target(student_logits, target_label, mask, eps)
    raise ValueError(f"forget_loss kind must be one of {FORGET_LOSSES}, got {kind!r}")
