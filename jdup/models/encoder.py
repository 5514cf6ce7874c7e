"""BERT-family encoders (BERT, MiniLM, RoBERTa, XLM-R) for sequence classification, in Flax NNX.

The module tree mirrors Hugging Face closely enough that the weight table is one line per tensor:

* ``embeddings.{word_embeddings,position_embeddings,token_type_embeddings}.embedding`` and ``embeddings.LayerNorm``;
* ``encoder.layers.{i}.attention.{query,key,value,dense}`` (``nnx.Linear``), ``encoder.layers.{i}.attention_norm``,
  ``encoder.layers.{i}.intermediate``, ``encoder.layers.{i}.output`` (``nnx.Linear``), ``encoder.layers.{i}.output_norm``;
* heads: BERT ``pooler.dense`` + ``classifier``; RoBERTa ``classifier.dense`` + ``classifier.out_proj``.

Layers are post-LN (``LayerNorm(x + sublayer(x))``), as in the original BERT. Compute runs in ``dtype``
(float32 or bfloat16) while parameters are stored in ``param_dtype``; attention softmax and LayerNorm statistics are
always float32. Dropout is active only with ``deterministic=False`` and an ``nnx.Rngs`` (``dropout`` stream) passed
at call time: the modules own parameters only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdup import dropout as _dropout_lib
from jdup.errors import JdupError
from jdup.models import registry
from jdup.models.common import Output
from jdup.models.registry import TRANSPOSE, Arch, KeyRule

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape and behaviour of a BERT-family classifier (field names follow Hugging Face ``config.json``)."""

    arch: str = "bert"  # registry name: "bert" (BERT, MiniLM) or "roberta" (RoBERTa, XLM-R)
    num_labels: int = 2  # classes of the classification head
    vocab_size: int = 30522  # rows of the word embedding
    hidden_size: int = 768  # model width
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # heads per layer (hidden_size must divide evenly)
    intermediate_size: int = 3072  # feed-forward width
    hidden_act: str = "gelu"  # gelu (exact erf) | gelu_new / gelu_pytorch_tanh (tanh) | relu | silu
    hidden_dropout_prob: float = 0.1  # dropout on embeddings, sublayer outputs and (by default) the head
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    classifier_dropout: float | None = None  # head dropout; None -> hidden_dropout_prob (as transformers)
    max_position_embeddings: int = 512  # rows of the absolute position embedding
    type_vocab_size: int = 2  # rows of the token-type embedding (RoBERTa: 1)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    initializer_range: float = 0.02  # std of the normal init (random models, new heads)
    pad_token_id: int = 0  # padding token; RoBERTa positions start after it
    bos_token_id: int | None = None  # exported to config.json when set (RoBERTa: 0)
    eos_token_id: int | None = None  # exported to config.json when set (RoBERTa: 2)
    id2label: tuple[str, ...] | None = None  # label names by index; None -> LABEL_0, LABEL_1, ...
    hf_model_type: str | None = None  # model_type written on export; None -> arch ("xlm-roberta" is kept)
    remat: bool = False  # rematerialise each layer in the backward pass (jax.checkpoint) to save memory

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def head_dropout(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def tiny(cls, arch: str = "bert", num_labels: int = 2, **kw) -> EncoderConfig:
        """A 2-layer, width-32 model for tests; vocab 30522 so the real MiniLM/BERT tokenizer fits (BERT)."""
        base: dict[str, Any] = dict(
            arch=arch,
            num_labels=num_labels,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        if arch == "roberta":
            base.update(
                vocab_size=50265,
                type_vocab_size=1,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                max_position_embeddings=130,
                layer_norm_eps=1e-5,
            )
        base.update(kw)
        return cls(**base)

    @classmethod
    def bert_base(cls, num_labels: int = 2, **kw) -> EncoderConfig:
        """``bert-base-uncased`` shapes."""
        return cls(arch="bert", num_labels=num_labels, **kw)

    @classmethod
    def minilm_l6(cls, num_labels: int = 2, **kw) -> EncoderConfig:
        """``all-MiniLM-L6-v2`` shapes."""
        return cls(
            arch="bert",
            num_labels=num_labels,
            hidden_size=384,
            num_hidden_layers=6,
            intermediate_size=1536,
            **kw,
        )

    @classmethod
    def roberta_base(cls, num_labels: int = 2, **kw) -> EncoderConfig:
        """``roberta-base`` shapes."""
        return cls(
            arch="roberta",
            num_labels=num_labels,
            vocab_size=50265,
            type_vocab_size=1,
            max_position_embeddings=514,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **kw,
        )


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def _dropout(x: jax.Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout; a no-op when ``deterministic`` or ``rate == 0``."""
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("deterministic=False needs rngs=nnx.Rngs(dropout=...) at call time")
    return _dropout_lib.dropout(x, rate, rngs.dropout())


def _linear(d_in: int, d_out: int, cfg: EncoderConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
    )


class _LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics and arithmetic whatever the compute dtype; output in ``dtype``."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm = nnx.LayerNorm(
            dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x.astype(jnp.float32)).astype(self.dtype)


class Embeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        emb = lambda n: nnx.Embed(
            n, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs
        )
        self.word_embeddings = emb(cfg.vocab_size)
        self.position_embeddings = emb(cfg.max_position_embeddings)
        self.token_type_embeddings = emb(cfg.type_vocab_size)
        self.LayerNorm = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype, rngs)

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        """BERT: ``0..seq-1``. RoBERTa: ``pad+1+cumsum`` over non-pad ids, pad positions get ``pad`` (as
        transformers' ``create_position_ids_from_input_ids``)."""
        if self.cfg.arch == "roberta":
            pad = self.cfg.pad_token_id
            mask = (input_ids != pad).astype(jnp.int32)
            return jnp.cumsum(mask, axis=1) * mask + pad
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

    def __call__(self, input_ids, token_type_ids, *, deterministic: bool, rngs) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(self.position_ids(input_ids))
            + self.token_type_embeddings(token_type_ids)
        )
        h = self.LayerNorm(h)
        return _dropout(h, self.cfg.hidden_dropout_prob, deterministic, rngs)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        if d % cfg.num_attention_heads:
            raise JdupError(
                f"hidden_size {d} is not a multiple of num_attention_heads {cfg.num_attention_heads}"
            )
        self.query = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.key = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.value = _linear(d, d, cfg, dtype, param_dtype, rngs)
        self.dense = _linear(d, d, cfg, dtype, param_dtype, rngs)

    def __call__(
        self, h: jax.Array, bias: jax.Array, *, deterministic: bool, rngs, queries: jax.Array | None = None
    ) -> jax.Array:
        """Self-attention over ``h [B, S, D]``; ``queries [B, Q, D]`` (default ``h``) are the rows whose outputs
        are computed (keys and values always come from every position of ``h``). Returns ``[B, Q, D]``."""
        b, s, _ = h.shape
        hq = h if queries is None else queries
        nq = hq.shape[1]
        nh, hd = self.cfg.num_attention_heads, self.cfg.head_dim
        # heads-major [B, H, T, d] operands: XLA:CPU runs these batched matmuls about 1.5x faster than the
        # same einsums on [B, T, H, d] (benchmarks/bench_attention.py)
        q = self.query(hq).reshape(b, nq, nh, hd).transpose(0, 2, 1, 3)
        k = self.key(h).reshape(b, s, nh, hd).transpose(0, 2, 1, 3)
        v = self.value(h).reshape(b, s, nh, hd).transpose(0, 2, 1, 3)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
        probs = jax.nn.softmax(scores + bias, axis=-1)
        probs = _dropout(probs, self.cfg.attention_probs_dropout_prob, deterministic, rngs).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(b, nq, nh * hd)
        return self.dense(ctx)


class Layer(nnx.Module):
    """One post-LN transformer layer."""

    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.attention = SelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype, rngs)
        self.intermediate = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, dtype, param_dtype, rngs)
        self.output = _linear(cfg.intermediate_size, cfg.hidden_size, cfg, dtype, param_dtype, rngs)
        self.output_norm = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype, rngs)

    def __call__(
        self, h: jax.Array, bias: jax.Array, *, deterministic: bool, rngs, cls_only: bool = False
    ) -> jax.Array:
        """``h [B, S, D]`` -> ``[B, S, D]``; with ``cls_only`` only position 0 is computed (attending to every
        position) and the result is ``[B, 1, D]``: exact for a last layer whose only use is the [CLS] row."""
        p = self.cfg.hidden_dropout_prob
        x = h[:, :1] if cls_only else h
        a = self.attention(h, bias, deterministic=deterministic, rngs=rngs, queries=x if cls_only else None)
        h = self.attention_norm(x + _dropout(a, p, deterministic, rngs))
        f = self.output(self.act(self.intermediate(h)))
        return self.output_norm(h + _dropout(f, p, deterministic, rngs))


class Encoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.remat = cfg.remat
        self.layers = nnx.List(
            [
                Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )

    def __call__(self, h, bias, *, deterministic: bool, rngs, last_cls_only: bool = False) -> list[jax.Array]:
        states = [h]
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            co = last_cls_only and i == n - 1
            if self.remat:
                h = nnx.remat(_layer_fn(deterministic, co))(layer, h, bias, rngs)
            else:
                h = layer(h, bias, deterministic=deterministic, rngs=rngs, cls_only=co)
            states.append(h)
        return states


def _layer_fn(deterministic: bool, cls_only: bool):
    """``(layer, h, bias, rngs) -> layer(...)`` with the static flags closed over (for ``nnx.remat``)."""

    def f(m, x, b, r):
        return m(x, b, deterministic=deterministic, rngs=r, cls_only=cls_only)

    return f


def attention_bias(attention_mask: jax.Array) -> jax.Array:
    """``[batch, seq]`` 1/0 mask -> additive float32 ``[batch, 1, 1, seq]`` bias (0 or the float32 minimum)."""
    m = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(m, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class _EncoderClassifier(nnx.Module):
    """Backbone shared by the BERT and RoBERTa classifiers; subclasses add the head in ``_head``."""

    LORA_TARGETS = ("query", "key", "value")
    HEAD = ("classifier",)

    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.hidden_act not in _ACTIVATIONS:
            raise JdupError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        self.config = cfg
        self.dtype = dtype
        self.embeddings = Embeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        last_layer_positions: str = "all",
    ) -> Output:
        """Classify a batch.

        Args:
          input_ids: ``[batch, seq]`` token ids.
          attention_mask: ``[batch, seq]``, 1 on real tokens (default: all ones).
          token_type_ids: ``[batch, seq]`` segment ids (default: zeros).
          output_hidden_states: also return the embedding output and every layer's output (static).
          deterministic: False turns dropout on; then ``rngs`` with a ``dropout`` stream is required.
          rngs: ``nnx.Rngs`` used only for dropout.
          last_layer_positions: ``"all"`` (default) or ``"cls"`` (static): the last layer computes only position
            0 (its attention still reads every position), which is all the head and [CLS] pooling need; the
            logits are unchanged, about ``1/num_hidden_layers`` of the work is saved, and the last entry of
            ``hidden_states`` is then ``[batch, 1, dim]`` (the [CLS] row only). Used by detection features.

        Returns:
          ``Output(logits [batch, num_labels] in the compute dtype, hidden_states or None)``.
        """
        if last_layer_positions not in ("all", "cls"):
            raise ValueError(f"last_layer_positions must be 'all' or 'cls', got {last_layer_positions!r}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
        states = self.encoder(
            h,
            attention_bias(attention_mask),
            deterministic=deterministic,
            rngs=rngs,
            last_cls_only=last_layer_positions == "cls",
        )
        logits = self._head(states[-1][:, 0], deterministic=deterministic, rngs=rngs)
        return Output(logits=logits, hidden_states=tuple(states) if output_hidden_states else None)

    def _head(self, cls: jax.Array, *, deterministic: bool, rngs) -> jax.Array:
        raise NotImplementedError


class BertForSequenceClassification(_EncoderClassifier):
    """BERT / MiniLM classifier: ``classifier(dropout(tanh(pooler.dense(h[CLS]))))``."""

    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pooler = _Pooler(cfg, dtype, param_dtype, rngs)
        self.classifier = _linear(cfg.hidden_size, cfg.num_labels, cfg, dtype, param_dtype, rngs)

    def _head(self, cls, *, deterministic, rngs):
        pooled = jnp.tanh(self.pooler.dense(cls))
        return self.classifier(_dropout(pooled, self.config.head_dropout, deterministic, rngs))


class _Pooler(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.dense = _linear(cfg.hidden_size, cfg.hidden_size, cfg, dtype, param_dtype, rngs)


class RobertaClassificationHead(nnx.Module):
    def __init__(self, cfg: EncoderConfig, dtype, param_dtype, rngs: nnx.Rngs):
        self.rate = cfg.head_dropout
        self.dense = _linear(cfg.hidden_size, cfg.hidden_size, cfg, dtype, param_dtype, rngs)
        self.out_proj = _linear(cfg.hidden_size, cfg.num_labels, cfg, dtype, param_dtype, rngs)

    def __call__(self, x, *, deterministic: bool, rngs):
        x = jnp.tanh(self.dense(_dropout(x, self.rate, deterministic, rngs)))
        return self.out_proj(_dropout(x, self.rate, deterministic, rngs))


class RobertaForSequenceClassification(_EncoderClassifier):
    """RoBERTa / XLM-R classifier: ``classifier.out_proj(tanh(classifier.dense(h[<s>])))`` (no pooler)."""

    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classifier = RobertaClassificationHead(cfg, dtype, param_dtype, rngs)

    def _head(self, cls, *, deterministic, rngs):
        return self.classifier(cls, deterministic=deterministic, rngs=rngs)


def build(
    cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> _EncoderClassifier:
    """Construct the classifier for ``cfg.arch`` with random (transformers-style) initialisation."""
    cls = RobertaForSequenceClassification if cfg.arch == "roberta" else BertForSequenceClassification
    return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face config and weight tables

_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "initializer_range",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def _config_from_hf(arch: str):
    def config_from_hf(hf: dict, num_labels: int | None) -> EncoderConfig:
        pet = hf.get("position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise JdupError(
                f"position_embedding_type {pet!r} is not supported (only 'absolute')", "config.json"
            )
        if hf.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise JdupError(
                f"hidden_act {hf['hidden_act']!r} is not supported; supported: {sorted(_ACTIVATIONS)}",
                "config.json",
            )
        defaults = EncoderConfig.roberta_base() if arch == "roberta" else EncoderConfig()
        kw = {
            f: hf[f]
            for f in _HF_FIELDS
            if f in hf and (hf[f] is not None or f in ("classifier_dropout", "bos_token_id", "eos_token_id"))
        }
        if kw.get("pad_token_id") is None:
            kw["pad_token_id"] = defaults.pad_token_id
        id2label = hf.get("id2label")
        names = None
        if isinstance(id2label, dict) and id2label:
            names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        n_ckpt = len(names) if names else int(hf.get("num_labels", 2))
        n = n_ckpt if num_labels is None else int(num_labels)
        if names is not None and (len(names) != n or names == tuple(f"LABEL_{i}" for i in range(n))):
            names = None  # default names, or the caller asked for another label count
        return dataclasses.replace(
            defaults,
            arch=arch,
            num_labels=n,
            id2label=names,
            hf_model_type=None if hf.get("model_type") == arch else hf.get("model_type"),
            **kw,
        )

    return config_from_hf


def _config_to_hf(cfg: EncoderConfig) -> dict:
    names = cfg.id2label or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
    out = {
        "architectures": [
            "RobertaForSequenceClassification" if cfg.arch == "roberta" else "BertForSequenceClassification"
        ],
        "model_type": cfg.hf_model_type or cfg.arch,
        **{
            f: getattr(cfg, f) for f in _HF_FIELDS if getattr(cfg, f) is not None or f == "classifier_dropout"
        },
        "position_embedding_type": "absolute",
        "num_labels": cfg.num_labels,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "dtype": "float32",
    }
    return out


def _backbone_rules(p: str) -> list[KeyRule]:
    """Rules for embeddings + layers; ``p`` is the HF prefix ("bert." / "roberta.")."""
    T = TRANSPOSE
    rules = []
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        rules.append(KeyRule(f"{p}embeddings.{name}.weight", f"embeddings.{name}.embedding"))
    rules += _ln(f"{p}embeddings.LayerNorm", "embeddings.LayerNorm")
    L, J = f"{p}encoder.layer.{{i}}.", "encoder.layers.{i}."
    for hf_name, jd in (
        ("attention.self.query", "attention.query"),
        ("attention.self.key", "attention.key"),
        ("attention.self.value", "attention.value"),
        ("attention.output.dense", "attention.dense"),
        ("intermediate.dense", "intermediate"),
        ("output.dense", "output"),
    ):
        rules += [
            KeyRule(L + hf_name + ".weight", J + jd + ".kernel", T),
            KeyRule(L + hf_name + ".bias", J + jd + ".bias"),
        ]
    rules += _ln(L + "attention.output.LayerNorm", J + "attention_norm")
    rules += _ln(L + "output.LayerNorm", J + "output_norm")
    return rules


def _ln(hf: str, jd: str) -> list[KeyRule]:
    return [KeyRule(hf + ".weight", jd + ".norm.scale"), KeyRule(hf + ".bias", jd + ".norm.bias")]


def _dense(hf: str, jd: str) -> list[KeyRule]:
    return [KeyRule(hf + ".weight", jd + ".kernel", TRANSPOSE), KeyRule(hf + ".bias", jd + ".bias")]


def bert_key_rules(cfg: EncoderConfig) -> list[KeyRule]:
    return (
        _backbone_rules("bert.")
        + _dense("bert.pooler.dense", "pooler.dense")
        + _dense("classifier", "classifier")
    )


def roberta_key_rules(cfg: EncoderConfig) -> list[KeyRule]:
    return (
        _backbone_rules("roberta.")
        + _dense("classifier.dense", "classifier.dense")
        + _dense("classifier.out_proj", "classifier.out_proj")
    )


_IGNORE_COMMON = (r"(^|\.)embeddings\.position_ids$", r"(^|\.)embeddings\.token_type_ids$")

BERT = registry.register(
    Arch(
        name="bert",
        hf_model_types=("bert",),
        config_from_hf=_config_from_hf("bert"),
        config_to_hf=_config_to_hf,
        build=build,
        key_rules=bert_key_rules,
        # the pooler is part of a pretrained BertModel, but like transformers we initialise it when a save lacks it
        head_rules=("classifier.kernel", "classifier.bias", "pooler.dense.kernel", "pooler.dense.bias"),
        ignore_hf=_IGNORE_COMMON + (r"^cls\.",),  # pre-training heads (MLM / NSP) of BertForPreTraining saves
        hf_prefixes=("bert.",),
        feature_pooling="cls",
    )
)

ROBERTA = registry.register(
    Arch(
        name="roberta",
        hf_model_types=("roberta", "xlm-roberta"),
        config_from_hf=_config_from_hf("roberta"),
        config_to_hf=_config_to_hf,
        build=build,
        key_rules=roberta_key_rules,
        head_rules=(
            "classifier.dense.kernel",
            "classifier.dense.bias",
            "classifier.out_proj.kernel",
            "classifier.out_proj.bias",
        ),
        ignore_hf=_IGNORE_COMMON + (r"^lm_head\.", r"^(roberta\.)?pooler\."),  # MLM head; unused pooler
        hf_prefixes=("roberta.",),
        feature_pooling="cls",
    )
)
