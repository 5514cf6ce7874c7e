"""Fewer distinct shapes (issue 15): sparse detection buckets and sparse unlearning lengths are merged upward.

Each padded length compiles a jitted function once; a length only a few rows (detection) or steps (unlearning)
would use costs more to compile than the padding it saves. Merging changes padding only: detection scores move by
float rounding, unlearning batches keep their rows.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from jdup import data, detect, models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_merge_sparse_buckets():
    m = data.merge_sparse_buckets
    bks = (8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 512)
    lengths = [5] * 88 + [12] * 768 + [20] * 950 + [50] * 77 + [60] * 17 + [70] * 3
    # 8 (88 rows) -> 16; 56 (77) + 64 (17) -> 72 (the longest used bucket is always kept); unused ones stay
    assert m(lengths, bks, 128) == (16, 24, 32, 40, 48, 72, 80, 512)
    assert m(lengths, bks, 0) == m(lengths, bks, 1) == bks  # off
    assert m([], bks, 128) == bks
    assert m([3, 100], (8, 16, 512), 2) == (512,)  # the lone short row joins the long one
    assert m([3] * 10 + [9], (8, 16, 32), 5) == (8, 16, 32)  # a sparse top bucket is kept
    assert m([600], (8, 512), 5) == (8, 512)  # longer than every bucket: the last one


@pytest.fixture(scope="module")
def sets(sst2_dir):
    folder = sst2_dir / "badnets"
    calib = data.read_split(folder, "dev-clean").subset(np.arange(96))
    det = data.read_split(folder, "test-detect")
    return calib, det.subset(np.r_[0:60, len(det) - 40 : len(det)])


def test_detection_buckets_from_the_histogram_change_only_rounding(tiny_bert, sets, monkeypatch):
    cfg = detect.DetectSettings(batch_size=8, max_length=64, progress=False, bucket_min_rows=0)
    shapes: list[int] = []
    real_batches = data.batches

    def spy(enc, *a, **kw):
        for b in real_batches(enc, *a, **kw):
            shapes.append(b["input_ids"].shape[1])
            yield b

    monkeypatch.setattr(data, "batches", spy)  # detect and features both call jdup.data.batches
    every = detect.detect(*tiny_bert, *sets, cfg)
    every_shapes, shapes[:] = set(shapes), []
    merged = detect.detect(*tiny_bert, *sets, dataclasses.replace(cfg, bucket_min_rows=48))
    merged_shapes = set(shapes)
    assert len(merged_shapes) < len(every_shapes), (every_shapes, merged_shapes)
    np.testing.assert_allclose(merged.scores, every.scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(merged.md, every.md, rtol=1e-4)
    np.testing.assert_allclose(merged.ss, every.ss, rtol=1e-4, atol=1e-5)
    assert merged.layers == every.layers
    assert (merged.flags != every.flags).sum() <= 1  # a row at the threshold may flip on rounding


def _encoded(n: int, lengths: np.ndarray, max_length: int = 64) -> data.Encoded:
    ids = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
    return data.Encoded(ids * 5, ids, np.zeros_like(ids), lengths.astype(np.int32), np.arange(n) % 2,
                        np.zeros(n, np.int8), (64,), 0)


@dataclasses.dataclass
class _Cfg:
    batch_size: int = 8
    seed: int = 3
    length_group: int = 4
    pad_multiple: int = 8
    epochs: int = 2
    pad_min_steps: int = 0


def test_unlearning_plan_merges_sparse_lengths_keeping_the_rows():
    rng = np.random.default_rng(0)
    forget = _encoded(40, rng.integers(3, 60, 40))
    retain = _encoded(64, rng.integers(3, 60, 64))
    base = data.BatchPlan.from_config(forget, retain, _Cfg())
    thin = data.BatchPlan.from_config(forget, retain, _Cfg(pad_min_steps=4))
    steps = base.per_epoch * 2

    def length(plan, s):
        return max(plan.forget_batch(s)["input_ids"].shape[1], plan.clean_batch(s)["input_ids"].shape[1])

    before = collections.Counter(length(base, s) for s in range(steps))
    after = collections.Counter(length(thin, s) for s in range(steps))
    assert len(after) < len(before) and min(after.values()) >= 4 or len(after) == 1, (before, after)
    for s in range(steps):
        for a, b in ((base.forget_batch(s), thin.forget_batch(s)), (base.clean_batch(s), thin.clean_batch(s))):
            np.testing.assert_array_equal(a["index"], b["index"])  # same rows, only the padding differs
            assert b["input_ids"].shape[1] >= a["input_ids"].shape[1]
            w = a["input_ids"].shape[1]
            np.testing.assert_array_equal(b["input_ids"][:, :w], a["input_ids"])
            assert not b["attention_mask"][:, w:].any()
        assert length(thin, s) >= length(base, s)
    assert base.step_lengths(steps).max() <= 60
    # off (0) is the plain pad_multiple plan, and a settings object without the field behaves the same
    plain = data.BatchPlan(forget, retain, 8, 3, length_group=4, pad_multiple=8)
    assert [length(plain, s) for s in range(steps)] == [length(base, s) for s in range(steps)]


def test_unlearn_settings_default():
    from jdup.settings import UnlearnSettings

    assert UnlearnSettings().pad_min_steps == 8 and detect.DetectSettings().bucket_min_rows == 128


# ---------------------------------------------------------------------------------------------------------------
# No plot work in the hot path: `jdup detect` draws after the timing, the detection inside `jdup unlearn` not at all


def test_plots_after_the_timing_and_opt_in_for_unlearning(tmp_path, tiny_model_dir, sets):
    import json

    from jdup.stages import detect as detect_stage

    calib, scored = sets
    folder = tmp_path / "data"
    data.write_dup_csv(calib, folder / "dev-clean.csv")
    data.write_dup_csv(scored, folder / "test-detect.csv")
    data.write_dup_csv(scored.subset(np.arange(60, 80)), folder / "dev-poison.csv")
    kw = dict(model=str(tiny_model_dir), data=str(folder), batch_size=16, max_length=32, progress=False)
    out = tmp_path / "out"
    res = detect_stage.run_detect(detect_stage.DetectConfig(out=str(out), **kw))  # plots=None: yes for jdup detect
    assert (out / "roc.png").is_file() and (out / "hist.png").is_file()
    on_disk = json.loads((out / "detection.json").read_text())
    assert on_disk["seconds_plots"] > 0 and on_disk["seconds"] == res["seconds"]
    assert {"roc.png", "hist.png"} <= set(on_disk["files"])
    model = models.from_pretrained(str(tiny_model_dir))
    opts = {"batch_size": 16, "max_length": 32, "progress": False}
    _, info = detect_stage.detect_dev(model, str(tiny_model_dir), str(folder), str(tmp_path / "dev"), opts)
    assert not list((tmp_path / "dev").glob("*.png")) and "roc.png" not in info["files"]
    _, info = detect_stage.detect_dev(model, str(tiny_model_dir), str(folder), str(tmp_path / "dev2"),
                                      {**opts, "plots": True})
    assert (tmp_path / "dev2" / "roc.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# `jdup unlearn` reads its data once: detection in memory on the splits it read, flags kept in memory


@pytest.mark.slow
def test_unlearn_reads_the_splits_once_and_detects_in_memory(tmp_path, tiny_model_dir, sets, monkeypatch):
    import json

    from jdup.settings import UnlearnConfig
    from jdup.stages import unlearn as unlearn_stage

    calib, scored = sets
    folder = tmp_path / "data"
    clean, poison = scored.subset(np.arange(60)), scored.subset(np.arange(60, 100))
    data.write_dup_csv(calib, folder / "dev-clean.csv")
    data.write_dup_csv(poison.subset(np.arange(20)), folder / "dev-poison.csv")
    data.write_dup_csv(clean, folder / "test-clean.csv")
    data.write_dup_csv(poison, folder / "test-poison.csv")
    reads, encodes, loads = [], [], []
    real_read, real_encode, real_load = data.read_split, data.encode, np.load
    monkeypatch.setattr(data, "read_split", lambda f, name, *a, **kw: reads.append(name) or real_read(f, name, *a, **kw))
    monkeypatch.setattr(data, "encode", lambda tok, ds, *a, **kw: encodes.append(len(ds)) or real_encode(tok, ds, *a, **kw))
    monkeypatch.setattr(np, "load", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    cfg = UnlearnConfig(model=str(tiny_model_dir), data=str(folder), out=str(tmp_path / "out"), epochs=1,
                        batch_size=8, max_length=32, progress=False, ckpt_every_steps=0, allow_empty_forget=True,
                        detect={"batch_size": 16, "max_length": 32, "buckets": [16, 32], "frr": 0.3})
    res = unlearn_stage.run_unlearn(cfg)
    assert sorted(reads) == ["dev-clean", "dev-poison", "test-clean", "test-poison"]  # each split read once
    assert not loads  # the flags never go through flags.npy
    # unlearning tokenises the four splits once; detection its calibration half C and V ∪ (dev-detect rows that are
    # not calibration rows): dev-detect's 96 dev-clean rows take their C / V scores, only its 20 poison rows are new
    assert sorted(encodes) == sorted([96, 20, 60, 40, 48, 48 + 20])  # no second tokenisation of dev-detect
    assert res.stage == "unlearn" and res.record["n_flagged"] == res["n_flagged"] > 0
    det = json.loads((tmp_path / "out" / "detection" / "detection.json").read_text())
    assert det["n_scored"] == 96 + 20 and det["mesh"] == res.record["mesh"] and det["process_count"] == 1
    flags = real_load(tmp_path / "out" / "detection" / "flags.npy")
    assert int(flags.sum()) == res.record["n_flagged"]
