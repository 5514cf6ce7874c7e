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

:func:`train` is the whole algorithm in memory (victim training, model selection, resumable checkpoints):
``train(model, data, settings, target=...) -> TrainResult``. The ``jdup train`` stage (reading the data folder,
``metrics.jsonl``, model export, ``run_train``) is :mod:`jdup.stages.train`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdup import data as D
from jdup import distributed, optim
from jdup import mesh as mesh_lib
from jdup.checkpoint import Checkpoint
from jdup.errors import JdupError
from jdup.metrics import accuracy, attack_success_rate
from jdup.predict import model_inputs, predict, predict_states
from jdup.settings import TrainConfig, TrainSettings, settings_of

log = logging.getLogger("jdup.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
EVAL_SPLITS = ("dev-clean", "dev-poison", "test-clean", "test-poison")



# ----------------------------------------------------------------------------------------------------------------
# schedule and optimizer
# ----------------------------------------------------------------------------------------------------------------


def warmup_steps(cfg: TrainSettings, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps by the one rule :func:`jdup.optim.warmup_steps`: ``warmup_epochs`` epochs
    when set, else the ``warmup`` fraction of all steps (``warmup = 0.6`` of 5 epochs: exactly 3 epochs)."""
    if cfg.warmup_epochs is not None:
        return optim.warmup_steps(steps_per_epoch, cfg.warmup_epochs)
    return optim.warmup_steps(steps_per_epoch * cfg.epochs, cfg.warmup)


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
    # jdup's one optimizer; decay on kernels and embeddings only (the usual Hugging Face grouping)
    tx = optim.adamw_chain(optim.linear_warmup_decay(lr, total, warm), weight_decay=weight_decay, clip=clip,
                           mask=optim.matrices_only)
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
    cfg: TrainSettings,
    pos: LoopPosition | None = None,
    mesh: Any = None,
) -> Iterator[tuple]:
    """Runs the epoch loop from ``pos`` and yields after every optimizer step.

    The data order of epoch ``e`` is ``batches(shuffle=True, seed=cfg.seed, epoch=e)`` (length-grouped with
    ``cfg.group_by_length``), started at ``pos.batch`` in the first epoch; the dropout key of step ``t`` is
    ``fold_in(key(cfg.seed), t)``. So a loop restarted from a saved position and state replays an uninterrupted
    run exactly. ``pos`` is updated in place before each yield (``epoch``/``batch`` point at the next batch).
    With a ``mesh`` (:mod:`jdup.mesh`) each batch is padded to a multiple of its ``data`` axis (copies marked
    invalid: no weight in the loss) and its rows are split over ``data``; the real rows keep their dropout masks.

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
            inputs = {**model_inputs(batch), "labels": batch["labels"], "valid": batch["valid"]}
            if mesh is not None:
                inputs = mesh_lib.put_rows(mesh_lib.pad_rows(inputs, mesh_lib.data_size(mesh))[0], mesh)
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
    progress: bool = False, mesh: Any = None,
) -> dict[str, float]:
    """:func:`evaluate` of a split model on the evaluation splits of ``encoded`` (:data:`EVAL_SPLITS`)."""
    logits = {k: predict_states(graphdef, states, encoded[k], batch_size, progress=progress, desc=f"eval {k}",
                                mesh=mesh)
              for k in EVAL_SPLITS if k in encoded}
    return evaluate(logits, encoded, target)


# ----------------------------------------------------------------------------------------------------------------
# the algorithm: train(model, data, settings) -> TrainResult
# ----------------------------------------------------------------------------------------------------------------

#: Settings that may change between a stopped run and its continuation (not in the checkpoint fingerprint).
RESUME_FREE = ("max_steps", "ckpt_every_steps", "progress", "eval_batch_size", "log_every")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      model: the selected model (best evaluation by ``settings.select``); ``None`` when ``stopped``.
      metrics: evaluation of the selected epoch (``dev_acc``, ``dev_asr``, ``cacc``, ``asr`` of the splits
        present, ``epoch``, ``step``).
      best_epoch: the selected epoch (1-based; -1 before any evaluation).
      history: one evaluation record per evaluated epoch.
      steps: optimizer steps done; total_steps: steps of the whole schedule.
      steps_per_epoch, warmup_steps: the schedule.
      target: the target label ASR was measured against.
      seconds: training time, over every resumed part of the run.
      stopped: ``settings.max_steps`` stopped the run before the end (a checkpoint holds it).
      checkpoint: the checkpoint folder (``None`` without one).
    """

    model: Any
    metrics: dict[str, float]
    best_epoch: int
    history: list[dict]
    steps: int
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    target: int
    seconds: float
    stopped: bool = False
    checkpoint: str | None = None


def train(
    model: nnx.Module,
    data: Mapping[str, D.Encoded],
    settings: TrainSettings,
    *,
    target: int,
    mesh: Any = None,
    checkpoint: Checkpoint | None = None,
    on_start: Callable[[int], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
    donate_model: bool = False,
) -> TrainResult:
    """Trains ``model`` on ``data["train"]`` and keeps the best evaluated weights (the DUP PLM recipe, above).

    Args:
      model: the classifier to fine-tune (an NNX module of :mod:`jdup.models`); not modified.
      data: tokenised splits: ``"train"`` and any of :data:`EVAL_SPLITS` (evaluated after every
        ``eval_every`` epochs: ``dev_acc``, ``dev_asr``, ``cacc``, ``asr``).
      settings: :class:`jdup.settings.TrainSettings` (a stage's ``TrainConfig`` is reduced to it).
      target: the backdoor's target label (for ASR and ``select="dev_mean"``).
      mesh: the device mesh (``jdup.mesh``); ``None`` = the default device.
      checkpoint: resumable checkpoints (:class:`Checkpoint`); the run resumes from the newest one when its
        fingerprint (settings except :data:`RESUME_FREE`, row counts, target, ``identity``) matches, else raises.
      on_start: called once with the step the loop starts from (0, or the resumed step).
      on_record: called with each log record: ``{"step", "epoch", "loss", "train_acc", "grad_norm", "lr"}`` every
        ``log_every`` steps and at epoch ends, ``{"eval": True, ...metrics}`` after each evaluation.
      donate_model: let the first step reuse ``model``'s parameter buffers (no copy; ``model`` must not be used
        afterwards). Default: the parameters are copied and ``model`` stays usable.

    Returns:
      A :class:`TrainResult` (``stopped`` and no model when ``max_steps`` ended the run first).
    """
    from tqdm.auto import tqdm

    from jdup.checkpoint import Checkpointer, fingerprint

    cfg = settings_of(settings, TrainSettings)
    t_start = time.perf_counter()
    train_enc = data["train"]
    spe = D.num_batches(len(train_enc), cfg.batch_size)
    total = spe * cfg.epochs
    warm = warmup_steps(cfg, spe)
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    tx, step_fn = cached_train_step(graphdef, float(cfg.lr), total, warm, float(cfg.weight_decay),
                                    float(cfg.clip) if cfg.clip else None)
    rest = tuple(rest)
    if mesh is not None:  # whole over the mesh's data axis, split over model by jdup.models.sharding's rules
        params, rest = mesh_lib.put_state((params, rest), mesh, keep=True)
    if not donate_model:  # the train step donates its buffers: copy them so the caller's model stays as it was
        params = jax.tree.map(jnp.copy, params)
    # on a mesh, an eager init lays the moments out like their parameters (a jitted one would put them on one device)
    opt_state = jax.jit(tx.init)(params) if mesh is None else mesh_lib.commit(tx.init(params), mesh)
    best = mesh_lib.gather(params)

    meta: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best_score": None, "best_epoch": -1,
                            "history": [], "elapsed": 0.0, "best_metrics": {}}
    ck = None
    if checkpoint is not None:
        fp = fingerprint({
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE},
            "rows": {k: len(v) for k, v in data.items()}, "target": int(target), "identity": checkpoint.identity,
        })
        meta["fingerprint"] = fp
        ck = Checkpointer(checkpoint.directory, max_to_keep=checkpoint.max_to_keep or 2)
        if ck.latest_step() is not None:
            try:
                (params, opt_state, best), saved = ck.restore((params, opt_state, best))
            except BaseException:
                ck.close()
                raise
            if saved.get("fingerprint") != fp:
                ck.close()
                raise JdupError("the checkpoint was written with different settings (model, data or "
                                "hyper-parameters); pass --overwrite (overwrite=true) to discard it and start again, "
                                "or choose another out folder", ck.directory)
            meta.update(saved)
            log.info("resuming from step %d (epoch %d, batch %d)", meta["step"], meta["epoch"], meta["batch"])
    if on_start is not None:
        on_start(int(meta["step"]))

    def record(obj):
        if on_record is not None:
            on_record(obj)

    elapsed_before = float(meta["elapsed"])
    pos = LoopPosition(int(meta["step"]), int(meta["epoch"]), int(meta["batch"]))
    pending: list[dict] = []
    stopped = False
    bar = tqdm(total=total, initial=pos.step, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    loop = train_steps(step_fn, params, opt_state, rest, train_enc, cfg, pos, mesh)
    try:
        for params, opt_state, stats, epoch, b_idx, epoch_end in loop:
            step = pos.step
            distributed.stop_point(step)  # Ctrl-C (even one a library swallowed) or another process stopped
            meta.update(step=step, epoch=pos.epoch, batch=pos.batch)
            pending.append(stats)
            bar.update(1)
            if step % max(cfg.log_every, 1) == 0 or epoch_end:
                host = jax.device_get(pending)
                loss = float(np.mean([s["loss"] for s in host]))
                acc = float(sum(s["correct"] for s in host) / max(sum(s["count"] for s in host), 1))
                record({"step": step, "epoch": epoch + (b_idx + 1) / spe, "loss": loss, "train_acc": acc,
                        "grad_norm": float(host[-1]["grad_norm"]),
                        "lr": optim.schedule_value(cfg.lr, total, warm, step - 1)})
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
                pending = []
            if epoch_end and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                m = evaluate_states(graphdef, (params, *rest), data, target, cfg.eval_batch_size,
                                    progress=cfg.progress, mesh=mesh)
                m.update(epoch=epoch + 1, step=step)
                score = m["dev_acc"] if cfg.select == "dev_acc" else (m["dev_acc"] + m["dev_asr"]) / 2
                if meta["best_score"] is None or score > meta["best_score"]:
                    meta.update(best_score=score, best_epoch=epoch + 1, best_metrics=m)
                    best = mesh_lib.gather(params)
                meta["history"] = [*meta["history"], m]
                record({"eval": True, **m})
                log.info("epoch %d: %s", epoch + 1, m)
            hit_max = cfg.max_steps is not None and step >= cfg.max_steps and step < total
            if ck is not None and (epoch_end or hit_max or (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0)):
                meta["elapsed"] = elapsed_before + time.perf_counter() - t_start
                ck.save(meta["step"], (params, opt_state, best), meta)
            if hit_max:
                stopped = True
                break
    finally:
        bar.close()
        if ck is not None:
            ck.close()

    final = None
    if not stopped:
        final = nnx.merge(graphdef, jax.device_put(best) if mesh is None else mesh_lib.put_state(best, mesh), *rest)
    return TrainResult(
        model=final, metrics=dict(meta["best_metrics"]), best_epoch=int(meta["best_epoch"]),
        history=list(meta["history"]), steps=pos.step, total_steps=total, steps_per_epoch=spe,
        warmup_steps=warm, target=int(target), seconds=elapsed_before + time.perf_counter() - t_start,
        stopped=stopped, checkpoint=ck.directory if ck is not None else None,
    )


__all__ = [
    "DTYPES", "EVAL_SPLITS", "RESUME_FREE", "LoopPosition", "TrainConfig", "TrainResult",
    "TrainSettings", "accuracy", "attack_success_rate", "cached_train_step", "evaluate", "evaluate_states",
    "make_train_step", "predict", "predict_states", "train", "train_steps",
    "warmup_steps",
]
