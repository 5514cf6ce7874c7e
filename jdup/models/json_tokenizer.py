"""A BERT-family tokenizer served from its ``tokenizer.json`` by the ``tokenizers`` library, transformers on demand.

Importing ``transformers``' tokenizer classes costs about 0.65 s of every CLI call (measured on the project's CPU
VM), more than tokenising a whole SST-2 split. For checkpoints whose ``tokenizer.json`` holds the whole pipeline
(normaliser, pre-tokeniser, WordPiece model, ``[CLS] … [SEP]`` post-processor: ``BertTokenizer`` folders, see
:data:`jdup.models.hub.PLAIN_FAST_TOKENIZERS`), :class:`JsonTokenizer` answers the one call jdup's batching makes
(:func:`jdup.data.encode`: a list of texts, ``truncation=True, max_length=n, padding=False,
add_special_tokens=True``) and the attributes it reads (``pad_token_id``, ``model_max_length``) itself, with the
same calls a ``transformers.PreTrainedTokenizerFast`` makes on the same ``tokenizers.Tokenizer`` (truncation
``longest_first`` on the configured side, no padding, ``encode_batch``), so the ids are the same
(``tests/test_hf.py``). Every other call or attribute goes to a ``PreTrainedTokenizerFast`` of the same folder,
built the first time it is needed, so the object behaves like the Hugging Face tokenizer it stands for.
:func:`jdup.models.hub.save_tokenizer` exports it by copying the tokenizer files of its :attr:`~JsonTokenizer.folder`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: transformers' "no limit" value of ``model_max_length`` (``VERY_LARGE_INTEGER``)
_NO_LIMIT = int(1e30)
#: the model inputs of a BERT tokenizer (``PreTrainedTokenizerFast`` alone would leave ``token_type_ids`` out)
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")


class JsonTokenizer:
    """See the module docstring. ``folder``: a checkpoint folder with ``tokenizer.json`` and
    ``tokenizer_config.json``; ``tokenizer_class``: the class its config names (written back on export)."""

    def __init__(self, folder: str | os.PathLike, tokenizer_class: str):
        from tokenizers import Tokenizer

        self.folder = Path(folder)  # the checkpoint folder its files come from
        self._raw = Tokenizer.from_file(os.fspath(self.folder / "tokenizer.json"))
        with open(self.folder / "tokenizer_config.json", encoding="utf-8") as f:
            cfg = json.load(f)
        self._hf: Any = None
        self.jdup_tokenizer_class = tokenizer_class
        self.model_max_length = int(cfg.get("model_max_length") or _NO_LIMIT)
        self.truncation_side = str(cfg.get("truncation_side") or "right")
        pad = cfg.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = self._raw.token_to_id(pad) if isinstance(pad, str) else None
        self._max_length: int | None = None

    def __call__(self, text: Any, *args: Any, **kw: Any) -> dict:
        plain = (
            not args and isinstance(text, list) and all(isinstance(t, str) for t in text)
            and kw.keys() == {"truncation", "max_length", "padding", "add_special_tokens"}
            and kw["truncation"] is True and kw["padding"] is False and kw["add_special_tokens"] is True
            and isinstance(kw["max_length"], int)
        )
        if not plain:
            return self.hf(text, *args, **kw)
        if self._max_length != kw["max_length"]:  # what PreTrainedTokenizerFast.set_truncation_and_padding sets
            self._raw.enable_truncation(kw["max_length"], stride=0, strategy="longest_first",
                                        direction=self.truncation_side)
            self._raw.no_padding()
            self._max_length = kw["max_length"]
        rows = self._raw.encode_batch(text, add_special_tokens=True)
        return {
            "input_ids": [r.ids for r in rows],
            "token_type_ids": [r.type_ids for r in rows],
            "attention_mask": [r.attention_mask for r in rows],
        }

    @property
    def hf(self) -> Any:
        """The ``transformers.PreTrainedTokenizerFast`` of the same folder (built on first use)."""
        if self._hf is None:
            from transformers import PreTrainedTokenizerFast

            self._hf = PreTrainedTokenizerFast.from_pretrained(
                os.fspath(self.folder), model_input_names=list(INPUT_NAMES)
            )
            self._hf.jdup_tokenizer_class = self.jdup_tokenizer_class
        return self._hf

    def __getattr__(self, name: str) -> Any:  # only for names this class does not define
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __repr__(self) -> str:
        return f"JsonTokenizer({os.fspath(self.folder)!r}, {self.jdup_tokenizer_class!r})"
