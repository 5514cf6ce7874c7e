"""Stop rules of the unlearning loop, and the preparation of the forget/holdout/retain sets from the flags.

:func:`prepare_sets` is the in-memory part of ``jdup unlearn`` between the detection flags and :func:`unlearn`
(teacher logits, the defender's target, the held-out flagged and clean rows, the monitor); the stage and the sweep
both call it, so a sweep cell prepares exactly what ``jdup unlearn`` prepares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from jdup import data as D
from jdup import predict as predict_lib
from jdup.unlearn.loss import mix_encoded
from jdup.unlearn.stop import StopParams, forget_check_monitor


class Evaluation(NamedTuple):
    """What a stop rule says about one state (:data:`Monitor`). A monitor may return any NamedTuple with these
    three fields first; its other fields are measurements, recorded in the run's history."""

    score: float  # lower is better: the loop keeps the state with the lowest score among ok evaluations
    ok: bool = True  # the state is acceptable (e.g. clean accuracy did not fall too far)
    stop: bool = False  # the run may stop here


class ProxyEvaluation(NamedTuple):
    """:func:`proxy_monitor`'s :class:`Evaluation`."""

    score: float  # = proxy_asr
    ok: bool  # dev_acc >= base_acc - max_acc_drop
    stop: bool  # ok and proxy_asr <= asr_stop
    proxy_asr: float  # fraction of the held-out flagged rows predicted as the target
    dev_acc: float  # accuracy on the held-out labelled clean rows


class OracleEvaluation(NamedTuple):
    """:func:`oracle_monitor`'s :class:`Evaluation`."""

    score: float  # = dev_asr_oracle
    ok: bool
    stop: bool  # dev_asr_oracle <= asr_threshold
    dev_asr_oracle: float  # ASR on the ground-truth dev-poison rows


Monitor = Callable[[Callable[[D.Encoded], np.ndarray]], Evaluation]
"""``monitor(logits_fn) -> Evaluation`` (or a NamedTuple starting with ``score, ok, stop``); ``logits_fn`` gives
the current student's deterministic logits on any :class:`jdup.data.Encoded`."""


def proxy_monitor(
    holdout: D.Encoded,
    clean: D.Encoded,
    target: int,
    base_acc: float,
    *,
    asr_stop: float,
    max_acc_drop: float,
) -> Monitor:
    """Defender-side stop rule: forgetting measured on held-out flagged rows, accuracy on labelled clean rows.

    ``score`` = fraction of ``holdout`` predicted as ``target`` (a proxy for ASR: most flagged rows carry the
    trigger); ``ok`` = clean accuracy ≥ ``base_acc − max_acc_drop``; ``stop`` = ``ok`` and score ≤ ``asr_stop``.
    """

    def monitor(logits_fn) -> ProxyEvaluation:
        acc = float((logits_fn(clean).argmax(-1) == clean.labels).mean()) if len(clean) else 1.0
        score = float((logits_fn(holdout).argmax(-1) == target).mean()) if len(holdout) else 0.0
        ok = acc >= base_acc - max_acc_drop - 1e-9
        return ProxyEvaluation(score, ok, ok and score <= asr_stop, score, acc)

    return monitor


def oracle_monitor(dev_poison: D.Encoded, target: int, asr_threshold: float) -> Monitor:
    """The official rule (docs/dup-method.md §3.6), an ORACLE: ASR on ground-truth dev-poison; stop once ≤ ``asr_threshold``."""

    def monitor(logits_fn) -> OracleEvaluation:
        asr = float((logits_fn(dev_poison).argmax(-1) == target).mean()) if len(dev_poison) else 0.0
        return OracleEvaluation(asr, True, asr <= asr_threshold, asr)

    return monitor


def _starts_with(rows: D.Encoded, head: D.Encoded) -> bool:
    """Whether the first ``len(head)`` rows of ``rows`` are ``head``'s (same tokens)."""
    n = len(head)
    return (len(rows) >= n and rows.input_ids.shape[1:] == head.input_ids.shape[1:]
            and bool(np.array_equal(rows.input_ids[:n], head.input_ids)))


def infer_target(teacher_logits: np.ndarray, num_labels: int) -> int:
    """The backdoor target a defender can infer: the majority teacher prediction on the flagged rows."""
    if teacher_logits.size == 0:
        return 0
    return int(np.bincount(teacher_logits.argmax(-1), minlength=num_labels).argmax())


class UnlearnSets(NamedTuple):
    """What :func:`unlearn` trains on and monitors, prepared from the detection flags (:func:`prepare_sets`).

    Attributes:
      forget: flagged rows trained on.
      holdout: flagged rows held out for the stop rule (empty unless ``early_stop`` is ``proxy`` or ``forget_check``).
      retain: labelled clean rows of the CE term (dev-clean minus the clean holdout).
      teacher: ``[len(forget), K]`` victim logits on ``forget``.
      target: the defender's target label (``cfg.target_label`` or :func:`infer_target`).
      monitor: the stop rule (``None`` for ``early_stop == "none"``).
      clean_check: the held-out labelled clean rows (not in ``retain``) when a stop rule or ``target_tilt`` uses
        them, else ``None``.
      base_acc: the victim's accuracy on ``clean_check`` (``None`` without it).
    """

    forget: D.Encoded
    holdout: D.Encoded
    retain: D.Encoded
    teacher: np.ndarray
    target: int
    monitor: Monitor | None
    clean_check: D.Encoded | None = None
    base_acc: float | None = None


def prepare_sets(
    cfg: Any,
    victim: nnx.Module,
    dev_detect: D.Encoded,
    flags: np.ndarray,
    dev_clean: D.Encoded,
    dev_poison: D.Encoded,
    eval_target: int,
    *,
    victim_logits: np.ndarray | None = None,
) -> UnlearnSets:
    """The forget set, its holdout, the retain set, the teacher logits, the defender's target and the monitor.

    Args:
      cfg: an :class:`~jdup.unlearn.UnlearnSettings` (seed, holdout fractions, stop rule, batch size, ...).
      victim: the backdoored model (teacher).
      dev_detect: tokenised ``dev-clean ‖ dev-poison`` (the rows the flags refer to).
      flags: ``[len(dev_detect)]`` bool, the detection's flags.
      dev_clean: tokenised dev-clean (labelled clean rows).
      dev_poison: tokenised dev-poison (only for the ``oracle_dev_poison`` rule).
      eval_target: the attack's true target (only for the ``oracle_dev_poison`` rule).
      victim_logits: optional ``[len(dev_detect), K]`` logits of ``victim`` on ``dev_detect`` already computed
        (e.g. :attr:`jdup.detect.DetectionResult.logits` of the detection that produced ``flags``); then the teacher
        logits are those rows' and, when ``dev_detect`` starts with ``dev_clean`` (dev-clean ‖ dev-poison), the
        clean accuracy too, without another forward pass (the same numbers up to float rounding).

    Flagged rows held out for the proxy and forget_check rules: ``round(holdout_frac · n_flagged)`` drawn with
    ``default_rng([seed, 7])``; clean rows held out of the CE set: ``round(clean_holdout_frac · n_clean)`` drawn
    with ``default_rng([seed, 11])`` (none if that leaves no CE rows). With ``check_mix`` the ``forget_check`` rule
    judges forgetting on the held-out flagged rows each put into a held-out clean row of another class
    (:func:`jdup.unlearn.loss.mix_encoded`, ``default_rng([seed, 13])``).
    """
    k = int(victim.config.num_labels)
    flagged_idx = np.flatnonzero(np.asarray(flags, bool))
    if victim_logits is not None and len(victim_logits) != len(dev_detect):
        raise ValueError(f"victim_logits has {len(victim_logits)} rows for {len(dev_detect)} dev_detect rows")
    # dev_detect = dev_clean ‖ ...: the clean rows' logits are its first rows
    clean_logits = (np.asarray(victim_logits)[: len(dev_clean)]
                    if victim_logits is not None and _starts_with(dev_detect, dev_clean) else None)
    teacher_all = np.asarray(victim_logits, np.float32)[flagged_idx] if victim_logits is not None else (
        predict_lib.predict(
            victim,
            dev_detect.subset(flagged_idx),
            cfg.eval_batch_size,
            progress=cfg.progress,
            desc="teacher logits",
        )
        if len(flagged_idx)
        else np.zeros((0, k), np.float32)
    )
    target = cfg.target_label if cfg.target_label is not None else infer_target(teacher_all, k)
    perm = np.random.default_rng([cfg.seed, 7]).permutation(len(flagged_idx))
    held_out = cfg.early_stop in ("proxy", "forget_check")
    n_hold = int(round(cfg.holdout_frac * len(flagged_idx))) if held_out else 0
    hold_pos, train_pos = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    forget = dev_detect.subset(flagged_idx[train_pos])
    holdout = dev_detect.subset(flagged_idx[hold_pos])
    teacher = teacher_all[train_pos] if len(train_pos) else np.zeros((0, k), np.float32)

    monitor = None
    retain = dev_clean
    clean_check, base_acc = None, None
    if held_out or getattr(cfg, "target_tilt", False):
        clean_check = retain
        check_rows = np.arange(len(retain))
        n_clean_hold = int(round(cfg.clean_holdout_frac * len(retain)))
        if 0 < n_clean_hold < len(retain):
            perm_c = np.random.default_rng([cfg.seed, 11]).permutation(len(retain))
            check_rows = np.sort(perm_c[:n_clean_hold])
            clean_check = retain.subset(check_rows)
            retain = retain.subset(np.sort(perm_c[n_clean_hold:]))
        check_logits = (clean_logits[check_rows] if clean_logits is not None
                        else predict_lib.predict(victim, clean_check, cfg.eval_batch_size))
        base_acc = float((check_logits.argmax(-1) == clean_check.labels).mean())
        if not held_out:
            pass  # target_tilt only: the clean hold-out, no stop rule
        elif cfg.early_stop == "forget_check":
            params = StopParams(cfg.forget_ratio, cfg.forget_floor, cfg.max_cacc_drop, cfg.stop_patience)
            check_rows = holdout
            if getattr(cfg, "check_mix", False):  # the held-out flagged rows inside held-out clean rows of
                others = clean_check.subset(np.flatnonzero(clean_check.labels != target))  # the other classes
                check_rows = mix_encoded(holdout, others, [cfg.seed, 13])
            monitor = forget_check_monitor(check_rows, clean_check, target, base_acc, params)
        else:
            monitor = proxy_monitor(
                holdout,
                clean_check,
                target,
                base_acc,
                asr_stop=cfg.proxy_asr_stop,
                max_acc_drop=cfg.max_cacc_drop,
            )
    if cfg.early_stop == "oracle_dev_poison":
        monitor = oracle_monitor(dev_poison, eval_target, cfg.asr_threshold)
    return UnlearnSets(forget, holdout, retain, teacher, int(target), monitor, clean_check, base_acc)
