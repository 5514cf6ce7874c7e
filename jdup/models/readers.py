"""Readers of Hugging Face model folders: ``config.json`` plus safetensors (single or sharded) or ``pytorch_model.bin``.

:func:`read_folder` returns ``(hf_config, tensors)``, the same pair :func:`jdup.models.gguf.read_gguf` returns for
a GGUF file, and :func:`jdup.models.from_pretrained` builds the model from it. ``tensors`` maps Hugging Face names
to numpy arrays in Hugging Face (torch) layout; for folders it is lazy (:class:`FolderTensors`): the weight files
are located and opened on first use, after the caller has checked the config, and safetensors are read one tensor
at a time. Every error names the file it concerns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jdup.errors import JdupError


class _SafetensorsFiles(Mapping):
    """Lazy ``{hf_name: np.ndarray}`` over one or more safetensors files; errors name the file."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for f in files:
            if not f.is_file():
                raise JdupError("safetensors shard listed in the index is missing", f)
            try:
                h = safe_open(os.fspath(f), framework="numpy")
                keys = list(h.keys())
            except Exception as e:
                raise JdupError(f"corrupt or truncated safetensors file ({e})", f) from e
            self._handles[f] = h
            for k in keys:
                self._where[k] = f

    def __getitem__(self, key: str) -> np.ndarray:
        f = self._where[key]
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:
            raise JdupError(f"cannot read tensor {key!r} (corrupt or truncated file?): {e}", f) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _torch_bin(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        import torch  # only this legacy format needs torch
    except ImportError as e:
        raise JdupError(
            "reading pytorch_model.bin needs torch (pip install torch); or convert it to safetensors",
            files[0],
        ) from e
    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            sd = torch.load(os.fspath(f), map_location="cpu", weights_only=True)
        except Exception as e:
            raise JdupError(f"cannot read PyTorch checkpoint: {e}", f) from e
        for k, t in sd.items():
            t = t.detach()
            out[k] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


def read_tensors(folder: Path) -> tuple[Mapping[str, np.ndarray], str]:
    """Tensors of a checkpoint folder: ``model.safetensors``, a sharded index, or ``pytorch_model.bin``.

    Returns:
      ``(mapping hf_name -> array, name of the file it came from)``.

    Raises:
      JdupError: no weights, an unreadable index, a missing shard, a corrupt file.
    """
    for index_name, reader in (
        ("model.safetensors.index.json", "st"),
        ("pytorch_model.bin.index.json", "pt"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except Exception as e:
                raise JdupError(f"unreadable shard index ({e})", index) from e
            files = [folder / f for f in sorted(set(weight_map.values()))]
            return (_SafetensorsFiles(files) if reader == "st" else _torch_bin(files)), os.fspath(index)
    st = folder / "model.safetensors"
    if st.is_file():
        return _SafetensorsFiles([st]), os.fspath(st)
    pt = folder / "pytorch_model.bin"
    if pt.is_file():
        return _torch_bin([pt]), os.fspath(pt)
    raise JdupError(
        "no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
        folder,
    )


def read_config(folder: Path) -> dict:
    """``config.json`` of a model folder as a dict (it must name a ``model_type``)."""
    f = folder / "config.json"
    if not f.is_file():
        raise JdupError("config.json not found: not a Hugging Face model folder", f)
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise JdupError(f"config.json is not valid JSON ({e})", f) from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise JdupError("config.json has no 'model_type'", f)
    return cfg


class FolderTensors(Mapping):
    """The tensors of a model folder, located and opened on first use (see :func:`read_tensors`).

    Attributes:
      source: the weights file (or shard index) they come from; named in loader errors.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._tensors: Mapping[str, np.ndarray] | None = None
        self._source = ""

    def _open(self) -> Mapping[str, np.ndarray]:
        if self._tensors is None:
            self._tensors, self._source = read_tensors(self.folder)
        return self._tensors

    @property
    def source(self) -> str:
        self._open()
        return self._source

    def __getitem__(self, key: str) -> np.ndarray:
        return self._open()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._open())

    def __len__(self) -> int:
        return len(self._open())


def read_folder(folder: str | os.PathLike) -> tuple[dict, FolderTensors]:
    """``(hf_config, tensors)`` of a Hugging Face model folder; the config is read now, the weights lazily.

    Raises:
      JdupError: a missing or invalid ``config.json`` (weight errors come when ``tensors`` is first used).
    """
    folder = Path(folder)
    return read_config(folder), FolderTensors(folder)
