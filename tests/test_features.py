"""jdup.features: per-example pooling, per-arch layer lists, one jitted pass per batch with bounded compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdup import data, features, models, predict
from jdup.models.common import Output

TEXTS = [
    "a gripping , beautifully acted film",
    "dull",
    "the plot never comes together and the jokes fall flat , which is a shame given the cast and the "
    "budget and the long , long running time of this movie",
    "it is fine",
    "one of the best films of the year , full of heart",
    "bad",
    "an uneven but often funny comedy",
]


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("builtin:minilm")


@pytest.fixture(scope="module")
def tiny_bert():
    return models.tiny_model("bert", 2, seed=0)


def _ds(texts=TEXTS):
    n = len(texts)
    return data.TextDataset(texts, np.arange(n) % 2, np.zeros(n))


def test_pool_one_matches_numpy():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(6, 4)).astype(np.float32)
    right = np.array([1, 1, 1, 1, 0, 0])
    left = np.array([0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(features.pool_one(jnp.asarray(h), jnp.asarray(right), "cls"), h[0])
    np.testing.assert_allclose(features.pool_one(jnp.asarray(h), jnp.asarray(right), "last_token"), h[3])
    np.testing.assert_allclose(features.pool_one(jnp.asarray(h), jnp.asarray(left), "last_token"), h[5])
    np.testing.assert_allclose(
        features.pool_one(jnp.asarray(h), jnp.asarray(right), "mean"), h[:4].mean(0), rtol=1e-6
    )
    np.testing.assert_allclose(
        features.pool_one(jnp.asarray(h), jnp.asarray(left), "mean"), h[2:].mean(0), rtol=1e-6
    )
    np.testing.assert_allclose(
        features.pool_one(jnp.asarray(h), jnp.asarray(right), "mean_unmasked"), h.mean(0), rtol=1e-6
    )
    assert int(features.last_index(jnp.asarray([1, 0, 0]))) == 0
    assert int(features.last_index(jnp.asarray([1, 1, 1]))) == 2
    with pytest.raises(ValueError):
        features.pool_one(jnp.asarray(h), jnp.asarray(right), "max")


def test_default_pooling_per_arch():
    assert features.default_pooling("bert") == "cls"
    assert features.default_pooling("roberta") == "cls"
    assert features.default_pooling("llama") == "last_token"
    assert features.default_pooling("qwen2") == "last_token"
    assert features.default_pooling("bart") == "mean"
    assert features.default_pooling("bart", faithful_bart=True) == "mean_unmasked"
    assert features.resolve_pooling("auto", "bert") == "cls"
    assert features.resolve_pooling("mean", "bert") == "mean"
    with pytest.raises(ValueError):
        features.resolve_pooling("bogus", "bert")


def test_bart_layers_are_encoder_then_decoder():
    b, t, d = 2, 5, 3
    enc = tuple(jnp.full((b, t, d), float(i)) for i in range(4))  # embeddings + 3 layers
    dec = tuple(jnp.full((b, t, d), 10.0 + i) for i in range(4))
    out = Output(logits=jnp.zeros((b, 2)), hidden_states=dec, encoder_hidden_states=enc)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    f = features.pooled_features(out, mask, "bart", "mean")
    assert f.shape == (b, 6, d)
    np.testing.assert_allclose(f[0, :, 0], [1, 2, 3, 11, 12, 13])
    with pytest.raises(ValueError):
        features.layer_states(Output(logits=jnp.zeros((1, 2))), "bert")


@pytest.mark.slow
def test_pooled_features_are_cls_of_layers_1_to_L(tiny_bert, tok):
    enc = data.encode(tok, _ds(), max_length=64, buckets=(16, 32, 64))
    b = next(data.batches(enc, 4))
    out = tiny_bert(
        jnp.asarray(b["input_ids"]),
        jnp.asarray(b["attention_mask"]),
        jnp.asarray(b["token_type_ids"]),
        output_hidden_states=True,
    )
    f = features.pooled_features(out, jnp.asarray(b["attention_mask"]), "bert", "cls")
    assert f.shape == (4, tiny_bert.config.num_hidden_layers, tiny_bert.config.hidden_size)
    assert f.dtype == jnp.float32
    for layer in range(f.shape[1]):
        np.testing.assert_allclose(f[:, layer], out.hidden_states[layer + 1][:, 0], rtol=1e-6)


@pytest.mark.slow
def test_extract_features_row_order_and_padding_invariance(tiny_bert, tok):
    enc = data.encode(tok, _ds(), max_length=64, buckets=(8, 16, 64))
    got = features.extract_features(tiny_bert, enc, batch_size=3, progress=False)
    assert got["features"].shape[:2] == (len(TEXTS), 2)
    assert got["logits"].shape == (len(TEXTS), 2)
    # each row alone (its own bucket, no batch mates) gives the same features, in file order
    for i in range(len(TEXTS)):
        one = features.extract_features(tiny_bert, enc.subset([i]), batch_size=1, progress=False)
        np.testing.assert_allclose(one["features"][0], got["features"][i], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(one["logits"][0], got["logits"][i], rtol=2e-5, atol=2e-5)


def _pass(fn, state, enc, aux):
    """One scoring pass of ``fn`` through the one batch loop."""
    return predict.run_batches(lambda b: fn(state, b, aux), data.batches(enc, 2, sort_by_length=True), len(enc))


@pytest.mark.slow
def test_batch_fn_compiles_once_per_bucket_and_takes_state_as_argument(tiny_bert, tok):
    traces = []

    def head(feats, logits, batch, aux):
        traces.append(feats.shape)
        return {"s": jnp.sum(feats, axis=(1, 2)) * aux}

    enc = data.encode(tok, _ds(), max_length=64, buckets=(8, 16, 64))
    buckets = {b["input_ids"].shape[1] for b in data.batches(enc, 2, sort_by_length=True)}
    fn, state = features.make_batch_fn(tiny_bert, head)
    r1 = _pass(fn, state, enc, jnp.float32(1.0))
    r2 = _pass(fn, state, enc, jnp.float32(2.0))
    # the head sees only [B, ...] arrays: one trace whatever the bucket, none for the second pass / new aux value
    assert len(traces) == 1 and len(buckets) > 1
    np.testing.assert_allclose(r2["s"], 2 * r1["s"], rtol=1e-6)
    # a changed state (e.g. other weights) is an argument, not a baked-in constant
    state2 = jax.tree.map(lambda x: x * 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    r3 = _pass(fn, state2, enc, jnp.float32(1.0))
    assert len(traces) == 1
    assert not np.allclose(r3["s"], r1["s"])
    # the forward is compiled once per bucket and shared with the features pass (nothing new to compile)
    from jax import monitoring

    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda ev, d, **kw: (
            compiles.append(ev) if ev == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    features.extract_features(tiny_bert, enc, batch_size=2, progress=False)
    _pass(fn, state, enc, jnp.float32(3.0))
    assert compiles == []


@pytest.mark.slow
def test_last_token_pooling_on_a_decoder(tok):
    try:
        model = models.tiny_model("llama", 2, seed=0)
    except (ValueError, KeyError, ModuleNotFoundError) as e:  # decoder family not available
        pytest.skip(f"no tiny llama: {e}")
    enc = data.encode(tok, _ds(TEXTS[:4]), max_length=32, buckets=(32,))
    got = features.extract_features(model, enc, batch_size=4, progress=False)
    b = next(data.batches(enc, 4))
    out = model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]), output_hidden_states=True)
    last = enc.lengths - 1
    n_layers = len(out.hidden_states) - 1
    assert got["features"].shape[1] == n_layers
    for layer in range(n_layers):
        ref = np.asarray(out.hidden_states[layer + 1])[np.arange(4), last]
        np.testing.assert_allclose(got["features"][:, layer], ref, rtol=2e-5, atol=2e-5)


def test_trimmed_last_layer_gives_the_same_features(tiny_bert, tok):
    assert features.model_call_kwargs("bert", "cls") == {"last_layer_positions": "cls"}
    assert features.model_call_kwargs("bert", "mean") == {}
    assert features.model_call_kwargs("llama", "last_token") == {}
    assert features.model_call_kwargs("bert", "cls", trim_last_layer=False) == {}
    enc = data.encode(tok, _ds(), max_length=64, buckets=(8, 16, 64))
    trim = features.extract_features(tiny_bert, enc, batch_size=3, progress=False)
    full = features.extract_features(tiny_bert, enc, batch_size=3, progress=False, trim_last_layer=False)
    np.testing.assert_allclose(trim["features"], full["features"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trim["logits"], full["logits"], rtol=1e-5, atol=1e-5)
