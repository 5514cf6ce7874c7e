"""BART encoder-decoder as a sequence classifier (``BartForSequenceClassification``), in Flax NNX.

Structure (names as in Hugging Face, so the weight table is one line per tensor):

* ``model.shared`` -- the token embedding used by encoder and decoder (times ``sqrt(d_model)`` if
  ``scale_embedding``); ``model.{encoder,decoder}.embed_positions`` -- learned positions with BART's offset of 2;
  ``model.{encoder,decoder}.layernorm_embedding``;
* ``model.encoder.layers.{i}``: post-LN ``self_attn`` (``q_proj/k_proj/v_proj/out_proj``) and ``fc1``/``fc2``;
* ``model.decoder.layers.{i}``: causal ``self_attn``, cross-attention ``encoder_attn`` over the encoder output,
  ``fc1``/``fc2``, each followed by its LayerNorm;
* ``classification_head``: ``out_proj(dropout(tanh(dense(dropout(h)))))`` on the decoder state at the **last
  ``</s>``** (eos) of each row.

As transformers does when no ``decoder_input_ids`` are given, the decoder reads ``input_ids`` shifted right by one
(``decoder_start_token_id`` first) and masks only causally (padding in the decoder is not masked); the
cross-attention ignores padded encoder positions. LayerNorm statistics and softmax are float32 whatever ``dtype``.

``Output.hidden_states`` are the decoder states (embedding output, then each layer), ``encoder_hidden_states``
the encoder ones. :func:`pooled_features` turns them into DUP's per-layer features (encoder layers then decoder
layers, mean over positions; unmasked = the official code, masked = the default).

The building blocks (dropout, LayerNorm, linear layers, the heads-major attention core, the classification head)
come from :mod:`jdup.models.layers`; the Hugging Face config conversion and weight table are in
:mod:`jdup.models.bart_params`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdup.errors import JdupError
from jdup.models import layers as L
from jdup.models.common import Output

_ACTIVATIONS = L.ACTIVATIONS
_POS_OFFSET = 2  # BART's learned positions start at row 2


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Shape and behaviour of a BART classifier (names follow Hugging Face ``config.json``)."""

    arch: str = "bart"  # registry name
    num_labels: int = 3  # classes of the classification head
    vocab_size: int = 50265  # rows of the shared token embedding
    d_model: int = 768  # model width
    encoder_layers: int = 6  # encoder layers
    decoder_layers: int = 6  # decoder layers
    encoder_attention_heads: int = 12  # heads per encoder layer
    decoder_attention_heads: int = 12  # heads per decoder layer (self and cross attention)
    encoder_ffn_dim: int = 3072  # encoder feed-forward width
    decoder_ffn_dim: int = 3072  # decoder feed-forward width
    activation_function: str = "gelu"  # gelu (exact) | gelu_new | relu | silu | tanh
    dropout: float = 0.1  # on embeddings and sublayer outputs
    attention_dropout: float = 0.0  # on attention probabilities
    activation_dropout: float = 0.0  # after the feed-forward activation
    classifier_dropout: float = 0.0  # in the classification head
    max_position_embeddings: int = 1024  # learned positions (the table has 2 more rows)
    init_std: float = 0.02  # std of the normal init (random models, new heads)
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon (torch default)
    pad_token_id: int = 1  # <pad>
    bos_token_id: int = 0  # <s>
    eos_token_id: int = 2  # </s>; the head reads the decoder state at the last one
    decoder_start_token_id: int = 2  # first decoder input
    id2label: tuple[str, ...] | None = None  # label names by index; None -> LABEL_0, LABEL_1, ...
    remat: bool = False  # rematerialise each layer in the backward pass (jax.checkpoint)

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        """Feature layers for DUP: encoder layers plus decoder layers."""
        return self.encoder_layers + self.decoder_layers

    @property
    def initializer_range(self) -> float:
        return self.init_std

    @classmethod
    def tiny(cls, num_labels: int = 2, **kw) -> BartConfig:
        """2 encoder + 2 decoder layers, width 32, vocab 128: for tests."""
        base: dict[str, Any] = dict(
            num_labels=num_labels,
            vocab_size=128,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, num_labels: int = 2, **kw) -> BartConfig:
        """``"bart-base"`` (facebook/bart-base shapes)."""
        if name != "bart-base":
            raise JdupError(f"unknown BART preset {name!r}; known: ['bart-base']")
        return cls(num_labels=num_labels, **kw)


def tiny_config(arch: str = "bart", num_labels: int = 2, **overrides) -> BartConfig:
    """``BartConfig.tiny`` (the hook ``jdup.models.tiny_model`` calls)."""
    del arch
    return BartConfig.tiny(num_labels=num_labels, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# modules


def _linear(d_in: int, d_out: int, cfg: BartConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return L.linear(d_in, d_out, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _norm(cfg: BartConfig, dtype, param_dtype, rngs: nnx.Rngs) -> L.LayerNorm:
    return L.LayerNorm(cfg.d_model, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head attention (self or cross); ``bias`` is additive float32, broadcastable to ``[B, H, T, S]``."""

    def __init__(self, cfg: BartConfig, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.rate = cfg.attention_dropout
        d = cfg.d_model
        self.q_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.k_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.v_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.out_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)

    def __call__(self, x, kv, bias, *, deterministic: bool, rngs) -> jax.Array:
        h = self.heads
        # heads-major [B, H, T, d] operands (faster batched matmuls on XLA:CPU, benchmarks/bench_attention.py)
        q = L.split_heads(self.q_proj(x), h)
        k = L.split_heads(self.k_proj(kv), h)
        v = L.split_heads(self.v_proj(kv), h)
        ctx = L.attend(q, k, v, bias, rate=self.rate, deterministic=deterministic, rngs=rngs)
        return self.out_proj(L.merge_heads(ctx))


def _ffn(layer, x, deterministic: bool, rngs) -> jax.Array:
    """``final_layer_norm(x + dropout(fc2(dropout(act(fc1(x))))))``, the feed-forward block of both layer kinds."""
    c = layer.cfg
    f = L.dropout(_ACTIVATIONS[c.activation_function](layer.fc1(x)), c.activation_dropout, deterministic, rngs)
    return layer.final_layer_norm(x + L.dropout(layer.fc2(f), c.dropout, deterministic, rngs))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: BartConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.self_attn = Attention(
            cfg, cfg.encoder_attention_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.self_attn_layer_norm = _norm(cfg, dtype, param_dtype, rngs)
        self.fc1 = _linear(cfg.d_model, cfg.encoder_ffn_dim, cfg, dtype, param_dtype, rngs)
        self.fc2 = _linear(cfg.encoder_ffn_dim, cfg.d_model, cfg, dtype, param_dtype, rngs)
        self.final_layer_norm = _norm(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, bias, *, deterministic: bool, rngs) -> jax.Array:
        a = self.self_attn(x, x, bias, deterministic=deterministic, rngs=rngs)
        x = self.self_attn_layer_norm(x + L.dropout(a, self.cfg.dropout, deterministic, rngs))
        return _ffn(self, x, deterministic, rngs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: BartConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        heads = cfg.decoder_attention_heads
        self.self_attn = Attention(cfg, heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn_layer_norm = _norm(cfg, dtype, param_dtype, rngs)
        self.encoder_attn = Attention(cfg, heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder_attn_layer_norm = _norm(cfg, dtype, param_dtype, rngs)
        self.fc1 = _linear(cfg.d_model, cfg.decoder_ffn_dim, cfg, dtype, param_dtype, rngs)
        self.fc2 = _linear(cfg.decoder_ffn_dim, cfg.d_model, cfg, dtype, param_dtype, rngs)
        self.final_layer_norm = _norm(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, enc, self_bias, cross_bias, *, deterministic: bool, rngs) -> jax.Array:
        p = self.cfg.dropout
        a = self.self_attn(x, x, self_bias, deterministic=deterministic, rngs=rngs)
        x = self.self_attn_layer_norm(x + L.dropout(a, p, deterministic, rngs))
        a = self.encoder_attn(x, enc, cross_bias, deterministic=deterministic, rngs=rngs)
        x = self.encoder_attn_layer_norm(x + L.dropout(a, p, deterministic, rngs))
        return _ffn(self, x, deterministic, rngs)


class BartStack(nnx.Module):
    """Encoder or decoder stack: positions, embedding LayerNorm, layers (token embedding lives in the parent)."""

    def __init__(self, cfg: BartConfig, decoder: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.is_decoder = decoder
        self.embed_positions = L.embed(
            cfg.max_position_embeddings + _POS_OFFSET,
            cfg.d_model,
            std=cfg.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layernorm_embedding = _norm(cfg, dtype, param_dtype, rngs)
        layer = DecoderLayer if decoder else EncoderLayer
        n = cfg.decoder_layers if decoder else cfg.encoder_layers
        self.layers = nnx.List(
            [layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(n)]
        )

    def __call__(self, tok_emb, biases, enc=None, *, deterministic: bool, rngs) -> list[jax.Array]:
        """``biases``: ``(self_bias,)`` for the encoder, ``(causal_bias, cross_bias)`` for the decoder."""
        t = tok_emb.shape[1]
        h = tok_emb + self.embed_positions(jnp.arange(t) + _POS_OFFSET)[None].astype(tok_emb.dtype)
        h = L.dropout(self.layernorm_embedding(h), self.cfg.dropout, deterministic, rngs)
        states = [h]
        for layer in self.layers:
            if self.is_decoder:
                call = lambda m, x, e, bs, r: m(x, e, *bs, deterministic=deterministic, rngs=r)
                args = (layer, h, enc, biases)
            else:
                call = lambda m, x, e, bs, r: m(x, bs[0], deterministic=deterministic, rngs=r)
                args = (layer, h, h, biases)
            h = L.remat_call(call, *args, rngs=rngs) if self.cfg.remat else call(*args, rngs)
            states.append(h)
        return states


class BartModel(nnx.Module):
    def __init__(self, cfg: BartConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.shared = L.embed(
            cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.encoder = BartStack(cfg, False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = BartStack(cfg, True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask, *, deterministic: bool, rngs):
        cfg = self.cfg
        scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        emb = lambda ids: (self.shared(ids) * scale).astype(self.dtype)
        keys = L.padding_bias(attention_mask)  # [batch, 1, 1, key]: padded encoder positions
        causal = L.mask_bias(L.causal_mask(input_ids.shape[1])[None])  # [1, 1, query, key]
        enc = self.encoder(emb(input_ids), (keys,), deterministic=deterministic, rngs=rngs)
        dec_ids = shift_tokens_right(input_ids, cfg.decoder_start_token_id)
        dec = self.decoder(emb(dec_ids), (causal, keys), enc[-1], deterministic=deterministic, rngs=rngs)
        return enc, dec


def shift_tokens_right(input_ids: jax.Array, start_id: int) -> jax.Array:
    """``[start, x_0, ..., x_{T-2}]``: the decoder inputs BART builds from ``input_ids``."""
    start = jnp.full((input_ids.shape[0], 1), start_id, input_ids.dtype)
    return jnp.concatenate([start, input_ids[:, :-1]], axis=1)


def last_index_of(input_ids: jax.Array, token_id: int) -> jax.Array:
    """Position of the last ``token_id`` per row (0 when absent; transformers raises instead)."""
    t = input_ids.shape[-1]
    return jnp.argmax(jnp.arange(t)[None, :] * (input_ids == token_id), axis=-1)


class BartForSequenceClassification(nnx.Module):
    """``classification_head(decoder_state[last </s>])``."""

    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
    HEAD = ("classification_head",)

    def __init__(self, cfg: BartConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.activation_function not in _ACTIVATIONS:
            raise JdupError(f"unsupported activation_function {cfg.activation_function!r}")
        if cfg.d_model % cfg.encoder_attention_heads or cfg.d_model % cfg.decoder_attention_heads:
            raise JdupError("d_model must be a multiple of the attention head counts")
        self.config = cfg
        self.model = BartModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classification_head = L.ClassificationHead(
            cfg.d_model,
            cfg.num_labels,
            cfg.classifier_dropout,
            std=cfg.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Output:
        """Classify a batch (right padding; every row must contain ``</s>``, as transformers requires).

        Args:
          input_ids: ``[batch, seq]`` token ids.
          attention_mask: ``[batch, seq]``, 1 on real tokens (default all ones).
          token_type_ids: ignored.
          output_hidden_states: also return decoder (``hidden_states``) and encoder states (static).
          deterministic: False turns dropout on; then ``rngs`` with a ``dropout`` stream is required.
          rngs: ``nnx.Rngs`` used only for dropout.

        Returns:
          ``Output(logits, hidden_states=decoder states, encoder_hidden_states=encoder states)``.
        """
        del token_type_ids
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        enc, dec = self.model(input_ids, attention_mask, deterministic=deterministic, rngs=rngs)
        idx = last_index_of(input_ids, self.config.eos_token_id)
        rep = jnp.take_along_axis(dec[-1], idx[:, None, None], axis=1)[:, 0]
        logits = self.classification_head(rep, deterministic=deterministic, rngs=rngs)
        if not output_hidden_states:
            return Output(logits=logits)
        return Output(logits=logits, hidden_states=tuple(dec), encoder_hidden_states=tuple(enc))


def pooled_features(out: Output, attention_mask: jax.Array, *, masked: bool = True) -> jax.Array:
    """DUP's BART features: mean over positions of encoder layers 1..E then decoder layers 1..D.

    Args:
      out: an ``Output`` from ``output_hidden_states=True``.
      attention_mask: ``[batch, seq]`` mask of the inputs (used for both stacks: decoder position t reads the
        token before it, so the same positions are real).
      masked: True (default) averages real positions only; False is the official code's plain mean over all
        positions, padding included (features then depend on the batch's padded length).

    Returns:
      ``[E + D, batch, d_model]`` float32.
    """
    states = list(out.encoder_hidden_states[1:]) + list(out.hidden_states[1:])
    h = jnp.stack(states).astype(jnp.float32)  # [L, B, T, D]
    if not masked:
        return h.mean(axis=2)
    m = attention_mask.astype(jnp.float32)[None, :, :, None]
    return (h * m).sum(axis=2) / jnp.maximum(m.sum(axis=2), 1.0)


def build(cfg: BartConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Construct the classifier with random (transformers-style) initialisation."""
    return BartForSequenceClassification(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
