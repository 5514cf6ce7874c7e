"""The unlearning loop, written once for K runs ("cells"): ``jdup unlearn`` runs it with K = 1, a sweep group
with K > 1 (:mod:`jdup.sweep.vmapped`).

The device part is pure functions over a :class:`LoopState` whose leaves carry a leading cell axis ``[K, ...]``:

* :func:`cell_step` — one optimizer step of one cell (:func:`jdup.unlearn.train_step` with the cell's dropout key
  :func:`~jdup.unlearn.step_key` and :class:`~jdup.unlearn.StepHParams`); :func:`cells_step` runs it over K cells
  (``jax.jit(jax.vmap(cell_step))``; for K = 1 the same function on the one cell, without ``vmap``);
* :func:`keep_best` — the kept ("best") state: the current state of the cells whose evaluation beat their best;
* :func:`final_state` — what a run returns: the kept state with a stop rule, else the last state.

The host part, :func:`run_cells`, is the same Python for every K: the batches of each cell (its own
:class:`jdup.data.BatchPlan`), when to evaluate (every ``eval_every_steps``, 0: each epoch, and at the end), the
stop rule's decision per cell (:func:`judge`: the lowest ``score`` among ``ok`` evaluations is kept; a cell stops
once an evaluation says ``stop`` before the last step), the history and the per-step log, the ``on_step`` hooks
(the UPGP projection's basis refresh), checkpoints and the final state. A stopped cell is no longer evaluated;
the loop ends when every cell stopped or the last step ran. :func:`unlearn` is one cell of it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jdup import data as D
from jdup import distributed
from jdup import lora as lora_lib
from jdup import mesh as mesh_lib
from jdup import predict as predict_lib
from jdup import projection as projection_lib
from jdup.errors import JdupError
from jdup.predict import MODEL_INPUTS
from jdup.settings import UnlearnSettings
from jdup.unlearn.loss import LossSettings, joint_batch
from jdup.unlearn.monitors import Evaluation, Monitor, infer_target
from jdup.unlearn.step import OptimizerSpec, step_hparams, step_key, train_step
from jdup.unlearn.student import Student, build_student

log = logging.getLogger("jdup.unlearn")

#: Settings that do not change a run's numbers (left out of the checkpoint fingerprint).
NOT_FINGERPRINTED = ("resume", "progress", "ckpt_every_steps", "eval_batch_size")


class StepInfo(NamedTuple):
    """What the ``on_step`` hook of :func:`unlearn` receives after every optimizer step."""

    step: int  # steps done so far (1-based after the first update)
    metrics: dict  # host floats: loss, forget, retain, grad_norm, lr
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


class Cell(NamedTuple):
    """One run's inputs to the loop (:func:`make_cell`).

    Attributes:
      settings: an :class:`~jdup.unlearn.UnlearnSettings` (or a stage config carrying its fields).
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


class CellParams(NamedTuple):
    """The traced per-cell numbers of a step (leading cell axis ``[K]``)."""

    seed: Any  # int32: the cell's seed (dropout key step_key(seed, t))
    hp: Any  # jdup.unlearn.StepHParams: peak learning rate and loss weights


class LoopState(NamedTuple):
    """The device state of K runs; every leaf has a leading cell axis ``[K, ...]``.

    Attributes:
      trainable: current trainable state (adapters + head).
      opt_state: optimizer state (with the projection bases of a projected run).
      best: the kept trainable state (the starting state until an evaluation beats it).
    """

    trainable: Any
    opt_state: Any
    best: Any


class Placement(NamedTuple):
    """Where the loop puts its arrays (``None`` everywhere: JAX's default device).

    Attributes:
      cells: sharding of per-cell leaves (leading cell axis), e.g. over a sweep's ``sweep`` mesh axis.
      rows: sharding of the batch's model inputs ``[K, B, S]`` (e.g. rows over ``data``); ``None``: as ``cells``.
      replicated: sharding of the frozen weights.
      mesh: the :mod:`jdup.mesh` mesh of one run (:func:`unlearn` with ``mesh=``): the frozen weights keep the
        layout :func:`jdup.mesh.put_state` gives them, the model inputs of each step are padded to a multiple of
        its ``data`` axis (copies of a row at the end, which the loss never reads), and evaluations run on it.
    """

    cells: Any = None
    rows: Any = None
    replicated: Any = None
    mesh: Any = None

    @classmethod
    def of_mesh(cls, mesh: Any) -> Placement:
        """One run on a ``("data", "model")`` mesh: per-cell state whole on every device, rows over ``data``."""
        return cls(cells=mesh_lib.replicated(mesh), rows=NamedSharding(mesh, PartitionSpec(None, mesh_lib.DATA)),
                   mesh=mesh)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (one cell; vmapped over K)


def cell_step(
    graphdef, spec: OptimizerSpec, settings: LossSettings, state: LoopState, frozen, batch, params, t
):
    """One optimizer step of one cell ``-> (state, metrics)`` (:func:`jdup.unlearn.train_step`)."""
    trainable, opt_state, metrics = train_step(
        graphdef,
        spec,
        settings,
        state.trainable,
        frozen,
        state.opt_state,
        batch,
        step_key(params.seed, t),
        params.hp,
    )
    return state._replace(trainable=trainable, opt_state=opt_state), metrics


@functools.lru_cache(maxsize=16)
def cells_step(graphdef, spec: OptimizerSpec, settings: LossSettings, k: int) -> Callable:
    """``(state[K], frozen, batch[K], params[K], t) -> (state[K], metrics[K])``: :func:`cell_step` over K
    cells, jitted. K > 1: ``jax.vmap``; K = 1: the one cell's step on the unstacked arrays (the program
    ``jdup unlearn`` has always compiled)."""

    def one(state, frozen, batch, params, t):
        return cell_step(graphdef, spec, settings, state, frozen, batch, params, t)

    if k > 1:
        return jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0, None)))

    def single(state, frozen, batch, params, t):
        def first(tree):
            return jax.tree.map(lambda x: x[0], tree)

        out = one(first(state), frozen, first(batch), first(params), t)
        return jax.tree.map(lambda x: x[None], out)

    return jax.jit(single)


def keep_best(state: LoopState, better) -> LoopState:
    """The kept state becomes the current one where ``better`` (one cell; vmapped by :data:`keep_best_cells`)."""
    return state._replace(
        best=jax.tree.map(lambda new, old: jnp.where(better, new, old), state.trainable, state.best)
    )


keep_best_cells = jax.jit(jax.vmap(keep_best))


def final_state(state: LoopState, monitored: bool) -> Any:
    """What a run returns: the kept state when a stop rule evaluated it, else the last state."""
    return state.best if monitored else state.trainable


class Tally(NamedTuple):
    """The host side of the stop rule for K cells (NumPy ``[K]``; float64 scores, compared as the monitor gave
    them)."""

    best_score: np.ndarray  # lowest score of an ok evaluation (inf: none yet)
    best_step: np.ndarray  # its step (0: the starting state)
    stopped: np.ndarray  # the stop rule fired
    steps: np.ndarray  # steps taken (frozen at the stop)

    @classmethod
    def start(cls, k: int) -> Tally:
        return cls(np.full(k, np.inf), np.zeros(k, np.int64), np.zeros(k, bool), np.zeros(k, np.int64))


def judge(tally: Tally, i: int, ev: Evaluation, at_step: int, total: int) -> bool:
    """Records cell ``i``'s evaluation at ``at_step`` in ``tally`` (in place); True when its state is the new
    kept state (``ok`` and a lower score than the kept one). The cell stops when ``ev.stop`` after a step and
    before the last one (the evaluation of the starting state never stops a run)."""
    better = bool(ev.ok) and float(ev.score) < tally.best_score[i]
    if better:
        tally.best_score[i], tally.best_step[i] = float(ev.score), at_step
    if ev.stop and 0 < at_step < total:
        tally.stopped[i] = True
    return better


# ---------------------------------------------------------------------------------------------------------------
# Batches of K cells


def _pad_cols(x: np.ndarray, s: int, fill: int) -> np.ndarray:
    return x if x.shape[1] == s else np.pad(x, ((0, 0), (0, s - x.shape[1])), constant_values=fill)


def stack_batches(batches: list[dict], pad_id: int) -> tuple[dict, list[bool]]:
    """Stacks the K cells' library batches on a new leading axis; model inputs of different lengths are padded
    to the longest (``pad_id`` / mask 0). Returns ``(batch, padded)`` with ``padded[i]`` True when cell ``i``'s
    batch was lengthened."""
    padded = [False] * len(batches)

    def stack(parts: list[dict]) -> dict:
        out = {}
        for key, first in parts[0].items():
            if isinstance(first, dict):
                out[key] = stack([p[key] for p in parts])
            elif key in MODEL_INPUTS:
                s = max(p[key].shape[1] for p in parts)
                for i, p in enumerate(parts):
                    padded[i] |= p[key].shape[1] < s
                fill = pad_id if key == "input_ids" else 0
                out[key] = np.stack([_pad_cols(p[key], s, fill) for p in parts])
            else:
                out[key] = np.stack([p[key] for p in parts])
        return out

    return stack(batches), padded


# ---------------------------------------------------------------------------------------------------------------
# Host helpers


def _to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host sharded) array as NumPy on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _one_device(x: Any) -> bool:
    return isinstance(x, jax.Array) and len(x.sharding.device_set) == 1


def cell_of(tree: Any, i: int) -> Any:
    """Cell ``i`` of a stacked tree, on the default device."""
    return jax.tree.map(lambda x: x[i] if _one_device(x) else jnp.asarray(_to_host(x)[i]), tree)


def _put(tree: Any, sharding: Any) -> Any:
    return mesh_lib.put(tree, sharding)  # host values to global arrays on any number of processes


def pad_inputs(part: dict, multiple: int) -> dict:
    """A :func:`~jdup.unlearn.joint_batch` whose model inputs have a multiple of ``multiple`` rows (to split them
    over a mesh's ``data`` axis): copies of their first row appended at the end, which the loss never reads (it
    takes the first rows of each stream), so the real rows keep their positions and dropout masks."""
    out = dict(part)
    if "forget_inputs" in part:
        for name in ("forget_inputs", "retain_inputs"):
            out[name] = mesh_lib.pad_rows(part[name], multiple)[0]
    else:
        out.update(mesh_lib.pad_rows({k: part[k] for k in MODEL_INPUTS}, multiple)[0])
    return out


def place_student(student: Student, mesh: Any) -> Student:
    """``student`` with its trainable and frozen state on ``mesh`` (:func:`jdup.mesh.put_state`; arrays already
    spread over the mesh stay as they are), written into its model too (so the merge at the end runs there)."""
    trainable, frozen = mesh_lib.put_state((student.trainable, student.frozen), mesh, keep=True)
    nnx.update(student.model, trainable, frozen)
    return student._replace(trainable=trainable, frozen=frozen)


def _set_cell(stacked: Any, i: int, tree: Any, sharding: Any) -> Any:
    """``stacked`` with cell ``i`` replaced by ``tree``."""
    if sharding is None:
        return jax.tree.map(lambda s, x: s.at[i].set(jnp.asarray(x, s.dtype)), stacked, tree)

    def put(s, x):
        h = _to_host(s).copy()
        h[i] = np.asarray(x)
        return _put(h, sharding)

    return jax.tree.map(put, stacked, tree)


def _stack(trees: Sequence[Any], sharding: Any) -> Any:
    if len(trees) == 1 and sharding is None:
        return jax.tree.map(lambda x: jnp.asarray(x)[None], trees[0])
    return _put(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees), sharding)


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
    cfg: Any,
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
    ckpt_dir: str | None = None,
    progress: bool | None = None,
) -> list[UnlearnResult]:
    """Unlearns K cells together (K = 1: :func:`unlearn`); one :class:`UnlearnResult` per cell.

    Args:
      cells: the runs (:func:`make_cell`); they must agree as :func:`check_group` says, and in every setting
        but ``seed``, ``lr``, ``lambda_asr`` and ``lambda_acc`` (the static step is the first cell's).
      placement: where the stacked arrays live (default: JAX's default device).
      pad_cells: copies of the last cell appended to the stacked arrays (e.g. to fill a mesh axis); they are
        computed and dropped (never evaluated, no hook, no result).
      ckpt_dir: orbax checkpoint folder; resumes from it when the first cell's ``resume`` is set and the
        fingerprint (:func:`settings_fingerprint` of every cell) matches.
      progress: a tqdm bar (default: the first cell's ``progress``).
    """
    from tqdm.auto import tqdm

    from jdup.checkpoint import Checkpointer, fingerprint

    place = placement or Placement()
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
    progress = cfg0.progress if progress is None else progress

    starts = [c.student.trainable for c in cells]
    step = 0
    histories: list[list[dict]] = [[] for _ in cells]
    logs: list[list[dict]] = [[] for _ in cells]
    tally = Tally.start(k_real)
    state = None

    fp = fingerprint([settings_fingerprint(c) for c in cells] if k_real > 1 else settings_fingerprint(c0))
    ck = None
    if ckpt_dir and cfg0.ckpt_every_steps > 0:
        ck = Checkpointer(ckpt_dir, max_to_keep=1)
        if cfg0.resume and ck.latest_step() is not None:
            tr0 = _stack([starts[i] for i in idx], place.cells)
            template = {
                "trainable": tr0,
                "opt": _stack([specs[i].init(starts[i]) for i in idx], place.cells),
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
                ck = Checkpointer(ckpt_dir, max_to_keep=1)
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
        trainable = _stack([starts[i] for i in idx], place.cells)
        opt_state = _stack([specs[i].init(starts[i]) for i in idx], place.cells)
        state = LoopState(trainable, opt_state, trainable)
    if place.mesh is not None:  # the frozen weights by the mesh's rules (a model axis splits them)
        frozen = mesh_lib.put_state(c0.student.frozen, place.mesh, keep=True)
    else:
        frozen = _put(c0.student.frozen, place.replicated)
    take = cell_of if place.mesh is None else (lambda tree, i: jax.tree.map(lambda x: x[i], tree))  # stay on it
    rows_multiple = mesh_lib.data_size(place.mesh)
    params = CellParams(
        _put(np.asarray([cells[i].settings.seed for i in idx], np.int32), place.cells),
        _put(
            step_hparams(
                *(
                    np.asarray([getattr(cells[i].settings, n) for i in idx])
                    for n in ("lr", "lambda_asr", "lambda_acc")
                )
            ),
            place.cells,
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
                    graphdef, (tr_i, c.student.frozen), enc, c.settings.eval_batch_size, mesh=place.mesh
                )
            )
            histories[i].append({**ev._asdict(), "step": at_step})
            better[i] = judge(tally, i, ev, at_step, total)
            log.info("unlearn eval @%d%s: %s", at_step, f" cell {i}" if k_real > 1 else "", ev)
        if better.any():
            state = keep_best_cells(state, _put(better, place.cells))

    if monitored and step == 0 and not histories[0]:
        evaluate(0)

    hooks = [c.on_step for c in cells]
    host_every_step = progress or any(h is not None for h in hooks)
    pending: list[tuple[int, dict]] = []  # device metrics not yet written into the logs

    def flush() -> None:
        for t, m in pending:
            host = {n: _to_host(v) for n, v in m.items()}
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
                )
                for i in idx
            ]
            if rows_multiple > 1:
                parts = [pad_inputs(p, rows_multiple) for p in parts]
            batch, padded = stack_batches(parts, pad_id)
            for i in range(k_real):
                padded_steps[i] += int(padded[i] and not tally.stopped[i])
            batch = {
                n: _put(v, place.rows if n in (*MODEL_INPUTS, "forget_inputs", "retain_inputs")
                        and place.rows is not None else place.cells)
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
                            opt_state=_set_cell(state.opt_state, i, extra.pop("opt_state"), place.cells)
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
    for i, c in enumerate(cells):
        tr = take(final, i)
        nnx.update(c.student.model, tr)
        best_step = int(tally.best_step[i]) if monitored else int(tally.steps[i])
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
            )
        )
    return results


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
      ckpt_dir: orbax checkpoint folder (resumes from it when ``cfg.resume`` and it matches).
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
    return run_cells([cell], placement=placement, ckpt_dir=ckpt_dir)[0]
