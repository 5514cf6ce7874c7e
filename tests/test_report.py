"""Tests of `jdup report` (jdup.sweep.report, jdup.sweep.tables): mean ± std over seeds, CSV/Markdown tables,
plots, failures; and the figures of jdup.plots."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from jdup import plots
from jdup.errors import JdupError
from jdup.sweep import report as R
from jdup.sweep import tables as T


def _rec(cid, attack, lam, seed, cacc, asr, auroc, status="ok", seconds=2.0):
    return {
        "id": cid,
        "sweep": "unit",
        "status": status,
        "seed": seed,
        "point": {"data.dir": f"/data/sst-2/1/{attack}", "unlearn.lambda_asr": lam, "seed": seed},
        "config": {
            "data": {"dir": f"/data/sst-2/1/{attack}", "source": "dup"},
            "model": {"name": "builtin:minilm", "victim": f"/victims/{attack}/model"},
            "detect": {"alpha": 0.9, "top_k": 3, "frr": 0.05},
            "tags": {},
        },
        "metrics": {}
        if status != "ok"
        else {
            "cacc_before": 0.9,
            "asr_before": 1.0,
            "cacc_after": cacc,
            "asr_after": asr,
            "auroc": auroc,
            "frr": 0.05,
            "far": 0.1,
            "n_flagged": 40,
            "roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.9, 1.0]},
        },
        "time": {"seconds": seconds},
        **({"error": "RuntimeError: boom\nmore", "traceback": "Traceback ..."} if status != "ok" else {}),
    }


@pytest.fixture
def sweep_dir(tmp_path):
    recs = [
        _rec("a0", "badnets", 1.0, 0, 0.88, 0.10, 0.99),
        _rec("a1", "badnets", 1.0, 1, 0.86, 0.20, 0.97),
        _rec("b0", "badnets", 0.0, 0, 0.90, 0.90, 0.99),
        _rec("c0", "addsent", 1.0, 0, 0.80, 0.30, 0.80),
        _rec("f0", "addsent", 0.0, 0, 0, 0, 0, status="error"),
    ]
    with open(tmp_path / "results.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
        f.write(
            json.dumps({**recs[0], "metrics": {**recs[0]["metrics"], "asr_after": 0.0}}) + "\n"
        )  # rerun wins
        f.write('{"id": "trunc')  # a truncated last line is ignored
    return tmp_path


def test_summary_mean_std_over_seeds(sweep_dir):
    recs = R.latest_results(sweep_dir)
    assert len(recs) == 5
    axes, rows = T.summarize(recs)
    assert axes == ["data.dir", "unlearn.lambda_asr"]
    assert len(rows) == 3
    row = next(r for r in rows if r["data.dir"] == "badnets" and r["unlearn.lambda_asr"] == "1")
    assert row["n_seeds"] == 2
    assert row["asr_after_mean"] == pytest.approx(0.1)  # (0.0 [rerun] + 0.2) / 2
    assert row["asr_after_std"] == pytest.approx(np.std([0.0, 0.2], ddof=1))  # sample std, as the validation tables
    assert row["cacc_after_mean"] == pytest.approx(0.87)
    assert row["cacc_after_std"] == pytest.approx(np.std([0.88, 0.86], ddof=1))
    assert row["attack"] == "badnets" and row["model"] == "model" and row["method"] == "lambda_asr=1"
    single = [r for r in rows if r["n_seeds"] == 1 and r["cacc_after_mean"] is not None]
    assert single and all(r["cacc_after_std"] == 0.0 for r in single)  # one seed: std 0, not NaN


def test_run_report_writes_tables_and_plots(sweep_dir):
    out = R.run_report(sweep_dir)
    assert out["cells"] == 5 and out["ok"] == 4 and out["failed"] == 1 and out["settings"] == 3
    names = {p.rsplit("/", 1)[-1] for p in out["files"]}
    assert names == {"report.csv", "report.md", "asr_vs_cacc.png", "auroc_per_attack.png", "roc_curves.png"}
    for p in out["files"]:
        if p.endswith(".png"):
            assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO((sweep_dir / "report.csv").read_text())))
    assert len(rows) == 3 and float(rows[0]["asr_after_mean"]) == pytest.approx(0.1)
    md = (sweep_dir / "report.md").read_text()
    assert "| data.dir | unlearn.lambda_asr | seeds | CACC before" in md
    assert "0.870 ± 0.014" in md and "0.100 ± 0.141" in md
    assert "Failed cells (1)" in md and "RuntimeError: boom" in md and "more" not in md


def test_report_errors(tmp_path):
    with pytest.raises(JdupError, match="results.jsonl"):
        R.run_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("")
    out = R.run_report(tmp_path)  # an empty sweep still gives (empty) tables and no plots
    assert out["cells"] == 0 and len(out["files"]) == 2


def _cell(cid, seed, tags, detect, auroc, unlearn=True, after=None):
    metrics = {"auroc": auroc, "frr": 0.05, "far": 0.2, "n_flagged": 30, "n_flagged_poison": 25}
    metrics.update(detect_split_seed=seed, cacc_before=0.9, asr_before=1.0, ra_before=0.0)
    if unlearn:
        metrics.update(cacc_after=after[0], asr_after=after[1], ra_after=after[2], steps=10)
    return {
        "id": cid,
        "sweep": "full",
        "status": "ok",
        "seed": seed,
        "point": {"tags.attack": "badnets", **{f"tags.{k}": v for k, v in tags.items()}, "seed": seed},
        "config": {
            "data": {"dir": "/d/badnets"},
            "model": {"victim": "/v/badnets/model"},
            "detect": {"split_seed": 2025, "alpha": 0.9, **detect},
            "unlearn": {"enabled": unlearn},
            "tags": {"attack": "badnets", "model": "minilm", **tags},
        },
        "metrics": metrics,
        "time": {"seconds": 60.0, "detect_seconds": 5.0 if seed == 1 else 7.0},
        "versions": {"jdup": "0.1", "jax": "0.10", "backend": "cpu", "devices": 1},
    }


def test_results_tables_detection_per_detector_and_purification_per_method(tmp_path):
    """report.md starts with the run facts (from invocations.jsonl) and the two tables for the results docs: one
    detection row per detector setting (a detection shared by several cells counts once per calibration split),
    one purification row per method; both mean ± std over seeds, in the grid order of sweep.json."""
    recs = [
        _cell("d1", 1, {"detector": "dup"}, {"method": "dup"}, 0.90, unlearn=False),
        _cell("d2", 2, {"detector": "dup"}, {"method": "dup"}, 0.80, unlearn=False),
        _cell("f1", 1, {"method": "dup-faithful"}, {"method": "dup"}, 0.90, after=(0.88, 0.10, 0.85)),
        _cell("f2", 2, {"method": "dup-faithful"}, {"method": "dup"}, 0.80, after=(0.86, 0.30, 0.65)),
        _cell("g1", 1, {"method": "defaults"}, {"method": "fisher"}, 0.97, after=(0.90, 0.05, 0.90)),
        _cell("a1", 1, {"detector": "dup"}, {"method": "dup", "alpha": 0.5}, 0.95, unlearn=False),
    ]
    with open(tmp_path / "results.jsonl", "w") as f:
        for r in reversed(recs):  # written out of grid order; sweep.json puts them back
            f.write(json.dumps(r) + "\n")
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": [{"id": r["id"]} for r in recs]}))
    machine = {"host": "box", "cpu": "AMD EPYC", "cpu_count": 2, "cpus_usable": 2, "memory_gb": 23.5}
    inv = [
        {"command": "jdup sweep configs/sweeps/sst2_full.yaml", "seconds": 3000.0, "machine": {**machine, "load_1min": 1.5}},
        {"command": "jdup sweep configs/sweeps/sst2_full.yaml", "seconds": 1000.0, "load_1min_end": 3.0},
    ]
    (tmp_path / "invocations.jsonl").write_text("".join(json.dumps(i) + "\n" for i in inv) + '{"trunc')

    ordered = R._grid_order(R.latest_results(tmp_path), str(tmp_path))
    assert [r["id"] for r in ordered] == [r["id"] for r in recs]
    det = T.detection_rows(ordered)
    assert [r["detector"] for r in det] == ["dup (alpha=0.9)", "fisher", "dup (alpha=0.5)"]
    dup = det[0]
    assert dup["n_seeds"] == 2 and dup["auroc_mean"] == pytest.approx(0.85) and dup["auroc_std"] == pytest.approx(0.05 * 2**0.5)
    assert dup["detect_seconds_mean"] == pytest.approx(6.0)  # one entry per split seed, not per cell
    pur = T.purification_rows(ordered)
    assert [(r["method"], r["n_seeds"]) for r in pur] == [("dup-faithful", 2), ("defaults", 1)]
    ordered[4]["metrics"]["collapsed"] = True  # the collapse guard returned an earlier state in that cell
    assert [r["method"] for r in T.purification_rows(ordered)] == ["dup-faithful", "defaults (1 collapsed)"]
    ordered[4]["metrics"]["collapsed"] = False
    assert pur[0]["ra_after_mean"] == pytest.approx(0.75) and pur[0]["asr_after_std"] == pytest.approx(0.1 * 2**0.5)

    R.run_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "- **Command:** `jdup sweep configs/sweeps/sst2_full.yaml`, then `jdup report " in md
    assert "- **Machine:** box: AMD EPYC, 2 cores, 23.5 GB; 1-minute load average 1.5–3.0" in md
    assert "- **Wall time:** 1 h 06 min over 2 invocation(s)" in md
    assert "| attack | detector | seeds | AUROC | FRR | FAR | flagged (dev) | poison flagged (dev) | time (s) |" in md
    assert "| badnets | dup (alpha=0.9) | 2 | 0.850 ± 0.071 | 0.050 ± 0.000 | 0.200 ± 0.000 | 30 ± 0 | 25 ± 0 | 6.0 ± 1.4 |" in md
    assert "| badnets | dup-faithful | 2 | 0.900 ± 0.000 | 1.000 ± 0.000 | 0.000 ± 0.000 | 0.870 ± 0.014 | 0.200 ± 0.141 |" in md
    assert md.index("### Detection") < md.index("### Purification") < md.index("## All settings")


def test_every_figure_goes_through_jdup_plots(tmp_path):
    """jdup.plots is the one module that draws (and writes each PNG through jdup.atomic: no temporary left)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "jdup"
    drawing = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "matplotlib" in p.read_text())
    assert drawing == ["plots.py"]
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    plots.roc_plot(y, s, str(tmp_path / "roc.png"), extra={"md": s[::-1].copy()})
    plots.score_histogram(s, y, 0.5, str(tmp_path / "hist.png"))
    plots.before_after_bars(
        {"cacc_before": 0.9, "cacc_after": 0.88, "asr_before": 1.0, "asr_after": 0.05}, str(tmp_path / "run.png")
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["hist.png", "roc.png", "run.png"]
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_of_a_restricted_run_join_their_attack(tmp_path):
    """Two invocations of one sweep folder, the second restricted to a new row by an axis override: the report
    orders cells by attack (the first axis), then by when a plan first named them, not the second run first.
    The victims do not exist, so every cell fails at once and is recorded (failed cells are ordered too)."""
    from jdup.sweep import engine

    attacks = [{"data.dir": str(tmp_path / a), "model.victim": str(tmp_path / a / "model"), "tags.attack": a}
               for a in ("badnets", "addsent")]
    rows = [{"tags.method": "defaults"}, {"tags.method": "gradient", "unlearn.projection": "gradient"}]
    base = {"name": "t", "progress": False, "fixed": {"data": {"source": "dup"}, "model": {"name": "builtin:minilm"}}}
    out = tmp_path / "sweep"
    engine.run_sweep({**base, "axes": {"attack": attacks, "row": rows[:1], "seed": [1, 2]}}, out)
    engine.run_sweep({**base, "axes": {"attack": attacks, "row": rows[1:], "seed": [1]}}, out)
    plan = json.loads((out / "sweep.json").read_text())
    assert len(plan["cells"]) == 2 and len(plan["known_cells"]) == 6  # this run's plan; every plan's cells
    ordered = R._grid_order(R.latest_results(out), str(out))
    assert all(r["status"] != "ok" for r in ordered) and len(ordered) == 6
    got = [(r["point"]["tags.attack"], r["point"]["tags.method"], r["point"]["seed"]) for r in ordered]
    assert got == [("badnets", "defaults", 1), ("badnets", "defaults", 2), ("badnets", "gradient", 1),
                   ("addsent", "defaults", 1), ("addsent", "defaults", 2), ("addsent", "gradient", 1)]
