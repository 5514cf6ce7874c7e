"""K unlearning runs stacked on a leading cell axis: the state, the pure pieces the loop vmaps, and the stacking.

The device part of :func:`jdup.unlearn.run_cells` is pure functions over a :class:`LoopState` whose leaves carry a
leading cell axis ``[K, ...]``:

* :func:`cell_step` — one optimizer step of one cell (:func:`jdup.unlearn.train_step` with the cell's dropout key
  :func:`~jdup.unlearn.step_key` and :class:`~jdup.unlearn.StepHParams`); :func:`cells_step` runs it over K cells
  (``jax.jit(jax.vmap(cell_step))``; for K = 1 the same function on the one cell, without ``vmap``);
* :func:`keep_best` — the kept ("best") state: the current state of the cells whose evaluation beat their best;
* :func:`final_state` — what a run returns: the kept state with a stop rule, else the last state.

The stop rule's bookkeeping is host-side NumPy (:class:`Tally`, :func:`judge`); :func:`stack_batches` stacks the
K cells' batches; :class:`Placement` says where the stacked arrays live (a sweep's ``sweep x data`` mesh, one run's
``data x model`` mesh, or the default device).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jdup import mesh as mesh_lib
from jdup.predict import MODEL_INPUTS, model_inputs
from jdup.unlearn.loss import LossSettings
from jdup.unlearn.monitors import Evaluation
from jdup.unlearn.step import OptimizerSpec, keep_step, step_key, train_step
from jdup.unlearn.student import Student


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

    return keep_step(jax.jit(single), graphdef, spec, settings)  # executables kept across processes (jdup.aot)


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


def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host sharded) array as NumPy on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _one_device(x: Any) -> bool:
    return isinstance(x, jax.Array) and len(x.sharding.device_set) == 1


def cell_of(tree: Any, i: int) -> Any:
    """Cell ``i`` of a stacked tree, on the default device."""
    return jax.tree.map(lambda x: x[i] if _one_device(x) else jnp.asarray(to_host(x)[i]), tree)


def place(tree: Any, sharding: Any) -> Any:
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
        out.update(mesh_lib.pad_rows(model_inputs(part), multiple)[0])
    return out


def place_student(student: Student, mesh: Any) -> Student:
    """``student`` with its trainable and frozen state on ``mesh`` (:func:`jdup.mesh.put_state`; arrays already
    spread over the mesh stay as they are), written into its model too (so the merge at the end runs there)."""
    trainable, frozen = mesh_lib.put_state((student.trainable, student.frozen), mesh, keep=True)
    nnx.update(student.model, trainable, frozen)
    return student._replace(trainable=trainable, frozen=frozen)


def set_cell(stacked: Any, i: int, tree: Any, sharding: Any) -> Any:
    """``stacked`` with cell ``i`` replaced by ``tree``."""
    if sharding is None:
        return jax.tree.map(lambda s, x: s.at[i].set(jnp.asarray(x, s.dtype)), stacked, tree)

    def put(s, x):
        h = to_host(s).copy()
        h[i] = np.asarray(x)
        return place(h, sharding)

    return jax.tree.map(put, stacked, tree)


def stack_cells(trees: Sequence[Any], sharding: Any) -> Any:
    if len(trees) == 1 and sharding is None:
        return jax.tree.map(lambda x: jnp.asarray(x)[None], trees[0])
    return place(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees), sharding)
