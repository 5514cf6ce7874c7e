"""Hugging Face interop of the Llama-architecture decoders: ``config.json`` conversion, weight table, registration.

Importing this module registers the ``llama`` (Llama 2/3, SmolLM2) and ``qwen2`` (Qwen2/2.5) families in
:mod:`jdup.models.registry`. ``config.json`` may use the transformers 4 (``rope_theta`` + ``rope_scaling``) or 5
(``rope_parameters``) layout; export writes the transformers 5 one. GGUF files reach this module through
:func:`jdup.models.gguf.read_gguf`, which derives a Hugging Face config dict from the GGUF metadata.
"""

from __future__ import annotations

from typing import Any

from jdup.errors import JdupError
from jdup.models import registry
from jdup.models.decoder import ROPE_TYPES, DecoderConfig, build
from jdup.models.registry import TRANSPOSE, Arch, KeyRule


def _first(x):
    if isinstance(x, list | tuple):
        return x[0] if x else None
    return x


def config_from_hf(hf: dict, num_labels: int | None) -> DecoderConfig:
    """``config.json`` of a Llama/Qwen2 model (transformers 4 or 5 layout) -> :class:`DecoderConfig`.

    Raises:
      JdupError: an option this port does not implement (sliding-window attention, other RoPE types,
        non-SiLU activations).
    """
    mt = hf.get("model_type")
    arch = "qwen2" if mt == "qwen2" else "llama"
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise JdupError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu)", "config.json")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise JdupError("Qwen2 sliding-window attention (use_sliding_window) is not supported", "config.json")
    # RoPE: transformers 5 `rope_parameters` (incl. rope_theta) or transformers 4 `rope_theta` + `rope_scaling`
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise JdupError(
            f"rope type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}", "config.json"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    kw: dict[str, Any] = dict(
        arch=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_type=rope_type,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch == "qwen2")),
        initializer_range=hf.get("initializer_range", 0.02),
        attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
    )
    if rope_type in ("linear", "llama3"):
        kw["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        kw["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        kw["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        kw["rope_original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    if arch == "qwen2":
        kw.update(qkv_bias=True, o_bias=False, mlp_bias=False)
    else:
        ab = bool(hf.get("attention_bias", False))
        kw.update(qkv_bias=ab, o_bias=ab, mlp_bias=bool(hf.get("mlp_bias", False)))
    pad = hf.get("pad_token_id")
    kw["pad_token_id"] = pad if pad is not None else kw["eos_token_id"]  # DUP: pad = eos
    id2label = hf.get("id2label")
    names = None
    if isinstance(id2label, dict) and id2label:
        names = tuple(id2label[k] for k in sorted(id2label, key=int))
    if num_labels is None:
        num_labels = len(names) if names else int(hf.get("num_labels", 2))
    if names is not None and len(names) != num_labels:
        names = None
    return DecoderConfig(num_labels=num_labels, id2label=names, **kw)


def config_to_hf(cfg: DecoderConfig) -> dict:
    """:class:`DecoderConfig` -> ``config.json`` for ``LlamaForSequenceClassification`` / ``Qwen2...``."""
    names = cfg.id2label or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
        )
    out: dict[str, Any] = {
        "architectures": [
            "Qwen2ForSequenceClassification" if cfg.arch == "qwen2" else "LlamaForSequenceClassification"
        ],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": cfg.attention_dropout,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "dtype": "float32",
        "use_cache": False,
    }
    if cfg.arch == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            raise JdupError(
                "a Llama config.json cannot express qkv_bias != o_bias (attention_bias is shared)"
            )
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        out.update(use_sliding_window=False)
    return out


def key_rules(cfg: DecoderConfig) -> list[KeyRule]:
    """HF ``model.*`` / ``score`` names <-> jdup paths (Linear weights transposed to ``(in, out)`` kernels)."""
    p = "model.layers.{i}."
    rules = [
        KeyRule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
        KeyRule("model.norm.weight", "model.norm.weight"),
        KeyRule(p + "input_layernorm.weight", p + "input_layernorm.weight"),
        KeyRule(p + "post_attention_layernorm.weight", p + "post_attention_layernorm.weight"),
        KeyRule("score.weight", "score.kernel", TRANSPOSE),
    ]
    for name, bias in (
        ("self_attn.q_proj", cfg.qkv_bias),
        ("self_attn.k_proj", cfg.qkv_bias),
        ("self_attn.v_proj", cfg.qkv_bias),
        ("self_attn.o_proj", cfg.o_bias),
        ("mlp.gate_proj", cfg.mlp_bias),
        ("mlp.up_proj", cfg.mlp_bias),
        ("mlp.down_proj", cfg.mlp_bias),
    ):
        rules.append(KeyRule(p + name + ".weight", p + name + ".kernel", TRANSPOSE))
        if bias:
            rules.append(KeyRule(p + name + ".bias", p + name + ".bias"))
    return rules


for _name in ("llama", "qwen2"):
    registry.register(
        Arch(
            name=_name,
            hf_model_types=(_name,),
            config_from_hf=config_from_hf,
            config_to_hf=config_to_hf,
            build=build,
            tiny_config=DecoderConfig.tiny,
            key_rules=key_rules,
            head_rules=("score.kernel",),
            # causal-LM checkpoints carry an LM head (tied or not) that a classifier does not use
            ignore_hf=(r"^lm_head\.", r"rotary_emb\.inv_freq$"),
            hf_prefixes=("model.",),
            feature_pooling="last_token",
        )
    )
