"""Hash dropout masks (jdup.dropout): keep rate, independence, fresh masks per key/step, inverted scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdup import dropout as DR
from jdup import lora
from jdup.models import tiny_model


def _masks(keys, keep, shape):
    f = jax.jit(jax.vmap(lambda k: DR.keep_mask(k, keep, shape)))
    return np.asarray(f(keys))


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.25])
def test_keep_rate_within_tolerance(keep):
    m = np.asarray(jax.jit(lambda k: DR.keep_mask(k, keep, (64, 48, 384)))(jax.random.key(3)))
    n = m.size
    assert abs(m.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)


def test_masks_differ_per_step_and_are_independent():
    keep, shape = 0.9, (32, 40, 96)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2025), i))(jnp.arange(64))
    m = _masks(keys, keep, shape).reshape(64, -1).astype(np.float64)
    n = m.shape[1]
    tol = 6 * np.sqrt(keep * (1 - keep) / n)
    # every step's mask is different, each has the right rate
    assert len({r.tobytes() for r in m.astype(bool)}) == 64
    assert np.all(np.abs(m.mean(1) - keep) < tol)
    # masks of consecutive steps (and of far-apart steps) are uncorrelated: P(both kept) = keep^2
    for a, b in [(0, 1), (1, 2), (5, 37), (62, 63)]:
        both = (m[a] * m[b]).mean()
        assert abs(both - keep * keep) < 6 * np.sqrt(keep * keep * (1 - keep * keep) / n), (a, b)
    # neighbouring elements of one mask are uncorrelated (along every axis of the flattened layout)
    for lag in (1, 2, 96, 40 * 96):
        both = (m[:, :-lag] * m[:, lag:]).mean()
        assert abs(both - keep * keep) < 6 * np.sqrt(keep * keep * (1 - keep * keep) / (64 * (n - lag))), lag
    # each position is kept at the right rate across steps (no position is biased)
    per_pos = m.mean(0)
    z = (per_pos - keep) / np.sqrt(keep * (1 - keep) / 64)
    assert abs(z.mean()) < 6 / np.sqrt(n) and 0.95 < z.std() < 1.05


def test_same_key_same_mask_and_any_key_impl():
    a = DR.keep_mask(jax.random.key(1), 0.9, (7, 5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(DR.keep_mask(jax.random.key(1), 0.9, (7, 5))))
    assert not np.array_equal(np.asarray(a), np.asarray(DR.keep_mask(jax.random.key(2), 0.9, (7, 5))))
    for impl in ("rbg", "unsafe_rbg"):
        m = np.asarray(DR.keep_mask(jax.random.key(0, impl=impl), 0.8, (100, 100)))
        assert abs(m.mean() - 0.8) < 5 * np.sqrt(0.16 / 1e4)


def test_dropout_is_inverted_and_rate_zero_is_identity():
    x = jnp.ones((200, 300))
    y = np.asarray(DR.dropout(x, 0.1, jax.random.key(0)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.9], rtol=1e-6)
    assert abs(y.mean() - 1.0) < 5 * np.sqrt(0.1 / 0.9 / y.size)
    assert DR.dropout(x, 0.0, jax.random.key(0)) is x
    assert DR.dropout(x.astype(jnp.bfloat16), 0.1, jax.random.key(0)).dtype == jnp.bfloat16


def test_threefry_switch(monkeypatch):
    monkeypatch.setenv("JDUP_DROPOUT_RNG", "threefry")
    k = jax.random.key(4)
    np.testing.assert_array_equal(
        np.asarray(DR.keep_mask(k, 0.9, (10, 10))), np.asarray(jax.random.bernoulli(k, 0.9, (10, 10)))
    )
    # the stream's keys are exactly what calling the stream gives
    a, b = nnx.Rngs(dropout=k), nnx.Rngs(dropout=k)
    for _ in range(3):
        np.testing.assert_array_equal(
            np.asarray(jax.random.key_data(DR.next_seed(a.dropout))),
            np.asarray(jax.random.key_data(b.dropout())),
        )


@pytest.mark.slow
def test_model_and_lora_dropout_use_it():
    victim = tiny_model("bert", 2, seed=1)
    m = lora.add_lora(victim, rank=4, alpha=8, dropout=0.5)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 50, (3, 9)), jnp.int32)
    det = np.asarray(m(ids).logits)

    def run(seed):
        with lora.lora_dropout(jax.random.key(seed)):
            return np.asarray(m(ids, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(seed))).logits)

    a, b = run(1), run(2)
    assert np.abs(a - det).max() > 1e-4 and np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(a, run(1))


def test_seed_words_of_consecutive_counters_give_independent_masks():
    # the seeds a layer stack draws from one step key (next_seed: counter 0, 1, 2, ...) must give unrelated masks
    keep, shape, n_masks = 0.9, (16, 24, 96), 48
    key = jax.random.fold_in(jax.random.key(2025), 7)
    seeds = jax.vmap(lambda c: DR.seed_words(key, c))(jnp.arange(n_masks))
    assert len({tuple(np.asarray(s).tolist()) for s in seeds}) == n_masks
    m = _masks(seeds, keep, shape).reshape(n_masks, -1).astype(np.float64)
    n = m.shape[1]
    assert np.all(np.abs(m.mean(1) - keep) < 6 * np.sqrt(keep * (1 - keep) / n))
    for a, b in [(0, 1), (1, 2), (10, 11), (3, 40)]:
        both = (m[a] * m[b]).mean()
        assert abs(both - keep * keep) < 6 * np.sqrt(keep * keep * (1 - keep * keep) / n), (a, b)
    # keys that differ in one raw word (jax.random.key(1) vs key(2)) still give unrelated masks
    m1 = np.asarray(DR.keep_mask(jax.random.key(1), keep, shape)).reshape(-1).astype(np.float64)
    m2 = np.asarray(DR.keep_mask(jax.random.key(2), keep, shape)).reshape(-1).astype(np.float64)
    for lag in (0, 1):  # also not a neighbour-swapped copy
        both = (m1[lag:] * m2[: n - lag]).mean()
        assert abs(both - keep * keep) < 6 * np.sqrt(keep * keep * (1 - keep * keep) / n), lag


def test_next_seed_advances_the_stream_like_calling_it():
    rngs = nnx.Rngs(dropout=jax.random.key(3))
    s0, s1 = DR.next_seed(rngs.dropout), DR.next_seed(rngs.dropout)
    assert int(rngs.dropout.count[...]) == 2 and not np.array_equal(np.asarray(s0), np.asarray(s1))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(DR.seed_words(jax.random.key(3), 1)))
    # seed words and the typed key they came from draw the same mask
    np.testing.assert_array_equal(
        np.asarray(DR.keep_mask(DR.seed_words(jax.random.key(5)), 0.8, (9, 11))),
        np.asarray(DR.keep_mask(jax.random.key(5), 0.8, (9, 11))),
    )


def test_a_training_forward_runs_no_threefry_per_mask():
    # each mask's seed comes from integer hashing of the step key (jdup.dropout.next_seed); a fold_in or bits call
    # per mask (XLA unrolls threefry into ~20 rounds each) cost 15-27 % of a step's compile time on CPU
    victim = tiny_model("bert", 2, seed=1)
    m = lora.add_lora(victim, rank=4, alpha=8, dropout=0.5)
    ids = jnp.ones((2, 7), jnp.int32)

    def fwd(key):
        return m(ids, deterministic=False, rngs=nnx.Rngs(dropout=key)).logits

    prims = {e.primitive.name for e in jax.make_jaxpr(fwd)(jax.random.key(0)).jaxpr.eqns}
    text = str(jax.make_jaxpr(fwd)(jax.random.key(0)))
    assert not {"random_bits", "random_fold_in", "random_split", "threefry2x32"} & prims, prims
    assert "threefry" not in text and "random_bits" not in text
