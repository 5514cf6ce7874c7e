"""jdup.detect: the DUP split, one pass per sample, decision rules, outputs, and end to end on real victims."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jdup import data, detect, models, predict
from jdup.errors import JdupError
from jdup.stages import detect as detect_stage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_split_calibration_is_pythons_random_shuffle():
    for n in (872, 101):
        lst = list(range(n))
        random.seed(2025)
        random.shuffle(lst)
        c, v = detect.split_calibration(n, 2025, 0.5)
        assert c.tolist() == lst[: n // 2]
        assert v.tolist() == lst[n // 2 :]
    c, v = detect.split_calibration(872, 2025, 0.5, max_samples=200)
    assert len(c) == len(v) == 100 and max(c.max(), v.max()) < 200
    c, v = detect.split_calibration(100, 2024, 0.8)
    assert (len(c), len(v)) == (80, 20)
    with pytest.raises(JdupError):
        detect.split_calibration(3, 2025, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Fast checks on a random tiny BERT


@pytest.fixture(scope="module")
def small_sets(sst2_dir):
    folder = sst2_dir / "badnets"
    calib = data.read_split(folder, "dev-clean").subset(np.arange(80))
    det = data.read_split(folder, "test-detect")
    scored = det.subset(np.r_[0:30, len(det) - 20 : len(det)])
    return calib, scored


CFG = detect.DetectSettings(method="dup", batch_size=16, max_length=32, buckets=(16, 32), progress=False)


@pytest.fixture(scope="module")
def tiny_result(tiny_bert, small_sets):
    return detect.detect(*tiny_bert, *small_sets, CFG)


def test_decision_rule_and_shapes(tiny_result, small_sets):
    r = tiny_result
    _, scored = small_sets
    n = len(scored)
    for a in (r.scores, r.flags, r.md, r.ss, r.z_md, r.z_ss, r.preds):
        assert a.shape == (n,)
    assert r.threshold == pytest.approx(np.percentile(r.val_scores, 95.0))
    np.testing.assert_array_equal(r.flags, r.scores > r.threshold)
    np.testing.assert_allclose(r.scores, 0.9 * r.z_md + 0.1 * r.z_ss, rtol=1e-12)
    assert len(r.layers) == 2 and len(set(r.layers)) == 2  # tiny BERT has 2 layers, top-3 -> both
    assert r.md_layers.shape == (n, 2)
    assert r.metrics["n_scored"] == n and r.metrics["n_poison"] == 20
    for key in (
        "auroc",
        "auroc_md",
        "auroc_ss",
        "frr",
        "far",
        "precision",
        "recall",
        "f1",
        "cacc_filtered",
        "asr_filtered",
    ):
        assert key in r.metrics
    assert r.metrics["frr_validation"] <= 0.05 + 1e-9
    assert len(r.calib_index) == len(r.val_index) == 40


def test_one_forward_pass_per_sample(tiny_bert, small_sets, monkeypatch):
    seen = []
    real = predict.run_batches

    def counting(fn, batch_iter, n_rows, **kw):
        def it():
            for b in batch_iter:
                seen.extend(b["index"][b["valid"]].tolist())
                yield b

        return real(fn, it(), n_rows, **kw)

    monkeypatch.setattr(predict, "run_batches", counting)
    calib, scored = small_sets
    detect.detect(*tiny_bert, calib, scored, CFG)
    # calibration half once (pass 1), then validation half + scored rows once (pass 2)
    assert len(seen) == 40 + 40 + len(scored)


def test_scored_rows_that_are_calibration_rows_are_not_forwarded_again(tiny_bert, small_sets, monkeypatch):
    """A scored set holding the calibration rows (unlearning's dev-detect = dev-clean ‖ dev-poison) is scored from
    the calibration passes for those rows: the same scores, flags and logits as when every row is forwarded."""
    import dataclasses

    calib, scored = small_sets
    # the calibration rows (both halves, shuffled) among the scored rows
    both = data.TextDataset.concat([calib.subset(np.random.default_rng(1).permutation(len(calib))), scored])
    # the same rows with a trailing space: the same tokens, but other texts, so all of them are forwarded
    spaced = dataclasses.replace(both, texts=[t + " " for t in both.texts])
    seen = []
    real = predict.run_batches

    def counting(fn, batch_iter, n_rows, **kw):
        seen.append(n_rows)
        return real(fn, batch_iter, n_rows, **kw)

    monkeypatch.setattr(predict, "run_batches", counting)
    shared = detect.detect(*tiny_bert, calib, both, CFG)
    assert sum(seen) == 40 + 40 + len(scored)  # each distinct row once
    seen.clear()
    full = detect.detect(*tiny_bert, calib, spaced, CFG)
    assert sum(seen) == 40 + 40 + len(both)
    np.testing.assert_allclose(shared.scores, full.scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(shared.md_layers, full.md_layers, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(shared.flags, full.flags)
    np.testing.assert_array_equal(shared.preds, full.preds)
    assert shared.threshold == pytest.approx(full.threshold, rel=1e-6)
    # the result's logits are the model's (what a second forward would give)
    np.testing.assert_allclose(shared.logits, predict.predict(tiny_bert[0], data.encode(
        tiny_bert[1], both, CFG.max_length, buckets=CFG.buckets), 16), rtol=1e-4, atol=1e-5)


def test_scores_follow_rows_when_the_scored_set_is_permuted(tiny_bert, small_sets, tiny_result):
    calib, scored = small_sets
    perm = np.random.default_rng(0).permutation(len(scored))
    r = detect.detect(*tiny_bert, calib, scored.subset(perm), CFG)
    np.testing.assert_allclose(r.scores, tiny_result.scores[perm], rtol=1e-4, atol=1e-5)
    assert r.threshold == pytest.approx(tiny_result.threshold, rel=1e-5)
    # scoring in small chunks (bounded host memory) gives the same result
    import dataclasses

    rc = detect.detect(*tiny_bert, calib, scored, dataclasses.replace(CFG, chunk_rows=16))
    np.testing.assert_allclose(rc.scores, tiny_result.scores, rtol=1e-4, atol=1e-5)


def test_alpha_extremes_purification_mode_and_dan(tiny_bert, small_sets, tiny_result):
    import dataclasses

    calib, scored = small_sets
    r1 = detect.detect(*tiny_bert, calib, scored, dataclasses.replace(CFG, alpha=1.0))
    np.testing.assert_allclose(r1.scores, tiny_result.z_md, rtol=1e-5, atol=1e-6)
    r0 = detect.detect(*tiny_bert, calib, scored, dataclasses.replace(CFG, alpha=0.0, md_layers=(1,), top_k=None))
    np.testing.assert_allclose(r0.scores, r0.z_ss, rtol=1e-12)
    assert r0.layers == [1]
    rp = detect.detect(*tiny_bert, calib, scored, dataclasses.replace(CFG, purification_mode=True))
    assert rp.threshold == pytest.approx(np.percentile(rp.scores, 80.0))
    assert rp.flags.sum() == int(np.sum(rp.scores > rp.threshold))
    rd = detect.detect(*tiny_bert, calib, scored, dataclasses.replace(CFG, method="dan"))
    assert rd.layers == [0, 1] and rd.md_layers.shape == (len(scored), 2)
    assert rd.threshold == pytest.approx(np.percentile(rd.val_scores, 95.0))


def _numpy_decision(per_layer, ss, n_val, cfg):
    """The host decision as plain NumPy (the reference jdup.detect.decide must reproduce bit for bit)."""

    def zfit(x):
        mean, std = x.mean(0), x.std(0)
        return mean, np.where(std < 1e-6, 1.0, std)

    per_layer = np.asarray(per_layer, np.float64)
    if cfg.method in ("dup", "fisher"):
        md = per_layer.mean(1) if cfg.agg == "mean" else per_layer.max(1)
        s = np.asarray(ss, np.float64)
    else:
        m, sd = zfit(per_layer[:n_val])
        z = (per_layer - m) / sd
        md = z.max(1) if cfg.dan_agg == "max" else z.mean(1)
        s = np.zeros_like(md)
    (mm, ms), (sm, ssd) = zfit(md[:n_val]), zfit(s[:n_val])
    z_md, z_ss = (md - mm) / ms, (s - sm) / ssd
    if cfg.method == "fisher":
        from jdup import fusion

        fused = fusion.fisher_scores([md, s], n_val)
    else:
        alpha = cfg.alpha if cfg.method == "dup" else 1.0
        fused = alpha * z_md + (1.0 - alpha) * z_ss
    val, sc = fused[:n_val], fused[n_val:]
    if cfg.purification_mode:
        tau = float(np.percentile(sc, cfg.purification_percentile))
    else:
        tau = float(np.percentile(val, (1.0 - cfg.frr) * 100.0))
    return sc, sc > tau, tau, z_md, z_ss


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="dup"),
        dict(method="dup", agg="max", alpha=0.7, frr=0.1),
        dict(method="fisher"),
        dict(method="dan"),
        dict(method="dan", dan_agg="mean"),
        dict(method="dup", purification_mode=True, purification_percentile=73.0),
    ],
)
def test_decision_through_jdup_scores_is_bit_identical_to_numpy(kw):
    """`decide` runs jdup.scores' decision functions; on host float64 scalars it gives exactly NumPy's numbers."""
    rng = np.random.default_rng(11)
    per_layer, ss = rng.gamma(2.0, size=(900, 4)), rng.normal(size=900)
    per_layer[:, 2] = 3.0  # a constant layer: its std is replaced by 1, as in DUP
    cfg = detect.DetectSettings(**kw)
    d = detect.decide(per_layer, ss, 400, cfg)
    sc, flags, tau, z_md, z_ss = _numpy_decision(per_layer, ss, 400, cfg)
    assert np.array_equal(d.scores, sc) and np.array_equal(d.flags, flags) and d.threshold == tau
    assert np.array_equal(d.z_md, z_md) and np.array_equal(d.z_ss, z_ss)
    assert 0 < d.flags.sum() < len(d.flags)


def test_scores_decision_functions_run_on_device_too():
    """The same functions on JAX arrays (float32 on device) agree with the host decision to float32 rounding."""
    import jax.numpy as jnp

    from jdup import scores as S

    rng = np.random.default_rng(5)
    val, sc = rng.normal(size=300), rng.normal(size=500)
    host = S.flag(S.zscore(S.fit_zscore(sc[:300]), sc), S.threshold_at_frr(val, 0.05))
    dev = S.flag(S.zscore(S.fit_zscore(jnp.asarray(sc[:300])), jnp.asarray(sc)), S.threshold_at_frr(jnp.asarray(val)))
    assert isinstance(host, np.ndarray) and not isinstance(dev, np.ndarray)
    assert np.mean(np.asarray(dev) == host) > 0.99


def test_bad_settings_raise_jdup_error(tiny_bert, small_sets):
    import dataclasses

    calib, scored = small_sets
    for bad in (
        dict(alpha=1.5),
        dict(frr=0.0),
        dict(method="strip"),
        dict(md_layers=(7,)),
        dict(ss_layers=(1,)),
    ):
        with pytest.raises(JdupError):
            detect.detect(*tiny_bert, calib, scored, dataclasses.replace(CFG, **bad))


@pytest.mark.slow
def test_run_detect_writes_outputs(tmp_path, small_sets):
    calib, scored = small_sets
    model_dir = tmp_path / "model"
    models.save_pretrained(models.tiny_model("bert", 2, seed=1), model_dir, tokenizer_src="builtin:minilm")
    folder = tmp_path / "data"
    data.write_dup_csv(calib, folder / "dev-clean.csv")
    data.write_dup_csv(scored, folder / "test-detect.csv")
    out = tmp_path / "out"
    cfg = detect_stage.DetectConfig(
        model=str(model_dir),
        data=str(folder),
        out=str(out),
        batch_size=16,
        max_length=32,
        buckets=(16, 32),
        progress=False,
    )
    res = detect_stage.run_detect(cfg)
    for f in ("detection.json", "scores.npy", "flags.npy", "components.npz", "roc.png", "hist.png"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "detection.json").read_text())
    for key in (
        "auroc",
        "auroc_md",
        "auroc_ss",
        "frr",
        "far",
        "threshold",
        "layers",
        "n_scored",
        "n_flagged",
        "seconds",
    ):
        assert key in on_disk, key
    assert on_disk["n_scored"] == len(scored)
    s = np.load(out / "scores.npy")
    assert s.shape == (len(scored),) and s.dtype == np.float32
    np.testing.assert_array_equal(np.load(out / "flags.npy"), s > res["threshold"])
    assert not list(out.glob("*.tmp-*"))
    # dev-detect via detect_dev (what unlearning calls) needs dev-poison too
    data.write_dup_csv(scored.subset(np.arange(30, 50)), folder / "dev-poison.csv")
    flags, info = detect_stage.detect_dev(
        models.from_pretrained(str(model_dir)),
        str(model_dir),
        str(folder),
        str(tmp_path / "dev"),
        {"seed": 2025, "batch_size": 16, "max_length": 32, "progress": False},
    )
    assert flags.shape == (len(calib) + 20,) and info["n_scored"] == len(calib) + 20
    with pytest.raises(JdupError):
        detect_stage.detect_dev(None, str(model_dir), str(folder), str(tmp_path / "dev2"), {"no_such_key": 1})


# ---------------------------------------------------------------------------------------------------------------
# End to end on real backdoored MiniLM victims (trained once per session, see tests/helpers/victim.py)


def _e2e(victim, tmp_path, **kw):
    cfg = detect_stage.DetectConfig(
        model=victim["model"],
        data=victim["data"],
        out=str(tmp_path / "det"),
        batch_size=32,
        max_length=48,
        progress=False,
        **kw,
    )
    res = detect_stage.run_detect(cfg)
    print(
        f"\n{victim['data']}: AUROC {res['auroc']:.4f} (MD {res['auroc_md']:.4f}, SS {res['auroc_ss']}), "
        f"FRR {res['frr']:.3f}, FAR {res['far']:.3f}, layers {res['layers']}, victim ASR "
        f"{victim['metrics'].get('asr')}"
    )
    return res


@pytest.mark.slow
def test_e2e_badnets(badnets_victim, tmp_path):
    assert badnets_victim["metrics"]["asr"] > 0.8  # the victim really is backdoored
    res = _e2e(badnets_victim, tmp_path, method="dup")
    assert res["auroc"] > 0.8
    assert res["frr"] < 0.2
    assert res["asr_filtered"] < res["asr"]
    dan = _e2e(badnets_victim, tmp_path / "dan", method="dan")
    assert dan["auroc"] > 0.6
    # the default detector (Fisher fusion of DUP's two scores) stays within 0.01 of DUP on a rare-word trigger
    default = _e2e(badnets_victim, tmp_path / "default")
    assert default["method"] == "fisher" and default["auroc"] >= res["auroc"] - 0.01 and default["frr"] < 0.2


@pytest.mark.slow
def test_e2e_addsent(addsent_victim, tmp_path):
    assert addsent_victim["metrics"]["asr"] > 0.8
    res = _e2e(addsent_victim, tmp_path, method="dup")
    assert res["auroc"] > 0.7  # observed ~0.86 (MD ~0.83, spectral ~0.87 on this small victim)
    assert res["frr"] < 0.2
    # the default detector uses the spectral score's tail where DUP's alpha = 0.9 mutes it (observed 0.937)
    default = _e2e(addsent_victim, tmp_path / "default")
    assert default["method"] == "fisher" and default["auroc"] > max(0.9, res["auroc"]) and default["frr"] < 0.2


@pytest.mark.parametrize("stage", ["train", "detect", "unlearn"])
def test_stage_configs_reduce_to_settings_without_paths(stage):
    """Each stage config = the algorithm's settings + files/mesh/output options; `.settings()` has no path, and a
    malformed `mesh` fails at build time naming the key."""
    import dataclasses

    from jdup import config as config_lib
    from jdup import settings as S

    cfg_cls, set_cls = {"train": (S.TrainConfig, S.TrainSettings), "detect": (S.DetectConfig, S.DetectSettings),
                        "unlearn": (S.UnlearnConfig, S.UnlearnSettings)}[stage]
    cfg = config_lib.build(cfg_cls, {"model": "m", "data": "d", "out": "o", "mesh": "2x4"}, source="test")
    settings = cfg.settings()
    assert type(settings) is set_cls and dataclasses.is_dataclass(settings)
    names = {f.name for f in dataclasses.fields(settings)}
    assert not names & {"model", "data", "out", "mesh", "overwrite", "plots", "score_set", "detection"}
    assert all(getattr(settings, n) == getattr(cfg, n) for n in names)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1
    for ok in ("auto", "1", "8", "2x4"):
        config_lib.build(cfg_cls, {"mesh": ok}, source="test")
    for bad in ("2x", "x4", "0", "two", "2x4x1"):
        with pytest.raises(JdupError, match="mesh"):
            config_lib.build(cfg_cls, {"mesh": bad}, source="test")
