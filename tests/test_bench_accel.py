"""The accelerator benchmark set: its helpers, and the whole script in --dry-run mode (tiny shapes on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import accel_common as A  # noqa: E402
from benchmarks import common as C  # noqa: E402
from tests.helpers.subproc import xla_flags  # noqa: E402


def test_length_histogram_sampling():
    assert sum(c for _, c in A.SST2_LENGTH_HIST) == A.SST2_TEST_DETECT_ROWS
    lengths = A.sample_lengths(20000, np.random.default_rng(0))
    assert lengths.min() >= 4 and lengths.max() <= 71
    assert 23.5 < lengths.mean() < 27.5  # SST-2 test-detect: mean 25.4
    assert (A.sample_lengths(100, np.random.default_rng(1), max_len=16) <= 16).all()


def test_token_batch_and_rows():
    b = A.token_batch(8, 64, 30522, seed=3)
    ids, mask, n = b["input_ids"], b["attention_mask"], b["lengths"]
    assert ids.shape == (8, 64) and ids.dtype == np.int32
    np.testing.assert_array_equal(mask.sum(1), n)
    assert (ids[:, 0] == A.CLS).all() and (ids[np.arange(8), n - 1] == A.SEP).all()
    assert (ids[mask == 0] == A.PAD).all() and (ids[mask == 1] != A.PAD).all()
    again = A.token_batch(8, 64, 30522, seed=3)
    np.testing.assert_array_equal(again["input_ids"], ids)  # both workers get the same rows
    dec = A.token_batch(4, 32, 128256, seed=4, pad_id=128009, bos=128000, eos=None)
    assert (dec["input_ids"][dec["attention_mask"] == 1] != 128009).all()
    rows = A.synthetic_rows(50, 5, 1000, 32, poison_frac=0.5)
    assert sum(p for _, _, p in rows) == 25 and max(A.token_lengths(rows)) <= 32


def test_synthetic_tokenizer_counts_match():
    pytest.importorskip("tokenizers")
    tok = A.synthetic_tokenizer(1000)
    rows = A.synthetic_rows(20, 6, 1000, 64)
    enc = tok([r[0] for r in rows])["input_ids"]
    assert [len(e) for e in enc] == A.token_lengths(rows)
    assert all(e[0] == A.CLS and e[-1] == A.SEP for e in enc)
    assert tok.pad_token_id == A.PAD


def test_decoder_flops():
    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=4)  # fmt: skip
    per_tok = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)
    assert A.decoder_forward_flops([3], cfg) == 2 * (3 * per_tok + 4 * 9 * 2 * 4)


def test_rows_and_markdown_without_results():
    from benchmarks import run_accel_set as R

    peaks = R._peaks_block({}, {})
    rows = R.build_rows({"sections": {}}, {"sections": {}}, peaks, A.DRY)
    assert {r["bench"] for r in rows} >= {"accel_peaks", "accel_detect", "accel_sweep"}
    header = {
        "machine": C.machine_info(),
        "versions": {},
        "peaks": peaks | {"n_peak": None},
        "set_wall_s": 0.0,
    }
    md = R.markdown(rows, header)
    assert "| row | jdup |" in md and "Not measured" in md


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """``run_accel_set.py --dry-run``: every section of the workers runs on the CPU and every row is complete."""
    torch_ok = all(
        __import__("importlib").util.find_spec(m) is not None
        for m in ("torch", "transformers", "peft", "sklearn")
    )
    out = tmp_path / "accel.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_accel_set.py"), "--dry-run", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, "XLA_FLAGS": xla_flags()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["bench"], []).append(r)
    assert set(by) == {
        "accel_peaks", "accel_encoder_forward", "accel_decoder_forward", "accel_detect", "accel_unlearn_step",
        "accel_sweep", "accel_mesh_detect", "accel_mesh_unlearn_step", "accel_mesh_decoder_forward",
    }  # fmt: skip
    for r in rows:  # every line: machine, versions, both peaks, precision pin
        assert r["machine"]["cpu"] and r["machine"]["cores"] >= 1 and r["versions"]["jax"]
        assert r["peaks"]["jax_gflops"] > 0 and r["peaks"]["jax_bfloat16_gflops"] > 0
        if torch_ok:
            assert r["peaks"]["torch_gflops"] > 0 and r["peaks"]["torch_bfloat16_gflops"] > 0
        assert r["dry_run"] is True
    sides = ("jdup", "torch") if torch_ok else ("jdup",)
    for name in ("accel_encoder_forward", "accel_decoder_forward"):
        assert sorted(r["dtype"] for r in by[name]) == ["bfloat16", "float32"]
        for r in by[name]:
            for side in sides:
                assert r[side]["error"] is None, r[side]["error"]
                assert r[side]["batch_s"] > 0 and r[side]["tokens_per_s"] > 0 and r[side]["mfu_chip_bf16"] > 0
            want = "highest" if r["dtype"] == "float32" else "default"
            assert r["jdup"]["jax_default_matmul_precision"] == want
            if torch_ok:
                assert r["normalised"]["speedup_raw"] > 0 and r["normalised"]["mfu_ratio"] > 0
    d = by["accel_detect"][0]
    assert d["rows_scored"] == A.DRY.scored_rows and d["flops_real"] > 0
    for side in sides:
        assert d[side]["error"] is None, d[side]["error"]
        assert d[side]["rows_per_s"] > 0
    if torch_ok:  # same weights, same rows: the two detectors agree
        assert abs(d["jdup"]["auroc"] - d["torch"]["auroc"]) <= 0.02
    u = by["accel_unlearn_step"][0]
    for side in sides:
        assert u[side]["error"] is None, u[side]["error"]
        assert u[side]["step_s"] > 0 and u[side]["steps"] == A.DRY.unlearn_steps
    assert sorted(r["k"] for r in by["accel_sweep"]) == list(A.DRY.sweep_ks)
    assert all(r["per_cell_s"] > 0 for r in by["accel_sweep"])
    # the multi-device rows: their own worker on 4 simulated CPU devices
    for name in ("accel_mesh_detect", "accel_mesh_unlearn_step"):
        assert {r["spec"]: r["mesh"] for r in by[name]} == {"1": {"data": 1, "model": 1}, "auto": {"data": 4, "model": 1}}
        for r in by[name]:
            assert r["error"] is None, r["error"]
            assert r["devices"] == 4 and r["speedup_vs_mesh_1"] > 0
    assert all(r["rows_per_s"] > 0 and r["rows_scored"] == A.DRY.scored_rows for r in by["accel_mesh_detect"])
    assert all(r["step_s"] > 0 and r["steps"] == A.DRY.unlearn_steps for r in by["accel_mesh_unlearn_step"])
    (dec,) = by["accel_mesh_decoder_forward"]
    assert dec["error"] is None and dec["mesh"] == {"data": 2, "model": 2} and dec["batch_s"] > 0
    hidden = dec["q_proj_shard_shape"][0]
    assert dec["q_proj_shard_shape"] == [hidden, hidden // 2]  # q_proj [in, out@model]: split over model = 2
    md = out.with_suffix(".md").read_text()
    assert "DRY RUN" in md and "vmapped sweep" in md and "Not measured" not in md
    assert "DUP detection on mesh auto (4x1)" in md and "on mesh 2x2" in md
