"""Sweeps: a grid of DUP cells (attack x poison rate x model x seed x detector/unlearning settings), vectorised.

A sweep config is YAML with shared settings and axes (see ``configs/sweeps/`` and ``docs/sweeps.md``)::

    name: local-minilm
    out: runs/sweeps/local-minilm      # the sweep folder (results.jsonl, summary.json, victims/)
    fixed:                             # settings of every cell (sections of CellConfig)
      model: {name: builtin:minilm}
      unlearn: {epochs: 2}             # any `jdup unlearn` setting (UnlearnConfig)
      detect: {alpha: 0.9}             # any `jdup detect` setting (DetectConfig)
    axes:                              # dotted key -> list; the grid is the Cartesian product
      data.dir: [.../badnets, .../addsent]
      seed: [0, 1, 2]
      unlearn.lr: [5e-4, 1e-3]

An axis may also set several keys together: ``{attack: [{data.dir: A, model.victim: VA}, ...]}`` (an axis whose
values are mappings of dotted keys; its name is only a label), or ``{"data.dir,model.victim": [[A, VA], ...]}``.

Every cell is one ``jdup unlearn`` run (:func:`grid.stage_unlearn_config` gives its exact config): the same
detection (:func:`jdup.detect.detect`), the same inferred target, hold-out splits and stop rule, and the same
unlearning loop (:func:`jdup.unlearn.run_cells`: batches, step, evaluations, kept state, history; ``jdup unlearn``
runs it with one cell). The sweep only shares work: one victim and tokenisation per base, one detection per
setting, and K cells that differ in ``seed``/``lr``/``lambda_asr``/``lambda_acc`` run by that loop together, its
step ``jax.jit(jax.vmap(...))`` over the library step, sharded over a ``sweep x data`` device mesh
(:mod:`jdup.sweep.vmapped`; projected cells too, each with its own bases).

Every finished cell appends one JSON line to ``<out>/results.jsonl`` (:mod:`jdup.sweep.store`): its id, full
resolved config, seed, versions, metrics and time. A restarted sweep skips ids already ``ok`` there; a cell that
raises is recorded with ``status: error`` and its traceback, and the other cells go on (a failing group is
retried cell by cell).

Several hosts: run the same command on every host (``jdup --distributed sweep CONFIG``, or ``--coordinator``/
``--num-processes``/``--process-id``); process 0's ``results.jsonl`` decides what is left to run (sent to every
process), and only process 0 writes.

Modules: :mod:`~jdup.sweep.grid` (config, expansion, ids, grouping), :mod:`~jdup.sweep.store` (results store),
:mod:`~jdup.sweep.engine` (running groups, resume), :mod:`~jdup.sweep.vmapped` (the vmapped step over K cells),
:mod:`~jdup.sweep.report` (result lines and ``jdup report``), :mod:`~jdup.sweep.tables` (the tables of ``jdup report``).
"""

from jdup.sweep.engine import Base, Engine, run_sweep, synthetic_texts
from jdup.sweep.grid import (
    CARRIED,
    VMAP_KEYS,
    Cell,
    CellConfig,
    CellData,
    CellModel,
    CellUnlearn,
    SweepConfig,
    base_key,
    build_cell,
    canonical_json,
    cell_id,
    detect_key,
    expand,
    get_dotted,
    group_cells,
    group_key,
    load_sweep_config,
    stage_train_config,
    stage_unlearn_config,
)
from jdup.sweep.store import ResultsStore, read_results, versions
from jdup.sweep.vmapped import mesh_for, padded_size

__all__ = [
    "CARRIED",
    "VMAP_KEYS",
    "Base",
    "Cell",
    "CellConfig",
    "CellData",
    "CellModel",
    "CellUnlearn",
    "Engine",
    "ResultsStore",
    "SweepConfig",
    "base_key",
    "build_cell",
    "canonical_json",
    "cell_id",
    "detect_key",
    "expand",
    "get_dotted",
    "group_cells",
    "group_key",
    "load_sweep_config",
    "mesh_for",
    "padded_size",
    "read_results",
    "run_sweep",
    "stage_train_config",
    "stage_unlearn_config",
    "synthetic_texts",
    "versions",
]
