"""DUP purification in memory: LoRA unlearning of the samples a detector flagged (docs/dup-method.md §3).

* :mod:`~jdup.unlearn.config`: :class:`UnlearnSettings`, every knob of the algorithm (no paths);
* :mod:`~jdup.unlearn.student`: :func:`build_student` (victim + LoRA + trainable head copy, split);
* :mod:`~jdup.unlearn.loss`: :class:`LossSettings`, :func:`loss_pieces` (the forget and retain terms separately),
  :func:`joint_batch`;
* :mod:`~jdup.unlearn.step`: :func:`train_step` (pure; the sweep vmaps it), :data:`jit_train_step`,
  :class:`OptimizerSpec` (static) and :class:`StepHParams` (traced learning rate and loss weights);
* :mod:`~jdup.unlearn.monitors`: the stop rules and :func:`prepare_sets` (forget/holdout/retain from the flags);
* :mod:`~jdup.unlearn.loop`: :func:`unlearn` (one run) and :func:`run_cells` (K runs, the sweep), both the one
  loop; :class:`StepInfo`, :class:`UnlearnResult`;
* :mod:`~jdup.unlearn.guard`: the collapse guard of a run without a stop rule (pure checks of the step log);
* :mod:`~jdup.unlearn.cells`: the loop's device state :class:`LoopState` and the pure pieces it vmaps over K
  cells (one step, the kept state, the final state), the batch stacking and :class:`Placement`.

Files (model, data folder, detection, metrics, the exported model) belong to the ``jdup unlearn`` stage,
:mod:`jdup.stages.unlearn` (``UnlearnConfig``, ``run_unlearn``); this package reads and writes none, except the
optional orbax checkpoint folder :func:`unlearn` is given.
"""

from __future__ import annotations

from jdup.data.batching import (
    BatchPlan,
    clean_batch_at,
    forget_batch_at,
    forget_batches_per_epoch,
    with_pad_multiple,
)
from jdup.unlearn.cells import CellParams, LoopState, Placement
from jdup.unlearn.config import EARLY_STOP, UnlearnSettings
from jdup.unlearn.loop import (
    Cell,
    StepInfo,
    UnlearnResult,
    make_cell,
    run_cells,
    unlearn,
)
from jdup.unlearn.loss import LossSettings, joint_batch, loss_pieces, objective, student_logits
from jdup.unlearn.monitors import (
    Evaluation,
    Monitor,
    OracleEvaluation,
    ProxyEvaluation,
    UnlearnSets,
    infer_target,
    oracle_monitor,
    prepare_sets,
    proxy_monitor,
)
from jdup.unlearn.step import (
    OptimizerSpec,
    StepHParams,
    jit_train_step,
    step_hparams,
    step_key,
    train_step,
)
from jdup.unlearn.student import Student, build_student

__all__ = [
    "EARLY_STOP",
    "UnlearnSettings",
    "Student",
    "build_student",
    "LossSettings",
    "student_logits",
    "loss_pieces",
    "objective",
    "joint_batch",
    "StepHParams",
    "step_hparams",
    "OptimizerSpec",
    "train_step",
    "jit_train_step",
    "step_key",
    "Monitor",
    "Evaluation",
    "ProxyEvaluation",
    "OracleEvaluation",
    "proxy_monitor",
    "oracle_monitor",
    "infer_target",
    "UnlearnSets",
    "prepare_sets",
    "StepInfo",
    "UnlearnResult",
    "unlearn",
    "Cell",
    "CellParams",
    "LoopState",
    "Placement",
    "make_cell",
    "run_cells",
    "BatchPlan",
    "clean_batch_at",
    "forget_batch_at",
    "forget_batches_per_epoch",
    "with_pad_multiple",
]
