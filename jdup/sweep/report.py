"""What a sweep writes about its cells: the metrics of a result line and the run summary.

The tables and plots over a finished sweep are ``jdup report`` (:mod:`jdup.report`), which reads the lines built
here from ``results.jsonl``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jdup import metrics as MT

#: Detection metrics of the scored test set (``test-clean ‖ test-poison``) copied into every result line.
TEST_DETECTION_KEYS = ("auroc", "auroc_md", "auroc_ss", "frr", "far", "precision", "recall", "f1")


def roc_points(is_poison: np.ndarray, scores: np.ndarray, n: int = 51) -> dict:
    """The ROC curve on a fixed FPR grid of ``n`` points (small enough for every result line; for plots)."""
    fpr, tpr, _ = MT.roc_curve(is_poison, scores)
    grid = np.linspace(0.0, 1.0, n)
    return {
        "fpr": [round(float(x), 4) for x in grid],
        "tpr": [round(float(x), 4) for x in np.interp(grid, fpr, tpr)],
    }


def detection_metrics(dev: Any, test: Any, dev_is_poison: np.ndarray, test_is_poison: np.ndarray) -> dict:
    """A cell's detection columns from two :class:`jdup.detect.DetectionResult`: the flags that drive unlearning
    come from ``dev`` (dev-detect, as ``jdup unlearn``); AUROC/FRR/FAR/... are measured on ``test``
    (test-detect, as ``jdup detect --score-set test-detect``)."""
    flags = np.asarray(dev.flags, bool)
    out = {k: test.metrics.get(k) for k in TEST_DETECTION_KEYS if k in test.metrics}
    out.update(
        threshold=float(dev.threshold),
        layers=[int(i) for i in dev.layers],
        n_flagged=int(flags.sum()),
        n_flagged_poison=int((flags & dev_is_poison).sum()),
        n_dev_detect=int(len(flags)),
    )
    if test_is_poison.any() and (~test_is_poison).any():
        out["roc"] = roc_points(test_is_poison, np.asarray(test.scores))
    return out


def victim_metrics(ev: dict, dev_asr: float, suffix: str) -> dict:
    """``cacc_<suffix>``, ``asr_<suffix>``, ``ra_<suffix>`` (from :func:`jdup.stages.unlearn.evaluate_model`) and
    ``dev_asr_<suffix>`` (dev-poison predicted as the target)."""
    return {
        f"cacc_{suffix}": ev["cacc"],
        f"asr_{suffix}": ev["asr"],
        f"ra_{suffix}": ev["ra"],
        f"dev_asr_{suffix}": dev_asr,
    }


def unlearn_metrics(res: Any, run: Any) -> dict:
    """What one cell's unlearning did (:class:`jdup.unlearn.UnlearnResult` + its :class:`CellRun`)."""
    last = res.log[-1] if res.log else {}
    return {
        "n_forget_train": int(len(run.sets.forget)),
        "n_holdout": int(len(run.sets.holdout)),
        "n_retain": int(len(run.sets.retain)),
        "defender_target": int(run.sets.target),
        "steps": int(res.steps),
        "total_steps": int(res.total_steps),
        "best_step": int(res.best_step),
        "stopped_early": bool(res.stopped_early),
        "loss_last": float(last.get("loss", np.nan)),
        "forget_last": float(last.get("forget", np.nan)),
        "retain_last": float(last.get("retain", np.nan)),
    }


def summary(
    out: str, results: str, cells: int, skipped: int, counter: dict, groups: int, seconds: float
) -> dict:
    """The dict :func:`jdup.sweep.run_sweep` returns and writes to ``summary.json``."""
    return {
        "out": out,
        "results": results,
        "cells": cells,
        "skipped": skipped,
        "ran": cells - skipped,
        "ok": counter["ok"],
        "failed": counter["failed"],
        "groups": groups,
        "seconds": seconds,
    }
