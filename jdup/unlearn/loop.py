"""The unlearning loop, written once for K runs ("cells"): ``jdup unlearn`` runs it with K = 1, a sweep group
with K > 1 (:mod:`jdup.sweep.vmapped`).

:func:`run_cells` is the host part, the same Python for every K: the batches of each cell (its own
:class:`jdup.data.BatchPlan`), when to evaluate (every ``eval_every_steps``, 0: each epoch, and at the end), the
stop rule's decision per cell (:func:`jdup.unlearn.cells.judge`: the lowest ``score`` among ``ok`` evaluations is
kept; a cell stops once an evaluation after a step says ``stop`` before the last step), the history and the
per-step log, the ``on_step`` hooks (the UPGP projection's basis refresh), checkpoints and the final state. Its
device part is the pure functions of :mod:`jdup.unlearn.cells` over a :class:`~jdup.unlearn.cells.LoopState`
(one step of every cell, ``jax.vmap``-ed; the kept state; the final state). A stopped cell is no longer evaluated;
the loop ends when every cell stopped or the last step ran. :func:`unlearn` is one cell of it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from jdup import data as D
from jdup import distributed
from jdup import lora as lora_lib
from jdup import mesh as mesh_lib
from jdup import predict as predict_lib
from jdup import projection as projection_lib
from jdup.checkpoint import Checkpoint
from jdup.errors import JdupError
from jdup.predict import MODEL_INPUTS
from jdup.settings import UnlearnSettings, settings_of
from jdup.unlearn import guard as guard_lib
from jdup.unlearn.cells import (
    CellParams,
    LoopState,
    Placement,
    Tally,
    cell_of,
    cells_step,
    final_state,
    judge,
    keep_best_cells,
    pad_inputs,
    place,
    place_student,
    set_cell,
    stack_batches,
    stack_cells,
    to_host,
)
from jdup.unlearn.loss import LossSettings, forget_augment_at, joint_batch
from jdup.unlearn.monitors import Monitor, infer_target
from jdup.unlearn.step import OptimizerSpec, step_hparams
from jdup.unlearn.student import Student, build_student

log = logging.getLogger("jdup.unlearn")

#: Settings that do not change a run's numbers (left out of the checkpoint fingerprint).
NOT_FINGERPRINTED = ("resume", "progress", "ckpt_every_steps", "eval_batch_size")


class StepInfo(NamedTuple):
    """What the ``on_step`` hook of :func:`unlearn` receives after every optimizer step."""

    step: int  # steps done so far (1-based after the first update)
    metrics: dict  # host floats: loss, forget, retain, retain_acc, grad_norm, lr
    student: Student  # graphdef + current trainable/frozen state (read-only use)
    opt_state: Any  # current optimizer state (e.g. to refresh a projection basis with jdup.optim.set_basis)


@dataclasses.dataclass
class UnlearnResult:
    """Output of :func:`unlearn` (one per cell of :func:`run_cells`).

    Attributes:
      student: the student with the selected (best) trainable state written in.
      merged: the merged plain model (adapters folded in; same class as the victim).
      steps: optimizer steps taken.
      total_steps: steps planned.
      best_step: the step whose state was kept.
      history: per-evaluation records (step and the monitor's :class:`~jdup.unlearn.Evaluation` fields).
      log: per-step training metrics (step, loss, forget, retain, grad_norm, lr, + hook extras).
      stopped_early: True if the stop rule fired before ``total_steps``.
      padded_steps: steps at which this cell's batch was lengthened to the longest batch of its group (a sweep
        group; always 0 for one run): there its dropout masks differ from a single run's.
      collapsed: the collapse guard (:mod:`jdup.unlearn.guard`) found the last epoch collapsed and returned the
        state of ``best_step`` instead of the final one.
    """

    student: Student
    merged: nnx.Module
    steps: int
    total_steps: int
    best_step: int
    history: list
    log: list
    stopped_early: bool
    padded_steps: int = 0
    collapsed: bool = False


class Cell(NamedTuple):
    """One run's inputs to the loop (:func:`make_cell`).

    Attributes:
      settings: the run's :class:`~jdup.unlearn.UnlearnSettings` (a stage config is reduced to it: no paths).
      forget, retain: the tokenised flagged rows and labelled clean rows.
      teacher: ``[len(forget), K]`` victim logits on ``forget``.
      target: the defender's target label.
      student: the student at its starting state (after the projection hook's ``prepare_student``).
      monitor: the stop rule (``None``: keep the last state).
      projection, retain_projection: the forget stream's projection and the retain stream's structural
        constraints (UPGP; ``None`` for one AdamW stream). Their bases live in the optimizer state, so cells of
        one group may have different bases.
      on_step: hook called after every step with a :class:`StepInfo` of this cell.
    """

    settings: Any
    forget: D.Encoded
    retain: D.Encoded
    teacher: np.ndarray
    target: int
    student: Student
    monitor: Monitor | None = None
    projection: optax.GradientTransformation | None = None
    retain_projection: optax.GradientTransformation | None = None
    on_step: Callable[[StepInfo], dict | None] | None = None


def settings_fingerprint(cell: Cell) -> dict:
    """What must match to resume a cell from a checkpoint: its :class:`~jdup.unlearn.UnlearnSettings` fields
    (except :data:`NOT_FINGERPRINTED`), its set sizes and target. A stage config's I/O fields are not read."""
    cfg = cell.settings
    values = {}
    for f in dataclasses.fields(UnlearnSettings):
        if f.name in NOT_FINGERPRINTED:
            continue
        v = getattr(cfg, f.name)
        values[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return values | {"n_forget": len(cell.forget), "n_retain": len(cell.retain), "target": int(cell.target)}


def _plain(v: Any) -> Any:
    return float(v) if np.ndim(v) == 0 else v


# ---------------------------------------------------------------------------------------------------------------
# Cells and the loop


def make_cell(
    model: nnx.Module,
    forget: D.Encoded,
    retain: D.Encoded,
    cfg: UnlearnSettings,
    *,
    teacher_logits: np.ndarray | None = None,
    target_label: int | None = None,
    monitor: Monitor | None = None,
    projection: optax.GradientTransformation | None = None,
    retain_projection: optax.GradientTransformation | None = None,
    on_step: Callable[[StepInfo], dict | None] | None = None,
    student: Student | None = None,
    mesh: Any = None,
) -> Cell:
    """One run's :class:`Cell` (the arguments of :func:`unlearn`): teacher logits (one jitted pass when ``None``),
    the target (``cfg.target_label`` or :func:`~jdup.unlearn.infer_target`), the student
    (:func:`~jdup.unlearn.build_student`), and, when ``projection`` and ``on_step`` are ``None`` and
    ``cfg.projection`` names a variant, the projection and its hook (:func:`jdup.projection.build_projection` on
    this student); the hook's ``prepare_student`` gives the starting state. ``mesh``: the teacher pass and the
    student on it (:func:`place_student`)."""
    cfg = settings_of(cfg, UnlearnSettings)  # a stage's UnlearnConfig: its algorithm settings only
    if teacher_logits is None:
        teacher_logits = predict_lib.predict(
            model, forget, cfg.eval_batch_size, progress=cfg.progress, desc="teacher logits", mesh=mesh
        )
    if target_label is None:
        target_label = cfg.target_label
    if target_label is None:
        target_label = infer_target(teacher_logits, model.config.num_labels)
    student = build_student(model, cfg) if student is None else student
    if mesh is not None:
        student = place_student(student, mesh)
    total = D.forget_batches_per_epoch(len(forget), cfg.batch_size) * cfg.epochs
    if total and len(retain):
        if projection is None and on_step is None and cfg.projection not in ("", "none", None):
            projection, on_step = projection_lib.build_projection(
                cfg.projection, cfg.projection_options, student, retain=retain, forget=forget, seed=cfg.seed
            )
        if projection is not None and retain_projection is None:
            retain_projection = getattr(on_step, "retain_projection", None)
    return Cell(
        cfg,
        forget,
        retain,
        np.asarray(teacher_logits),
        int(target_label),
        student,
        monitor,
        projection,
        retain_projection if projection is not None else None,
        on_step,
    )


def _total_steps(cell: Cell) -> int:
    return D.forget_batches_per_epoch(len(cell.forget), cell.settings.batch_size) * cell.settings.epochs


def check_group(cells: Sequence[Cell]) -> None:
    """Cells run together must share the compiled step: steps, target, retain size, stop rule kind and
    projection (their learning rates, loss weights, seeds, rows and bases may differ)."""
    c0 = cells[0]
    key0 = (_total_steps(c0), c0.target, len(c0.retain), c0.monitor is None, c0.projection is None)
    for c in cells[1:]:
        if (_total_steps(c), c.target, len(c.retain), c.monitor is None, c.projection is None) != key0:
            raise JdupError(
                "cells run together must share steps, target, retain size, stop rule and projection"
            )


def run_cells(
    cells: Sequence[Cell],
    *,
    placement: Placement | None = None,
    pad_cells: int = 0,
    checkpoint: Checkpoint | None = None,
    progress: bool | None = None,
) -> list[UnlearnResult]:
    """Unlearns K cells together (K = 1: :func:`unlearn`); one :class:`UnlearnResult` per cell.

    Args:
      cells: the runs (:func:`make_cell`); they must agree as :func:`check_group` says, and in every setting
        but ``seed``, ``lr``, ``lambda_asr`` and ``lambda_acc`` (the static step is the first cell's).
      placement: where the stacked arrays live (default: JAX's default device).
      pad_cells: copies of the last cell appended to the stacked arrays (e.g. to fill a mesh axis); they are
        computed and dropped (never evaluated, no hook, no result).
      checkpoint: resumable checkpoints (:class:`jdup.checkpoint.Checkpoint`, written every
        ``ckpt_every_steps``); resumes from them when the first cell's ``resume`` is set and the fingerprint
        (:func:`settings_fingerprint` of every cell, and ``checkpoint.identity`` when given) matches.
      progress: a tqdm bar (default: the first cell's ``progress``).
    """
    from tqdm.auto import tqdm

    from jdup.checkpoint import Checkpointer, fingerprint

    where = placement or Placement()
    check_group(cells)
    k_real, c0 = len(cells), cells[0]
    cfg0 = c0.settings
    k = k_real + int(pad_cells)
    idx = list(range(k_real)) + [k_real - 1] * int(pad_cells)
    per_epoch = D.forget_batches_per_epoch(len(c0.forget), cfg0.batch_size)
    total = per_epoch * cfg0.epochs
    if total == 0 or len(c0.retain) == 0:
        return [
            UnlearnResult(c.student, lora_lib.merge(c.student.model), 0, 0, 0, [], [], False) for c in cells
        ]

    specs = [OptimizerSpec.from_config(c.settings, total, c.projection, c.retain_projection) for c in cells]
    spec = specs[0]
    settings = LossSettings.from_config(cfg0, c0.target)
    graphdef = c0.student.graphdef
    eval_every = cfg0.eval_every_steps or per_epoch
    plans = [D.BatchPlan.from_config(c.forget, c.retain, c.settings) for c in cells]
    pad_id = int(c0.forget.pad_id)
    monitored = c0.monitor is not None
    guard_tol = 0.0 if monitored else float(cfg0.collapse_guard)  # a stop rule keeps its own best state
    progress = cfg0.progress if progress is None else progress

    starts = [c.student.trainable for c in cells]
    step = 0
    histories: list[list[dict]] = [[] for _ in cells]
    logs: list[list[dict]] = [[] for _ in cells]
    tally = Tally.start(k_real)
    state = None

    fp = fingerprint([settings_fingerprint(c) for c in cells] if k_real > 1 else settings_fingerprint(c0))
    if checkpoint is not None and checkpoint.identity:
        fp = fingerprint({"settings": fp, "identity": dict(checkpoint.identity)})
    ck = None
    ckpt_dir = checkpoint.directory if checkpoint is not None else None
    keep = (checkpoint.max_to_keep or 1) if checkpoint is not None else 1
    if ckpt_dir and cfg0.ckpt_every_steps > 0:
        ck = Checkpointer(ckpt_dir, max_to_keep=keep)
        if cfg0.resume and ck.latest_step() is not None:
            tr0 = stack_cells([starts[i] for i in idx], where.cells)
            template = {
                "trainable": tr0,
                "opt": stack_cells([specs[i].init(starts[i]) for i in idx], where.cells),
                "best": tr0,
            }
            try:
                tree, meta = ck.restore(template)
                if meta.get("fingerprint") != fp:
                    raise JdupError("checkpoint was written with different settings", ckpt_dir)
                state = LoopState(tree["trainable"], tree["opt"], tree["best"])
                step = int(meta["step"])
                histories, logs = meta["history"], meta["log"]
                t = meta["tally"]
                tally = Tally(
                    np.asarray([np.inf if s is None else s for s in t["best_score"]], float),
                    np.asarray(t["best_step"], np.int64),
                    np.asarray(t["stopped"], bool),
                    np.asarray(t["steps"], np.int64),
                )
                log.info("unlearn: resumed at step %d from %s", step, ckpt_dir)
            except (JdupError, KeyError, TypeError, ValueError) as e:
                log.warning("unlearn: not resuming (%s); starting over", e)
                ck.close()
                shutil.rmtree(ckpt_dir, ignore_errors=True)
                ck = Checkpointer(ckpt_dir, max_to_keep=keep)
                state, step = None, 0

    # A hook may move the initial adapters first (jdup.projection: LoRA A into the clean complement). It is told
    # even on resume (the restored state already has it), so it does not redo the move.
    for i, c in enumerate(cells):
        prepare = getattr(c.on_step, "prepare_student", None)
        if prepare is not None:
            prepared = prepare(c.student)
            if step == 0:
                starts[i] = prepared
    if state is None:
        trainable = stack_cells([starts[i] for i in idx], where.cells)
        opt_state = stack_cells([specs[i].init(starts[i]) for i in idx], where.cells)
        state = LoopState(trainable, opt_state, trainable)
    if where.mesh is not None:  # the frozen weights by the mesh's rules (a model axis splits them)
        frozen = mesh_lib.put_state(c0.student.frozen, where.mesh, keep=True)
    else:
        frozen = place(c0.student.frozen, where.replicated)
    take = (
        cell_of if where.mesh is None else (lambda tree, i: jax.tree.map(lambda x: x[i], tree))
    )  # stay on it
    rows_multiple = mesh_lib.data_size(where.mesh)
    params = CellParams(
        place(np.asarray([cells[i].settings.seed for i in idx], np.int32), where.cells),
        place(
            step_hparams(
                *(
                    np.asarray([getattr(cells[i].settings, n) for i in idx])
                    for n in ("lr", "lambda_asr", "lambda_acc")
                )
            ),
            where.cells,
        ),
    )
    step_fn = cells_step(graphdef, spec, settings, k)
    # the learning rate of every step, as the schedule computes it (float32)
    lrs = [np.asarray(spec.schedule(c.settings.lr)(np.arange(total))) for c in cells]
    padded_steps = [0] * k_real

    def evaluate(at_step: int) -> None:
        nonlocal state
        better = np.zeros(k, bool)
        for i, c in enumerate(cells):
            if tally.stopped[i]:
                continue
            tr_i = take(state.trainable, i)
            ev = c.monitor(
                lambda enc, tr_i=tr_i, c=c: predict_lib.predict_states(
                    graphdef, (tr_i, c.student.frozen), enc, c.settings.eval_batch_size, mesh=where.mesh
                )
            )
            histories[i].append({**ev._asdict(), "step": at_step})
            better[i] = judge(tally, i, ev, at_step, total)
            log.info("unlearn eval @%d%s: %s", at_step, f" cell {i}" if k_real > 1 else "", ev)
        if better.any():
            state = keep_best_cells(state, place(better, where.cells))

    if monitored and step == 0 and not histories[0]:
        evaluate(0)

    hooks = [c.on_step for c in cells]
    host_every_step = progress or any(h is not None for h in hooks)
    pending: list[tuple[int, dict]] = []  # device metrics not yet written into the logs

    def flush() -> None:
        for t, m in pending:
            host = {n: to_host(v) for n, v in m.items()}
            for i in range(k_real):
                if t < tally.steps[i]:
                    logs[i].append(
                        {"step": t + 1, "lr": float(lrs[i][t]), **{n: float(v[i]) for n, v in host.items()}}
                    )
        pending.clear()

    bar = tqdm(
        total=total,
        initial=step,
        desc="unlearn" if k_real == 1 else f"unlearn K={k_real}",
        disable=not progress,
        leave=False,
    )
    try:
        while step < total and not tally.stopped.all():
            distributed.stop_point(step)  # Ctrl-C (even one a library swallowed) or another process stopped
            parts = [
                joint_batch(
                    plans[i].forget_batch(step),
                    cells[i].teacher,
                    plans[i].clean_batch(step),
                    cells[i].settings.fused_step,
                    forget_augment_at(cells[i].settings, step, pad_id, cells[i].target),
                )
                for i in idx
            ]
            if rows_multiple > 1:
                parts = [pad_inputs(p, rows_multiple) for p in parts]
            batch, padded = stack_batches(parts, pad_id)
            for i in range(k_real):
                padded_steps[i] += int(padded[i] and not tally.stopped[i])
            batch = {
                n: place(
                    v,
                    where.rows
                    if n in (*MODEL_INPUTS, "forget_inputs", "retain_inputs") and where.rows is not None
                    else where.cells,
                )
                for n, v in batch.items()
            }
            state, m = step_fn(state, frozen, batch, params, step)
            step += 1
            tally.steps[~tally.stopped] = step
            pending.append((step - 1, m))
            if host_every_step:
                flush()
                for i, hook in enumerate(hooks):
                    if hook is None or tally.stopped[i]:
                        continue
                    c = cells[i]
                    opt_i = take(state.opt_state, i)
                    extra = hook(
                        StepInfo(
                            step,
                            logs[i][-1],
                            Student(c.student.model, graphdef, take(state.trainable, i), c.student.frozen),
                            opt_i,
                        )
                    )
                    if extra and "opt_state" in extra:
                        extra = dict(extra)
                        state = state._replace(
                            opt_state=set_cell(state.opt_state, i, extra.pop("opt_state"), where.cells)
                        )
                    if extra:
                        logs[i][-1].update({n: _plain(v) for n, v in extra.items()})
                r = logs[0][-1]
                bar.set_postfix(
                    loss=f"{r['loss']:.3f}", forget=f"{r['forget']:.3f}", retain=f"{r['retain']:.3f}"
                )
            bar.update(1)
            if monitored and (step % eval_every == 0 or step == total):
                evaluate(step)
            if guard_tol > 0 and step % per_epoch == 0:  # an epoch end: copy aside the states that kept accuracy
                flush()
                ok = np.zeros(k, bool)
                for i, c in enumerate(cells):
                    last = guard_lib.review(logs[i], per_epoch, c.settings.batch_size, guard_tol)[-1:]
                    ok[i] = bool(last) and last[0].step == step and not last[0].collapsed
                if ok.any():
                    state = keep_best_cells(state, place(ok, where.cells))
            if ck is not None and (step % cfg0.ckpt_every_steps == 0 or tally.stopped.all() or step == total):
                flush()
                ck.save(
                    step,
                    {"trainable": state.trainable, "opt": state.opt_state, "best": state.best},
                    {
                        "step": step,
                        "fingerprint": fp,
                        "history": histories,
                        "log": logs,
                        "tally": {
                            "best_score": [
                                None if not np.isfinite(s) else float(s) for s in tally.best_score
                            ],
                            "best_step": tally.best_step.tolist(),
                            "stopped": tally.stopped.tolist(),
                            "steps": tally.steps.tolist(),
                        },
                    },
                )
        flush()
    finally:
        bar.close()
        if ck is not None:
            ck.close()

    results = []
    final = final_state(state, monitored)
    collapsed = [False] * k_real
    kept = [int(s) for s in tally.steps[:k_real]]
    if guard_tol > 0:
        for i, c in enumerate(cells):
            checks = guard_lib.review(logs[i], per_epoch, c.settings.batch_size, guard_tol)
            if checks and checks[-1].collapsed:
                collapsed[i] = True
                kept[i] = max([e.step for e in checks if not e.collapsed], default=0)
                log.warning(
                    "unlearn%s: accuracy on the clean batches fell from %.3f (epoch 1) to %.3f (epoch %d, z = %.1f):"
                    " the classifier collapsed; returning the state after epoch %d (step %d), in which the "
                    "backdoor may remain (collapse_guard=%g; early_stop=forget_check or fewer epochs may do better)",
                    f" cell {i}" if k_real > 1 else "", checks[0].reference, checks[-1].accuracy,
                    checks[-1].epoch, checks[-1].z, kept[i] // per_epoch, kept[i], guard_tol,
                )
    for i, c in enumerate(cells):
        tr = take(state.best if collapsed[i] else final, i)
        nnx.update(c.student.model, tr)
        best_step = int(tally.best_step[i]) if monitored else kept[i]
        results.append(
            UnlearnResult(
                Student(c.student.model, graphdef, tr, c.student.frozen),
                lora_lib.merge(c.student.model),
                int(tally.steps[i]),
                total,
                best_step,
                histories[i],
                logs[i],
                bool(tally.stopped[i]),
                padded_steps[i],
                collapsed[i],
            )
        )
    return results


def unlearn(
    model: nnx.Module,
    forget: D.Encoded,
    retain: D.Encoded,
    cfg: UnlearnSettings,
    *,
    teacher_logits: np.ndarray | None = None,
    target_label: int | None = None,
    monitor: Monitor | None = None,
    projection: optax.GradientTransformation | None = None,
    on_step: Callable[[StepInfo], dict | None] | None = None,
    checkpoint: Checkpoint | None = None,
    retain_projection: optax.GradientTransformation | None = None,
    student: Student | None = None,
    mesh: Any = None,
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
      checkpoint: resumable checkpoints (:class:`jdup.checkpoint.Checkpoint`, the form
        :func:`jdup.train.train` takes; written every ``cfg.ckpt_every_steps``); the run resumes from them when
        ``cfg.resume`` is set and they were written with the same settings (and ``checkpoint.identity``).
      student: the student to train (default :func:`~jdup.unlearn.build_student` of ``model`` and ``cfg``).
      mesh: a :mod:`jdup.mesh` mesh: the rows of each step split over its ``data`` axis (padded to a multiple
        of it), the frozen weights by its ``model`` rules, the adapters and optimizer state whole on every
        device; ``None``: the default device. The trajectory does not depend on it (same batches and dropout
        masks; only the order of the sums inside a step changes).

    Returns:
      An :class:`UnlearnResult`.
    """
    cell = make_cell(
        model,
        forget,
        retain,
        cfg,
        teacher_logits=teacher_logits,
        target_label=target_label,
        monitor=monitor,
        projection=projection,
        retain_projection=retain_projection,
        on_step=on_step,
        student=student,
        mesh=mesh,
    )
    placement = Placement.of_mesh(mesh) if mesh is not None else None
    return run_cells([cell], placement=placement, checkpoint=checkpoint)[0]
