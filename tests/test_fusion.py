"""jdup.fusion: Fisher's combination of robust-z tail probabilities (the default detector's fusion)."""

import numpy as np
import pytest
from scipy.stats import norm

from jdup import detect, fusion


def test_fisher_scores_match_the_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.gamma(2.0, size=300)
    got = fusion.fisher_scores([a, b], n_ref=200)
    want = 0.0
    for s in (a, b):
        med = np.median(s[:200])
        mad = 1.4826 * np.median(np.abs(s[:200] - med))
        want = want - norm.logsf((s - med) / mad)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_one_extreme_component_is_enough():
    """A row far out on ONE component outranks rows that are mildly high on both; a weighted mean with a small
    weight on that component (DUP's alpha = 0.9 on Mahalanobis) would not rank it first."""
    rng = np.random.default_rng(1)
    md, ss = rng.normal(size=500), rng.normal(size=500)
    md[-2:], ss[-2:] = 1.5, 1.5  # mildly high on both
    ss[-3], md[-3] = 12.0, 0.0  # extreme on the spectral score only
    fused = fusion.fisher_scores([md, ss], n_ref=400)
    assert np.argmax(fused) == 497
    z = lambda s: (s - s[:400].mean()) / s[:400].std()
    weighted = 0.9 * z(md) + 0.1 * z(ss)
    assert np.argmax(weighted) != 497


def test_an_uninformative_component_costs_little():
    """Poisoned rows separated on one component keep almost all of their AUROC when a pure-noise component is
    fused in."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    n_ref, n_clean, n_poison = 400, 600, 200
    md = np.concatenate([rng.normal(size=n_ref + n_clean), rng.normal(3.0, 1.0, n_poison)])
    noise = rng.normal(size=md.size)
    y = np.r_[np.zeros(n_clean), np.ones(n_poison)]
    alone = roc_auc_score(y, md[n_ref:])
    fused = roc_auc_score(y, fusion.fisher_scores([md, noise], n_ref)[n_ref:])
    assert fused > alone - 0.03


def test_upper_tail_logp_is_finite_far_out():
    lp = fusion.upper_tail_logp(np.array([-5.0, 0.0, 5.0, 30.0]))
    assert np.all(np.isfinite(lp)) and np.all(np.diff(lp) < 0)
    assert lp[1] == pytest.approx(np.log(0.5), abs=1e-6)


def test_decide_fisher_uses_the_dup_pass_scalars():
    """`decide` with method fisher: threshold at the 1 - frr quantile of the validation rows' fused scores."""
    rng = np.random.default_rng(3)
    per_layer, ss = rng.gamma(3.0, size=(700, 3)), rng.normal(size=700)
    cfg = detect.DetectSettings(method="fisher", frr=0.1)
    d = detect.decide(per_layer, ss, 300, cfg)
    np.testing.assert_allclose(np.r_[d.val_scores, d.scores], fusion.fisher_scores([per_layer.mean(1), ss], 300))
    assert d.threshold == pytest.approx(np.percentile(d.val_scores, 90.0))
    assert np.array_equal(d.flags, d.scores > d.threshold)
