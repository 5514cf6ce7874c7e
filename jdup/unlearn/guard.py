"""The collapse guard of a run without a stop rule (``early_stop=none``, ``collapse_guard > 0``).

Forgetting and clean accuracy pull against each other; on some victims (style-level triggers, where the flagged
rows look like ordinary clean rows of the target class) the forgetting term wins and the classifier collapses to
one class. A run without a stop rule would return that model. The guard watches the one accuracy every step
already computes, the student's accuracy on the labelled clean rows of its own cross-entropy batches
(``retain_acc``, dropout on), averaged over each epoch:

* the first epoch (mostly learning-rate warm-up, so close to the victim) is the reference;
* an epoch has *collapsed* when its accuracy is at least ``tol`` below the reference and the drop is beyond
  batch noise: a two-proportion z-score of at least :data:`Z_MIN` (each epoch counted as
  ``steps · batch_size`` rows);
* at every epoch end that has not collapsed, the loop copies the state aside (the ``best`` slot of
  :class:`~jdup.unlearn.LoopState`); if the *last* epoch has collapsed, the run returns the last copied state
  instead of its final one, and says so.

A run whose last epoch keeps its clean accuracy returns its final state, bit for bit what it returns without the
guard: a dip in the middle that recovers changes nothing. The thresholds are fixed, not tuned on victims: a
collapse to one class on two balanced classes drops the accuracy by tens of points, which at 256 rows an epoch
has a z-score near 7. Accuracy on rows the student trains on is optimistic, so the guard sees only gross
collapses; ``early_stop=forget_check`` judges clean accuracy on held-out rows instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

#: The drop must be at least this many standard errors (two-proportion z-test of the epochs' clean batches).
Z_MIN = 3.0


class EpochCheck(NamedTuple):
    """One epoch against the first: accuracies, the drop's z-score and the verdict."""

    epoch: int  # 1-based
    step: int  # the step at the epoch's end
    reference: float  # mean clean-batch accuracy of epoch 1
    accuracy: float  # this epoch's
    z: float  # two-proportion z-score of the drop (0 when no drop)
    collapsed: bool


def epoch_accuracies(log: Sequence[dict], per_epoch: int) -> list[float]:
    """Mean ``retain_acc`` of each complete epoch in a run's step log (rows without it are skipped)."""
    acc = [float(r["retain_acc"]) for r in log if "retain_acc" in r]
    return [sum(acc[i : i + per_epoch]) / per_epoch for i in range(0, len(acc) - per_epoch + 1, per_epoch)]


def check_epoch(reference: float, accuracy: float, rows: int, tol: float, epoch: int = 0, step: int = 0,
                z_min: float = Z_MIN) -> EpochCheck:
    """Has an epoch whose clean batches (``rows`` rows, as many as the first epoch's) scored ``accuracy``
    collapsed against the first epoch's ``reference``?"""
    drop = reference - accuracy
    pooled = (reference + accuracy) / 2
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / max(rows, 1))
    z = drop / se if drop > 0 else 0.0
    return EpochCheck(epoch, step, reference, accuracy, z, bool(tol > 0 and drop >= tol and z >= z_min))


def review(log: Sequence[dict], per_epoch: int, batch_size: int, tol: float) -> list[EpochCheck]:
    """Every complete epoch of a run's step log checked against the first (epoch 1 itself never collapses)."""
    accs = epoch_accuracies(log, per_epoch)
    rows = per_epoch * batch_size
    return [check_epoch(accs[0], a, rows, tol, e + 1, (e + 1) * per_epoch) for e, a in enumerate(accs)]


__all__ = ["EpochCheck", "Z_MIN", "check_epoch", "epoch_accuracies", "review"]
