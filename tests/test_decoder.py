"""Llama / Qwen2 classifiers: parity with transformers' PyTorch models, HF load/export, full-size shapes."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdup.errors import JdupError
from jdup.models import decoder, decoder_params, from_pretrained, hf, registry, save_pretrained, tiny_model
from tests.helpers.decoder_ref import assert_states_close, padded_batch, torch_state

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD = 128, 0


def _hf_llama(**kw):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        num_labels=3,
        max_position_embeddings=128,
        # Llama-3 frequency schedule; with head_dim 8 the 4 frequencies hit all three branches
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=10000.0,
        attn_implementation="eager",
        **kw,
    )
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def _hf_qwen2(**kw):
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        pad_token_id=PAD,
        num_labels=2,
        max_position_embeddings=128,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        attn_implementation="eager",
        **kw,
    )
    torch.manual_seed(1)
    m = transformers.Qwen2ForSequenceClassification(cfg).eval()
    with torch.no_grad():  # q/k/v biases are zero-initialised: make them matter
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for name, make in (("llama", _hf_llama), ("qwen2", _hf_qwen2)):
        tm = make()
        cfg = decoder_params.config_from_hf(tm.config.to_dict(), None)
        out[name] = (tm, hf.load_state_from_tensors(name, cfg, torch_state(tm), f"torch-{name}"))
    return out


@nnx.jit
def _fwd(model, ids, mask, pos=None):
    return model(ids, mask, position_ids=pos, output_hidden_states=True)


def _torch_run(tm, ids, mask, **kw):
    with torch.no_grad():
        r = tm(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            output_hidden_states=True,
            **kw,
        )
    return r.logits.numpy(), [h.numpy() for h in r.hidden_states]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_parity_with_transformers(pairs, name, side):
    tm, jm = pairs[name]
    ids, mask = padded_batch([5, 11, 2, 11], 11, VOCAB, PAD, side, seed=3)
    logits, states = _torch_run(tm, ids, mask)
    out = _fwd(jm, jnp.asarray(ids), jnp.asarray(mask))
    assert len(out.hidden_states) == tm.config.num_hidden_layers + 1
    assert_states_close(out.hidden_states, states, mask, 1e-4, f"{name}/{side}")
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    assert np.abs(logits).max() > 1e-3  # the comparison is not vacuous


def test_explicit_position_ids_match_transformers(pairs):
    """Left padding with positions counted from the first real token (cumsum(mask) - 1), passed to both."""
    tm, jm = pairs["llama"]
    ids, mask = padded_batch([4, 9, 6], 9, VOCAB, PAD, "left", seed=5)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits, states = _torch_run(tm, ids, mask, position_ids=torch.tensor(pos, dtype=torch.long))
    out = _fwd(jm, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
    assert_states_close(out.hidden_states, states, mask, 1e-4, "llama/position_ids")
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    # with those positions a left-padded row gives the same logits as the unpadded row
    ids_r, mask_r = padded_batch([4, 9, 6], 9, VOCAB, PAD, "right", seed=5)
    out_r = _fwd(jm, jnp.asarray(ids_r), jnp.asarray(mask_r))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(out_r.logits), atol=1e-5)


def test_pool_from_pad_id_is_transformers_rule(pairs):
    """A pad id inside the text: transformers (rightmost non-pad) vs the mask rule."""
    tm, jm = pairs["llama"]
    ids, mask = padded_batch([6, 8], 8, VOCAB, PAD, "right", seed=2)
    ids[0, 5] = PAD  # a real token equal to the pad id, at the last real position of row 0
    logits, _ = _torch_run(tm, ids, mask)
    by_pad = dataclasses.replace(jm.config, pool_from="pad_id")
    jm2 = nnx.merge(nnx.graphdef(decoder.build(by_pad, rngs=nnx.Rngs(0))), nnx.state(jm))
    np.testing.assert_allclose(
        np.asarray(_fwd(jm2, jnp.asarray(ids), jnp.asarray(mask)).logits), logits, atol=1e-4
    )
    mine = np.asarray(_fwd(jm, jnp.asarray(ids), jnp.asarray(mask)).logits)
    assert np.abs(mine[0] - logits[0]).max() > 1e-4  # mask rule reads position 5, transformers position 4
    np.testing.assert_allclose(mine[1], logits[1], atol=1e-4)


@pytest.mark.slow
def test_remat_and_bf16():
    m = tiny_model("llama", num_labels=2, seed=0)
    cfg_r = dataclasses.replace(m.config, remat=True)
    mr = nnx.merge(nnx.graphdef(decoder.build(cfg_r, rngs=nnx.Rngs(0))), nnx.state(m))
    ids, mask = padded_batch([7, 3], 7, 128, 0, "right")
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    y = jnp.array([0, 1])

    def loss(model):
        logits = model(ids, mask).logits
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y])

    g1 = nnx.jit(nnx.grad(loss))(m)
    g2 = nnx.jit(nnx.grad(loss))(mr)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # bf16 compute, fp32 params: close to fp32, and norms/softmax stay finite
    mb = nnx.merge(nnx.graphdef(decoder.build(m.config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))), nnx.state(m))
    out = _fwd(mb, ids, mask)
    assert out.logits.dtype == jnp.bfloat16 and out.hidden_states[-1].dtype == jnp.bfloat16
    ref = _fwd(m, ids, mask).logits
    np.testing.assert_allclose(np.asarray(out.logits, np.float32), np.asarray(ref), atol=3e-2)


@pytest.mark.slow
def test_dropout_needs_rngs_and_is_reproducible():
    m = tiny_model("qwen2", attention_dropout=0.5)
    ids, mask = padded_batch([5, 5], 5, 128, 0, "right")
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    with pytest.raises(ValueError, match="rngs"):
        m(ids, mask, deterministic=False)
    train = nnx.jit(lambda m, i, k, r: m(i, k, deterministic=False, rngs=r).logits)
    a = train(m, ids, mask, nnx.Rngs(dropout=1))
    b = train(m, ids, mask, nnx.Rngs(dropout=1))
    c = _fwd(m, ids, mask).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-6


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.slow
def test_hf_folder_roundtrip(pairs, tmp_path, name):
    """transformers save (single file and sharded index) -> jdup load -> jdup export -> transformers load."""
    tm, _ = pairs[name]
    ids, mask = padded_batch([6, 3], 6, VOCAB, PAD, "right", seed=9)
    logits, _ = _torch_run(tm, ids, mask)
    tm.save_pretrained(tmp_path / "single")
    tm.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for sub in ("single", "sharded"):
        jm = from_pretrained(tmp_path / sub)
        assert jm.load_report.initialized == ()
        np.testing.assert_allclose(
            np.asarray(jm(jnp.asarray(ids), jnp.asarray(mask)).logits), logits, atol=1e-4
        )
    save_pretrained(jm, tmp_path / "export")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "export", attn_implementation="eager"
    ).eval()
    assert type(back) is type(tm)
    logits2, _ = _torch_run(back, ids, mask)
    np.testing.assert_allclose(logits2, logits, atol=1e-5)


def test_causal_lm_checkpoint_gets_new_head(tmp_path):
    """A bare LlamaForCausalLM save: lm_head ignored, score initialised, backbone loaded."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg)
    lm.save_pretrained(tmp_path)
    jm = from_pretrained(tmp_path, num_labels=4)
    assert jm.load_report.initialized == ("score.kernel",)
    assert jm.config.pad_token_id == 2  # pad = eos when config has none
    emb = lm.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(jm.model.embed_tokens.embedding[...]), emb)


def test_config_errors():
    with pytest.raises(JdupError, match="rope type"):
        decoder_params.config_from_hf(
            {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2}},
            2,
        )  # fmt: skip
    with pytest.raises(JdupError, match="sliding"):
        decoder_params.config_from_hf(
            {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2, "use_sliding_window": True},
            2,
        )  # fmt: skip
    with pytest.raises(JdupError, match="multiple"):
        decoder.DecoderConfig.tiny(num_key_value_heads=3).validate()


@pytest.mark.parametrize(
    "preset,expected",
    [
        # backbone counts published for the tied-embedding models, plus the score head (hidden x 2)
        ("llama-3.2-3b", 3_212_749_824 + 3072 * 2),
        ("qwen2.5-3b", 3_085_938_688 + 2048 * 2),
        ("smollm2-135m", 134_515_008 + 576 * 2),
    ],
)
@pytest.mark.slow
def test_full_size_param_counts(preset, expected):
    """Full configs built abstractly (jax.eval_shape), counted, and checked against transformers on 'meta'."""
    cfg = decoder.DecoderConfig.preset(preset, num_labels=2)
    n = decoder.count_params(cfg)
    assert n == expected
    hf_cfg = transformers.AutoConfig.for_model(**registry.get(cfg.arch).config_to_hf(cfg))
    with torch.device("meta"):
        tm = transformers.AutoModelForSequenceClassification.from_config(hf_cfg)
    assert sum(p.numel() for p in tm.parameters()) == n
    # an abstract forward pass at full size (shapes only)
    abstract = nnx.eval_shape(lambda: decoder.build(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    gdef, state = nnx.split(abstract)
    out = jax.eval_shape(
        lambda s, i, m: nnx.merge(gdef, s)(i, m, output_hidden_states=True),
        state,
        jax.ShapeDtypeStruct((2, 16), jnp.int32),
        jax.ShapeDtypeStruct((2, 16), jnp.int32),
    )
    assert out.logits.shape == (2, 2) and len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert json.dumps(registry.get(cfg.arch).config_to_hf(cfg))  # serialisable


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_decoder_detection_and_lora_unlearning_end_to_end(synthetic_dup, tmp_path):
    """A tiny Llama (vocab of the real SmolLM2 tokenizer, rebuilt from the GGUF without torch) through
    ``run_unlearn``: DUP detection on last-token features, LoRA on q/k/v/o, export, reload."""
    from jdup import lora
    from jdup.models import tokenizer_from_gguf
    from jdup.stages import unlearn as U

    try:
        tok = tokenizer_from_gguf("builtin:smollm2")
    except JdupError as e:
        pytest.skip(str(e))
    cfg = decoder.DecoderConfig.tiny(
        "llama",
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=1,
    )
    model = decoder.build(cfg, rngs=nnx.Rngs(0))
    src = save_pretrained(model, tmp_path / "victim", tokenizer_src=tok)
    student = lora.add_lora(model, rank=2, alpha=4.0)
    attn = student.model.layers[0].self_attn
    assert all(
        isinstance(getattr(attn, n), lora.LoRALinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    )
    assert not isinstance(student.model.layers[0].mlp.up_proj, lora.LoRALinear)
    out = tmp_path / "purify"
    ucfg = U.UnlearnConfig(
        model=str(src),
        data=str(synthetic_dup),
        out=str(out),
        max_length=24,
        lora_rank=4,
        lora_alpha=8.0,
        batch_size=4,
        epochs=1,
        eval_batch_size=8,
        progress=False,
        ckpt_every_steps=0,
        early_stop="none",
        detect={"progress": False, "plots": False, "max_length": 24},
    )
    m = U.run_unlearn(ucfg)
    assert m["n_flagged"] > 0 and 0.0 <= m["cacc_after"] <= 1.0
    purified = from_pretrained(out / "model")
    assert purified.config.arch == "llama"
    changed = np.abs(
        np.asarray(purified.model.layers[0].self_attn.q_proj.kernel[...])
        - np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...])
    ).max()
    assert changed > 0  # LoRA on q_proj was trained and merged


def test_final_norm_state_option():
    m = tiny_model("llama", seed=2)
    raw_cfg = dataclasses.replace(m.config, final_norm_state=False)
    mr = nnx.merge(nnx.graphdef(decoder.build(raw_cfg, rngs=nnx.Rngs(0))), nnx.state(m))
    ids, mask = padded_batch([6, 4], 6, 128, 0, "right")
    a, b = _fwd(m, jnp.asarray(ids), jnp.asarray(mask)), _fwd(mr, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    np.testing.assert_allclose(
        np.asarray(a.hidden_states[-1]), np.asarray(m.model.norm(b.hidden_states[-1])), atol=1e-5
    )
    assert np.abs(np.asarray(a.hidden_states[-1]) - np.asarray(b.hidden_states[-1])).max() > 1e-2
