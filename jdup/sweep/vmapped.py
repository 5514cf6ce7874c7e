"""K cells of one group unlearned at once: ``jax.jit(jax.vmap(train_step))`` of the library's unlearning step.

The cells of a group differ only in ``seed``, ``lr``, ``lambda_asr`` and ``lambda_acc`` (and, through the seed, in
their detection's calibration split and hold-out rows). Everything a cell computes comes from
:mod:`jdup.unlearn` / :mod:`jdup.data`, exactly as in ``jdup unlearn`` (the contract is in ``docs/sweeps.md``):

* its inputs: :func:`jdup.unlearn.prepare_sets` (forget/hold-out/retain rows, teacher logits, inferred target,
  stop rule), called by the engine;
* its student: :func:`jdup.unlearn.build_student` (LoRA init from the cell's seed);
* its batches: the cell's own :class:`jdup.data.BatchPlan` and :func:`jdup.unlearn.joint_batch`;
* its update: :func:`jdup.unlearn.train_step` with the static :class:`jdup.unlearn.OptimizerSpec` and
  :class:`jdup.unlearn.LossSettings` and the cell's traced :class:`jdup.unlearn.StepHParams`
  (:func:`jdup.unlearn.step_hparams`) and dropout key (:func:`jdup.unlearn.step_key`);
* its stop rule and kept state: the cell's monitor at the steps :func:`jdup.unlearn.unlearn` evaluates it, on the
  cell's own adapter state (:func:`jdup.unlearn.predict_logits`), keeping the best ``ok`` state.

The K adapter states and optimizer states are stacked on a leading axis sharded over the ``sweep`` axis of a
``sweep x data`` mesh; with ``mesh_data > 1`` the batch rows of each cell are also split over ``data``. The frozen
base weights are replicated.

One thing differs from K separate runs: at a step where the K cells' batches have different padded lengths,
they are padded to the longest, and the hash dropout masks (which depend on the array shape) then differ from
the single run's. ``padded_steps`` in each cell's timing counts such steps; 0 means the cell computed exactly what
``jdup unlearn`` computes (cells of one seed always; several seeds when every batch has one length, e.g. with
``unlearn.pad_multiple`` >= the longest row). A group of one cell on one device runs :func:`jdup.unlearn.unlearn`
itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import data as D
from jdup import lora
from jdup import unlearn as U
from jdup.errors import JdupError
from jdup.optim import schedule_value
from jdup.predict import MODEL_INPUTS

#: Settings that may differ inside a group (everything else must be equal).
PER_CELL = ("seed", "lr", "lambda_asr", "lambda_acc", "out")


@dataclasses.dataclass
class CellRun:
    """One cell's inputs to the unlearning loop, as ``jdup unlearn`` prepares them."""

    cfg: Any  # jdup.stages.unlearn.UnlearnConfig (or UnlearnSettings)
    sets: Any  # jdup.unlearn.UnlearnSets: forget, holdout, retain, teacher, target, monitor


def compatible(runs: list[CellRun]) -> list[list[int]]:
    """Splits runs into sets that can share one vmapped loop: equal steps per epoch, defender target, retain
    size and stop-rule kind (cells with different seeds may flag different rows)."""
    parts: dict[tuple, list[int]] = {}
    for i, r in enumerate(runs):
        key = (
            D.forget_batches_per_epoch(len(r.sets.forget), r.cfg.batch_size),
            int(r.sets.target),
            len(r.sets.retain),
            r.sets.monitor is None,
        )
        parts.setdefault(key, []).append(i)
    return list(parts.values())


def mesh_for(k: int, n_devices: int, requested: int = 0) -> int:
    """Devices on the ``sweep`` mesh axis for a group of ``k`` cells.

    ``requested`` > 0 is used as is (capped at the device count). Otherwise: all devices if ``k`` >= their number,
    else the largest divisor of the device count that is <= ``k`` (so a small group does not pad to many devices).
    """
    if requested and requested > 0:
        return max(1, min(int(requested), n_devices))
    if k >= n_devices:
        return n_devices
    return max(d for d in range(1, n_devices + 1) if n_devices % d == 0 and d <= max(k, 1))


def padded_size(k: int, n_sweep: int) -> int:
    """``k`` rounded up to a multiple of the mesh's ``sweep`` size (padding cells are computed and dropped)."""
    return int(math.ceil(k / n_sweep) * n_sweep)


def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host sharded) array as NumPy on this host."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------------------------
# The library step, vmapped


@functools.lru_cache(maxsize=16)
def vmapped_step(graphdef, spec, settings) -> Callable:
    """``jit(vmap(jdup.unlearn.train_step))`` over K cells: ``(trainable[K], frozen, opt_state[K], batch[K],
    seed[K], t, hp[K]) -> (trainable[K], opt_state[K], metrics[K])``; cell ``i``'s dropout key is
    ``step_key(seed[i], t)``, the key :func:`jdup.unlearn.unlearn` uses at step ``t``."""

    def one(trainable, frozen, opt_state, batch, seed, t, hp):
        return U.train_step(
            graphdef, spec, settings, trainable, frozen, opt_state, batch, U.step_key(seed, t), hp
        )

    return jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0, 0, None, 0)), donate_argnums=(0, 2))


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
# The loop


def _check_group(runs: list[CellRun]) -> None:
    zero = {k: 0 for k in PER_CELL if hasattr(runs[0].cfg, k)}
    ref = dataclasses.replace(runs[0].cfg, **zero)
    for r in runs[1:]:
        if dataclasses.replace(r.cfg, **zero) != ref:
            raise JdupError("cells of a vmapped group may differ only in seed, lr, lambda_asr and lambda_acc")
    if len(compatible(runs)) != 1:
        raise JdupError(
            "cells of a vmapped group must share steps per epoch, target, retain size and stop rule"
        )


def unlearn_group(
    model: nnx.Module,
    runs: list[CellRun],
    *,
    mesh_sweep: int = 0,
    mesh_data: int = 1,
    progress: bool = False,
) -> tuple[list[Any], dict]:
    """Unlearns every cell of a group; returns one :class:`jdup.unlearn.UnlearnResult` per cell and run info
    (``mesh_sweep``, ``mesh_data``, ``padded_k``, ``padded_steps`` per cell)."""
    _check_group(runs)
    projected = runs[0].cfg.projection not in ("", "none", None)
    if projected or (len(runs) == 1 and mesh_data <= 1 and jax.process_count() == 1):
        # UPGP cells (their projection basis is built per student) and single cells: the library loop itself
        results = [
            U.unlearn(
                model,
                r.sets.forget,
                r.sets.retain,
                r.cfg,
                teacher_logits=r.sets.teacher,
                target_label=r.sets.target,
                monitor=r.sets.monitor,
            )
            for r in runs
        ]
        info = {"mesh_sweep": 1, "mesh_data": 1, "padded_k": 1, "padded_steps": [0] * len(runs)}
        return results, info
    return _unlearn_vmapped(model, runs, mesh_sweep, mesh_data, progress)


def _unlearn_vmapped(model, runs: list[CellRun], mesh_sweep: int, mesh_data: int, progress: bool):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm.auto import tqdm

    cfg0, sets0, k_real = runs[0].cfg, runs[0].sets, len(runs)
    students = [U.build_student(model, r.cfg) for r in runs]
    per_epoch = D.forget_batches_per_epoch(len(sets0.forget), cfg0.batch_size)
    total = per_epoch * cfg0.epochs
    info: dict = {"mesh_sweep": 1, "mesh_data": 1, "padded_k": k_real, "padded_steps": [0] * k_real}
    if total == 0 or len(sets0.retain) == 0:
        return [U.UnlearnResult(s, lora.merge(s.model), 0, 0, 0, [], [], False) for s in students], info

    devices = jax.devices()
    n_data = max(1, int(mesh_data))
    if len(devices) % n_data or cfg0.batch_size % n_data:
        raise JdupError(
            f"mesh_data={n_data} must divide the device count ({len(devices)}) and "
            f"unlearn.batch_size ({cfg0.batch_size})"
        )
    n_sweep = mesh_for(k_real, len(devices) // n_data, mesh_sweep or 0)
    if jax.process_count() > 1:
        n_sweep = len(devices) // n_data  # every host must hold a slice of the global arrays
    k = padded_size(k_real, n_sweep)
    info.update(mesh_sweep=n_sweep, mesh_data=n_data, padded_k=k)
    cells = list(range(k_real)) + [k_real - 1] * (k - k_real)  # padding cells repeat the last one
    mesh = Mesh(np.asarray(devices[: n_sweep * n_data]).reshape(n_sweep, n_data), ("sweep", "data"))
    per_cell, rows = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P("sweep", "data"))

    def put(batch: dict) -> dict:
        return {
            key: put(v)
            if isinstance(v, dict)
            else jax.device_put(v, rows if key in MODEL_INPUTS and n_data > 1 else per_cell)
            for key, v in batch.items()
        }

    def stack(trees):
        return jax.device_put(
            jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees), per_cell
        )

    spec = U.OptimizerSpec.from_config(cfg0, total)
    settings = U.LossSettings.from_config(cfg0, sets0.target)
    graphdef = students[0].graphdef
    frozen = jax.device_put(students[0].frozen, NamedSharding(mesh, P()))
    step_fn = vmapped_step(graphdef, spec, settings)
    trainable = stack([students[i].trainable for i in cells])
    opt_state = stack([spec.init(students[i].trainable) for i in cells])
    hp = U.step_hparams(
        *(np.asarray([getattr(runs[i].cfg, n) for i in cells]) for n in ("lr", "lambda_asr", "lambda_acc"))
    )
    hp = jax.device_put(hp, per_cell)
    seeds = jax.device_put(np.asarray([runs[i].cfg.seed for i in cells], np.int32), per_cell)
    plans = [D.BatchPlan.from_config(r.sets.forget, r.sets.retain, r.cfg) for r in runs]
    pad_id = int(sets0.forget.pad_id)

    def cell_state(tr, i: int):
        return jax.tree.map(lambda x: jnp.asarray(to_host(x)[i]), tr)

    monitors = [r.sets.monitor for r in runs]
    eval_every = cfg0.eval_every_steps or per_epoch
    history: list[list[dict]] = [[] for _ in runs]
    best = [{"score": np.inf, "step": 0, "state": None} for _ in runs]
    stopped, stop_step = [False] * k_real, [total] * k_real

    def evaluate(i: int, at_step: int, tr_i) -> dict:
        def logits_fn(enc):
            return U.predict_logits(graphdef, (tr_i, students[i].frozen), enc, runs[i].cfg.eval_batch_size)

        rec = dict(monitors[i](logits_fn))
        rec["step"] = at_step
        history[i].append(rec)
        if rec.get("ok", True) and rec["score"] < best[i]["score"]:
            best[i].update(score=float(rec["score"]), step=at_step, state=jax.tree.map(np.asarray, tr_i))
        return rec

    if monitors[0] is not None:
        for i in range(k_real):
            evaluate(i, 0, students[i].trainable)

    logs: list = []
    step = 0
    bar = tqdm(total=total, desc=f"unlearn K={k_real}", disable=not progress, leave=False)
    try:
        while step < total and not all(stopped):
            parts = [
                U.joint_batch(p.forget_batch(step), r.sets.teacher, p.clean_batch(step), r.cfg.fused_step)
                for p, r in zip(plans, runs, strict=True)
            ]
            batch, padded = stack_batches([parts[i] for i in cells], pad_id)
            for i in range(k_real):
                info["padded_steps"][i] += int(padded[i] and not stopped[i])
            trainable, opt_state, m = step_fn(trainable, frozen, opt_state, put(batch), seeds, step, hp)
            step += 1
            logs.append(m)
            bar.update(1)
            if monitors[0] is not None and (step % eval_every == 0 or step == total):
                for i in range(k_real):
                    if stopped[i]:
                        continue
                    if evaluate(i, step, cell_state(trainable, i)).get("stop") and step < total:
                        stopped[i], stop_step[i] = True, step
    finally:
        bar.close()

    logs_host = [{key: to_host(v) for key, v in m.items()} for m in logs]
    results = []
    for i in range(k_real):
        s = students[i]
        if monitors[i] is not None and best[i]["state"] is not None:
            final, best_step = jax.tree.map(jnp.asarray, best[i]["state"]), best[i]["step"]
        elif monitors[i] is not None:  # no acceptable evaluation: the untouched student (step 0)
            final, best_step = s.trainable, 0
        else:
            final, best_step = cell_state(trainable, i), stop_step[i]
        nnx.update(s.model, final)
        lr = runs[i].cfg.lr
        log_i = [
            {
                "step": t + 1,
                "lr": schedule_value(lr, total, spec.warmup_steps, t),
                **{n: float(v[i]) for n, v in m.items()},
            }
            for t, m in enumerate(logs_host[: stop_step[i]])
        ]
        result = U.UnlearnResult(
            U.Student(s.model, s.graphdef, final, s.frozen),
            lora.merge(s.model),
            stop_step[i],
            total,
            best_step,
            history[i],
            log_i,
            stopped[i],
        )
        results.append(result)
    return results, info
