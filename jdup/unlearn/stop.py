"""The defender-side stop rule ``early_stop=forget_check``: how much to forget, decided from what a defender sees.

A defender holds (a) some flagged rows that the unlearning never trains on and (b) some labelled clean rows that
the retain loss never trains on. At each evaluation of the student it measures

- ``proxy``: the fraction of held-out flagged rows predicted as the inferred target (most flagged rows carry the
  trigger, so this follows the attack success rate);
- ``acc``: accuracy on the held-out clean rows;
- ``other``: the fraction of held-out clean rows of the *other* classes predicted as the target (how often the
  model sends an ordinary non-target row to the target).

A state has **forgotten** the trigger once ``proxy <= max(floor, ratio * other)``: triggered rows go to the target
no more often than (a fraction ``ratio`` of) ordinary rows of the other classes do. A state is **acceptable**
when ``acc >= base_acc - acc_tol``. Among acceptable forgotten states the one with the best held-out accuracy is
kept; before any state has forgotten, the acceptable state with the lowest ``proxy`` is kept. The run stops
``patience`` evaluations after the last improvement once a forgotten state exists, or as soon as held-out clean
accuracy falls below ``base_acc - acc_tol`` after one did; otherwise it runs to the epoch cap.

The numerics are pure functions of NamedTuples (:func:`judge`, :func:`advance`); :func:`forget_check_monitor`
wraps them as a :data:`jdup.unlearn.monitors.Monitor` for the unlearning loop, whose rule "keep the ok state with
the lowest score" reproduces the selection above through :attr:`Verdict.score`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class StopParams(NamedTuple):
    """Parameters of the ``forget_check`` rule.

    Attributes:
      ratio: forgotten when ``proxy <= ratio * other`` ...
      floor: ... or ``proxy <= floor`` (a fraction of held-out flagged rows that may still go to the target).
      acc_tol: a state is acceptable when held-out clean accuracy ``>= base_acc - acc_tol``.
      patience: evaluations without a better kept state, once one has forgotten, before stopping.
    """

    ratio: float = 0.5
    floor: float = 0.02
    acc_tol: float = 0.01
    patience: int = 2


class Verdict(NamedTuple):
    """One evaluation judged by :func:`judge`.

    Attributes:
      forgotten: ``proxy <= max(floor, ratio * other)``.
      ok: ``acc >= base_acc - acc_tol``.
      score: lower is better; forgotten states score ``-1 - acc`` (best accuracy first; always below any
        not-forgotten state), the others ``proxy``.
    """

    forgotten: bool
    ok: bool
    score: float


class StopState(NamedTuple):
    """Running state of the rule over the evaluations so far.

    Attributes:
      best_score: lowest ``score`` of an acceptable evaluation (``inf`` if none).
      found: an acceptable forgotten state was seen.
      since_best: evaluations since ``best_score`` last improved.
    """

    best_score: float = float("inf")
    found: bool = False
    since_best: int = 0


def forget_threshold(other: float, params: StopParams) -> float:
    """The largest ``proxy`` that counts as forgotten: ``max(floor, ratio * other)``."""
    return max(float(params.floor), float(params.ratio) * float(other))


def judge(proxy: float, acc: float, other: float, base_acc: float, params: StopParams) -> Verdict:
    """Judge one evaluation (see the module docstring)."""
    forgotten = float(proxy) <= forget_threshold(other, params) + 1e-12
    ok = float(acc) >= float(base_acc) - float(params.acc_tol) - 1e-9
    score = -1.0 - float(acc) if forgotten else float(proxy)
    return Verdict(bool(forgotten), bool(ok), float(score))


def advance(state: StopState, verdict: Verdict, params: StopParams) -> tuple[StopState, bool]:
    """Fold one verdict into the running state; returns ``(new_state, stop)``.

    ``stop`` is true once an acceptable forgotten state exists and either this evaluation is not acceptable (clean
    accuracy fell by more than the tolerance) or ``patience`` evaluations passed without a better kept state.
    """
    improved = verdict.ok and verdict.score < state.best_score
    best = verdict.score if improved else state.best_score
    found = state.found or (verdict.ok and verdict.forgotten)
    since = 0 if improved else state.since_best + 1
    new = StopState(float(best), bool(found), int(since))
    stop = found and ((not verdict.ok) or since >= params.patience)
    return new, bool(stop)


def held_out_rates(pred: np.ndarray, labels: np.ndarray, target: int) -> tuple[float, float]:
    """``(accuracy, other)`` of predictions on labelled clean rows: ``other`` = fraction of the rows whose label is
    not ``target`` that are predicted as ``target`` (0 when there are none)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    acc = float((pred == labels).mean()) if len(labels) else 1.0
    non_target = labels != target
    other = float((pred[non_target] == target).mean()) if non_target.any() else 0.0
    return acc, other


class ForgetCheckEvaluation(NamedTuple):
    """What :func:`forget_check_monitor` returns (a :class:`jdup.unlearn.Evaluation` with the measurements)."""

    score: float
    ok: bool
    stop: bool
    forgotten: bool
    proxy_asr: float
    dev_acc: float
    other_to_target: float
    threshold: float


def forget_check_monitor(holdout, clean, target: int, base_acc: float, params: StopParams) -> Callable:
    """The rule as a monitor for :func:`jdup.unlearn.unlearn`: ``monitor(logits_fn) -> ForgetCheckEvaluation``: ``score``,
    ``ok`` and ``stop`` (the loop keeps the ok state with the lowest score) and the measured ``proxy_asr``,
    ``dev_acc``, ``other_to_target``, ``threshold``, ``forgotten``.

    Args:
      holdout: a :class:`jdup.data.Encoded` of held-out flagged rows (never trained on).
      clean: a :class:`jdup.data.Encoded` of held-out labelled clean rows (not in the retain loss).
      target: the defender's target label.
      base_acc: the victim's accuracy on ``clean``.
      params: :class:`StopParams`.
    """
    state = [StopState()]

    def monitor(logits_fn):
        acc, other = held_out_rates(logits_fn(clean).argmax(-1), clean.labels, target) if len(clean) else (1.0, 0.0)
        proxy = float((logits_fn(holdout).argmax(-1) == target).mean()) if len(holdout) else 0.0
        verdict = judge(proxy, acc, other, base_acc, params)
        state[0], stop = advance(state[0], verdict, params)
        return ForgetCheckEvaluation(
            verdict.score, verdict.ok, stop, verdict.forgotten, proxy, acc, other, forget_threshold(other, params)
        )

    return monitor
