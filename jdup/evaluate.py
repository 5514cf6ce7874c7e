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
import re
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


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def pairing_overlap(clean_texts, poison_texts) -> tuple[float, float]:
    """How much the triggered rows look like copies of their clean partners.

    Returns ``(paired, shifted)``: the mean share of a clean row's words that its partner (row ``i`` with row
    ``i``) contains, and the same with the partners shifted by one row (row ``i`` with row ``i - 1``), the level
    of two unrelated rows of the same data. Word- and sentence-level triggers keep every word (paired 1.0);
    paraphrase and style triggers keep about half; unrelated rows share about a tenth.
    """
    clean = [_words(t) for t in clean_texts]
    poison = [_words(t) for t in poison_texts]
    if len(clean) != len(poison):
        raise ValueError(f"pairing needs equal counts: {len(clean)} vs {len(poison)}")
    if not clean:
        return float("nan"), float("nan")

    def cover(a: set[str], b: set[str]) -> float:
        return len(a & b) / len(a) if a else 1.0

    paired = float(np.mean([cover(a, b) for a, b in zip(clean, poison, strict=True)]))
    shifted = float(np.mean([cover(a, b) for a, b in zip(clean, poison[-1:] + poison[:-1], strict=True)]))
    return paired, shifted


#: The pairing holds when the partners share at least this share of words on average ...
MIN_PAIRED_OVERLAP = 0.3
#: ... and at least this many times what rows shifted by one share.
MIN_OVERLAP_RATIO = 2.0


def robust_labels(
    test_clean: D.TextDataset, test_poison: D.TextDataset, target: int, where: str = "data"
) -> np.ndarray | None:
    """True labels of the test-poison rows: row i is the poisoned copy of the i-th non-target test-clean row
    (docs/dup-method.md §5.1). ``None`` (no RA, no trigger ASR) when the counts do not line up, or when the rows
    do not read as copies (:func:`pairing_overlap`: partners share under :data:`MIN_PAIRED_OVERLAP` of their
    words, or under :data:`MIN_OVERLAP_RATIO` times what unrelated rows share), e.g. a subsample that drew its
    triggered rows independently of its clean ones."""
    keep = test_clean.labels != target
    true = test_clean.labels[keep]
    if len(true) != len(test_poison):
        log.warning(
            "%s: %d non-target test-clean rows but %d test-poison rows; RA not computed",
            where,
            len(true),
            len(test_poison),
        )
        return None
    clean_texts = [t for t, k in zip(test_clean.texts, keep, strict=True) if k]
    paired, shifted = pairing_overlap(clean_texts, test_poison.texts)
    if len(true) and (paired < MIN_PAIRED_OVERLAP or (len(true) > 1 and paired < MIN_OVERLAP_RATIO * shifted)):
        log.warning(
            "%s: test-poison row i does not read as a copy of the i-th non-target test-clean row (they share "
            "%.2f of their words, rows shifted by one %.2f); RA and trigger ASR not computed",
            where,
            paired,
            shifted,
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


__all__ = ["Evaluation", "evaluate_model", "pairing_overlap", "robust_labels"]
