"""Hugging Face interop of BART: ``config.json`` conversion, weight table, registration.

Importing this module registers the ``bart`` family in :mod:`jdup.models.registry`. Post-LN BART only (mBART's
pre-LN variants are rejected); tied copies of ``model.shared`` and the LM head of ``BartForConditionalGeneration``
saves are skipped on load.
"""

from __future__ import annotations

from typing import Any

from jdup.errors import JdupError
from jdup.models import registry
from jdup.models.bart import BartConfig, build, tiny_config
from jdup.models.layers import ACTIVATIONS
from jdup.models.registry import TRANSPOSE, Arch, KeyRule

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
    if hf.get("activation_function", "gelu") not in ACTIVATIONS:
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
        return [KeyRule(p + ".weight", p + ".norm.scale"), KeyRule(p + ".bias", p + ".norm.bias")]

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
        tiny_config=tiny_config,
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
