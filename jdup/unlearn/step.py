"""One optimizer step of unlearning, written so that ``jax.vmap`` can run K settings at once.

What is static (hashable, part of the compiled program): the student's ``graphdef``, the :class:`OptimizerSpec`
(step counts, weight decay, clip, projection transforms) and the :class:`~jdup.unlearn.LossSettings`. What is
traced (data, may carry a leading cell axis): the trainable state, the optimizer state, the batch, the dropout
key and the :class:`StepHParams` (peak learning rate and loss weights). The optimizer state does not hold the
learning rate, so it is initialised the same way for every cell (:meth:`OptimizerSpec.init`).

Optimiser (:func:`jdup.optim.adamw_chain`): ``clip_by_global_norm → scale_by_adam → decoupled weight decay →
−lr(t)``, linear warm-up then linear decay (first update lr 0); without a projection this is exactly torch AdamW.
With a projection (UPGP) the two loss terms get separate streams (:func:`jdup.optim.two_stream_chain`): the
forgetting gradient goes through ``clip → Adam → projection → −lr·λ_asr``, the clean CE through its own
unprojected ``clip → Adam → −lr·λ_acc``, and the two updates are added (no weight decay).

:mod:`jdup.sweep.vmapped` runs ``jax.vmap`` of :func:`train_step` over K cells (traced ``hp``, stacked states),
so a sweep cell computes what ``jdup unlearn`` computes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdup import aot, optim
from jdup import dropout as dropout_lib
from jdup.unlearn.loss import LossSettings, loss_terms, objective


class StepHParams(NamedTuple):
    """The traced numbers of a step (float32; ``[]`` for one run, ``[K]`` for K vmapped cells).

    Build it with :func:`step_hparams` only: ``forget_lr``/``retain_lr`` are the products ``lr·λ`` taken in
    float64 on the host, which is what keeps a vmapped cell's numbers equal to the single run's.
    """

    lr: Any  # peak learning rate (single stream)
    lambda_asr: Any  # weight of the forgetting term
    lambda_acc: Any  # weight of the clean CE term
    forget_lr: Any  # lr · lambda_asr: peak learning rate of the projected forget stream (two streams)
    retain_lr: Any  # lr · lambda_acc: peak learning rate of the free retain stream (two streams)


def step_hparams(lr: Any, lambda_asr: Any = 1.0, lambda_acc: Any = 1.0) -> StepHParams:
    """:class:`StepHParams` from Python floats or ``[K]`` NumPy arrays (one entry per cell)."""
    lr64 = np.asarray(lr, np.float64)
    a64 = np.asarray(lambda_asr, np.float64)
    c64 = np.asarray(lambda_acc, np.float64)

    def f32(x):
        return np.asarray(x, np.float32)

    return StepHParams(f32(lr64), f32(a64), f32(c64), f32(lr64 * a64), f32(lr64 * c64))


class OptimizerSpec(NamedTuple):
    """The static part of the unlearning optimizer; :meth:`build` adds the traced learning rates.

    Attributes:
      total_steps: optimizer steps ``T`` of the whole run.
      warmup_steps: ``W = floor(warmup_frac·T)`` (:func:`jdup.optim.warmup_steps`); ``lr(t) = lr·t/W`` for
        ``t < W``, then ``lr·max(0, (T−t)/(T−W))``.
      weight_decay: decoupled weight decay on every trainable leaf (single stream only).
      clip: global-norm clip of the raw gradient (0 disables).
      projection: ``None`` (one AdamW stream) or the forget stream's projection (two streams).
      retain_projection: structural constraints of the retain stream (two streams; see
        :func:`jdup.optim.two_stream_chain`).
    """

    total_steps: int
    warmup_steps: int
    weight_decay: float = 0.01
    clip: float = 1.0
    projection: optax.GradientTransformation | None = None
    retain_projection: optax.GradientTransformation | None = None

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        total_steps: int,
        projection: optax.GradientTransformation | None = None,
        retain_projection: optax.GradientTransformation | None = None,
    ) -> OptimizerSpec:
        """From an :class:`~jdup.unlearn.UnlearnSettings` (``warmup_frac``, ``weight_decay``, ``clip_norm``)."""
        total = int(total_steps)
        return cls(
            total,
            optim.warmup_steps(total, cfg.warmup_frac),
            float(cfg.weight_decay),
            float(cfg.clip_norm),
            projection,
            retain_projection,
        )

    @property
    def two_streams(self) -> bool:
        """A projected run: the step feeds :meth:`build`'s transform the pair ``(forget, retain)`` of gradients."""
        return self.projection is not None

    def schedule(self, peak: Any) -> optax.Schedule:
        """:func:`jdup.optim.linear_warmup_decay` of this run for ``peak`` (a float or a traced array)."""
        return optim.linear_warmup_decay(peak, self.total_steps, self.warmup_steps)

    def build(self, hp: StepHParams) -> optax.GradientTransformation:
        """The optimizer with ``hp``'s learning rates (traced values are fine: build it inside the step): one
        :func:`jdup.optim.adamw_chain`, or with a projection :func:`jdup.optim.two_stream_chain`, whose update
        takes the pair ``(forget_grads, retain_grads)``."""
        if not self.two_streams:
            return optim.adamw_chain(self.schedule(hp.lr), weight_decay=self.weight_decay, clip=self.clip)
        return optim.two_stream_chain(
            self.schedule(hp.forget_lr),
            self.schedule(hp.retain_lr),
            clip=self.clip,
            projection=self.projection,
            retain_projection=self.retain_projection,
        )

    def init(self, trainable: Any) -> Any:
        """The initial optimizer state (independent of the learning rate and the loss weights)."""
        return self.build(step_hparams(0.0)).init(trainable)


def step_key(seed: Any, step: Any) -> jax.Array:
    """The dropout key of step ``step`` (0-based) of a run with ``seed`` (either may be traced)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def train_step(graphdef, optimizer, settings: LossSettings, trainable, frozen, opt_state, batch, key, hp):
    """One unlearning step ``-> (trainable, opt_state, metrics)``; pure, not jitted (vmap it, or use
    :data:`jit_train_step`).

    Args:
      graphdef: the student's graph definition (static).
      optimizer: an :class:`OptimizerSpec` (static; its learning rates come from ``hp``).
      settings: :class:`~jdup.unlearn.LossSettings` (static).
      trainable, frozen: the student's state (``frozen`` is never differentiated).
      opt_state: the optimizer state (:meth:`OptimizerSpec.init`).
      batch: a :func:`~jdup.unlearn.joint_batch`.
      key: dropout key (:func:`step_key`) or ``None`` for a deterministic forward.
      hp: :class:`StepHParams` (traced).

    Returns:
      The new trainable state, the new optimizer state and ``metrics``: ``loss``, ``forget``, ``retain``,
      ``retain_acc`` (accuracy on the clean rows) and ``grad_norm`` (of the weighted gradient, before clipping)
      as device scalars.
    """
    tx = optimizer.build(hp)
    if optimizer.two_streams:  # static: projected forget stream + unprojected retain stream
        return _two_stream_step(graphdef, tx, settings, trainable, frozen, opt_state, batch, key, hp)

    def weighted(trainable):
        forget, retain, acc = loss_terms(graphdef, trainable, frozen, batch, key, settings)
        return objective(forget, retain, hp.lambda_asr, hp.lambda_acc), (forget, retain, acc)

    (loss, (forget, retain, acc)), grads = jax.value_and_grad(weighted, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {
        "loss": loss, "forget": forget, "retain": retain, "retain_acc": acc, "grad_norm": optax.tree.norm(grads)
    }
    return trainable, opt_state, metrics


def _two_stream_step(graphdef, tx, settings, trainable, frozen, opt_state, batch, key, hp):
    """One forward pass, two backward passes (one per loss term), two optimizer streams."""

    def pieces(tr):
        forget, retain, acc = loss_terms(graphdef, tr, frozen, batch, key, settings)
        return (forget, retain), acc

    (forget, retain), vjp, acc = jax.vjp(pieces, trainable, has_aux=True)
    one, zero = jnp.ones_like(forget), jnp.zeros_like(forget)
    (g_forget,) = vjp((one, zero))
    (g_retain,) = vjp((zero, jnp.ones_like(retain)))
    updates, opt_state = tx.update((g_forget, g_retain), opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    grads = jax.tree.map(lambda a, b: hp.lambda_asr * a + hp.lambda_acc * b, g_forget, g_retain)
    loss = objective(forget, retain, hp.lambda_asr, hp.lambda_acc)
    metrics = {
        "loss": loss, "forget": forget, "retain": retain, "retain_acc": acc, "grad_norm": optax.tree.norm(grads)
    }
    return trainable, opt_state, metrics


#: :func:`train_step` jitted with ``graphdef``, ``optimizer`` and ``settings`` static: runs with the same model
#: structure, step counts and loss settings reuse the compiled step whatever their learning rate and weights.
jit_train_step = jax.jit(train_step, static_argnums=(0, 1, 2))


def keep_step(jitted, graphdef, optimizer: OptimizerSpec, settings: LossSettings):
    """A jitted step closing over ``graphdef``, ``optimizer`` and ``settings``, with its executables kept across
    processes (:func:`jdup.aot.keep_compiled`: a repeated ``jdup unlearn`` loads the step of each padded length
    instead of tracing and lowering it again; the same binary, so the same numbers). Not with a projection: its
    transforms close over arrays that no file name can identify, so that step is compiled in every process."""
    if optimizer.projection is not None or optimizer.retain_projection is not None:
        return jitted
    return aot.keep_compiled(
        jitted,
        lambda: f"unlearn.step {aot.stable_repr((graphdef, optimizer, settings))} dropout={dropout_lib.impl()}",
    )
