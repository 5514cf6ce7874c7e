"""What a defender can and cannot know: properties that fail when attacker-side information leaks into the
defaults, or when a calibrated rate is not the rate a user gets.

* the defender's target (``defender_target``, what ``suppress_target`` pushes away from) comes from the victim's
  predictions on the flagged rows, never from ``poison_config.json`` or test-poison;
* the default detector (``fisher``) never reads the scored rows' label or poison columns;
* the false rejection rate on clean rows held out of the calibration split matches ``frr`` within its binomial
  standard error;
* the end-to-end purification with the DEFAULTS on the MiniLM test victim keeps ASR and CACC within measured
  bounds.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from jdup import data as D
from jdup import detect, scores
from jdup.stages import unlearn as S

# ------------------------------------------------------------------------------------------- defender's target


@pytest.mark.slow
def test_defender_target_ignores_poison_config_and_test_poison(tiny_model_dir, synthetic_dup, tmp_path):
    """Two folders that differ only in the target named by poison_config.json and test-poison's labels give the
    same ``defender_target``: the majority victim prediction on the flagged rows."""
    from jdup import models
    from jdup.predict import predict

    other = tmp_path / "other-target"
    shutil.copytree(synthetic_dup, other)
    meta = json.loads((other / "poison_config.json").read_text())
    true_target = int(meta["target"])
    meta["target"] = 1 - true_target
    (other / "poison_config.json").write_text(json.dumps(meta))
    tp = D.read_split(other, "test-poison")
    D.write_dup_csv(D.TextDataset(tp.texts, np.full(len(tp), 1 - true_target), tp.poison), other / "test-poison.csv")

    runs = {}
    for name, folder in (("given", synthetic_dup), ("other", other)):
        cfg = S.UnlearnConfig(model=str(tiny_model_dir), data=str(folder), out=str(tmp_path / name), epochs=0,
                              max_length=32, progress=False, ckpt_every_steps=0,
                              detect={"progress": False, "plots": False, "max_length": 32, "frr": 0.3})
        runs[name] = S.run_unlearn(cfg)
    # the manipulation is live: the evaluation target follows the files ...
    assert (runs["given"]["target"], runs["other"]["target"]) == (true_target, 1 - true_target)
    # ... the defender's target does not
    assert runs["given"]["defender_target"] == runs["other"]["defender_target"]
    assert runs["given"]["n_flagged"] == runs["other"]["n_flagged"] > 0

    # and it is the victim's majority prediction on the flagged rows of dev-clean ‖ dev-poison
    flags = np.load(tmp_path / "given" / "detection" / "flags.npy").astype(bool)
    dev = D.TextDataset.concat([D.read_split(synthetic_dup, "dev-clean"), D.read_split(synthetic_dup, "dev-poison")])
    victim, tok = models.from_pretrained(tiny_model_dir), models.load_tokenizer(tiny_model_dir)
    preds = predict(victim, D.encode(tok, dev, 32), 64).argmax(-1)[flags]
    assert runs["given"]["defender_target"] == int(np.bincount(preds, minlength=2).argmax())


# ------------------------------------------------------------------------------- fisher ignores label/poison columns


@pytest.mark.slow
def test_fisher_flags_ignore_the_label_and_poison_columns(tiny_bert, synthetic_dup):
    """Permuting the scored rows' label and poison columns leaves the default detector's scores and flags as they
    were (only the metrics, which read the poison column, change)."""
    model, tok = tiny_bert
    calib = D.read_split(synthetic_dup, "dev-clean")
    scored = D.read_split(synthetic_dup, "test-detect")
    rng = np.random.default_rng(0)
    shuffled = D.TextDataset(scored.texts, rng.permutation(scored.labels), rng.permutation(scored.poison))
    assert (shuffled.poison != scored.poison).any() and (shuffled.labels != scored.labels).any()
    cfg = detect.DetectSettings(max_length=32, progress=False, frr=0.2)
    assert cfg.method == "fisher"  # the default
    a = detect.detect(model, tok, calib, scored, cfg)
    b = detect.detect(model, tok, calib, shuffled, cfg)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.flags, b.flags)
    assert a.threshold == b.threshold and a.flags.any()
    assert a.metrics["auroc"] != b.metrics["auroc"]  # the poison column was read, but only for the metrics


# ------------------------------------------------------------------------------------ FRR on held-out clean rows


@pytest.mark.parametrize("method", ["fisher", "dup"])
@pytest.mark.parametrize("frr", [0.05, 0.2])
def test_frr_on_held_out_clean_rows_matches_frr(method, frr):
    """Clean features: fit on a calibration half, threshold on a validation half (the detector's own path:
    jdup.scores fits, then detect.decide), then flag fresh clean rows from the same distribution. Their flagged
    fraction estimates the FRR a user gets; it must lie within 4 standard errors of ``frr``, where the error
    combines the validation quantile's and the test fraction's binomial variances, frr(1-frr)(1/n_val + 1/n_test)."""
    rng = np.random.default_rng(1 if method == "fisher" else 2)
    n_cal, n_val, n_test, layers, dim = 600, 3000, 6000, 4, 6
    mixing = rng.normal(size=(layers, dim, dim)) / math.sqrt(dim)

    def clean(n):
        z = rng.normal(size=(n, layers, dim)).astype(np.float32)
        return np.einsum("nld,lde->nle", z, mixing).astype(np.float32) + np.arange(layers)[None, :, None]

    cal, rest = clean(n_cal), clean(n_val + n_test)
    md = scores.mahalanobis(shrinkage=0.1, top_k=3)
    state = md.fit(cal, rng.integers(0, 2, n_cal))
    per_layer = np.asarray(md.score_layers(state, rest))
    ss = np.asarray(scores.spectral().score(scores.spectral().fit(cal), rest))
    d = detect.decide(per_layer, ss, n_val, detect.DetectSettings(method=method, frr=frr))
    observed = float(d.flags.mean())
    se = math.sqrt(frr * (1 - frr) * (1 / n_val + 1 / n_test))
    assert abs(observed - frr) <= 4 * se, (observed, frr, se)
    # the validation rows themselves sit at the target rate (the quantile's definition, up to ties)
    assert abs(float((d.val_scores > d.threshold).mean()) - frr) <= 1 / n_val + 1e-12


# ------------------------------------------------------------------------ end to end: the defaults on MiniLM

#: Bounds for the defaults on the shared MiniLM test victim (tests/helpers/victim.py: CACC 0.845, ASR 0.913 on
#: the reduced BadNets folder). Measured 2026-12-06 on the 2-core shared VM (defaults: fisher, suppress_target,
#: 8 epochs, no stop rule): 116 flagged (108 poisoned), 32 steps, ASR 0.913 -> 0.100, CACC 0.845 -> 0.820.
#: The bounds sit about two binomial standard errors above the measured values (150 test-poison rows: 0.025;
#: 200 test-clean rows: ~0.01 on a paired drop). Remeasure them when the defaults change.
DEFAULTS_MAX_ASR = 0.15
DEFAULTS_MAX_CACC_DROP = 0.04


@pytest.mark.slow
def test_defaults_purify_the_badnets_test_victim(badnets_victim, tmp_path):
    """``jdup unlearn`` with its defaults (detector, forgetting loss, epochs, stop rule, max_length) on the
    reduced SST-2 BadNets folder of the test victim. Bounds sit a few points outside the measured values
    (see DEFAULTS_MAX_*), tight enough that a regression of the default recipe fails."""
    cfg = S.UnlearnConfig(model=badnets_victim["model"], data=badnets_victim["data"], out=str(tmp_path / "p"),
                          progress=False, ckpt_every_steps=0, detect={"progress": False, "plots": False})
    defaults = S.UnlearnConfig()
    for key in ("forget_loss", "epochs", "early_stop", "lambda_asr", "max_length", "lr", "projection"):
        assert getattr(cfg, key) == getattr(defaults, key), key
    assert cfg.detect.method == defaults.detect.method
    m = S.run_unlearn(cfg)
    print("defaults on the badnets test victim:", {k: m[k] for k in (
        "cacc_before", "cacc_after", "asr_before", "asr_after", "n_flagged", "n_flagged_poison", "steps",
        "defender_target", "seconds")})
    assert m["asr_before"] > 0.8 and m["defender_target"] == m["target"] == 1
    assert m["n_flagged_poison"] >= 0.85 * m["n_flagged"] > 0  # measured 108 of 116
    assert m["asr_after"] <= DEFAULTS_MAX_ASR
    assert m["cacc_after"] >= m["cacc_before"] - DEFAULTS_MAX_CACC_DROP
