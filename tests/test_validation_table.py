"""benchmarks/validation_table.py: groups victims by name, mean ± std over seeds, counts the goal per victim."""

import json

from benchmarks import validation_table as vt


def _write(path, rec):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_groups_seeds_and_counts_the_goal(tmp_path):
    runs = tmp_path / "runs"
    for seed, asr, cacc in [(2, 0.04, 0.80), (3, 0.10, 0.81), (4, 0.02, 0.77)]:
        name = f"val-sst2-badnets-s{seed}"
        trig = {"asr_trigger_after": 0.001} if seed == 3 else {}  # runs before the metric existed have none
        if seed == 4:
            trig.update(collapsed=True, best_step=2)  # the collapse guard returned the state of step 2
        _write(runs / "vu" / name / "defaults" / "metrics.json",
               dict(asr_before=1.0, asr_after=asr, cacc_before=0.79, cacc_after=cacc, n_flagged=10,
                    n_flagged_poison=9, steps=5, seconds=1.0, **trig))
        _write(runs / "vd" / name / "default" / "detection.json", {"auroc": 0.9 + seed / 100})
    _write(runs / "vu" / "val-sst2-addsent-s2" / "defaults" / "metrics.json",
           dict(asr_before=1.0, asr_after=0.01, cacc_before=0.8, cacc_after=0.8, n_flagged=1, n_flagged_poison=1,
                steps=1, seconds=1.0))
    _write(runs / "vu" / "tune-sst2-badnets-s1" / "defaults" / "metrics.json", {})  # not a validation victim
    groups = vt.collect(runs, "val-")
    assert sorted(groups) == ["val-sst2-addsent", "val-sst2-badnets"]
    assert sorted(groups["val-sst2-badnets"]) == [2, 3, 4]
    lines = vt.rows(groups)
    badnets = next(x for x in lines if x.startswith("| val-sst2-badnets (2, 3, 4) | defaults"))
    # ASR after 0.04, 0.10, 0.02: mean 0.053, sample std 0.042; the goal holds on seed 2 only (seed 3: ASR,
    # seed 4: a 2-point drop)
    assert "0.053 ± 0.042" in badnets and "0.9300 ± 0.0100" in badnets and "| 1 of 3 |" in badnets
    assert "< 3 seeds" in next(x for x in lines if x.startswith("| val-sst2-addsent"))
    assert vt.main(["--runs", str(runs), "--out", str(tmp_path / "v.md")]) == 0
    text = (tmp_path / "v.md").read_text()
    assert "val-sst2-badnets-s4 | defaults | 0.9400 | 10 (9)" in text
    assert "| 1.000 → 0.100 | 0.001 | 5 |" in text and "| 1.000 → 0.020 |  | 5 (collapsed: step 2 kept) |" in text
