"""jdup.metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from jdup import metrics as M


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + 0.7 * y
    if ties:
        s = np.round(s, 1)  # many ties: averaged like sklearn
    assert abs(M.auroc(y, s) - roc_auc_score(y, s)) < 1e-12
    assert abs(M.auroc(y, -s) - roc_auc_score(y, -s)) < 1e-12
    assert np.isnan(M.auroc(np.zeros(5), np.arange(5)))


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)
    fpr, tpr, thr = M.roc_curve(y, s)
    f2, t2, th2 = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))


def test_detection_metrics_match_confusion_matrix():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    f = rng.random(300) < 0.3 + 0.4 * y
    m = M.detection_metrics(y, f, scores=f + 0.1 * y)
    cm = confusion_matrix(y, f)
    assert m["frr"] == pytest.approx(cm[0, 1] / (cm[0, 1] + cm[0, 0]))
    assert m["far"] == pytest.approx(cm[1, 0] / (cm[1, 1] + cm[1, 0]))
    assert m["precision"] == pytest.approx(precision_score(y, f))
    assert m["recall"] == pytest.approx(recall_score(y, f))
    assert m["f1"] == pytest.approx(f1_score(y, f))
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 300
    assert "auroc" in m
    # nothing flagged: precision/F1 0 (sklearn zero_division), FRR 0, FAR 1
    m = M.detection_metrics(y, np.zeros(300, bool))
    assert (m["precision"], m["f1"], m["frr"], m["far"]) == (0.0, 0.0, 0.0, 1.0)
    assert np.isnan(M.detection_metrics(np.ones(3), np.ones(3))["frr"])


def test_post_filter_cacc_asr():
    # 4 clean rows (labels 0,1,0,1), 3 poison rows (target 1)
    labels = np.array([0, 1, 0, 1, 1, 1, 1])
    preds = np.array([0, 1, 1, 1, 1, 1, 0])
    poison = np.array([0, 0, 0, 0, 1, 1, 1])
    flags = np.array([0, 1, 0, 0, 1, 0, 0])
    r = M.filtered_cacc_asr(preds, labels, flags, poison)
    assert r["cacc"] == pytest.approx(3 / 4)
    assert r["cacc_filtered"] == pytest.approx(2 / 4)  # flagged correct clean row counts as wrong
    assert r["asr"] == pytest.approx(2 / 3)
    assert r["asr_filtered"] == pytest.approx(1 / 3)  # the flagged poison row is no longer a success


def test_trigger_success_rate_leaves_out_the_models_own_errors():
    # 5 pairs, target 1: the clean copies of pairs 0 and 1 already go to the target (the model's own error)
    clean = np.array([1, 1, 0, 0, 2])
    poison = np.array([1, 1, 1, 0, 0])
    assert M.attack_success_rate(poison, 1) == pytest.approx(3 / 5)  # plain ASR counts the errors too
    assert M.trigger_success_rate(clean, poison, 1) == pytest.approx(1 / 3)  # pair 2 of pairs 2, 3, 4
    assert np.isnan(M.trigger_success_rate(np.zeros(3), np.zeros(3), 0))  # no clean copy kept off the target
    with pytest.raises(ValueError, match="shape"):
        M.trigger_success_rate(clean, poison[:4], 1)


def test_robust_labels_needs_the_triggered_rows_to_be_copies_of_the_clean_ones(caplog):
    from jdup.data import TextDataset
    from jdup.evaluate import pairing_overlap, robust_labels

    words = "the movie was great awful slow quick bright dull story actors plot music scene ending".split()
    rng = np.random.default_rng(0)
    clean_texts = [" ".join(rng.choice(words, 8)) + f" w{i} v{i}" for i in range(40)]
    labels = np.array([0, 1] * 20)
    clean = TextDataset(clean_texts, labels, np.zeros(40))
    non_target = [t for t, y in zip(clean_texts, labels, strict=True) if y != 1]
    copies = TextDataset([t + " cf" for t in non_target], np.ones(20), np.ones(20))  # BadNets-like copies
    np.testing.assert_array_equal(robust_labels(clean, copies, 1), np.zeros(20))
    half = TextDataset([" ".join(t.split()[::2]) + " indeed" for t in non_target], np.ones(20), np.ones(20))
    assert robust_labels(clean, half, 1) is not None  # a paraphrase keeping half the words still pairs up
    paired, shifted = pairing_overlap(non_target, copies.texts)
    assert paired == pytest.approx(1.0) and shifted < 0.9
    # same counts, drawn independently (row i is some other row's copy): no RA, with a warning that says why
    other = TextDataset([copies.texts[(i + 7) % 20] for i in range(20)], np.ones(20), np.ones(20))
    with caplog.at_level("WARNING", logger="jdup.evaluate"):
        assert robust_labels(clean, other, 1, where="d") is None
    assert "does not read as a copy" in caplog.text
    assert robust_labels(clean, TextDataset(copies.texts[:19], np.ones(19), np.ones(19)), 1) is None  # counts
