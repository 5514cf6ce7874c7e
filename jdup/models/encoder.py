"""BERT-family encoders (BERT, MiniLM, RoBERTa, XLM-R) for sequence classification, in Flax NNX.

The module tree mirrors Hugging Face closely enough that the weight table is one line per tensor:

* ``embeddings.{word_embeddings,position_embeddings,token_type_embeddings}.embedding`` and ``embeddings.LayerNorm``;
* ``encoder.layers.{i}.attention.{query,key,value,dense}`` (``nnx.Linear``), ``encoder.layers.{i}.attention_norm``,
  ``encoder.layers.{i}.intermediate``, ``encoder.layers.{i}.output`` (``nnx.Linear``), ``encoder.layers.{i}.output_norm``;
* heads: BERT ``pooler.dense`` + ``classifier``; RoBERTa ``classifier.dense`` + ``classifier.out_proj``.

Layers are post-LN (``LayerNorm(x + sublayer(x))``), as in the original BERT. Compute runs in ``dtype``
(float32 or bfloat16) while parameters are stored in ``param_dtype``; attention softmax and LayerNorm statistics are
always float32. Dropout is active only with ``deterministic=False`` and an ``nnx.Rngs`` (``dropout`` stream) passed
at call time: the modules own parameters only. The building blocks (dropout, LayerNorm, linear layers, the
heads-major attention core) come from :mod:`jdup.models.layers`; the Hugging Face config conversion and weight
table are in :mod:`jdup.models.encoder_params`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdup import dropout as _dropout_lib
from jdup.errors import JdupError
from jdup.models import layers as L
from jdup.models.common import Output

#: the activations ``hidden_act`` may name (one shared table; looked up here when a layer is built)
_ACTIVATIONS = L.ACTIVATIONS


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
# modules


def _linear(d_in: int, d_out: int, cfg: EncoderConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return L.linear(d_in, d_out, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _norm(cfg: EncoderConfig, dtype, param_dtype, rngs: nnx.Rngs) -> L.LayerNorm:
    return L.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        emb = lambda n: L.embed(
            n, cfg.hidden_size, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.word_embeddings = emb(cfg.vocab_size)
        self.position_embeddings = emb(cfg.max_position_embeddings)
        self.token_type_embeddings = emb(cfg.type_vocab_size)
        self.LayerNorm = _norm(cfg, dtype, param_dtype, rngs)

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
        return L.dropout(h, self.cfg.hidden_dropout_prob, deterministic, rngs)


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
        nh = self.cfg.num_attention_heads
        # heads-major [B, H, T, d] operands: XLA:CPU runs these batched matmuls about 1.5x faster than the
        # same einsums on [B, T, H, d] (benchmarks/bench_attention.py)
        q = L.split_heads(self.query(h if queries is None else queries), nh)
        k = L.split_heads(self.key(h), nh)
        v = L.split_heads(self.value(h), nh)
        ctx = L.attend(
            q, k, v, bias, rate=self.cfg.attention_probs_dropout_prob, deterministic=deterministic, rngs=rngs
        )
        return self.dense(L.merge_heads(ctx))


class Layer(nnx.Module):
    """One post-LN transformer layer."""

    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.attention = SelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = _norm(cfg, dtype, param_dtype, rngs)
        self.intermediate = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, dtype, param_dtype, rngs)
        self.output = _linear(cfg.intermediate_size, cfg.hidden_size, cfg, dtype, param_dtype, rngs)
        self.output_norm = _norm(cfg, dtype, param_dtype, rngs)

    def __call__(
        self, h: jax.Array, bias: jax.Array, *, deterministic: bool, rngs, cls_only: bool = False
    ) -> jax.Array:
        """``h [B, S, D]`` -> ``[B, S, D]``; with ``cls_only`` only position 0 is computed (attending to every
        position) and the result is ``[B, 1, D]``: exact for a last layer whose only use is the [CLS] row. With
        dropout on, its masks (attention, residual branches, LoRA inputs) are the [CLS] rows of the full layer's
        masks (:func:`jdup.dropout.leading_rows`), so the row equals the full computation's up to float rounding."""
        if cls_only and not deterministic:
            with _dropout_lib.leading_rows(h.shape[1]):
                return self._forward(h, bias, deterministic=deterministic, rngs=rngs, cls_only=True)
        return self._forward(h, bias, deterministic=deterministic, rngs=rngs, cls_only=cls_only)

    def _forward(self, h, bias, *, deterministic: bool, rngs, cls_only: bool) -> jax.Array:
        p = self.cfg.hidden_dropout_prob
        x = h[:, :1] if cls_only else h
        a = self.attention(h, bias, deterministic=deterministic, rngs=rngs, queries=x if cls_only else None)
        h = self.attention_norm(x + L.dropout(a, p, deterministic, rngs))
        f = self.output(self.act(self.intermediate(h)))
        return self.output_norm(h + L.dropout(f, p, deterministic, rngs))


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
                h = L.remat_call(_layer_fn(deterministic, co), layer, h, bias, rngs=rngs)
            else:
                h = layer(h, bias, deterministic=deterministic, rngs=rngs, cls_only=co)
            states.append(h)
        return states


def _layer_fn(deterministic: bool, cls_only: bool):
    """``(layer, h, bias, rngs) -> layer(...)`` with the static flags closed over (for :func:`L.remat_call`)."""

    def f(m, x, b, r):
        return m(x, b, deterministic=deterministic, rngs=r, cls_only=cls_only)

    return f


#: ``[batch, seq]`` 1/0 mask -> additive float32 ``[batch, 1, 1, seq]`` bias
attention_bias = L.padding_bias


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
            ``hidden_states`` is then ``[batch, 1, dim]`` (the [CLS] row only). Used by detection features,
            predictions and the unlearning step (with dropout on, the masks are the full layer's [CLS] rows).

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
        return self.classifier(L.dropout(pooled, self.config.head_dropout, deterministic, rngs))


class _Pooler(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.dense = _linear(cfg.hidden_size, cfg.hidden_size, cfg, dtype, param_dtype, rngs)


class RobertaForSequenceClassification(_EncoderClassifier):
    """RoBERTa / XLM-R classifier: ``classifier.out_proj(tanh(classifier.dense(h[<s>])))`` (no pooler)."""

    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classifier = L.ClassificationHead(
            cfg.hidden_size,
            cfg.num_labels,
            cfg.head_dropout,
            std=cfg.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def _head(self, cls, *, deterministic, rngs):
        return self.classifier(cls, deterministic=deterministic, rngs=rngs)


def build(
    cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> _EncoderClassifier:
    """Construct the classifier for ``cfg.arch`` with random (transformers-style) initialisation."""
    cls = RobertaForSequenceClassification if cfg.arch == "roberta" else BertForSequenceClassification
    return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
