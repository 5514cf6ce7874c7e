"""K cells of one group unlearned at once: the library's unlearning loop (:func:`jdup.unlearn.run_cells`) over K
cells, its step ``jax.jit(jax.vmap(...))``.

The cells of a group differ only in ``seed``, ``lr``, ``lambda_asr`` and ``lambda_acc`` (and, through the seed, in
their detection's calibration split, hold-out rows, LoRA init and, for a projected (UPGP) cell, its projection
bases). Everything a cell computes comes from :mod:`jdup.unlearn` / :mod:`jdup.data`, exactly as in
``jdup unlearn`` (the contract is in ``docs/sweeps.md``):

* its inputs: :func:`jdup.unlearn.prepare_sets` (forget/hold-out/retain rows, teacher logits, inferred target,
  stop rule), called by the engine;
* its run: :func:`jdup.unlearn.make_cell` (student, projection and hook) and :func:`jdup.unlearn.run_cells`, the
  loop ``jdup unlearn`` runs with one cell: batches, step, evaluation, kept state, stop rule, history, final
  state. Per-cell data (learning rate, loss weights, seed, rows, projection bases) is stacked on a leading axis.

The K adapter states and optimizer states are stacked on a leading axis sharded over the ``sweep`` axis of a
``sweep x data`` mesh; with ``mesh_data > 1`` the batch rows of each cell are also split over ``data``. The frozen
base weights are replicated.

One thing differs from K separate runs: at a step where the K cells' batches have different padded lengths,
they are padded to the longest, and the hash dropout masks (which depend on the array shape) then differ from
the single run's. ``padded_steps`` in each cell's timing counts such steps; 0 means the cell computed exactly what
``jdup unlearn`` computes (cells of one seed always; several seeds when every batch has one length, e.g. with
``unlearn.pad_multiple`` >= the longest row).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jdup import data as D
from jdup import unlearn as U
from jdup.errors import JdupError

#: Settings that may differ inside a group (everything else must be equal).
PER_CELL = ("seed", "lr", "lambda_asr", "lambda_acc", "out")


@dataclasses.dataclass
class CellRun:
    """One cell's inputs to the unlearning loop, as ``jdup unlearn`` prepares them."""

    cfg: Any  # jdup.stages.unlearn.UnlearnConfig (or UnlearnSettings)
    sets: Any  # jdup.unlearn.UnlearnSets: forget, holdout, retain, teacher, target, monitor


class GroupInfo(NamedTuple):
    """How :func:`unlearn_group` ran a group (recorded in each cell's timing)."""

    mesh_sweep: int  # devices on the ``sweep`` mesh axis
    mesh_data: int  # devices on the ``data`` mesh axis
    padded_k: int  # cells computed (the group padded to a multiple of ``mesh_sweep``)
    padded_steps: list[int]  # per cell: steps whose batch was padded to another cell's longer length


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
) -> tuple[list[Any], GroupInfo]:
    """Unlearns every cell of a group with :func:`jdup.unlearn.run_cells`; returns one
    :class:`jdup.unlearn.UnlearnResult` per cell and the :class:`GroupInfo`."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    _check_group(runs)
    cells = [
        U.make_cell(
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
    k_real = len(runs)
    cfg0 = runs[0].cfg
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
    placement = None
    if n_sweep * n_data > 1:
        mesh = Mesh(np.asarray(devices[: n_sweep * n_data]).reshape(n_sweep, n_data), ("sweep", "data"))
        placement = U.Placement(
            cells=NamedSharding(mesh, P("sweep")),
            rows=NamedSharding(mesh, P("sweep", "data")) if n_data > 1 else None,
            replicated=NamedSharding(mesh, P()),
        )
    results = U.run_cells(cells, placement=placement, pad_cells=k - k_real, progress=progress)
    return results, GroupInfo(n_sweep, n_data, k, [r.padded_steps for r in results])
