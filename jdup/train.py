"""Backdoored-victim training in memory: the optimizer, the jitted train step, the epoch loop and evaluation.

The recipe follows the DUP authors' PLM trainer (docs/dup-method.md §4.4): cross-entropy on ``dirty/<rate>/train-poison.csv``
(shuffled), AdamW lr 2e-5, a linear warm-up over the first 3 of 5 epochs then linear decay to 0, gradient-norm
clipping at 1.0, dropout on, evaluation on dev-clean / dev-poison / test-clean / test-poison after every epoch, and
the weights with the best dev-clean accuracy kept.

Implementation: the model is split once into ``(graphdef, params, rest)``; ONE ``jax.jit`` train step
(:func:`make_train_step`) takes ``(params, opt_state, rest, batch, key)``, merges the model inside, and donates the
parameter and optimizer buffers. Batches have a fixed size and a few bucketed lengths (:mod:`jdup.data`), so the
step compiles once per bucket. Dropout keys are ``fold_in(key(seed), step)`` and the data order is a function of
``(seed, epoch)`` (:func:`train_steps`), so a loop resumed from a saved ``(step, epoch, batch)`` position replays
exactly what an uninterrupted run does.

The ``jdup train`` stage (files, checkpoints, ``metrics.jsonl``, model export, ``run_train``) is
:mod:`jdup.stages.train`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdup import data as D
from jdup import optim
from jdup.metrics import accuracy, attack_success_rate
from jdup.predict import MODEL_INPUTS, predict, predict_states
from jdup.settings import TrainConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
EVAL_SPLITS = ("dev-clean", "dev-poison", "test-clean", "test-poison")



# ----------------------------------------------------------------------------------------------------------------
# schedule and optimizer
# ----------------------------------------------------------------------------------------------------------------


#: The one warm-up/decay schedule (Hugging Face ``get_linear_schedule_with_warmup``) lives in :mod:`jdup.optim`.
linear_warmup_decay = optim.linear_warmup_decay
_schedule_value = optim.schedule_value


def make_optimizer(
    lr: float, total_steps: int, warmup_steps: int, *, weight_decay: float = 0.0, clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """Victim training's optimizer: :func:`jdup.optim.adamw_chain` (global-norm clip, then AdamW with torch
    defaults) on :func:`jdup.optim.linear_warmup_decay`.

    Weight decay applies to parameters with 2+ dimensions only (kernels, embeddings), as the usual Hugging Face
    grouping that exempts biases and LayerNorm weights.
    """
    return optim.adamw_chain(
        optim.linear_warmup_decay(lr, total_steps, warmup_steps), weight_decay=weight_decay, clip=clip,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    )


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps: ``round(warmup_epochs * steps_per_epoch)`` or ``round(warmup * total)``."""
    total = steps_per_epoch * cfg.epochs
    if cfg.warmup_epochs is not None:
        return round(cfg.warmup_epochs * steps_per_epoch)
    return round(cfg.warmup * total)


# ----------------------------------------------------------------------------------------------------------------
# step, loop, evaluation
# ----------------------------------------------------------------------------------------------------------------


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
    """The jitted step ``(params, opt_state, rest, batch, key, step) -> (params, opt_state, stats)``.

    ``params`` and ``opt_state`` are donated. ``batch`` holds ``input_ids``, ``attention_mask``,
    ``token_type_ids``, ``labels`` and ``valid``; the loss is the mean cross-entropy over valid rows, with dropout
    on (``rngs=nnx.Rngs(dropout=fold_in(key, step))``). ``stats`` = ``{"loss", "grad_norm", "correct", "count"}``.
    """

    def loss_fn(params, rest, batch, key):
        model = nnx.merge(graphdef, params, *rest)
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], deterministic=False,
                    rngs=nnx.Rngs(dropout=key))
        logits = out.logits.astype(jnp.float32)
        w = batch["valid"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        count = jnp.maximum(w.sum(), 1.0)
        correct = ((logits.argmax(-1) == batch["labels"]) * w).sum()
        return (ce * w).sum() / count, (correct, w.sum())

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, batch, key, step):
        key = jax.random.fold_in(key, step)
        (loss, (correct, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "correct": correct,
                                   "count": count}

    return step


@functools.lru_cache(maxsize=8)
def cached_train_step(graphdef, lr: float, total: int, warm: int, weight_decay: float, clip: float | None):
    """``(tx, step)`` shared by runs with the same architecture and optimizer settings (one compile per process)."""
    tx = make_optimizer(lr, total, warm, weight_decay=weight_decay, clip=clip)
    return tx, make_train_step(graphdef, tx)


@dataclasses.dataclass
class LoopPosition:
    """Where a training loop stands: optimizer steps done, and the next ``(epoch, batch)`` to run."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def train_steps(
    step_fn: Callable,
    params,
    opt_state,
    rest: tuple,
    encoded: D.Encoded,
    cfg: TrainConfig,
    pos: LoopPosition | None = None,
) -> Iterator[tuple]:
    """Runs the epoch loop from ``pos`` and yields after every optimizer step.

    The data order of epoch ``e`` is ``batches(shuffle=True, seed=cfg.seed, epoch=e)`` (length-grouped with
    ``cfg.group_by_length``), started at ``pos.batch`` in the first epoch; the dropout key of step ``t`` is
    ``fold_in(key(cfg.seed), t)``. So a loop restarted from a saved position and state replays an uninterrupted
    run exactly. ``pos`` is updated in place before each yield (``epoch``/``batch`` point at the next batch).

    Yields:
      ``(params, opt_state, stats, epoch, batch_index, epoch_end)``; ``stats`` are device scalars
      (``loss``, ``grad_norm``, ``correct``, ``count``). The caller may stop iterating at any yield.
    """
    pos = pos or LoopPosition()
    spe = D.num_batches(len(encoded), cfg.batch_size)
    key = jax.random.key(cfg.seed)
    for epoch in range(pos.epoch, cfg.epochs):
        start = pos.batch if epoch == pos.epoch else 0
        batches = D.batches(encoded, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, start=start,
                            sort_by_length=cfg.group_by_length)
        for b_idx, batch in enumerate(batches, start=start):
            inputs = {k: batch[k] for k in (*MODEL_INPUTS, "labels", "valid")}
            params, opt_state, stats = step_fn(params, opt_state, rest, inputs, key, np.int32(pos.step))
            pos.step += 1
            epoch_end = b_idx + 1 == spe
            pos.epoch, pos.batch = (epoch + 1, 0) if epoch_end else (epoch, b_idx + 1)
            yield params, opt_state, stats, epoch, b_idx, epoch_end


def evaluate(logits: dict[str, np.ndarray], encoded: dict[str, D.Encoded], target: int) -> dict[str, float]:
    """``dev_acc``, ``dev_asr``, ``cacc`` and ``asr`` from logits of the four evaluation splits (those present)."""
    out = {}
    pred = {k: v.argmax(-1) for k, v in logits.items()}
    if "dev-clean" in pred:
        out["dev_acc"] = accuracy(pred["dev-clean"], encoded["dev-clean"].labels)
    if "dev-poison" in pred:
        out["dev_asr"] = attack_success_rate(pred["dev-poison"], target)
    if "test-clean" in pred:
        out["cacc"] = accuracy(pred["test-clean"], encoded["test-clean"].labels)
    if "test-poison" in pred:
        out["asr"] = attack_success_rate(pred["test-poison"], target)
    return out


def evaluate_states(
    graphdef, states: tuple, encoded: dict[str, D.Encoded], target: int, batch_size: int = 64, *,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`evaluate` of a split model on the evaluation splits of ``encoded`` (:data:`EVAL_SPLITS`)."""
    logits = {k: predict_states(graphdef, states, encoded[k], batch_size, progress=progress, desc=f"eval {k}")
              for k in EVAL_SPLITS if k in encoded}
    return evaluate(logits, encoded, target)


__all__ = [
    "DTYPES", "EVAL_SPLITS", "LoopPosition", "TrainConfig", "accuracy", "attack_success_rate",
    "cached_train_step", "evaluate", "evaluate_states", "linear_warmup_decay", "make_optimizer",
    "make_train_step", "predict", "predict_states", "train_steps", "warmup_steps",
]
