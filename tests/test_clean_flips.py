"""benchmarks/clean_flips.py (the exact McNemar test, the row-by-row comparison of two models on test-clean) and
benchmarks/class_shift.py (the shift of the target logit chosen on dev-clean)."""

import json

import numpy as np
import pytest

from benchmarks import clean_flips as cf


@pytest.mark.parametrize("fixed,broken", [(1, 10), (11, 4), (9, 6), (0, 0), (5, 5), (0, 7), (30, 12)])
def test_mcnemar_exact_is_the_two_sided_binomial_test(fixed, broken):
    scipy_stats = pytest.importorskip("scipy.stats")
    n = fixed + broken
    want = 1.0 if n == 0 else scipy_stats.binomtest(min(fixed, broken), n, 0.5).pvalue
    assert cf.mcnemar_exact(fixed, broken) == pytest.approx(want, rel=1e-9)
    assert cf.mcnemar_exact(fixed, broken) == cf.mcnemar_exact(broken, fixed)


def test_two_models_row_by_row(tmp_path, tiny_model_dir, synthetic_dup, capsys):
    """The purified model against itself changes nothing; against a victim whose head bias sends most rows to one
    class, every row the two disagree on is counted once, as fixed or broken, and the per-class accuracies match
    the predictions."""
    from jdup import data as D
    from jdup import models
    from jdup.predict import predict

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"defender_target": 1}))
    (run / "manifest.json").write_text(json.dumps({"config": {"max_length": 32}}))
    (run / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    assert cf.main([str(run), str(synthetic_dup), str(tiny_model_dir)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["fixed"] == same["broken"] == 0 and same["mcnemar_p"] == 1.0
    assert same["cacc_before"] == same["cacc_after"]

    tc = D.read_split(synthetic_dup, "test-clean", num_labels=2)
    enc = D.encode(models.load_tokenizer(tiny_model_dir), tc, 32)
    pa = predict(models.from_pretrained(tiny_model_dir), enc, 64).argmax(-1)
    rare = int(np.argmin(np.bincount(pa, minlength=2)))  # the class the purified model predicts least
    victim = models.from_pretrained(tiny_model_dir)
    victim.classifier.bias.set_value(victim.classifier.bias.get_value().at[rare].add(5.0))  # most rows -> rare
    models.save_pretrained(victim, tmp_path / "victim", tokenizer_src="builtin:minilm")
    assert cf.main([str(run), str(synthetic_dup), str(tmp_path / "victim")]) == 0
    out = json.loads(capsys.readouterr().out)
    pb = predict(models.from_pretrained(tmp_path / "victim"), enc, 64).argmax(-1)
    ok_b, ok_a = pb == tc.labels, pa == tc.labels
    assert out["fixed"] == int(np.sum(~ok_b & ok_a)) and out["broken"] == int(np.sum(ok_b & ~ok_a))
    assert out["fixed"] + out["broken"] > 0
    assert out["broken_rows"] == np.flatnonzero(ok_b & ~ok_a).tolist()
    assert sum(out["broken_true_to_pred"].values()) == out["broken"]
    assert out["cacc_after"] - out["cacc_before"] == pytest.approx((out["fixed"] - out["broken"]) / out["rows"], abs=2e-4)
    for c, row in out["per_class"].items():
        assert row["acc_before"] == pytest.approx(ok_b[tc.labels == int(c)].mean(), abs=1e-3)


def test_class_shift_picks_the_dev_clean_best_shift_of_the_target_logit():
    """benchmarks/class_shift.py: a model that sends every row to class 0 by a margin of 1.1 is moved back by the
    smallest shift that gives the best accuracy; ties prefer the smaller |b|; the summary reads the shifted rows."""
    from benchmarks import class_shift as cs

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    logits = np.stack([np.full(200, 1.1), np.where(labels == 1, 1.0, -1.0)], axis=1)  # class 1 rows lose by 0.1
    assert np.all(cs.shifted(logits, 1, 0.0) == 0)
    b = cs.best_shift(logits, labels, 1)
    assert b == 0.25  # the first grid step past the 0.1 margin (and below the 2.1 that would flip class 0 rows)
    assert np.all(cs.shifted(logits, 1, b) == labels)
    assert cs.best_shift(np.stack([labels == 0, labels == 1], 1).astype(float) * 5, labels, 1) == 0.0  # tie -> 0
    lg = {"dev-clean": (logits, labels), "test-clean": (logits, labels), "test-poison": (logits, labels)}
    at0, at_b = cs.summary(lg, 1, 0.0), cs.summary(lg, 1, b)
    assert at0["target_acc"] == 0.0 and at0["other_acc"] == 1.0 and at0["asr"] == 0.0
    assert at_b["cacc"] == 1.0 and at_b["asr"] == pytest.approx(np.mean(labels == 1), abs=1e-4)
