"""benchmarks/clean_flips.py: the exact McNemar test, and the row-by-row comparison of two models on test-clean."""

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
