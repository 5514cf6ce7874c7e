"""Llama-architecture decoders (Llama 2/3, SmolLM2, Qwen2/2.5) as sequence classifiers, in Flax NNX.

The model mirrors ``transformers``' ``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification``:

* ``model.embed_tokens`` (``nnx.Embed``), ``model.layers.{i}`` with ``input_layernorm`` -> ``self_attn``
  (``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query attention, rotary position embedding) -> residual
  -> ``post_attention_layernorm`` -> ``mlp`` (SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``) -> residual;
  ``model.norm`` (RMSNorm) at the end;
* ``score``: a bias-free linear layer applied to the final-norm state of the **last real token** of each row.

Qwen2 differs only by a bias on ``q_proj``/``k_proj``/``v_proj`` (``qkv_bias``). RoPE supports the plain
(``default``), ``linear`` and Llama-3 (``llama3``) frequency schedules. Attention is causal and ignores padded keys,
so right- and left-padded batches both work; positions are ``0..seq-1`` as in transformers (pass ``position_ids``
to count from the first real token instead).

Numerics: compute in ``dtype`` (float32 or bfloat16), parameters in ``param_dtype``; RMSNorm statistics, RoPE
angles and the attention softmax are always float32. ``config.remat`` rematerialises each layer in the backward
pass (:func:`jdup.models.layers.remat_call`). Dropout (``attention_dropout``, normally 0) needs ``rngs`` at call
time: the model holds parameters only.

``hidden_states`` follow transformers: the embedding output, then one entry per layer, where the **last entry is
after the final RMSNorm** (the raw output of the last layer is not returned). DUP's LLM features take the last real
token of entries ``1..L``. ``DecoderConfig(final_norm_state=False)`` returns the raw last-layer output as the last
entry instead (all entries then share one scale); the official code's post-norm entry is the default.

The building blocks (dropout, RMSNorm, linear layers, the heads-major attention core) come from
:mod:`jdup.models.layers`; the Hugging Face config conversion and weight table are in
:mod:`jdup.models.decoder_params`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup.errors import JdupError
from jdup.models import layers as L
from jdup.models.common import Output

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and behaviour of a Llama/Qwen2 classifier (names follow Hugging Face ``config.json``)."""

    arch: str = "llama"  # registry name: "llama" (Llama, SmolLM2, Mistral-free Llama clones) or "qwen2"
    num_labels: int = 2  # classes of the `score` head
    vocab_size: int = 32000  # rows of the token embedding
    hidden_size: int = 4096  # model width
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 32  # key/value heads (grouped-query attention when < num_attention_heads)
    head_dim: int = 128  # width of one head (Llama: hidden_size // num_attention_heads unless given)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_type: str = "default"  # "default" | "linear" | "llama3" (Llama 3.1+ frequency rescaling)
    rope_factor: float = 1.0  # linear / llama3: scaling factor
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3 only: pre-training context
    max_position_embeddings: int = 2048  # context length (exported; RoPE has no table)
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: True; Llama: attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias; Qwen2: False)
    mlp_bias: bool = False  # bias on the SwiGLU projections (Llama mlp_bias)
    attention_dropout: float = 0.0  # dropout on attention probabilities (training only)
    tie_word_embeddings: bool = False  # exported only: whether the LM head shares embed_tokens
    initializer_range: float = 0.02  # std of the normal init (random models, new `score` heads)
    pad_token_id: int | None = None  # padding id (DUP sets pad = eos when the tokenizer has none)
    bos_token_id: int | None = None  # exported to config.json
    eos_token_id: int | None = None  # exported to config.json
    pool_from: str = "mask"  # last-token index from "mask" (attention_mask, any padding side) or "pad_id"
    # ("pad_id" = transformers exactly: rightmost token != pad_token_id; differs if a real token equals pad)
    id2label: tuple[str, ...] | None = None  # label names by index; None -> LABEL_0, LABEL_1, ...
    remat: bool = False  # rematerialise each layer in the backward pass (jax.checkpoint) to save memory
    # hidden_states[-1]: True = final RMSNorm of the last layer (transformers; the official DUP features),
    # False = the raw residual output of the last layer (every entry then on the same scale). Logits unchanged.
    final_norm_state: bool = True

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        """Raise JdupError on inconsistent shapes or unsupported options."""
        if self.arch not in ("llama", "qwen2"):
            raise JdupError(f"DecoderConfig.arch must be 'llama' or 'qwen2', got {self.arch!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise JdupError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise JdupError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise JdupError(f"rope type {self.rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
        if self.pool_from not in ("mask", "pad_id"):
            raise JdupError(f"pool_from must be 'mask' or 'pad_id', got {self.pool_from!r}")

    # ---- presets -------------------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, arch: str = "llama", num_labels: int = 2, **kw) -> DecoderConfig:
        """A 2-layer, width-32 model with grouped-query attention (4 query heads, 2 kv heads), for tests."""
        base: dict[str, Any] = dict(
            arch=arch,
            num_labels=num_labels,
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rms_norm_eps=1e-6,
            max_position_embeddings=64,
            qkv_bias=arch == "qwen2",
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=0,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, num_labels: int = 2, **kw) -> DecoderConfig:
        """Full-size configs: ``"llama-3.2-3b"`` (Instruct ids), ``"qwen2.5-3b"``, ``"smollm2-135m"`` (Instruct).

        ``pad_token_id`` is the tokenizer's eos, as DUP sets it (Llama-3.2-Instruct ``<|eot_id|>``, Qwen2.5
        ``<|endoftext|>``, SmolLM2-Instruct ``<|im_end|>``).
        """
        presets: dict[str, dict[str, Any]] = {
            "llama-3.2-3b": dict(
                arch="llama",
                vocab_size=128256,
                hidden_size=3072,
                intermediate_size=8192,
                num_hidden_layers=28,
                num_attention_heads=24,
                num_key_value_heads=8,
                head_dim=128,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                rope_type="llama3",
                rope_factor=32.0,
                rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0,
                rope_original_max_position_embeddings=8192,
                max_position_embeddings=131072,
                tie_word_embeddings=True,
                bos_token_id=128000,
                eos_token_id=128009,
                pad_token_id=128009,
            ),
            "qwen2.5-3b": dict(
                arch="qwen2",
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=11008,
                num_hidden_layers=36,
                num_attention_heads=16,
                num_key_value_heads=2,
                head_dim=128,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                max_position_embeddings=32768,
                qkv_bias=True,
                tie_word_embeddings=True,
                bos_token_id=151643,
                eos_token_id=151643,
                pad_token_id=151643,
            ),
            "smollm2-135m": dict(
                arch="llama",
                vocab_size=49152,
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                head_dim=64,
                rms_norm_eps=1e-5,
                rope_theta=100000.0,
                max_position_embeddings=8192,
                tie_word_embeddings=True,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=2,
            ),
        }
        if name not in presets:
            raise JdupError(f"unknown decoder preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], "num_labels": num_labels, **kw})


# ---------------------------------------------------------------------------------------------------------------
# modules


def _linear(d_in: int, d_out: int, bias: bool, cfg, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return L.linear(
        d_in, d_out, std=cfg.initializer_range, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """Inverse RoPE frequencies ``[head_dim // 2]`` (float32), incl. the ``linear`` and ``llama3`` schedules.

    Computed in numpy float32 the way transformers computes them in torch float32.
    """
    dim = cfg.head_dim
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exps)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position_embeddings
        low_wl, high_wl = old / lo, old / hi
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wl, inv / factor, inv).astype(np.float32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """``positions [batch, seq]`` -> ``cos, sin [batch, seq, head_dim]`` (angles in float32, cast to ``dtype``)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [batch, seq, heads, head_dim]``; rotate-half convention of transformers."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE; softmax in float32."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = _linear(cfg.hidden_size, h * d, cfg.qkv_bias, cfg, dtype, param_dtype, rngs)
        self.k_proj = _linear(cfg.hidden_size, kv * d, cfg.qkv_bias, cfg, dtype, param_dtype, rngs)
        self.v_proj = _linear(cfg.hidden_size, kv * d, cfg.qkv_bias, cfg, dtype, param_dtype, rngs)
        self.o_proj = _linear(h * d, cfg.hidden_size, cfg.o_bias, cfg, dtype, param_dtype, rngs)

    def __call__(self, x, cos, sin, bias, *, deterministic: bool, rngs) -> jax.Array:
        """``x [B, T, D]``; ``bias`` an additive float32 ``[B, 1, 1, T, T]`` mask. Returns ``[B, T, D]``."""
        cfg = self.cfg
        b, t, _ = x.shape
        kv, g, d = cfg.num_key_value_heads, cfg.num_kv_groups, cfg.head_dim
        # query head h = kv_head * g + group, as transformers' repeat_kv. Heads-major operands ([B, kv, ..., T, d]):
        # XLA:CPU runs batched matmuls with leading batch dims much faster (benchmarks/bench_attention.py).
        q = _apply_rope(self.q_proj(x).reshape(b, t, kv * g, d), cos, sin)
        q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, kv, g, T, d]
        k = _apply_rope(self.k_proj(x).reshape(b, t, kv, d), cos, sin).transpose(0, 2, 1, 3)  # [B, kv, S, d]
        v = L.split_heads(self.v_proj(x), kv)
        ctx = L.attend(q, k, v, bias, rate=cfg.attention_dropout, deterministic=deterministic, rngs=rngs)
        return self.o_proj(L.merge_heads(ctx))


class MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hs, inter = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(hs, inter, cfg.mlp_bias, cfg, dtype, param_dtype, rngs)
        self.up_proj = _linear(hs, inter, cfg.mlp_bias, cfg, dtype, param_dtype, rngs)
        self.down_proj = _linear(inter, hs, cfg.mlp_bias, cfg, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = L.RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x, cos, sin, bias, *, deterministic: bool, rngs) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, deterministic=deterministic, rngs=rngs)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nnx.Module):
    """The backbone (``LlamaModel`` / ``Qwen2Model``): embeddings, layers, final norm."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg))  # static (hashable), not a parameter
        self.embed_tokens = L.embed(
            cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(
        self, input_ids, attention_mask, position_ids=None, *, deterministic: bool = True, rngs=None
    ) -> list[jax.Array]:
        """Run the backbone.

        Returns:
          ``(states, normed)``: the L+1 hidden states (embedding output, then one per layer; the last entry is
          final-norm(layer L) as in transformers, or the raw layer-L output with ``final_norm_state=False``) and
          the final-norm output ``[batch, seq, hidden]`` the head reads.
        """
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = rope_cos_sin(position_ids, np.asarray(self.inv_freq, np.float32), self.dtype)
        mask = L.causal_mask(t)[None] & attention_mask.astype(bool)[:, None, :]  # [batch, query, key]
        bias = L.mask_bias(mask)[:, None]  # [batch, 1 (kv heads), 1 (groups), query, key]
        h = self.embed_tokens(input_ids).astype(self.dtype)
        states = [h]
        for layer in self.layers:
            if self.cfg.remat:
                h = L.remat_call(
                    lambda m, x, c, s, bb, r: m(x, c, s, bb, deterministic=deterministic, rngs=r),
                    layer, h, cos, sin, bias, rngs=rngs,
                )
            else:
                h = layer(h, cos, sin, bias, deterministic=deterministic, rngs=rngs)
            states.append(h)
        normed = self.norm(h)
        if self.cfg.final_norm_state:
            states[-1] = normed
        return states, normed


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the rightmost real token per row (works for right and left padding; 0 for an empty row)."""
    t = attention_mask.shape[-1]
    return jnp.argmax(jnp.arange(t)[None, :] * (attention_mask != 0), axis=-1)


class DecoderForSequenceClassification(nnx.Module):
    """``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification``: ``score(h_final[last token])``."""

    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
    HEAD = ("score",)

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.config = cfg
        self.dtype = dtype
        self.model = DecoderModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.score = _linear(cfg.hidden_size, cfg.num_labels, False, cfg, dtype, param_dtype, rngs)

    def pool_index(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Position the head reads per row (see ``DecoderConfig.pool_from``)."""
        if self.config.pool_from == "pad_id" and self.config.pad_token_id is not None:
            return last_token_index(input_ids != self.config.pad_token_id)
        return last_token_index(attention_mask)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        position_ids: jax.Array | None = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Output:
        """Classify a batch.

        Args:
          input_ids: ``[batch, seq]`` token ids.
          attention_mask: ``[batch, seq]``, 1 on real tokens (default all ones); padding may be on either side.
          token_type_ids: ignored (decoders have none); accepted for the common call contract.
          position_ids: ``[batch, seq]`` RoPE positions; default ``0..seq-1`` (as transformers). For left-padded
            batches ``cumsum(mask) - 1`` makes each row independent of its padding.
          output_hidden_states: also return the L+1 hidden states (static).
          deterministic: False turns dropout on; then ``rngs`` with a ``dropout`` stream is required.
          rngs: ``nnx.Rngs`` used only for dropout.

        Returns:
          ``Output(logits [batch, num_labels], hidden_states or None)``.
        """
        del token_type_ids
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        states, normed = self.model(
            input_ids, attention_mask, position_ids, deterministic=deterministic, rngs=rngs
        )
        idx = self.pool_index(input_ids, attention_mask)
        pooled = jnp.take_along_axis(normed, idx[:, None, None], axis=1)[:, 0]
        logits = self.score(pooled)
        return Output(logits=logits, hidden_states=tuple(states) if output_hidden_states else None)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Next-token logits from final-norm states through the tied embedding (``hidden @ embed_tokens.T``)."""
        emb = self.model.embed_tokens.embedding[...]
        return jnp.einsum("...d,vd->...v", hidden.astype(jnp.float32), emb.astype(jnp.float32))


def build(
    cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> DecoderForSequenceClassification:
    """Construct the classifier with random (transformers-style) initialisation."""
    return DecoderForSequenceClassification(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def count_params(cfg: DecoderConfig) -> int:
    """Parameter count of the classifier for ``cfg``, from an abstract (``nnx.eval_shape``) build: no memory."""
    abstract = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
