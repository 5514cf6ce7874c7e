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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdup.errors import JdupError
from jdup.models import registry
from jdup.models.common import Output
from jdup.models.registry import TRANSPOSE, Arch, KeyRule

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
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
# building blocks


def _dropout(x: jax.Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("deterministic=False needs rngs=nnx.Rngs(dropout=...) at call time")
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _linear(d_in: int, d_out: int, cfg: BartConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(cfg.init_std),
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics and arithmetic; output in the compute dtype."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
            self.dtype
        )


class Attention(nnx.Module):
    """Multi-head attention (self or cross); ``mask`` is ``[batch, query, key]`` bool."""

    def __init__(self, cfg: BartConfig, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.rate = cfg.attention_dropout
        d = cfg.d_model
        self.q_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.k_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.v_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.out_proj = _linear(d, d, cfg, dtype, param_dtype, rngs)

    def __call__(self, x, kv, mask, *, deterministic: bool, rngs) -> jax.Array:
        b, t, d = x.shape
        s = kv.shape[1]
        h = self.heads
        hd = d // h
        # heads-major [B, H, T, d] operands (faster batched matmuls on XLA:CPU, benchmarks/bench_attention.py)
        q = self.q_proj(x).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
        k = self.k_proj(kv).reshape(b, s, h, hd).transpose(0, 2, 1, 3)
        v = self.v_proj(kv).reshape(b, s, h, hd).transpose(0, 2, 1, 3)
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k).astype(jnp.float32) * (hd**-0.5)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = _dropout(jax.nn.softmax(scores, axis=-1).astype(x.dtype), self.rate, deterministic, rngs)
        ctx = jnp.einsum("bhts,bhsd->bhtd", probs, v).transpose(0, 2, 1, 3)
        return self.out_proj(ctx.reshape(b, t, d))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: BartConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        norm = lambda: LayerNorm(cfg.d_model, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(
            cfg, cfg.encoder_attention_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.self_attn_layer_norm = norm()
        self.fc1 = _linear(cfg.d_model, cfg.encoder_ffn_dim, cfg, dtype, param_dtype, rngs)
        self.fc2 = _linear(cfg.encoder_ffn_dim, cfg.d_model, cfg, dtype, param_dtype, rngs)
        self.final_layer_norm = norm()

    def __call__(self, x, mask, *, deterministic: bool, rngs) -> jax.Array:
        c = self.cfg
        a = self.self_attn(x, x, mask, deterministic=deterministic, rngs=rngs)
        x = self.self_attn_layer_norm(x + _dropout(a, c.dropout, deterministic, rngs))
        f = _dropout(
            _ACTIVATIONS[c.activation_function](self.fc1(x)), c.activation_dropout, deterministic, rngs
        )
        return self.final_layer_norm(x + _dropout(self.fc2(f), c.dropout, deterministic, rngs))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: BartConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        norm = lambda: LayerNorm(cfg.d_model, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        heads = cfg.decoder_attention_heads
        self.self_attn = Attention(cfg, heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn_layer_norm = norm()
        self.encoder_attn = Attention(cfg, heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder_attn_layer_norm = norm()
        self.fc1 = _linear(cfg.d_model, cfg.decoder_ffn_dim, cfg, dtype, param_dtype, rngs)
        self.fc2 = _linear(cfg.decoder_ffn_dim, cfg.d_model, cfg, dtype, param_dtype, rngs)
        self.final_layer_norm = norm()

    def __call__(self, x, enc, self_mask, cross_mask, *, deterministic: bool, rngs) -> jax.Array:
        c = self.cfg
        a = self.self_attn(x, x, self_mask, deterministic=deterministic, rngs=rngs)
        x = self.self_attn_layer_norm(x + _dropout(a, c.dropout, deterministic, rngs))
        a = self.encoder_attn(x, enc, cross_mask, deterministic=deterministic, rngs=rngs)
        x = self.encoder_attn_layer_norm(x + _dropout(a, c.dropout, deterministic, rngs))
        f = _dropout(
            _ACTIVATIONS[c.activation_function](self.fc1(x)), c.activation_dropout, deterministic, rngs
        )
        return self.final_layer_norm(x + _dropout(self.fc2(f), c.dropout, deterministic, rngs))


def _positions(cfg: BartConfig, *, dtype, param_dtype, rngs) -> nnx.Embed:
    return nnx.Embed(
        cfg.max_position_embeddings + _POS_OFFSET,
        cfg.d_model,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(cfg.init_std),
        rngs=rngs,
    )


class BartStack(nnx.Module):
    """Encoder or decoder stack: positions, embedding LayerNorm, layers (token embedding lives in the parent)."""

    def __init__(self, cfg: BartConfig, decoder: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.is_decoder = decoder
        self.embed_positions = _positions(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layernorm_embedding = LayerNorm(
            cfg.d_model, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        layer = DecoderLayer if decoder else EncoderLayer
        n = cfg.decoder_layers if decoder else cfg.encoder_layers
        self.layers = nnx.List(
            [layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(n)]
        )

    def __call__(self, tok_emb, masks, enc=None, *, deterministic: bool, rngs) -> list[jax.Array]:
        t = tok_emb.shape[1]
        h = tok_emb + self.embed_positions(jnp.arange(t) + _POS_OFFSET)[None].astype(tok_emb.dtype)
        h = _dropout(self.layernorm_embedding(h), self.cfg.dropout, deterministic, rngs)
        states = [h]
        for layer in self.layers:
            if self.is_decoder:
                call = lambda m, x, e, ms, r: m(x, e, *ms, deterministic=deterministic, rngs=r)
                args = (layer, h, enc, masks, rngs)
            else:
                call = lambda m, x, e, ms, r: m(x, ms[0], deterministic=deterministic, rngs=r)
                args = (layer, h, h, masks, rngs)
            h = nnx.remat(call)(*args) if self.cfg.remat else call(*args)
            states.append(h)
        return states


class BartModel(nnx.Module):
    def __init__(self, cfg: BartConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.shared = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(cfg.init_std),
            rngs=rngs,
        )
        self.encoder = BartStack(cfg, False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = BartStack(cfg, True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask, *, deterministic: bool, rngs):
        cfg = self.cfg
        scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        emb = lambda ids: (self.shared(ids) * scale).astype(self.dtype)
        keys = attention_mask.astype(bool)[:, None, :]  # [batch, 1, key]
        b, t = input_ids.shape
        enc = self.encoder(emb(input_ids), (keys,), deterministic=deterministic, rngs=rngs)
        dec_ids = shift_tokens_right(input_ids, cfg.decoder_start_token_id)
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))
        dec = self.decoder(emb(dec_ids), (causal, keys), enc[-1], deterministic=deterministic, rngs=rngs)
        return enc, dec


def shift_tokens_right(input_ids: jax.Array, start_id: int) -> jax.Array:
    """``[start, x_0, ..., x_{T-2}]``: the decoder inputs BART builds from ``input_ids``."""
    start = jnp.full((input_ids.shape[0], 1), start_id, input_ids.dtype)
    return jnp.concatenate([start, input_ids[:, :-1]], axis=1)


class ClassificationHead(nnx.Module):
    def __init__(self, cfg: BartConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.rate = cfg.classifier_dropout
        self.dense = _linear(cfg.d_model, cfg.d_model, cfg, dtype, param_dtype, rngs)
        self.out_proj = _linear(cfg.d_model, cfg.num_labels, cfg, dtype, param_dtype, rngs)

    def __call__(self, x, *, deterministic: bool, rngs):
        x = jnp.tanh(self.dense(_dropout(x, self.rate, deterministic, rngs)))
        return self.out_proj(_dropout(x, self.rate, deterministic, rngs))


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
        self.classification_head = ClassificationHead(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

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


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face config and weight tables

_HF_FIELDS = (
    "vocab_size",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "activation_function",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "classifier_dropout",
    "max_position_embeddings",
    "init_std",
    "scale_embedding",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


def config_from_hf(hf: dict, num_labels: int | None) -> BartConfig:
    """``config.json`` of a BART model -> :class:`BartConfig`.

    Raises:
      JdupError: mBART-style pre-norm (``normalize_before``/``add_final_layer_norm``) or another activation.
    """
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise JdupError(
            "pre-LayerNorm BART variants (mBART: normalize_before/add_final_layer_norm) are not supported"
        )
    if hf.get("activation_function", "gelu") not in _ACTIVATIONS:
        raise JdupError(f"activation_function {hf['activation_function']!r} is not supported", "config.json")
    kw = {f: hf[f] for f in _HF_FIELDS if hf.get(f) is not None}
    for f in ("dropout", "attention_dropout", "activation_dropout", "classifier_dropout"):
        if f in kw:
            kw[f] = float(kw[f])
    id2label = hf.get("id2label")
    names = None
    if isinstance(id2label, dict) and id2label:
        names = tuple(id2label[k] for k in sorted(id2label, key=int))
    if num_labels is None:
        num_labels = len(names) if names else int(hf.get("num_labels", 3))
    if names is not None and len(names) != num_labels:
        names = None
    return BartConfig(num_labels=num_labels, id2label=names, **kw)


def config_to_hf(cfg: BartConfig) -> dict:
    """:class:`BartConfig` -> ``config.json`` for ``BartForSequenceClassification``."""
    names = cfg.id2label or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
    out: dict[str, Any] = {f: getattr(cfg, f) for f in _HF_FIELDS}
    out.update(
        architectures=["BartForSequenceClassification"],
        model_type="bart",
        is_encoder_decoder=True,
        normalize_before=False,
        add_final_layer_norm=False,
        tie_word_embeddings=True,
        forced_eos_token_id=cfg.eos_token_id,
        num_hidden_layers=cfg.encoder_layers,
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
        dtype="float32",
        use_cache=False,
    )
    return out


def key_rules(cfg: BartConfig) -> list[KeyRule]:
    """HF ``model.*`` / ``classification_head`` names <-> jdup paths (Linear weights transposed)."""
    del cfg
    rules = [
        KeyRule("model.shared.weight", "model.shared.embedding"),
        KeyRule("classification_head.dense.weight", "classification_head.dense.kernel", TRANSPOSE),
        KeyRule("classification_head.dense.bias", "classification_head.dense.bias"),
        KeyRule("classification_head.out_proj.weight", "classification_head.out_proj.kernel", TRANSPOSE),
        KeyRule("classification_head.out_proj.bias", "classification_head.out_proj.bias"),
    ]

    def ln(p):
        return [KeyRule(p + ".weight", p + ".scale"), KeyRule(p + ".bias", p + ".bias")]

    def dense(p):
        return [KeyRule(p + ".weight", p + ".kernel", TRANSPOSE), KeyRule(p + ".bias", p + ".bias")]

    for stack in ("encoder", "decoder"):
        s = f"model.{stack}."
        rules.append(KeyRule(s + "embed_positions.weight", s + "embed_positions.embedding"))
        rules += ln(s + "layernorm_embedding")
        p = s + "layers.{i}."
        attns = ("self_attn", "encoder_attn") if stack == "decoder" else ("self_attn",)
        for a in attns:
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                rules += dense(p + f"{a}.{proj}")
            rules += ln(p + f"{a}_layer_norm")
        rules += dense(p + "fc1") + dense(p + "fc2") + ln(p + "final_layer_norm")
    return rules


registry.register(
    Arch(
        name="bart",
        hf_model_types=("bart",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        build=build,
        key_rules=key_rules,
        head_rules=(
            "classification_head.dense.kernel",
            "classification_head.dense.bias",
            "classification_head.out_proj.kernel",
            "classification_head.out_proj.bias",
        ),  # fmt: skip
        # tied copies of model.shared, the LM head of BartForConditionalGeneration, fairseq leftovers
        ignore_hf=(
            r"^model\.(encoder|decoder)\.embed_tokens\.weight$",
            r"^lm_head\.",
            r"^final_logits_bias$",
            r"\.version$",
        ),
        hf_prefixes=("model.",),
        feature_pooling="mean",
    )
)
