"""jdup.scores against NumPy / scikit-learn references on random data, plus the scorer contracts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.covariance import ShrunkCovariance
from sklearn.metrics import calinski_harabasz_score

from jdup import scores as S

RTOL = 1e-5


def _data(n=120, layers=5, d=12, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    # layer-dependent class separation, correlated dims (a realistic covariance)
    mix = rng.normal(size=(layers, d, d)) / np.sqrt(d) + np.eye(d)
    x = rng.normal(size=(n, layers, d))
    x = np.einsum("nld,lde->nle", x, mix)
    sep = np.linspace(0.1, 2.0, layers)[rng.permutation(layers)]
    x += sep[None, :, None] * (y[:, None, None] - 0.5) * rng.normal(size=(1, 1, d))
    return x.astype(np.float32), y.astype(np.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("fit_dtype", ["float32", "float64"])
@pytest.mark.parametrize("shrinkage", [0.1, 0.3])
def test_shrunk_gaussian_matches_sklearn_precision(fit_dtype, shrinkage):
    x, _ = _data(n=200, layers=1, d=16)
    x = x[:, 0]
    ref = ShrunkCovariance(shrinkage=shrinkage).fit(x.astype(np.float64))
    g = S.shrunk_gaussian(jnp.asarray(x), shrinkage, fit_dtype=fit_dtype)
    assert g.chol.dtype == jnp.float32
    np.testing.assert_allclose(g.mean, ref.location_, rtol=1e-5, atol=1e-6)
    assert _rel(S.precision_matrix(g), ref.precision_) < RTOL
    _, cov = S.shrunk_covariance(jnp.asarray(x), shrinkage)
    assert _rel(cov, ref.covariance_) < RTOL
    # squared MD vs the sklearn precision
    q = x[:7].astype(np.float64) - ref.location_
    md2 = np.einsum("bi,ij,bj->b", q, ref.precision_, q)
    np.testing.assert_allclose(S.mahalanobis_sq(g, jnp.asarray(x[:7])), md2, rtol=RTOL)
    np.testing.assert_allclose(S.mahalanobis_distance(g, jnp.asarray(x[:7])), np.sqrt(md2), rtol=RTOL)


def test_shrunk_gaussian_weights_ignore_padding_rows():
    x, _ = _data(n=50, layers=1, d=8)
    x = x[:, 0]
    padded = np.concatenate([x, 100 * np.ones((6, 8), np.float32)])
    w = np.r_[np.ones(50), np.zeros(6)]
    for fit_dtype in ("float32", "float64"):
        a = S.shrunk_gaussian(jnp.asarray(x), fit_dtype=fit_dtype)
        b = S.shrunk_gaussian(jnp.asarray(padded), weights=jnp.asarray(w), fit_dtype=fit_dtype)
        np.testing.assert_allclose(a.chol, b.chol, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("classes", [2, 4])
def test_calinski_harabasz_matches_sklearn(classes):
    x, y = _data(n=90, layers=4, d=10, classes=classes, seed=classes)
    ch = S.calinski_harabasz(jnp.asarray(x), jnp.asarray(y), classes)
    ref = [calinski_harabasz_score(x[:, i].astype(np.float64), y) for i in range(x.shape[1])]
    np.testing.assert_allclose(ch, ref, rtol=RTOL)
    # a padding mask drops rows exactly
    xp = np.concatenate([x, np.ones_like(x[:5])])
    yp = np.r_[y, np.zeros(5, np.int32)]
    m = np.r_[np.ones(90, bool), np.zeros(5, bool)]
    np.testing.assert_allclose(
        S.calinski_harabasz(jnp.asarray(xp), jnp.asarray(yp), classes, mask=m), ref, rtol=RTOL
    )


def test_calinski_harabasz_edge_cases():
    x, _ = _data(n=20, layers=2, d=3)
    one = np.zeros(20, np.int32)
    np.testing.assert_array_equal(S.calinski_harabasz(jnp.asarray(x), jnp.asarray(one), 2), [0.0, 0.0])
    # identical points within each class: tr(W) = 0 -> 1.0 (sklearn)
    y = np.r_[np.zeros(10), np.ones(10)].astype(np.int32)
    xs = np.repeat(np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], np.float32), 10, axis=0)[:, None].repeat(2, 1)
    np.testing.assert_array_equal(S.calinski_harabasz(jnp.asarray(xs), jnp.asarray(y), 2), [1.0, 1.0])


def test_top_layers_stable_ties_and_candidates():
    ch = jnp.asarray([1.0, 5.0, 5.0, 3.0, 5.0])
    assert S.top_layers(ch, 3, range(5)).tolist() == [1, 2, 4]
    assert S.top_layers(ch, 2, [0, 3, 4]).tolist() == [4, 3]
    assert S.top_layers(ch, None, [0, 3]).tolist() == [0, 3]
    assert S.top_layers(ch, 10, [0, 3]).tolist() == [3, 0]


def test_layer_indices():
    assert S.layer_indices("all", 12) == tuple(range(12))
    assert S.layer_indices("middle", 12) == tuple(range(3, 9))
    assert S.layer_indices("last_three_layers", 12) == (9, 10, 11)
    assert S.layer_indices([3, -1, 3], 12) == (3, 11)
    with pytest.raises(ValueError):
        S.layer_indices([12], 12)
    with pytest.raises(ValueError):
        S.layer_indices("nope", 12)


def _ref_md(x_cal, y_cal, x, k=3, shrinkage=0.1, agg=np.mean):
    ch = [calinski_harabasz_score(x_cal[:, i].astype(np.float64), y_cal) for i in range(x_cal.shape[1])]
    sel = sorted(range(len(ch)), key=lambda i: ch[i], reverse=True)[:k]
    per = []
    for i in sel:
        sc = ShrunkCovariance(shrinkage=shrinkage).fit(x_cal[:, i].astype(np.float64))
        q = x[:, i].astype(np.float64) - sc.location_
        per.append(np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", q, sc.precision_, q), 0)))
    return sel, agg(np.stack(per, 1), axis=1)


@pytest.mark.parametrize("agg", ["mean", "max"])
@pytest.mark.slow
def test_mahalanobis_scorer_matches_reference(agg):
    x, y = _data(n=150, layers=6, d=10, seed=3)
    q, _ = _data(n=17, layers=6, d=10, seed=4)
    scorer = S.mahalanobis(top_k=3, agg=agg)
    state = scorer.fit(jnp.asarray(x), jnp.asarray(y))
    sel, ref = _ref_md(x, y, q, agg=getattr(np, agg))
    assert state.layers.tolist() == sel
    np.testing.assert_allclose(scorer.score(state, jnp.asarray(q)), ref, rtol=RTOL)
    assert scorer.score_layers(state, jnp.asarray(q)).shape == (17, 3)


@pytest.mark.slow
def test_mahalanobis_candidate_layers_and_all():
    x, y = _data(n=80, layers=6, d=6, seed=5)
    st = S.mahalanobis(top_k=2, layers=[0, 1]).fit(jnp.asarray(x), jnp.asarray(y))
    assert sorted(st.layers.tolist()) == [0, 1]
    assert np.isneginf(np.asarray(st.ch)[2:]).all()
    st = S.mahalanobis(top_k=None).fit(jnp.asarray(x))
    assert st.layers.tolist() == list(range(6))
    with pytest.raises(ValueError):
        S.mahalanobis(top_k=3).fit(jnp.asarray(x))


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_spectral_matches_numpy_svd(method):
    x, _ = _data(n=9, layers=7, d=20, seed=6)
    scorer = S.spectral(method=method)
    st = scorer.fit(jnp.asarray(x))
    got = scorer.score(st, jnp.asarray(x))
    ref = []
    for f in x.astype(np.float64):
        s = np.linalg.svd(np.diff(f, axis=0), compute_uv=False)
        ref.append(s[0] / s.sum())
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    # subset of layers; zero differences -> 0 (as DUP)
    st2 = S.spectral(layers=[1, 3, 5]).fit(jnp.asarray(x))
    f = x[0, [1, 3, 5]].astype(np.float64)
    s = np.linalg.svd(np.diff(f, axis=0), compute_uv=False)
    np.testing.assert_allclose(
        S.spectral(layers=[1, 3, 5]).score(st2, jnp.asarray(x[:1])), [s[0] / s.sum()], rtol=RTOL
    )
    const = jnp.ones((2, 7, 20), jnp.float32)
    np.testing.assert_array_equal(scorer.score(st, const), [0.0, 0.0])
    with pytest.raises(ValueError):
        S.spectral(layers=[2]).fit(jnp.asarray(x))


def test_zscore_fuse_threshold():
    rng = np.random.default_rng(7)
    v = rng.normal(3, 2, size=101).astype(np.float32)
    st = S.fit_zscore(jnp.asarray(v))
    np.testing.assert_allclose(st.mean, v.mean(), rtol=RTOL)
    np.testing.assert_allclose(st.std, v.std(), rtol=RTOL)
    assert float(S.fit_zscore(jnp.ones(5)).std) == 1.0  # std < 1e-6 -> 1
    np.testing.assert_allclose(S.zscore(st, jnp.asarray(v)), (v - v.mean()) / v.std(), rtol=1e-4, atol=1e-5)
    for n in (20, 101, 436):
        z = rng.normal(size=n).astype(np.float32)
        for frr in (0.05, 0.1, 0.2):
            np.testing.assert_allclose(
                S.threshold_at_frr(jnp.asarray(z), frr), np.percentile(z, (1 - frr) * 100), rtol=RTOL
            )
    np.testing.assert_allclose(S.fuse(jnp.asarray(1.0), jnp.asarray(3.0), 0.9), 1.2, rtol=1e-6)
    assert S.flag(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray(2.0)).tolist() == [False, False, True]
    # masked stats equal stats of the real rows
    w = np.r_[np.ones(101), np.zeros(4)].astype(bool)
    vp = np.r_[v, [1e3] * 4].astype(np.float32)
    stm = S.fit_zscore(jnp.asarray(vp), mask=jnp.asarray(w))
    np.testing.assert_allclose([stm.mean, stm.std], [v.mean(), v.std()], rtol=RTOL)


def _ref_dan(x_cal, y_cal, x, shrinkage=0.1):
    out = []
    for i in range(x_cal.shape[1]):
        xc = x_cal[:, i].astype(np.float64)
        means = np.stack([xc[y_cal == c].mean(0) for c in np.unique(y_cal)])
        sc = ShrunkCovariance(shrinkage=shrinkage).fit(xc - means[y_cal])
        q = x[:, i].astype(np.float64)[:, None, :] - means[None]
        out.append(np.einsum("bci,ij,bcj->bc", q, sc.precision_, q).min(1))
    return np.stack(out, 1)


@pytest.mark.slow
def test_dan_matches_reference():
    x, y = _data(n=160, layers=4, d=8, classes=3, seed=8)
    v, _ = _data(n=40, layers=4, d=8, seed=9)
    q, _ = _data(n=11, layers=4, d=8, seed=10)
    scorer = S.dan()
    st = scorer.fit(jnp.asarray(x), jnp.asarray(y))
    ref_q = _ref_dan(x, y, q)
    np.testing.assert_allclose(scorer.score_layers(st, jnp.asarray(q)), ref_q, rtol=RTOL)
    ref_v = _ref_dan(x, y, v)
    st = S.dan_calibrate(st, scorer.score_layers(st, jnp.asarray(v)))
    ref = ((ref_q - ref_v.mean(0)) / ref_v.std(0)).max(1)
    np.testing.assert_allclose(scorer.score(st, jnp.asarray(q)), ref, rtol=1e-4, atol=1e-5)


def _scorers():
    return {
        "md": S.mahalanobis(top_k=2, num_classes=2),
        "md64": S.mahalanobis(top_k=2, num_classes=2, fit_dtype="float64"),
        "ss": S.spectral(),
        "dan": S.dan(num_classes=2),
    }


@pytest.mark.parametrize("name", ["md", "md64", "ss", "dan"])
def test_scorer_contracts(name):
    scorer = _scorers()[name]
    x, y = _data(n=60, layers=4, d=6, seed=11)
    q, _ = _data(n=8, layers=4, d=6, seed=12)
    x, y, q = jnp.asarray(x), jnp.asarray(y), jnp.asarray(q)

    traces = {"fit": 0, "score": 0}

    def fit(a, b):
        traces["fit"] += 1
        return scorer.fit(a, b)

    def score(st, a):
        traces["score"] += 1
        return scorer.score(st, a)

    fit_j, score_j = jax.jit(fit), jax.jit(score)
    st = fit_j(x, y)
    out = score_j(st, q)
    # jit == eager
    st_e = scorer.fit(x, y)
    np.testing.assert_allclose(out, scorer.score(st_e, q), rtol=1e-5, atol=1e-6)
    # no recompilation with the same shapes
    fit_j(x + 1.0, y)
    score_j(st, q * 2.0)
    assert traces == {"fit": 1, "score": 1}
    # float32 in, float32 out
    assert out.dtype == jnp.float32
    for leaf in jax.tree.leaves(st):
        assert leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_), leaf.dtype
    # scores follow their samples under a permutation of the batch
    perm = np.random.default_rng(0).permutation(8)
    np.testing.assert_allclose(score_j(st, q[perm]), np.asarray(out)[perm], rtol=1e-5, atol=1e-6)
    # fitting is invariant to the order of calibration samples
    perm = np.random.default_rng(1).permutation(60)
    st_p = fit_j(x[perm], y[perm])
    np.testing.assert_allclose(score_j(st_p, q), out, rtol=1e-4, atol=1e-5)
