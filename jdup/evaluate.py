"""How well a classifier does on the clean and the triggered test rows: CACC, ASR and RA, in memory.

``jdup unlearn`` measures its victim before and its purified model after with :func:`evaluate_model`, and every
sweep cell does the same, so their numbers are one computation:

* CACC: accuracy on ``test-clean``;
* ASR: share of ``test-poison`` rows predicted as the attack's target label;
* RA (robust accuracy): accuracy on ``test-poison`` against the rows' true labels (:func:`robust_labels`);
* trigger ASR: among the pairs whose clean copy the model keeps off the target, the share whose triggered copy it
  sends there (:func:`jdup.metrics.trigger_success_rate`): the part of ASR the trigger itself causes, without the
  model's own error on clean non-target rows. Needs the same pairing as RA.

The attack's target label of a data folder (``poison_config.json`` or the majority label of ``test-poison``) is
read by the stages (:func:`jdup.stages.common.attack_target`); the target a *defender* infers from the victim's
predictions on the flagged rows is :func:`jdup.unlearn.infer_target`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from jdup import data as D
from jdup import metrics as metrics_lib
from jdup import predict as predict_lib

log = logging.getLogger("jdup.evaluate")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_model` measures; ``asr``/``ra``/``asr_trigger`` are ``None`` without triggered test
    rows (``ra`` and ``asr_trigger`` also when those rows do not pair up with the clean non-target rows, and
    ``asr_trigger`` when the model sends every clean non-target row to the target)."""

    cacc: float
    asr: float | None = None
    ra: float | None = None
    asr_trigger: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


def robust_labels(
    test_clean: D.TextDataset, test_poison: D.TextDataset, target: int, where: str = "data"
) -> np.ndarray | None:
    """True labels of the test-poison rows: row i is the poisoned copy of the i-th non-target test-clean row
    (docs/dup-method.md §5.1). ``None`` (RA not computed) when the counts do not line up."""
    true = test_clean.labels[test_clean.labels != target]
    if len(true) != len(test_poison):
        log.warning(
            "%s: %d non-target test-clean rows but %d test-poison rows; RA not computed",
            where,
            len(true),
            len(test_poison),
        )
        return None
    return true


def evaluate_model(
    model: Any,
    test_clean: D.Encoded,
    test_poison: D.Encoded | None,
    target: int | None,
    ra_labels: np.ndarray | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
    tag: str = "",
    mesh: Any = None,
) -> Evaluation:
    """CACC on ``test_clean``; ASR (→ ``target``) and RA (vs ``ra_labels``) on ``test_poison`` when it and the
    target are given.

    Args:
      model: the classifier (a :mod:`jdup.models` NNX module).
      test_clean, test_poison: tokenised splits (:func:`jdup.data.encode`).
      target: the attack's target label.
      ra_labels: true labels of ``test_poison`` (:func:`robust_labels`), which also says the rows pair up with the
        non-target rows of ``test_clean``; ``None``: no RA and no trigger ASR.
      batch_size, progress: of the forward passes; ``tag`` names them in progress bars.
      mesh: the device mesh (:mod:`jdup.mesh`; rows split over its ``data`` axis); ``None`` = the default device.
        The numbers do not depend on it.
    """
    prefix = f"eval {tag}: " if tag else "eval "
    pc = predict_lib.predict(model, test_clean, batch_size, progress=progress, desc=prefix + "test-clean", mesh=mesh)
    cacc = metrics_lib.accuracy(pc.argmax(-1), test_clean.labels)
    if test_poison is None or target is None:
        return Evaluation(cacc)
    pp = predict_lib.predict(model, test_poison, batch_size, progress=progress, desc=prefix + "test-poison",
                             mesh=mesh)
    pred = pp.argmax(-1)
    asr = metrics_lib.attack_success_rate(pred, target)
    if ra_labels is None:
        return Evaluation(cacc, asr)
    ra = metrics_lib.accuracy(pred, ra_labels)
    clean_pred = pc.argmax(-1)[np.asarray(test_clean.labels) != target]
    trig = metrics_lib.trigger_success_rate(clean_pred, pred, target)
    return Evaluation(cacc, asr, ra, None if np.isnan(trig) else trig)  # undefined: every clean copy on the target


__all__ = ["Evaluation", "evaluate_model", "robust_labels"]
