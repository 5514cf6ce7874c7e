"""Architecture registry: how a Hugging Face ``config.json`` ``model_type`` maps to a jdup model family.

Each family's ``*_params.py`` (``encoder_params``, ``decoder_params``, ``bart_params``) calls :func:`register` at
import time with an :class:`Arch`; ``jdup.models.hf`` imports them all, so the table is complete whenever the loader
is. The loader and exporter use only this table, so a new family slots in without touching them.

Weight mapping is a table of :class:`KeyRule` s. Both names are ``str.format`` templates whose only fields are
integers such as ``{i}`` (layer index), so the same table maps Hugging Face -> jdup on load and jdup -> Hugging
Face on export. ``jdup`` paths are dotted NNX state paths (``encoder.layers.{i}.attention.query.kernel``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of array maps: ``to_jdup`` on load, ``to_hf`` on export (its inverse)."""

    name: str
    to_jdup: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
TRANSPOSE = Transform("transpose", lambda a: np.ascontiguousarray(a.T), lambda a: np.ascontiguousarray(a.T))


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str  # e.g. "bert.encoder.layer.{i}.attention.self.query.weight"
    jdup: str  # e.g. "encoder.layers.{i}.attention.query.kernel"
    transform: Transform = IDENTITY


@dataclasses.dataclass(frozen=True)
class Arch:
    """One model family.

    Attributes:
      name: registry name, also ``config.arch`` (``"bert"``, ``"roberta"``, ``"llama"``, ``"qwen2"``, ``"bart"``).
      hf_model_types: ``model_type`` values of ``config.json`` handled by this family.
      config_from_hf: ``(hf_config_dict, num_labels | None) -> Config`` (raises ``JdupError`` on keys it cannot
        honour, e.g. an unsupported ``position_embedding_type``).
      config_to_hf: ``Config -> dict`` written as ``config.json`` on export (with ``architectures``,
        ``id2label``...), loadable by ``transformers.AutoModelForSequenceClassification``.
      build: ``(config, *, dtype, param_dtype, rngs) -> nnx.Module``.
      key_rules: ``config -> list[KeyRule]`` covering every parameter of the classifier.
      head_rules: the subset of jdup paths (templates) that form a newly initialisable classification head.
      ignore_hf: regexes of Hugging Face keys to skip silently (buffers such as ``position_ids``).
      hf_prefixes: prefixes a bare backbone checkpoint may lack (e.g. ``"bert."`` for a ``BertModel`` save).
      feature_pooling: default pooling for DUP features (``"cls"``, ``"last_token"``, ``"mean"``).
      tiny_config: ``(arch, num_labels=2, **overrides) -> Config`` of a 2-layer test model
        (:func:`jdup.models.tiny_model`); None when the family has none.
    """

    name: str
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable[[dict, int | None], Any]
    config_to_hf: Callable[[Any], dict]
    build: Callable[..., Any]
    key_rules: Callable[[Any], list[KeyRule]]
    head_rules: tuple[str, ...] = ()
    ignore_hf: tuple[str, ...] = ()
    hf_prefixes: tuple[str, ...] = ()
    feature_pooling: str = "cls"
    tiny_config: Callable[..., Any] | None = None


_ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    _ARCHS[arch.name] = arch
    return arch


def get(name: str) -> Arch:
    return _ARCHS[name]


def for_model_type(model_type: str) -> Arch | None:
    for arch in _ARCHS.values():
        if model_type in arch.hf_model_types:
            return arch
    return None


def names() -> list[str]:
    return sorted(_ARCHS)
