"""The unlearning loop: batches, steps, the stop rule, the kept state, checkpoints, the per-step hook."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdup import data as D
from jdup import lora as lora_lib
from jdup import optim
from jdup import predict as predict_lib
from jdup import projection as projection_lib
from jdup.errors import JdupError
from jdup.unlearn.loss import LossSettings, joint_batch
from jdup.unlearn.monitors import Monitor, infer_target
from jdup.unlearn.step import OptimizerSpec, jit_train_step, step_hparams, step_key
from jdup.unlearn.student import Student, build_student

log = logging.getLogger("jdup.unlearn")


def predict_logits(
    graphdef,
    states: tuple,
    encoded: D.Encoded,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Deterministic logits ``[N, K]`` of a split model (:func:`jdup.predict.predict_states`)."""
    return predict_lib.predict_states(
        graphdef, tuple(states), encoded, batch_size, progress=progress, desc=desc
    )


def model_logits(
    model: nnx.Module, encoded: D.Encoded, batch_size: int = 64, progress: bool = False, desc: str = "predict"
) -> np.ndarray:
    """Deterministic logits ``[N, K]`` of a whole model (:func:`jdup.predict.predict`)."""
    return predict_lib.predict(model, encoded, batch_size, progress=progress, desc=desc)


class StepInfo(NamedTuple):
    """What the ``on_step`` hook of :func:`unlearn` receives after every optimizer step."""

    step: int  # steps done so far (1-based after the first update)
    metrics: dict  # host floats: loss, forget, retain, grad_norm, lr
    student: Student  # graphdef + current trainable/frozen state (read-only use)
    opt_state: Any  # current optimizer state (e.g. to refresh a projection basis with jdup.optim.set_basis)


@dataclasses.dataclass
class UnlearnResult:
    """Output of :func:`unlearn`.

    Attributes:
      student: the student with the selected (best) trainable state written in.
      merged: the merged plain model (adapters folded in; same class as the victim).
      steps: optimizer steps taken.
      total_steps: steps planned.
      best_step: the step whose state was kept.
      history: per-evaluation records (step, monitor values).
      log: per-step training metrics (step, loss, forget, retain, grad_norm, lr, + hook extras).
      stopped_early: True if the stop rule fired before ``total_steps``.
    """

    student: Student
    merged: nnx.Module
    steps: int
    total_steps: int
    best_step: int
    history: list
    log: list
    stopped_early: bool


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def unlearn(
    model: nnx.Module,
    forget: D.Encoded,
    retain: D.Encoded,
    cfg: Any,
    *,
    teacher_logits: np.ndarray | None = None,
    target_label: int | None = None,
    monitor: Monitor | None = None,
    projection: optax.GradientTransformation | None = None,
    on_step: Callable[[StepInfo], dict | None] | None = None,
    ckpt_dir: str | None = None,
    retain_projection: optax.GradientTransformation | None = None,
    student: Student | None = None,
) -> UnlearnResult:
    """Unlearn the flagged rows ``forget`` while keeping accuracy on the labelled clean rows ``retain``.

    Args:
      model: the backdoored victim (teacher); not modified.
      forget: tokenised flagged rows (labels unused).
      retain: tokenised labelled clean rows.
      cfg: an :class:`~jdup.unlearn.UnlearnSettings` (or the stage's ``UnlearnConfig``): objective, LoRA,
        optimiser, stop-rule cadence, projection, seed, checkpoint period.
      teacher_logits: ``[len(forget), K]``; computed here (one jitted pass) when ``None``.
      target_label: target for ``suppress_target``; default ``cfg.target_label`` or :func:`infer_target`.
      monitor: early-stop rule evaluated every ``cfg.eval_every_steps`` (0: each epoch) and at the end; the
        state with the lowest ``score`` among ``ok`` evaluations (step 0 included) is kept. ``None``: keep the
        final state.
      projection: optional transform for the forget stream (:class:`~jdup.unlearn.OptimizerSpec`): only the
        forgetting update is projected; the retain (clean CE) update runs in a separate, unprojected stream and
        the two updates are added. When ``None``, ``on_step`` is ``None`` and ``cfg.projection`` names a variant,
        the projection and its hook are built here (:func:`jdup.projection.build_projection` on this student).
      retain_projection: structural constraints for the retain stream (see :func:`jdup.optim.two_stream_chain`);
        default: ``on_step.retain_projection`` when the hook has one (:class:`jdup.projection.ProjectionHook`).
      on_step: hook called after each step with a :class:`StepInfo`; a returned dict is merged into that step's
        log record (scalars), except its ``"opt_state"`` entry, which replaces the optimizer state (e.g. after a
        projection-basis refresh with ``jdup.optim.set_basis``). If the hook has a ``prepare_student(Student) ->
        trainable`` method, it is called once before the first step and its result is the starting state.
      ckpt_dir: orbax checkpoint folder (resumes from it when ``cfg.resume`` and it matches).
      student: the student to train (default :func:`~jdup.unlearn.build_student` of ``model`` and ``cfg``).

    Returns:
      An :class:`UnlearnResult`.
    """
    from tqdm.auto import tqdm

    from jdup.checkpoint import Checkpointer, fingerprint

    if teacher_logits is None:
        teacher_logits = model_logits(model, forget, cfg.eval_batch_size, cfg.progress, "teacher logits")
    if target_label is None:
        target_label = cfg.target_label
    if target_label is None:
        target_label = infer_target(teacher_logits, model.config.num_labels)
    settings = LossSettings.from_config(cfg, target_label)
    student = build_student(model, cfg) if student is None else student
    per_epoch = D.forget_batches_per_epoch(len(forget), cfg.batch_size)
    total = per_epoch * cfg.epochs
    if total == 0 or len(retain) == 0:
        merged = lora_lib.merge(student.model)
        return UnlearnResult(student, merged, 0, 0, 0, [], [], False)
    if projection is None and on_step is None and cfg.projection not in ("", "none", None):
        projection, on_step = projection_lib.build_projection(
            cfg.projection, cfg.projection_options, student, retain=retain, forget=forget, seed=cfg.seed
        )
    if projection is not None and retain_projection is None:
        retain_projection = getattr(on_step, "retain_projection", None)
    spec = OptimizerSpec.from_config(
        cfg, total, projection, retain_projection if projection is not None else None
    )
    hp = step_hparams(cfg.lr, cfg.lambda_asr, cfg.lambda_acc)
    schedule = optim.linear_warmup_decay(cfg.lr, total, spec.warmup_steps)
    eval_every = cfg.eval_every_steps or per_epoch
    plan = D.BatchPlan.from_config(forget, retain, cfg)

    trainable, frozen = student.trainable, student.frozen
    opt_state = spec.init(trainable)

    def logits_fn_for(tr):
        return lambda enc: predict_logits(student.graphdef, (tr, frozen), enc, cfg.eval_batch_size)

    history: list[dict] = []
    log_rows: list[dict] = []
    best = {"score": np.inf, "step": 0, "state": None}
    step = 0
    stopped = False

    def evaluate(at_step: int, tr) -> dict:
        rec = dict(monitor(logits_fn_for(tr)))
        rec["step"] = at_step
        history.append(rec)
        if rec.get("ok", True) and rec["score"] < best["score"]:
            best.update(score=float(rec["score"]), step=at_step, state=_host(tr))
        log.info("unlearn eval @%d: %s", at_step, {k: v for k, v in rec.items() if k != "step"})
        return rec

    fp = fingerprint(
        {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("out", "resume", "progress", "ckpt_every_steps", "eval_batch_size")
        }
        | {"n_forget": len(forget), "n_retain": len(retain), "target": int(target_label)}
    )
    ck = None
    if ckpt_dir and cfg.ckpt_every_steps > 0:
        ck = Checkpointer(ckpt_dir, max_to_keep=1)
        if cfg.resume and ck.latest_step() is not None:
            template = {"trainable": trainable, "opt": opt_state, "best": _host(trainable)}
            try:
                tree, meta = ck.restore(template)
                if meta.get("fingerprint") != fp:
                    raise JdupError("checkpoint was written with different settings", ckpt_dir)
                trainable, opt_state = tree["trainable"], tree["opt"]
                step = int(meta["step"])
                history, log_rows = meta["history"], meta["log"]
                best.update(
                    score=float(meta["best_score"]),
                    step=int(meta["best_step"]),
                    state=tree["best"] if meta["has_best"] else None,
                )
                log.info("unlearn: resumed at step %d from %s", step, ckpt_dir)
            except JdupError as e:
                log.warning("unlearn: not resuming (%s); starting over", e)
                ck.close()
                shutil.rmtree(ckpt_dir, ignore_errors=True)
                ck = Checkpointer(ckpt_dir, max_to_keep=1)

    # A hook may move the initial adapters first (jdup.projection: LoRA A into the clean complement). It is told
    # even on resume (the restored state already has it), so it does not redo the move.
    prepare = getattr(on_step, "prepare_student", None)
    if prepare is not None:
        prepared = prepare(Student(student.model, student.graphdef, trainable, frozen))
        if step == 0:
            trainable = prepared
    initial = trainable if step == 0 else student.trainable
    if monitor is not None and step == 0 and not history:
        evaluate(0, trainable)

    bar = tqdm(total=total, initial=step, desc="unlearn", disable=not cfg.progress, leave=False)
    try:
        while step < total:
            fb, cb = plan.forget_batch(step), plan.clean_batch(step)
            batch = joint_batch(fb, teacher_logits, cb, cfg.fused_step)
            lr = float(schedule(step))
            trainable, opt_state, m = jit_train_step(
                student.graphdef,
                spec,
                settings,
                trainable,
                frozen,
                opt_state,
                batch,
                step_key(cfg.seed, step),
                hp,
            )
            step += 1
            rec = {"step": step, "lr": lr, **{k: float(v) for k, v in m.items()}}
            if on_step is not None:
                extra = on_step(
                    StepInfo(
                        step, rec, Student(student.model, student.graphdef, trainable, frozen), opt_state
                    )
                )
                if extra and "opt_state" in extra:
                    extra = dict(extra)
                    opt_state = extra.pop("opt_state")
                if extra:
                    rec.update({k: (float(v) if np.ndim(v) == 0 else v) for k, v in extra.items()})
            log_rows.append(rec)
            bar.update(1)
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}", forget=f"{rec['forget']:.3f}", retain=f"{rec['retain']:.3f}"
            )
            if monitor is not None and (step % eval_every == 0 or step == total):
                r = evaluate(step, trainable)
                if r.get("stop") and step < total:
                    stopped = True
            if ck is not None and (step % cfg.ckpt_every_steps == 0 or stopped or step == total):
                ck.save(
                    step,
                    {
                        "trainable": trainable,
                        "opt": opt_state,
                        "best": best["state"] if best["state"] is not None else _host(trainable),
                    },
                    {
                        "step": step,
                        "fingerprint": fp,
                        "history": history,
                        "log": log_rows,
                        "best_score": best["score"] if np.isfinite(best["score"]) else 1e30,
                        "best_step": best["step"],
                        "has_best": best["state"] is not None,
                    },
                )
            if stopped:
                break
    finally:
        bar.close()
        if ck is not None:
            ck.close()

    if monitor is not None and best["state"] is not None:
        final, best_step = jax.tree.map(jnp.asarray, best["state"]), best["step"]
    elif monitor is not None:  # no acceptable evaluation at all: keep the untouched student (step 0)
        final, best_step = initial, 0
    else:
        final, best_step = trainable, step
    nnx.update(student.model, final)
    out = Student(student.model, student.graphdef, final, frozen)
    return UnlearnResult(
        out, lora_lib.merge(student.model), step, total, best_step, history, log_rows, stopped
    )
