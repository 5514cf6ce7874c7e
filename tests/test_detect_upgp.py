"""`jdup detect --method upgp|ensemble`: routing through the CLI / library / unlearning, outputs and errors.

Tiny random BERT (fast); the detection quality of UPGP on a real victim is checked in test_upgp.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jdup import cli, data, detect, models
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
    else:
        assert res["layers"] and comp["dup_scores"].shape == (n,)
        assert 0.0 <= scores.min() and scores.max() < 1.0  # mean rank fractions
        np.testing.assert_array_equal(flags, scores > res["threshold"])
        assert {"auroc_dup", "auroc_upgp", "frr_validation"} <= set(res)


def test_library_ensemble_is_the_rank_mean_of_dup_and_upgp(folder):
    from jdup import metrics, scores

    root, n, _ = folder
    model, tok = models.from_pretrained(root / "model"), models.load_tokenizer(root / "model")
    calib = data.read_split(root / "data", "dev-clean")
    scored = data.read_split(root / "data", "test-detect")
    cfg = detect.DetectConfig(
        method="ensemble",
        batch_size=16,
        max_length=32,
        buckets=(16, 32),
        progress=False,
        upgp=UPGPConfig(max_steps=4, eval_every=2, n_perturbations=1, first_order=False),
    )
    res = detect.detect(model, tok, calib, scored, cfg)
    x = res.extra
    n_v = len(res.val_index)
    assert n_v == len(calib) // 2 and x["upgp_val_scores"].shape == (n_v,)
    ens = scores.ensemble_scores(
        [np.r_[x["dup_val_scores"], x["dup_scores"]], np.r_[x["upgp_val_scores"], x["upgp_scores"]]],
        rank=True,
    )
    np.testing.assert_allclose(res.scores, ens[n_v:])
    np.testing.assert_allclose(res.val_scores, ens[:n_v])
    assert res.threshold == pytest.approx(np.percentile(ens[:n_v], 95.0))
    np.testing.assert_array_equal(res.flags, res.scores > res.threshold)
    assert res.metrics["auroc"] == pytest.approx(metrics.auroc(scored.poison.astype(bool), res.scores))
    # the DUP half is DUP's own detection
    dup = detect.detect(model, tok, calib, scored, detect.DetectConfig(**{**cfg.__dict__, "method": "dup"}))
    np.testing.assert_allclose(x["dup_scores"], dup.scores, rtol=1e-6, atol=1e-6)


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
    assert detect.upgp_config(detect.DetectConfig(split_seed=3)).seed == 3  # seed follows split_seed


def test_bad_method_and_upgp_options_raise_clear_errors(folder, tmp_path, capsys):
    root, _, _ = folder
    assert _cli(root, tmp_path / "bad", "strip") == 2
    err = capsys.readouterr().err
    assert "method" in err and "ensemble" in err and len(err.strip().splitlines()) == 1
    assert _cli(root, tmp_path / "bad2", "upgp", "upgp.no_such_option=1") == 2
    assert "no_such_option" in capsys.readouterr().err
    with pytest.raises(JdupError, match="max_length"):  # carried from the detect config, not an upgp option
        config_lib.build(detect.DetectConfig, {"method": "upgp", "upgp": {"max_length": 64}})
    with pytest.raises(JdupError, match="unknown detection method"):
        detect.detect(None, None, None, None, detect.DetectConfig(method="nope"))  # type: ignore[arg-type]
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

    from jdup import attacks, train
    from jdup.stages import train as train_stage

    ran = []
    stages = [(attacks, "run_poison"), (train, "run_train"), (detect, "run_detect")]
    stages += [(train_stage, "run_train"), (detect_stage, "run_detect")]
    for mod, fn in stages:
        monkeypatch.setattr(mod, fn, lambda cfg, _fn=fn: ran.append(_fn) or {})
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    rc = cli.main(["--log-level", "warning", "run", str(tiny), f"out={tmp_path / 'o'}", *override])
    assert rc == 2 and not ran
    err = capsys.readouterr().err
    assert must_contain in err and len(err.strip().splitlines()) == 1
