"""jdup: find and remove backdoors in transformer text classifiers with JAX/Flax NNX.

The library surface a JAX codebase imports (docs/api.md) is importable from here; each name is loaded on first
use, so ``import jdup`` stays light (``jdup --help`` imports no JAX):

* models: :func:`from_pretrained` (Hugging Face folders, Hub ids, GGUF, built-ins; ``mesh=`` shards the weights),
  :func:`save_pretrained`, :func:`load_tokenizer`, :func:`make_mesh`, the module :mod:`jdup.predict`
  (``jdup.predict.predict(model, encoded)``: logits);
* data: :class:`TextDataset`, :func:`read_split`, :func:`read_dup_folder`, :func:`write_dup_csv`, :func:`encode`,
  :class:`Encoded`, :func:`batches`;
* features: :func:`extract_features`;
* scores: the module :mod:`jdup.scores` (pure fit/score pairs and the decision functions);
* detect: the module :mod:`jdup.detect` (``jdup.detect.detect(...)``), :class:`DetectSettings`,
  :class:`DetectionResult`;
* unlearn: the package :mod:`jdup.unlearn` (``jdup.unlearn.unlearn(...)``, ``prepare_sets``),
  :class:`UnlearnSettings`, :class:`UnlearnResult`;
* optim: the module :mod:`jdup.optim` (``project_null_space``, the projection transform);
* train: the module :mod:`jdup.train` (``jdup.train.train(...)``), :class:`TrainSettings`, :class:`TrainResult`;
* evaluation: :func:`evaluate_model`.

``detect``, ``train``, ``unlearn`` and ``predict`` are modules (their functions have the module's name), so
``jdup.detect.detect`` means the same wherever a submodule was imported first.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> (module, attribute); ``None`` as attribute: the module itself.
_SURFACE: dict[str, tuple[str, str | None]] = {
    # models
    "from_pretrained": ("jdup.models", "from_pretrained"),
    "save_pretrained": ("jdup.models", "save_pretrained"),
    "load_tokenizer": ("jdup.models", "load_tokenizer"),
    "make_mesh": ("jdup.mesh", "make_mesh"),
    "predict": ("jdup.predict", None),
    # data
    "TextDataset": ("jdup.data", "TextDataset"),
    "Encoded": ("jdup.data", "Encoded"),
    "read_split": ("jdup.data", "read_split"),
    "read_dup_folder": ("jdup.data", "read_dup_folder"),
    "write_dup_csv": ("jdup.data", "write_dup_csv"),
    "encode": ("jdup.data", "encode"),
    "batches": ("jdup.data", "batches"),
    # features, scores, optim
    "extract_features": ("jdup.features", "extract_features"),
    "scores": ("jdup.scores", None),
    "optim": ("jdup.optim", None),
    # detect
    "detect": ("jdup.detect", None),
    "DetectSettings": ("jdup.settings", "DetectSettings"),
    "DetectionResult": ("jdup.detect", "DetectionResult"),
    # unlearn
    "unlearn": ("jdup.unlearn", None),
    "UnlearnSettings": ("jdup.settings", "UnlearnSettings"),
    "UnlearnResult": ("jdup.unlearn", "UnlearnResult"),
    # train
    "train": ("jdup.train", None),
    "TrainSettings": ("jdup.settings", "TrainSettings"),
    "TrainResult": ("jdup.train", "TrainResult"),
    # evaluation
    "evaluate_model": ("jdup.evaluate", "evaluate_model"),
}

__all__ = sorted(_SURFACE)


def __getattr__(name: str) -> Any:
    if name in _SURFACE:
        module, attr = _SURFACE[name]
        value = importlib.import_module(module)
        return value if attr is None else getattr(value, attr)
    raise AttributeError(f"module 'jdup' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
