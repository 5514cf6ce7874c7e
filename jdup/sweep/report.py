"""What a sweep reports: the metrics of each result line, written while it runs, and ``jdup report SWEEP_DIR``,
the tables and plots over a finished sweep's ``results.jsonl``.

Result lines (:mod:`jdup.sweep.engine` calls these): :func:`detection_metrics`, :func:`victim_metrics`,
:func:`unlearn_metrics`, :func:`summary`.

``jdup report`` (:func:`run_report`): rows are *settings*, every axis value of a cell except ``seed``. Each metric
is shown as mean ± std over the seeds of a setting (sample std, ``ddof=1``; a single seed shows ``± 0``).
Written into the sweep folder:

* ``report.csv``: one row per setting, the axis columns, ``n_seeds``, then ``<metric>_mean`` / ``<metric>_std``;
* ``report.md``: first the run (command, machine, software, wall time from ``invocations.jsonl``) and two tables
  for the results docs: detection per attack x detector (AUROC/FRR/FAR on test-detect, one entry per distinct
  detection) and purification per attack x method (CACC/ASR/RA before and after); then the table of every setting
  (``mean ± std``) and the failed cells with their errors;
* ``asr_vs_cacc.png``: ASR against CACC after unlearning, one colour per method (the non-data, non-model axis
  values), with the backdoored victims as grey crosses;
* ``auroc_per_attack.png``: detection AUROC per attack (bars per model, mean ± std);
* ``roc_curves.png``: detector ROC curves per attack (from the curve each cell stores).

The tables are :mod:`jdup.sweep.tables`; the figures are drawn by :mod:`jdup.plots`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jdup import atomic, plots
from jdup import metrics as MT
from jdup.errors import JdupError
from jdup.sweep import store as sweep_store
from jdup.sweep import tables as T

# ---------------------------------------------------------------------------------------------------------------
# Result lines (written while the sweep runs)


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


def victim_metrics(ev: Any, dev_asr: float, suffix: str) -> dict:
    """``cacc_<suffix>``, ``asr_<suffix>``, ``ra_<suffix>``, ``asr_trigger_<suffix>`` (a
    :class:`jdup.evaluate.Evaluation`) and ``dev_asr_<suffix>`` (dev-poison predicted as the target)."""
    return {
        f"cacc_{suffix}": ev.cacc,
        f"asr_{suffix}": ev.asr,
        f"ra_{suffix}": ev.ra,
        f"asr_trigger_{suffix}": ev.asr_trigger,
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
        "collapsed": bool(res.collapsed),
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


# ---------------------------------------------------------------------------------------------------------------
# ``jdup report``: plots (the numbers picked out of the records here, drawn by jdup.plots)


def _plot_asr_vs_cacc(records: Sequence[Mapping], path: str) -> bool:
    """ASR vs CACC after unlearning per method and attack; each victim (attack, model) once."""
    ok = [r for r in records if r.get("status") == "ok" and T.metric_value(r, "asr_after") is not None]
    if not ok:
        return False
    victims, seen = [], set()
    for r in ok:
        key = (T.attack_label(r), T.model_label(r))
        if key not in seen and T.metric_value(r, "asr_before") is not None:
            seen.add(key)
            victims.append((T.metric_value(r, "cacc_before"), T.metric_value(r, "asr_before")))
    points = [
        (
            T.method_label(r),
            T.attack_label(r),
            T.metric_value(r, "cacc_after"),
            T.metric_value(r, "asr_after"),
        )
        for r in ok
    ]
    plots.asr_vs_cacc(victims, points, path)
    return True


def _plot_auroc_per_attack(records: Sequence[Mapping], path: str) -> bool:
    """Detection AUROC per (attack, model), mean ± std over the cells."""
    values: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get("status") == "ok" and T.metric_value(r, "auroc") is not None:
            values.setdefault((T.attack_label(r), T.model_label(r)), []).append(T.metric_value(r, "auroc"))
    if not values:
        return False
    plots.auroc_bars(values, path)
    return True


def _plot_roc_curves(records: Sequence[Mapping], path: str) -> bool:
    """One ROC curve per (attack, model, detector setting) (the first seed's), one panel per attack."""
    curves: dict[str, list] = {}
    drawn = set()
    for r in records:
        if r.get("status") != "ok" or not isinstance(r.get("metrics", {}).get("roc"), Mapping):
            continue
        keys = ("method", "alpha", "top_k", "frr")
        det = {k: v for k, v in r["config"].get("detect", {}).items() if k in keys}
        key = (T.attack_label(r), T.model_label(r), json.dumps(det, sort_keys=True))
        if key in drawn:
            continue
        drawn.add(key)
        roc = r["metrics"]["roc"]
        method = f"{det['method']} " if det.get("method") else ""
        auroc = r["metrics"].get("auroc") or 0
        label = f"{key[1]} {method}α={det.get('alpha')} k={det.get('top_k')} (AUROC {auroc:.2f})"
        curves.setdefault(key[0], []).append((label, roc["fpr"], roc["tpr"]))
    if not curves:
        return False
    plots.roc_panels(curves, path)
    return True


# ---------------------------------------------------------------------------------------------------------------
# ``jdup report``: reading and the entry point


def latest_results(sweep_dir: str | os.PathLike) -> list[dict]:
    """Latest record per cell id from ``<sweep_dir>/results.jsonl`` (truncated/malformed lines skipped)."""
    path = os.fspath(sweep_dir)
    if os.path.isdir(path):
        path = os.path.join(path, "results.jsonl")
    if not os.path.isfile(path):
        raise JdupError("no results.jsonl here (is this a sweep folder?)", path)
    latest = {rec["id"]: rec for rec in sweep_store.read_results(path)}  # a rerun cell's newest record wins
    return list(latest.values())


def _grid_order(records: list[dict], sweep_dir: str) -> list[dict]:
    """Records in grid order: grouped by the value of the config's first (outermost) axis, e.g. the attack, and
    within a group in the order the folder's invocations first planned the cells (``known_cells`` of
    ``sweep.json``). So the rows of a run restricted by an axis override sit beside the earlier runs' rows of the
    same attack instead of before them all. Cells no plan lists keep their file order, last in their group."""
    try:
        with open(os.path.join(sweep_dir, "sweep.json"), encoding="utf-8") as f:
            plan = json.load(f)
        known = [c for c in plan.get("known_cells", plan["cells"]) if isinstance(c, dict)]
        axes = (plan.get("config") or {}).get("axes") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return records
    outer_keys: set[str] = set()
    if isinstance(axes, Mapping) and axes:
        name, values = next(iter(axes.items()))
        entries = values if isinstance(values, list) else [values]
        outer_keys = {str(k) for v in entries if isinstance(v, Mapping) for k in v} or {str(name)}

    def outer(point: Any) -> str:
        point = point if isinstance(point, Mapping) else {}
        return json.dumps({k: point[k] for k in sorted(outer_keys) if k in point}, sort_keys=True, default=str)

    group_rank: dict[str, int] = {}
    for point in [c.get("point") for c in known] + [r.get("point") for r in records]:
        group_rank.setdefault(outer(point), len(group_rank))
    pos = {c.get("id"): i for i, c in enumerate(known)}
    return sorted(records, key=lambda r: (group_rank[outer(r.get("point"))], pos.get(r.get("id"), len(pos))))


def run_report(sweep_dir: str | os.PathLike) -> dict:
    """Builds ``report.csv``, ``report.md`` and the plots in ``sweep_dir`` from its ``results.jsonl``.

    Args:
      sweep_dir: a folder written by :func:`jdup.sweep.run_sweep`.

    Returns:
      ``{"out", "cells", "ok", "failed", "settings", "files"}`` (``files``: paths written).

    Raises:
      JdupError: the folder has no ``results.jsonl``.
    """
    given = os.fspath(sweep_dir)
    sweep_dir = os.path.abspath(given)
    records = _grid_order(latest_results(sweep_dir), sweep_dir)
    failures = [r for r in records if r.get("status") != "ok"]
    axes, rows = T.summarize(records)
    name = next((r.get("sweep") for r in records if r.get("sweep")), os.path.basename(sweep_dir))
    files = []
    p = os.path.join(sweep_dir, "report.csv")
    atomic.write_text(p, T.to_csv(axes, rows))
    files.append(p)
    p = os.path.join(sweep_dir, "report.md")
    atomic.write_text(
        p,
        T.to_markdown(
            axes,
            rows,
            failures,
            title=f"sweep {name}: {len(records)} cells, {len(failures)} failed (mean ± std over seeds)",
            results=T.results_markdown(records, given),
        ),
    )
    files.append(p)
    for fn, fname in (
        (_plot_asr_vs_cacc, "asr_vs_cacc.png"),
        (_plot_auroc_per_attack, "auroc_per_attack.png"),
        (_plot_roc_curves, "roc_curves.png"),
    ):
        p = os.path.join(sweep_dir, fname)
        if fn(records, p):
            files.append(p)
        elif os.path.exists(p):  # no data for it now: a plot of an earlier report would be stale
            os.remove(p)
    return {
        "out": sweep_dir,
        "cells": len(records),
        "ok": len(records) - len(failures),
        "failed": len(failures),
        "settings": len(rows),
        "files": files,
    }
