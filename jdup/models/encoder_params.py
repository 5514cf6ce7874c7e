"""Hugging Face interop of the BERT-family encoders: ``config.json`` conversion, weight tables, registration.

Importing this module registers the ``bert`` (BERT, MiniLM) and ``roberta`` (RoBERTa, XLM-R) families in
:mod:`jdup.models.registry`. Weight rules map Hugging Face names (``bert.encoder.layer.{i}.attention.self.query
.weight``) to jdup paths (``encoder.layers.{i}.attention.query.kernel``); torch ``(out, in)`` Linear weights are
transposed to ``(in, out)`` kernels.
"""

from __future__ import annotations

import dataclasses

from jdup.errors import JdupError
from jdup.models import registry
from jdup.models.encoder import EncoderConfig, build
from jdup.models.layers import ACTIVATIONS
from jdup.models.registry import TRANSPOSE, Arch, KeyRule

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
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise JdupError(
                f"hidden_act {hf['hidden_act']!r} is not supported; supported: {sorted(ACTIVATIONS)}",
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
        tiny_config=EncoderConfig.tiny,
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
        tiny_config=EncoderConfig.tiny,
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
