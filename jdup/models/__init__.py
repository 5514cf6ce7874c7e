"""Transformer classifiers in Flax NNX and their Hugging Face / GGUF interop.

Layout (dependencies point down this list; nothing inside the package imports this face):

* :mod:`~jdup.models.hf` -- the one loader (:func:`from_pretrained`, :func:`from_checkpoint`) and exporter
  (:func:`save_pretrained`); it imports every family's ``*_params`` module, so all families are registered.
* :mod:`~jdup.models.hub` -- names: built-ins, local paths, Hub ids, GGUF files; :func:`load_tokenizer`.
* readers returning ``(hf_config, tensors)``: :mod:`~jdup.models.readers` (safetensors, ``pytorch_model.bin``)
  and :mod:`~jdup.models.gguf` (llama.cpp files, dequantised with numpy).
* families: ``encoder`` (BERT, MiniLM, RoBERTa), ``decoder`` (Llama, Qwen2), ``bart``; each a modeling module
  and a ``*_params`` module (Hugging Face config conversion, weight table, :mod:`~jdup.models.registry` entry).
* :mod:`~jdup.models.layers` (building blocks of all families), :mod:`~jdup.models.common` (the ``Output``
  contract), :mod:`~jdup.models.sharding` (mesh rules; ``from_pretrained(..., mesh=...)`` uses them).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jdup.models import registry
from jdup.models.bart import BartConfig
from jdup.models.common import Output
from jdup.models.decoder import DecoderConfig
from jdup.models.encoder import EncoderConfig
from jdup.models.gguf import read_gguf
from jdup.models.hf import (
    LoadReport,
    export_tensors,
    from_checkpoint,
    from_gguf,
    from_pretrained,
    gguf_to_hf,
    load_state_from_tensors,
    save_pretrained,
)
from jdup.models.hub import (
    is_gguf,
    load_tokenizer,
    resolve_builtin,
    resolve_path,
    smollm2_path,
    tokenizer_from_gguf,
)


def tiny_model(
    arch: str = "bert",
    num_labels: int = 2,
    seed: int = 0,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    **config_overrides,
) -> nnx.Module:
    """A randomly initialised tiny classifier for tests (2 layers, width 32).

    Args:
      arch: a registered family name (``"bert"``, ``"roberta"``, ``"llama"``, ``"qwen2"``, ``"bart"``).
      num_labels: classes of the head.
      seed: initialisation seed.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      **config_overrides: extra config fields (e.g. ``hidden_dropout_prob=0.0``).

    Returns:
      The NNX model (``model.config`` holds its config).
    """
    family = registry.get(arch)
    if family.tiny_config is None:
        raise ValueError(f"family {arch!r} has no tiny_config(arch, num_labels, **overrides)")
    cfg = family.tiny_config(arch, num_labels=num_labels, **config_overrides)
    return family.build(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


__all__ = [
    "BartConfig",
    "DecoderConfig",
    "EncoderConfig",
    "LoadReport",
    "Output",
    "export_tensors",
    "from_checkpoint",
    "from_gguf",
    "from_pretrained",
    "gguf_to_hf",
    "is_gguf",
    "load_state_from_tensors",
    "load_tokenizer",
    "read_gguf",
    "registry",
    "resolve_builtin",
    "resolve_path",
    "save_pretrained",
    "smollm2_path",
    "tiny_model",
    "tokenizer_from_gguf",
]
