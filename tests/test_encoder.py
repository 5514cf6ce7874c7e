"""The NNX BERT/RoBERTa encoders: parity with transformers (PyTorch), heads, dtypes, dropout, remat, presets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdup.models as jm
from jdup.models import encoder
from tests.helpers.encoder_ref import (
    assert_close_outputs,
    jdup_forward,
    padded_batch,
    torch_forward,
    torch_model,
)


@pytest.mark.parametrize(
    "arch,act",
    [
        ("bert", "gelu"),
        ("bert", "gelu_new"),
        ("bert", "relu"),
        ("roberta", "gelu"),
        ("roberta", "silu"),
        ("xlm-roberta", "gelu"),
    ],
)
def test_parity_tiny_random(arch, act, tmp_path):
    tm = torch_model(arch, num_labels=3, hidden_act=act)
    tm.save_pretrained(tmp_path)
    model = jm.from_pretrained(tmp_path)
    assert model.config.num_labels == 3 and model.config.hidden_act == act
    assert model.load_report.initialized == ()
    assert model.config.arch == ("bert" if arch == "bert" else "roberta")
    assert (model.config.hf_model_type or model.config.arch) == arch  # kept for export
    ids, mask, types = padded_batch(arch)
    types = types if arch == "bert" else None
    assert_close_outputs(jdup_forward(model, ids, mask, types), torch_forward(tm, ids, mask, types))


@pytest.mark.slow
def test_parity_minilm_with_head(minilm_torch_cls, minilm_dir):
    tm, folder = minilm_torch_cls
    model = jm.from_pretrained(folder)
    assert model.config.num_hidden_layers == 6 and model.config.num_labels == 3
    tok = jm.load_tokenizer("builtin:minilm")
    enc = tok(
        ["a gripping, beautifully shot film", "dull.", "the plot never quite comes together, sadly"],
        padding="max_length",
        truncation=True,
        max_length=16,
        return_tensors="np",
    )
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    want = torch_forward(tm, ids, mask, types)
    assert_close_outputs(jdup_forward(model, ids, mask, types), want)
    # the bare BertModel save (no "bert." prefix, no classifier) gives the same backbone
    bare = jm.from_pretrained(minilm_dir, 3)
    assert bare.load_report.prefixed and set(bare.load_report.initialized) == {
        "classifier.kernel",
        "classifier.bias",
    }
    _, hs = jdup_forward(bare, ids, mask, types)
    for g, w in zip(hs, want[1], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_module_names_and_class_attributes():
    def abstract(arch):
        return nnx.eval_shape(lambda: jm.tiny_model(arch, num_labels=2))

    for arch in ("bert", "roberta"):
        model = abstract(arch)
        assert model.LORA_TARGETS == ("query", "key", "value") and model.HEAD == ("classifier",)
        att = model.encoder.layers[0].attention
        for name in ("query", "key", "value", "dense"):
            assert isinstance(getattr(att, name), nnx.Linear)
    assert isinstance(abstract("bert").classifier, nnx.Linear)
    r = abstract("roberta")
    assert isinstance(r.classifier.dense, nnx.Linear) and isinstance(r.classifier.out_proj, nnx.Linear)
    assert not hasattr(r, "pooler")


def test_hidden_states_layout_and_jit():
    model = jm.tiny_model("bert", num_labels=4)
    ids, mask, _ = padded_batch("bert")
    out = nnx.jit(lambda m, i, a: m(i, a, output_hidden_states=True))(model, ids, mask)
    assert out.logits.shape == (3, 4) and out.logits.dtype == jnp.float32
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (3, 9, 32) for h in out.hidden_states)
    assert out.encoder_hidden_states is None
    assert model(ids, mask).hidden_states is None
    np.testing.assert_allclose(model(ids, mask).logits, out.logits, atol=1e-5)


def test_dropout_needs_rngs_and_models_hold_no_rng_state():
    model = jm.tiny_model("bert")
    assert len(jax.tree.leaves(nnx.state(model, nnx.RngState))) == 0
    ids, mask, _ = padded_batch("bert")
    with pytest.raises(ValueError, match="rngs"):
        model(ids, mask, deterministic=False)
    a = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1)).logits
    b = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1)).logits
    c = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=2)).logits
    d = model(ids, mask).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    # with all dropout rates at zero, deterministic=False is the same function
    z = jm.tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    np.testing.assert_allclose(
        z(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=0)).logits, z(ids, mask).logits, atol=1e-6
    )


@pytest.mark.slow
def test_remat_same_values_and_grads():
    ids, mask, _ = padded_batch("bert")
    plain = jm.tiny_model("bert", seed=3)
    remat = jm.tiny_model("bert", seed=3, remat=True)

    def loss(m):
        return jnp.sum(m(ids, mask).logits ** 2)

    step = nnx.jit(nnx.value_and_grad(loss))
    l1, g1 = step(plain)
    l2, g2 = step(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    # one rematerialised block per layer
    gdef, state = nnx.split(remat)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(gdef, s)(ids, mask).logits)(state)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("remat2") == remat.config.num_hidden_layers
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.slow
def test_bf16_compute_close_to_fp32(arch):
    ids, mask, _ = padded_batch(arch)
    ref = jm.tiny_model(arch, num_labels=3, seed=1)
    bf = jm.tiny_model(arch, num_labels=3, seed=1, dtype=jnp.bfloat16)
    out = bf(ids, mask, output_hidden_states=True)
    assert out.logits.dtype == jnp.bfloat16 and out.hidden_states[-1].dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf, nnx.Param))} == {jnp.dtype(jnp.float32)}
    want = np.asarray(ref(ids, mask).logits)
    got = np.asarray(out.logits.astype(jnp.float32))
    np.testing.assert_allclose(got, want, atol=5e-2)
    # bf16 storage as well
    both = jm.tiny_model(arch, num_labels=3, seed=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(both, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(np.asarray(both(ids, mask).logits, np.float32), want, atol=5e-2)


def _n_params(cfg):
    abstract = nnx.eval_shape(lambda: encoder.build(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_presets_parameter_counts_match_transformers():
    # transformers' num_parameters() for *ForSequenceClassification with 2 labels
    assert _n_params(encoder.EncoderConfig.bert_base(num_labels=2)) == 109_483_778
    assert _n_params(encoder.EncoderConfig.roberta_base(num_labels=2)) == 124_647_170
    # all-MiniLM-L6-v2 BertModel (22,713,216) + a 2-label classifier
    assert _n_params(encoder.EncoderConfig.minilm_l6(num_labels=2)) == 22_713_216 + 384 * 2 + 2


def test_roberta_position_ids_follow_padding():
    model = jm.tiny_model("roberta")
    ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
    pos = model.embeddings.position_ids(ids)
    np.testing.assert_array_equal(pos, [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]])


def test_unsupported_activation_is_rejected():
    with pytest.raises(jm.hf.JdupError, match="hidden_act"):
        jm.tiny_model("bert", hidden_act="mish")


@pytest.mark.parametrize("arch,remat", [("bert", False), ("roberta", False), ("bert", True)])
@pytest.mark.slow
def test_last_layer_cls_only_matches_full_forward(arch, remat):
    ids, mask, types = padded_batch(arch)
    model = jm.tiny_model(arch, num_labels=3, seed=2, num_hidden_layers=3, remat=remat)
    tt = types if arch == "bert" else None
    full = model(ids, mask, tt, output_hidden_states=True)
    fwd = nnx.jit(lambda m, i, a, t: m(i, a, t, output_hidden_states=True, last_layer_positions="cls"))
    trim = fwd(model, ids, mask, tt)
    np.testing.assert_allclose(trim.logits, full.logits, rtol=1e-5, atol=1e-5)
    assert len(trim.hidden_states) == len(full.hidden_states)
    for a, b in zip(trim.hidden_states[:-1], full.hidden_states[:-1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert trim.hidden_states[-1].shape == (ids.shape[0], 1, model.config.hidden_size)
    np.testing.assert_allclose(
        trim.hidden_states[-1][:, 0], full.hidden_states[-1][:, 0], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="last_layer_positions"):
        model(ids, mask, last_layer_positions="last")
