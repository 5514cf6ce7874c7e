"""Read llama.cpp GGUF files into jdup decoder classifiers, with numpy only (the ``gguf`` package; no torch).

What happens on load:

1. :func:`read_gguf` reads the metadata and dequantises every tensor to float32 (``gguf.quants.dequantize``; Q4/Q8
   blocks become the values llama.cpp would compute with).
2. Tensor names are mapped to Hugging Face names (``blk.N.attn_q`` -> ``model.layers.N.self_attn.q_proj`` ...;
   ``token_embd`` -> ``model.embed_tokens``; ``output_norm`` -> ``model.norm``; an ``output`` LM head is dropped,
   since the classifier does not use it).
3. For ``llama`` files, llama.cpp's converter permuted the rows of ``attn_q``/``attn_k`` (it interleaves the two
   RoPE halves of each head). :func:`unpermute_qk` undoes it: ``w.reshape(n_head, rows // n_head // 2, 2, in)
   .swapaxes(1, 2)`` (``n_head`` = kv heads for ``attn_k``), as transformers' own GGUF loader does. Qwen2 files
   are not permuted.
4. A Hugging Face ``config.json`` dict is derived from the metadata (:func:`hf_config_from_metadata`).

:func:`read_gguf` returns that ``(hf_config, tensors)`` pair, exactly what the folder reader returns, so
:func:`jdup.models.from_pretrained` builds GGUF and Hugging Face checkpoints the same way (the ``score`` head of a
GGUF decoder is new). :func:`tokenizer_from_gguf` rebuilds the tokenizer from the metadata with ``tokenizers`` (no
torch either). This module reads files only: built-in names such as ``builtin:smollm2`` are resolved by
:mod:`jdup.models.hub`, and it imports nothing else from ``jdup.models``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jdup.errors import JdupError

#: GGUF tensor name (per block) -> Hugging Face name.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SUPPORTED_ARCHS = ("llama", "qwen2")


def _file(path: str | os.PathLike) -> Path:
    """``path`` as an existing file (built-in names are :mod:`jdup.models.hub`'s business)."""
    s = os.fspath(path)
    if s.lower().startswith("builtin:"):
        raise JdupError("a built-in name, not a file: resolve it with jdup.models.hub.resolve_gguf", s)
    p = Path(s).expanduser()
    if not p.is_file():
        raise JdupError("GGUF file does not exist", p)
    return p


def _reader(path: Path):
    try:
        import gguf
    except ImportError as e:
        raise JdupError("reading GGUF files needs the 'gguf' package (pip install gguf)", path) from e
    try:
        return gguf.GGUFReader(os.fspath(path))
    except Exception as e:
        raise JdupError(f"not a readable GGUF file ({e})", path) from e


_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def read_metadata(path: str | os.PathLike, reader=None, *, tokenizer: bool = True) -> dict[str, Any]:
    """Key/value metadata of a GGUF file (strings, numbers and lists as Python values).

    Args:
      path: the file (named in errors).
      reader: an open ``gguf.GGUFReader`` to reuse.
      tokenizer: decode the (large) vocabulary, merges and token-type arrays; False stores their lengths.
    """
    path = Path(path)
    r = reader if reader is not None else _reader(path)
    meta: dict[str, Any] = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if not tokenizer and key in _TOKENIZER_ARRAYS:
            meta[key + ".count"] = len(field.data)
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:  # pragma: no cover - malformed field
            raise JdupError(f"cannot decode GGUF metadata field {key!r}: {e}", path) from e
    return meta


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: ``[n_head * head_dim, ...]`` rows back to Hugging Face order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config_from_metadata(meta: dict[str, Any], path: str | os.PathLike = "<gguf>") -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for the model a GGUF file describes (llama / qwen2).

    Raises:
      JdupError: another architecture, or metadata that is missing.
    """
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise JdupError(
            f"GGUF architecture {arch!r} is not supported; supported: {list(_SUPPORTED_ARCHS)}", path
        )

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise JdupError(f"GGUF metadata lacks {full!r}", path)
        return default

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size", required=False)
    if vocab is None:
        vocab = (
            meta.get("tokenizer.ggml.tokens.count") or len(meta.get("tokenizer.ggml.tokens") or []) or None
        )
    if vocab is None:
        raise JdupError("GGUF metadata gives no vocabulary size", path)
    cfg: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise JdupError(f"GGUF RoPE scaling {scaling!r} is not supported", path)
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return cfg


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Dequantise a llama/qwen2 GGUF file into Hugging Face-named float32 tensors.

    Args:
      path: a ``.gguf`` file.

    Returns:
      ``(hf_config_dict, {hf_name: float32 array in Hugging Face (out, in) layout})``; the config also records
      ``tie_word_embeddings`` (True when the file has no separate ``output`` head).

    Raises:
      JdupError: unreadable file, unsupported architecture, unknown tensor names.
    """
    import gguf

    path = _file(path)
    r = _reader(path)
    meta = read_metadata(path, r, tokenizer=False)
    cfg = hf_config_from_metadata(meta, path)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    permuted = cfg["model_type"] == "llama"
    tensors: dict[str, np.ndarray] = {}
    unknown = []
    block = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)\Z")
    for t in r.tensors:
        m = block.match(t.name)
        if m:
            layer, part, kind = m.groups()
            if part not in _BLOCK_NAMES:
                unknown.append(t.name)
                continue
            name = f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
        else:
            base, _, kind = t.name.rpartition(".")
            if base not in _GLOBAL_NAMES:
                unknown.append(t.name)
                continue
            name = f"{_GLOBAL_NAMES[base]}.{kind}"
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise JdupError(f"cannot dequantise tensor {t.name!r} ({t.tensor_type.name}): {e}", path) from e
        if permuted and m and m.group(2) in ("attn_q", "attn_k"):
            w = unpermute_qk(w, heads if m.group(2) == "attn_q" else kv_heads)
        tensors[name] = w
    if unknown:
        raise JdupError(f"GGUF tensors with no Hugging Face equivalent: {', '.join(unknown)}", path)
    cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return cfg, tensors


def tokenizer_from_gguf(path: str | os.PathLike):
    """A transformers fast tokenizer rebuilt from GGUF metadata, without torch.

    Uses the same converter as ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` (whose reader needs torch in
    transformers 5), fed from the numpy ``gguf`` reader instead. Padding side is right; ``pad_token`` is the
    file's padding token, else its eos (as DUP does).

    Raises:
      JdupError: unreadable file or a tokenizer type transformers cannot rebuild.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:  # pragma: no cover - transformers layout changed
        raise JdupError(f"this transformers version has no GGUF tokenizer converter ({e})") from e
    path = _file(path)
    meta = read_metadata(path)
    tok = {
        n: meta[f"tokenizer.{k}"]
        for k, n in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{k}" in meta
    }
    extra = {
        n: meta[f"tokenizer.{k}"]
        for k, n in GGUF_TOKENIZER_MAPPING["tokenizer_config"].items()
        if f"tokenizer.{k}" in meta
    }
    tokens = tok.get("tokens") or []

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    try:
        backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tok)
    except Exception as e:
        raise JdupError(f"cannot rebuild the tokenizer from GGUF metadata: {e}", path) from e
    specials = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id") or token("eos_token_id"),
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: v for k, v in specials.items() if v is not None},
        **extra,
        padding_side="right",
    )
