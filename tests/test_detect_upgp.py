"""`jdup detect --method upgp|ensemble`: routing through the CLI / library / unlearning, outputs and errors.

Tiny random models (fast), and the UPGP class choice on the shared MiniLM BadNets victim.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jdup import cli, data, detect, fusion, metrics, models
from jdup import config as config_lib
from jdup.errors import JdupError
from jdup.sensitivity import UPGPConfig
from jdup.stages import detect as detect_stage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST_UPGP = ["upgp.max_steps=4", "upgp.eval_every=2", "upgp.n_perturbations=1", "upgp.first_order=false"]
KEYS = ("auroc", "frr", "far", "threshold", "layers", "n_scored", "n_flagged", "seconds")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sst2_dir):
    src = sst2_dir / "badnets"
    root = tmp_path_factory.mktemp("upgp-route")
    calib = data.read_split(src, "dev-clean").subset(np.arange(64))
    det = data.read_split(src, "test-detect")
    scored = det.subset(np.r_[0:24, len(det) - 16 : len(det)])
    data.write_dup_csv(calib, root / "data" / "dev-clean.csv")
    data.write_dup_csv(scored, root / "data" / "test-detect.csv")
    data.write_dup_csv(det.subset(np.arange(len(det) - 30, len(det) - 16)), root / "data" / "dev-poison.csv")
    models.save_pretrained(
        models.tiny_model("bert", 2, seed=1), root / "model", tokenizer_src="builtin:minilm"
    )
    return root, len(scored), len(calib) + 14


def _cli(root, out, method, *extra):
    argv = ["--log-level", "warning", "detect", "--model", str(root / "model"), "--data", str(root / "data")]
    argv += ["--out", str(out), "--method", method, "batch_size=16", "max_length=32", "buckets=[16,32]"]
    return cli.main([*argv, "progress=false", *FAST_UPGP, *extra])


@pytest.mark.parametrize("method", ["upgp", "ensemble"])
@pytest.mark.slow
def test_cli_routes_method_and_writes_the_dup_outputs(folder, tmp_path, method, capsys):
    root, n, _ = folder
    out = tmp_path / method
    assert _cli(root, out, method) == 0, capsys.readouterr().err
    for f in ("detection.json", "scores.npy", "flags.npy", "components.npz", "roc.png", "hist.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "detection.json").read_text())
    for key in KEYS:
        assert key in res, key
    assert res["method"] == method and res["n_scored"] == n
    assert res["config"]["upgp"]["max_steps"] == 4
    assert "target_class" in res and res["upgp"]["perturbations"][0]["steps"] >= 2
    scores, flags = np.load(out / "scores.npy"), np.load(out / "flags.npy")
    assert scores.shape == flags.shape == (n,) and flags.dtype == bool
    assert flags.sum() == res["n_flagged"]
    comp = np.load(out / "components.npz")
    assert comp["upgp_scores"].shape == (n,)
    if method == "upgp":
        assert res["layers"] == [] and 0.0 <= res["auroc"] <= 1.0
        np.testing.assert_allclose(res["auroc"], res["auroc_upgp"])
        # the reported AUROC is the AUROC of the written scores against the scored file's poison column
        truth = data.read_split(root / "data", "test-detect").poison.astype(bool)
        np.testing.assert_allclose(res["auroc"], metrics.auroc(truth, scores))
    else:
        assert res["layers"] and comp["dup_scores"].shape == (n,)
        assert 0.0 <= scores.min() and scores.max() < 1.0  # mean rank fractions
        np.testing.assert_array_equal(flags, scores > res["threshold"])
        assert {"auroc_dup", "auroc_upgp", "frr_validation"} <= set(res)


@pytest.mark.slow
def test_library_ensemble_is_the_rank_mean_of_dup_and_upgp(folder):
    from jdup import metrics

    root, n, _ = folder
    model, tok = models.from_pretrained(root / "model"), models.load_tokenizer(root / "model")
    calib = data.read_split(root / "data", "dev-clean")
    scored = data.read_split(root / "data", "test-detect")
    cfg = detect.DetectSettings(
        method="ensemble",
        batch_size=16,
        max_length=32,
        buckets=(16, 32),
        progress=False,
        upgp=UPGPConfig(max_steps=4, eval_every=2, n_perturbations=1, first_order=False),
    )
    res = detect.detect(model, tok, calib, scored, cfg)
    x = res.ensemble
    n_v = len(res.val_index)
    assert n_v == len(calib) // 2 and x.upgp_val_scores.shape == (n_v,)
    ens = fusion.ensemble_scores(
        [np.r_[x.dup_val_scores, x.dup_scores], np.r_[x.upgp_val_scores, res.upgp.scores]],
        rank=True,
    )
    np.testing.assert_allclose(res.scores, ens[n_v:])
    np.testing.assert_allclose(res.val_scores, ens[:n_v])
    assert res.threshold == pytest.approx(np.percentile(ens[:n_v], 95.0))
    np.testing.assert_array_equal(res.flags, res.scores > res.threshold)
    assert res.metrics["auroc"] == pytest.approx(metrics.auroc(scored.poison.astype(bool), res.scores))
    # the DUP half is DUP's own detection
    dup = detect.detect(model, tok, calib, scored, detect.DetectSettings(**{**cfg.__dict__, "method": "dup"}))
    np.testing.assert_allclose(x.dup_scores, dup.scores, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_unlearning_detection_accepts_the_methods(folder, tmp_path):
    """`jdup unlearn detect.method=upgp` goes through detect_dev: flags over dev-clean ‖ dev-poison."""
    root, _, n_dev = folder
    opts = {
        "seed": 3,
        "batch_size": 16,
        "max_length": 32,
        "progress": False,
        "plots": False,
        "method": "upgp",
    }
    opts["upgp"] = {"max_steps": 4, "eval_every": 2, "n_perturbations": 1, "first_order": False}
    flags, info = detect_stage.detect_dev(
        models.from_pretrained(root / "model"), str(root / "model"), str(root / "data"), str(tmp_path), opts
    )
    assert flags.shape == (n_dev,) and info["n_scored"] == n_dev and info["method"] == "upgp"
    assert info["config"]["upgp"]["max_steps"] == 4
    assert detect.upgp_config(detect.DetectSettings(split_seed=3)).seed == 3  # seed follows split_seed


def test_bad_method_and_upgp_options_raise_clear_errors(folder, tmp_path, capsys):
    root, _, _ = folder
    assert _cli(root, tmp_path / "bad", "strip") == 2
    err = capsys.readouterr().err
    assert "method" in err and "ensemble" in err and len(err.strip().splitlines()) == 1
    assert _cli(root, tmp_path / "bad2", "upgp", "upgp.no_such_option=1") == 2
    assert "no_such_option" in capsys.readouterr().err
    with pytest.raises(JdupError, match="max_length"):  # carried from the detect config, not an upgp option
        config_lib.build(detect_stage.DetectConfig, {"method": "upgp", "upgp": {"max_length": 64}})
    with pytest.raises(JdupError, match="unknown detection method"):
        detect.detect(None, None, None, None, detect.DetectSettings(method="nope"))  # type: ignore[arg-type]
    assert not (tmp_path / "bad2").exists()  # options are checked before the model is loaded


@pytest.mark.parametrize(
    "override, must_contain",
    [
        (["detect.method=upgp", "detect.upgp.typo=1"], "typo"),
        (["unlearn.detect.method=ensemble", "unlearn.detect.upgp.max_length=9"], "max_length"),
        (["detect.method=strip"], "strip"),
    ],
    ids=["detect-upgp-typo", "unlearn-detect-carried-key", "bad-method"],
)
def test_jdup_run_checks_detection_options_before_any_stage(
    tmp_path, capsys, monkeypatch, override, must_contain
):
    from pathlib import Path

    from jdup.stages import poison as poison_stage
    from jdup.stages import train as train_stage

    ran = []
    stages = [(poison_stage, "run_poison"), (train_stage, "run_train"), (detect_stage, "run_detect")]
    for mod, fn in stages:
        monkeypatch.setattr(mod, fn, lambda cfg, _fn=fn: ran.append(_fn) or {})
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    rc = cli.main(["--log-level", "warning", "run", str(tiny), f"out={tmp_path / 'o'}", *override])
    assert rc == 2 and not ran
    err = capsys.readouterr().err
    assert must_contain in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- UPGP decision rules


def test_robust_z_and_low_tail_flags_pick_the_target_class():

    rng = np.random.default_rng(0)
    labels = np.array([0] * 100 + [1] * 100)
    s = rng.normal(5.0, 1.0, 200)
    s[150:180] = rng.normal(0.0, 0.1, 30)  # insensitive rows in class 1
    ref = rng.normal(5.0, 1.0, 60)
    ref_labels = np.array([0, 1] * 30)
    z = fusion.robust_z(s, labels, ref, ref_labels)
    flags, target = fusion.flag_low_tail(z, labels, 2.5, 0.0, 0.5)
    assert target == 1 and flags[150:180].all() and flags.sum() <= 33
    capped, _ = fusion.flag_low_tail(z, labels, 2.5, 0.0, 0.1)
    assert capped.sum() == 20 and capped[150:180].sum() == 20
    floor, _ = fusion.flag_low_tail(np.zeros(200), labels, 2.5, 0.05, 0.5)
    assert floor.sum() == 10


def test_low_tail_class_ignores_rows_the_victim_gets_wrong():
    """Issue 14 item 3 (the BadNets case, FAR 1.0): misclassified rows of the non-target class have s < 0 (the
    label flip lowers their loss), a far heavier low tail than the poisoned rows, which sit just below the clean
    median of the target class. The class comes from the rows the victim fits, and only those are flagged."""

    rng = np.random.default_rng(1)
    labels = np.array([0] * 100 + [1] * 200)
    z = rng.normal(0.0, 1.0, 300)
    z[:25] = rng.normal(-12.0, 3.0, 25)  # class 0: misclassified rows, extreme low tail
    z[200:300] = rng.normal(-1.5, 0.8, 100)  # class 1: poisoned rows, shifted bulk, some below -2.5
    z[190:200] = rng.normal(-6.0, 1.0, 10)  # class 1: a few misclassified rows too
    fit = np.ones(300, bool)
    fit[:25] = fit[190:200] = False
    _, old_choice = fusion.flag_low_tail(z, labels, 2.5)  # every row counts: the misfit tail wins
    assert old_choice == 0
    flags, target = fusion.flag_low_tail(z, labels, 2.5, 0.0, 0.5, fit=fit)
    assert target == 1
    assert flags.any() and not flags[~fit].any() and (labels[flags] == 1).all()
    assert flags[200:].sum() >= 0.8 * flags.sum()
    # a row is flagged only when fitted, in the target class, below -threshold (no floor here)
    np.testing.assert_array_equal(flags, fit & (labels == 1) & (z < -2.5))


@pytest.mark.slow
def test_upgp_flags_the_target_class_of_the_badnets_victim(badnets_victim):
    """On the shared MiniLM SST-2 BadNets victim (target label 1) UPGP must suspect class 1 (it chose 0 before)."""
    model = models.from_pretrained(badnets_victim["model"])
    tok = models.load_tokenizer(badnets_victim["model"])
    calib = data.read_split(badnets_victim["data"], "dev-clean", num_labels=2)
    scored = data.read_split(badnets_victim["data"], "test-detect", num_labels=2)
    cfg = detect.DetectSettings(
        method="upgp", max_length=48, progress=False, upgp=UPGPConfig(n_perturbations=1, first_order=False)
    )
    res = detect.detect(model, tok, calib, scored, cfg)
    y = scored.poison.astype(bool)
    assert res.metrics["target_class"] == 1 and res.metrics["auroc"] > 0.7
    # flagged rows are rows the victim sends to the target (labels are its predictions, not the file's column)
    assert res.flags.any() and (res.preds[res.flags] == 1).all()
    assert res.flags[y].sum() > res.flags[~y].sum()  # mostly poison among the flags


@pytest.mark.parametrize(
    "arch, expected",
    [("bert", ("query", "value")), ("llama", ("q_proj", "v_proj")), ("qwen2", ("q_proj", "v_proj")),
     ("bart", ("q_proj", "v_proj"))],
)
@pytest.mark.slow
def test_sensitivity_adapts_each_architectures_attention(arch, expected, tiny_enc):
    """Issue 14 item 3: the default targets were BERT's names (a raw ValueError on Llama, Qwen2 and BART)."""
    from jdup import sensitivity

    model = models.tiny_model(arch, 2, seed=0)
    assert sensitivity.lora_targets(model) == expected
    normal, scored = tiny_enc
    cfg = UPGPConfig(max_steps=2, eval_every=1, n_perturbations=1, first_order=arch == "llama", lora_rank=2)
    det = sensitivity.detect_upgp(model, scored, normal, cfg, eval_batch_size=8)
    assert det.scores.shape == (len(scored),) and np.isfinite(det.scores).all()
    with pytest.raises(JdupError, match="lora_targets.*leave it empty"):
        sensitivity.detect_upgp(model, scored, normal, UPGPConfig(lora_targets=("nope",), max_steps=1))


@pytest.fixture(scope="module")
def tiny_enc():
    """``(normal, scored)`` token rows inside every tiny model's vocabulary (128 ids), one padded length."""

    def rows(n, seed, length=12):
        rng = np.random.default_rng(seed)
        ids = rng.integers(5, 100, size=(n, length)).astype(np.int32)
        lengths = rng.integers(4, length + 1, size=n).astype(np.int32)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        labels = (ids[:, 1] >= 50).astype(np.int32)
        ids = np.where(mask == 1, ids, 0)
        return data.Encoded(ids, mask, np.zeros_like(ids), lengths, labels, np.zeros(n, np.int8), (length,), 0)

    return rows(48, 1), rows(12, 2)


def test_decide_redecides_one_scoring_pass(folder):
    """`detect.decide` on a result's validation + scored per-row scalars reproduces detect() for other alpha/frr,
    so a sweep over them needs one scoring pass (the sweep's request)."""
    import dataclasses

    root, _, _ = folder
    model, tok = models.from_pretrained(root / "model"), models.load_tokenizer(root / "model")
    calib = data.read_split(root / "data", "dev-clean")
    scored = data.read_split(root / "data", "test-detect")
    base = detect.DetectSettings(batch_size=16, max_length=32, buckets=(16, 32), progress=False)
    for method in ("dup", "dan"):
        res = detect.detect(model, tok, calib, scored, dataclasses.replace(base, method=method))
        layers = np.concatenate([res.val_md_layers, res.md_layers])
        ss = np.concatenate([res.val_ss, res.ss])
        for alpha, frr in ((0.9, 0.05), (0.5, 0.2)):
            cfg = dataclasses.replace(base, method=method, alpha=alpha, frr=frr)
            dec = detect.decide(layers, ss, len(res.val_index), cfg)
            if (alpha, frr) == (0.9, 0.05):
                np.testing.assert_array_equal(dec.scores, res.scores)
                np.testing.assert_array_equal(dec.flags, res.flags)
                assert dec.threshold == res.threshold
            else:
                again = detect.detect(model, tok, calib, scored, cfg)
                np.testing.assert_allclose(dec.scores, again.scores, rtol=1e-12, atol=1e-12)
                np.testing.assert_array_equal(dec.flags, again.flags)


@pytest.mark.slow
def test_default_upgp_scores_ignore_the_scored_label_column(tiny_enc):
    """The scored rows are unlabelled by default (``scored_labels: predicted``): permuting or corrupting their label
    column changes nothing; with ``scored_labels: given`` the same corruption changes the scores."""
    import dataclasses

    from jdup import sensitivity

    model = models.tiny_model("bert", 2, seed=0)
    normal, scored = tiny_enc
    permuted = dataclasses.replace(scored, labels=np.roll(scored.labels, 1))  # a permutation of the column
    corrupt = dataclasses.replace(scored, labels=(1 - scored.labels).astype(scored.labels.dtype))
    assert (permuted.labels != scored.labels).any()
    cfg = UPGPConfig(max_steps=2, eval_every=1, n_perturbations=1, lora_rank=2, first_order=True, first_order_batch=12)
    runs = [sensitivity.detect_upgp(model, s, normal, cfg, eval_batch_size=12) for s in (scored, permuted, corrupt)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.scores, runs[0].scores)
        np.testing.assert_array_equal(other.flags, runs[0].flags)
        np.testing.assert_array_equal(other.first_order, runs[0].first_order)
        assert other.target_class == runs[0].target_class
    assert runs[0].fit.all()  # every row "fits" its predicted label

    given = dataclasses.replace(cfg, scored_labels="given", first_order=False)
    a = sensitivity.detect_upgp(model, scored, normal, given, eval_batch_size=12)
    b = sensitivity.detect_upgp(model, corrupt, normal, given, eval_batch_size=12)
    assert not np.allclose(a.sensitivity, b.sensitivity)  # the option is live: given labels enter the score
    with pytest.raises(JdupError, match="scored_labels"):
        config_lib.build(UPGPConfig, {"scored_labels": "true"})
