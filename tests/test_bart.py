"""BART classifier: parity with transformers' PyTorch BartForSequenceClassification, HF load/export, features."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdup.errors import JdupError
from jdup.models import bart, bart_params, from_pretrained, hf, save_pretrained
from tests.helpers.decoder_ref import assert_states_close, padded_batch, torch_state

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD, EOS, BOS = 96, 1, 2, 0


def _hf_bart(**kw):
    cfg = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
        num_labels=3,
        attn_implementation="eager",
        **kw,
    )
    torch.manual_seed(0)
    m = transformers.BartForSequenceClassification(cfg).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): make them matter
        for name, p in m.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.fixture(scope="module")
def pair():
    tm = _hf_bart()
    cfg = bart_params.config_from_hf(tm.config.to_dict(), None)
    return tm, hf.load_state_from_tensors("bart", cfg, torch_state(tm), "torch-bart")


def _batch(lengths, seq, seed=0):
    """<s> tokens </s> <pad>...: right padded, one eos per row (transformers needs equal eos counts)."""
    ids, mask = padded_batch([n - 2 for n in lengths], seq, VOCAB, PAD, "right", seed=seed)
    out = np.full_like(ids, PAD)
    for r, n in enumerate(lengths):
        out[r, 0], out[r, 1 : n - 1], out[r, n - 1] = BOS, ids[r, : n - 2], EOS
        mask[r, :n] = 1
    return out, mask


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, mask, output_hidden_states=True)


def _torch_run(tm, ids, mask):
    with torch.no_grad():
        r = tm(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            output_hidden_states=True,
        )
    return (
        r.logits.numpy(),
        [h.numpy() for h in r.encoder_hidden_states],
        [h.numpy() for h in r.decoder_hidden_states],
    )


@pytest.mark.slow
def test_parity_with_transformers(pair):
    tm, jm = pair
    ids, mask = _batch([6, 10, 3, 10], 10, seed=4)
    logits, enc, dec = _torch_run(tm, ids, mask)
    out = _fwd(jm, jnp.asarray(ids), jnp.asarray(mask))
    assert len(out.encoder_hidden_states) == 3 and len(out.hidden_states) == 4
    assert_states_close(out.encoder_hidden_states, enc, mask, 1e-4, "encoder")
    # the decoder is only causally masked, so every position is defined: compare all of them
    assert_states_close(out.hidden_states, dec, np.ones_like(mask), 1e-4, "decoder")
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    assert np.abs(logits).max() > 1e-3


@pytest.mark.slow
def test_features_masked_and_unmasked(pair):
    tm, jm = pair
    ids, mask = _batch([5, 8], 8, seed=1)
    _, enc, dec = _torch_run(tm, ids, mask)
    out = _fwd(jm, jnp.asarray(ids), jnp.asarray(mask))
    # the official code: plain mean over positions of encoder layers 1.. then decoder layers 1..
    ref = np.stack([h.mean(axis=1) for h in enc[1:] + dec[1:]])
    np.testing.assert_allclose(
        np.asarray(bart.pooled_features(out, jnp.asarray(mask), masked=False)), ref, atol=1e-4
    )
    m = mask[None, :, :, None]
    ref_m = np.stack([(h[None] * m).sum(2)[0] / m.sum(2)[0] for h in enc[1:] + dec[1:]])
    feats = np.asarray(bart.pooled_features(out, jnp.asarray(mask)))
    assert feats.shape == (5, 2, 32)
    np.testing.assert_allclose(feats, ref_m, atol=1e-4)
    assert np.abs(feats[:, 0] - ref[:, 0]).max() > 1e-3  # padding changes the unmasked mean of the short row


@pytest.mark.slow
def test_hf_roundtrip(pair, tmp_path):
    tm, jm = pair
    ids, mask = _batch([7, 4], 7, seed=2)
    logits, _, _ = _torch_run(tm, ids, mask)
    tm.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    loaded = from_pretrained(tmp_path / "hf")
    assert loaded.load_report.initialized == ()
    np.testing.assert_allclose(
        np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask)).logits), logits, atol=1e-4
    )
    save_pretrained(jm, tmp_path / "export")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == "BartForSequenceClassification"
    np.testing.assert_allclose(_torch_run(back, ids, mask)[0], logits, atol=1e-5)


def test_bare_bart_model_gets_new_head(tmp_path):
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BartModel(cfg).save_pretrained(tmp_path)
    jm = from_pretrained(tmp_path, num_labels=2)
    assert set(jm.load_report.initialized) == {
        "classification_head.dense.kernel",
        "classification_head.dense.bias",
        "classification_head.out_proj.kernel",
        "classification_head.out_proj.bias",
    }
    assert jm.load_report.prefixed


@pytest.mark.slow
def test_dropout_and_errors():
    m = bart.build(bart.BartConfig.tiny(), rngs=nnx.Rngs(0))
    ids, mask = _batch([6, 6], 6)
    train = nnx.jit(lambda m, i, k, r: m(i, k, deterministic=False, rngs=r).logits)
    a = train(m, jnp.asarray(ids), jnp.asarray(mask), nnx.Rngs(dropout=3))
    b = _fwd(m, jnp.asarray(ids), jnp.asarray(mask)).logits
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-6
    with pytest.raises(JdupError, match="pre-LayerNorm"):
        bart_params.config_from_hf({"model_type": "bart", "normalize_before": True}, 2)


def test_full_size_param_count():
    cfg = bart.BartConfig.preset("bart-base", num_labels=2)
    abstract = nnx.eval_shape(lambda: bart.build(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax_leaves(nnx.state(abstract, nnx.Param)))
    hf_cfg = transformers.BartConfig(
        **{k: v for k, v in bart_params.config_to_hf(cfg).items() if k != "architectures"}
    )
    with torch.device("meta"):
        tm = transformers.BartForSequenceClassification(hf_cfg)
    # transformers counts the shared embedding once (encoder/decoder embed_tokens are tied to it)
    assert n == sum(p.numel() for p in tm.parameters())
    assert 139_000_000 < n < 141_000_000


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
