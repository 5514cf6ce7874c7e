"""Helpers of the encoder / HF tests: tiny random PyTorch reference classifiers, padded batches, forwards.

torch and transformers' PyTorch models are imported lazily inside the helpers (tests only, never by ``jdup``).
"""

from __future__ import annotations

import numpy as np

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)


def torch_config(arch: str, num_labels: int = 3, hidden_act: str = "gelu", **kw):
    """A tiny transformers config for ``arch`` ("bert", "roberta" or "xlm-roberta")."""
    from transformers import BertConfig, RobertaConfig, XLMRobertaConfig

    if arch in ("roberta", "xlm-roberta"):
        base = dict(
            TINY,
            max_position_embeddings=66,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            layer_norm_eps=1e-5,
        )
        cls = XLMRobertaConfig if arch == "xlm-roberta" else RobertaConfig
        return cls(**base, num_labels=num_labels, hidden_act=hidden_act, **kw)
    return BertConfig(**TINY, max_position_embeddings=64, num_labels=num_labels, hidden_act=hidden_act, **kw)


def torch_model(arch: str, num_labels: int = 3, hidden_act: str = "gelu", seed: int = 0, **kw):
    """A tiny random ``*ForSequenceClassification`` in eval mode, every parameter perturbed.

    The perturbation makes LayerNorm scales/biases and Linear biases non-trivial, so a mis-mapped tensor
    cannot hide behind transformers' ones/zeros initialisation.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(torch_config(arch, num_labels, hidden_act, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def padded_batch(arch: str, vocab_size: int = 100, lengths=(9, 5, 2), seed: int = 0):
    """``(input_ids, attention_mask, token_type_ids)`` int64 numpy arrays, right-padded to ``max(lengths)``."""
    rng = np.random.default_rng(seed)
    seq = max(lengths)
    pad, bos, eos = (0, 2, 3) if arch == "bert" else (1, 0, 2)
    ids = np.full((len(lengths), seq), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(4, vocab_size, n)
        ids[b, 0] = bos
        ids[b, n - 1] = eos
        mask[b, :n] = 1
        if arch == "bert":
            types[b, n // 2 : n] = 1
    return ids, mask, types


def torch_forward(model, ids, mask, types=None):
    """``(logits, [hidden_states...])`` of a transformers classifier as numpy float32."""
    import torch

    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    if types is not None:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        out = model(**kw)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def jdup_forward(model, ids, mask, types=None):
    """``(logits, [hidden_states...])`` of a jdup classifier in float32, highest matmul precision."""
    import jax
    import jax.numpy as jnp

    with jax.default_matmul_precision("highest"):
        out = model(
            jnp.asarray(ids),
            jnp.asarray(mask),
            None if types is None else jnp.asarray(types),
            output_hidden_states=True,
        )
    return np.asarray(out.logits, np.float32), [np.asarray(h, np.float32) for h in out.hidden_states]


def assert_close_outputs(got, want, atol=1e-4):
    """Compare ``(logits, hidden_states)`` pairs: every hidden state, then the logits."""
    g_logits, g_hs = got
    w_logits, w_hs = want
    assert len(g_hs) == len(w_hs)
    for i, (g, w) in enumerate(zip(g_hs, w_hs, strict=True)):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"hidden state {i}")
    np.testing.assert_allclose(g_logits, w_logits, atol=atol, rtol=0, err_msg="logits")
