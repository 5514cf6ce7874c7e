"""Tokenisation into right-padded numpy arrays (:class:`Encoded`, :func:`encode`) and the bucket lengths that
bound the shapes a jitted consumer sees (:data:`DEFAULT_BUCKETS`, :data:`INFERENCE_BUCKETS`, :func:`make_buckets`,
:func:`merge_sparse_buckets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jdup.data.records import TextDataset

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
#: Finer lengths for inference passes (detection): multiples of 8 up to 128, then steps of 32 and 64. Batches sorted
#: by length then carry almost no padding (SST-2: 1.15x the real tokens instead of 1.6x with DEFAULT_BUCKETS); only
#: the buckets that occur compile, once each per model.
INFERENCE_BUCKETS = (*range(8, 129, 8), 160, 192, 224, 256, 320, 384, 448, 512)


@dataclasses.dataclass
class Encoded:
    """A tokenised dataset, right-padded to ``max_length`` (batches are cut down to a bucket length).

    Attributes:
      input_ids, attention_mask, token_type_ids: ``int32 [N, max_length]``.
      lengths: ``int32 [N]`` number of real tokens (after truncation).
      labels: ``int32 [N]``; poison: ``int8 [N]``.
      buckets: the allowed sequence lengths, increasing, the last one = ``max_length``.
      pad_id: the id used for padding.
      num_truncated: rows that fill all ``max_length`` positions (truncated, or exactly that long).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    poison: np.ndarray
    buckets: tuple[int, ...]
    pad_id: int
    num_truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])

    def bucket_for(self, length: int) -> int:
        """The smallest bucket holding ``length`` tokens."""
        for b in self.buckets:
            if length <= b:
                return b
        return self.buckets[-1]

    @staticmethod
    def concat(parts: Sequence[Encoded]) -> Encoded:
        """The rows of ``parts`` in order, as one :class:`Encoded` (the same arrays :func:`encode` gives for the
        concatenated texts: every row is padded to the same ``max_length``). Buckets and pad id of the first."""
        first = parts[0]
        if any(p.max_length != first.max_length for p in parts):
            raise ValueError("cannot concatenate encodings of different max_length")
        cat = {k: np.concatenate([getattr(p, k) for p in parts])
               for k in ("input_ids", "attention_mask", "token_type_ids", "lengths", "labels", "poison")}
        return dataclasses.replace(first, **cat, num_truncated=sum(p.num_truncated for p in parts))

    def subset(self, index: Sequence[int] | np.ndarray) -> Encoded:
        """Rows ``index`` as a new :class:`Encoded` (same buckets)."""
        i = np.asarray(index, np.int64)
        return dataclasses.replace(
            self, input_ids=self.input_ids[i], attention_mask=self.attention_mask[i],
            token_type_ids=self.token_type_ids[i], lengths=self.lengths[i], labels=self.labels[i],
            poison=self.poison[i], num_truncated=int((self.lengths[i] >= self.max_length).sum()),
        )


def make_buckets(max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Bucket lengths capped at ``max_length``; ``max_length`` itself is always the last bucket."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = sorted({int(b) for b in buckets if 0 < int(b) < max_length} | {int(max_length)})
    return tuple(out)


def merge_sparse_buckets(lengths: Sequence[int] | np.ndarray, buckets: Sequence[int], min_count: int) -> tuple[int, ...]:
    """The bucket lengths worth a compilation for these lengths, chosen from their histogram.

    Walking up from the shortest bucket, a bucket that fewer than ``min_count`` of ``lengths`` would use (counting
    those carried up from dropped buckets below it) is dropped and its items go to the next longer bucket. The
    longest bucket any item uses is always kept, and so are buckets no item uses (longer rows seen later still
    find them) and the last one (the array width). ``min_count <= 1`` or no lengths: ``buckets`` unchanged.

    Every kept padded length compiles a jitted consumer once; a dropped one costs only padding, so sparse lengths
    are cheaper merged (detection: ``DetectConfig.bucket_min_rows``; unlearning: ``pad_min_steps``).
    """
    bks = tuple(sorted(int(b) for b in buckets))
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if min_count <= 1 or lengths.size == 0 or not bks:
        return bks
    idx = np.searchsorted(bks, np.minimum(lengths, bks[-1]), side="left")
    counts = np.bincount(idx, minlength=len(bks))
    top = int(idx.max())
    keep, carry = [], 0
    for i, b in enumerate(bks):
        carry += int(counts[i])
        if i >= top or carry == 0 or carry >= min_count:
            keep.append(b)
            carry = 0
    return tuple(keep)


def for_inference(encoded: Encoded, min_rows: int = 128) -> Encoded:
    """``encoded`` with the fine :data:`INFERENCE_BUCKETS` (capped at its width), less those fewer than
    ``min_rows`` of its rows would use (:func:`merge_sparse_buckets`): for passes over rows sorted by length,
    where a padding-invariant forward (dropout off, masked attention) gives the same outputs at any padded length.
    Same arrays, new ``buckets``."""
    bks = make_buckets(encoded.max_length, INFERENCE_BUCKETS)
    return dataclasses.replace(encoded, buckets=merge_sparse_buckets(encoded.lengths, bks, min_rows))


def pad_token_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its eos token (decoder LMs such as Llama), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def model_max_length(tokenizer, config: Any = None) -> int | None:
    """The longest input the model accepts: ``config.max_position_embeddings`` (minus RoBERTa's offset of 2 when
    ``pad_token_id`` is 1 and the arch is roberta) or a finite ``tokenizer.model_max_length``; None if unknown."""
    limits = []
    mpe = getattr(config, "max_position_embeddings", None)
    if mpe:
        offset = 2 if getattr(config, "arch", "") in ("roberta", "xlm-roberta") else 0
        limits.append(int(mpe) - offset)
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    return min(limits) if limits else None


def encode(
    tokenizer,
    dataset: TextDataset,
    max_length: int = 128,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    *,
    config: Any = None,
    chunk: int = 2048,
) -> Encoded:
    """Tokenise ``dataset`` (truncating to ``max_length``) into right-padded numpy arrays.

    Padding is always on the right, with the tokenizer's pad id, or its eos id for decoder tokenizers without a
    pad token (the models find the last real token from ``attention_mask``, so right padding is safe). The
    tokenizer object is not modified.

    Args:
      tokenizer: a Hugging Face (fast) tokenizer.
      dataset: the texts and labels.
      max_length: truncation length; capped at the model's limit (see :func:`model_max_length`).
      buckets: candidate padded lengths; those above ``max_length`` are dropped and ``max_length`` added.
      config: optional model config (for ``max_position_embeddings``).
      chunk: texts per tokenizer call.

    Returns:
      An :class:`Encoded`.
    """
    limit = model_max_length(tokenizer, config)
    if limit is not None:
        max_length = min(int(max_length), limit)
    bks = make_buckets(max_length, buckets)
    n = len(dataset)
    pad = pad_token_id(tokenizer)
    ids = np.full((n, max_length), pad, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    tt = np.zeros((n, max_length), np.int32)
    lengths = np.zeros(n, np.int32)
    truncated = 0
    for start in range(0, n, chunk):
        texts = dataset.texts[start : start + chunk]
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False, add_special_tokens=True)
        types = enc.get("token_type_ids")
        for j, row in enumerate(enc["input_ids"]):
            i = start + j
            k = len(row)
            truncated += k >= max_length
            ids[i, :k] = row
            mask[i, :k] = 1
            if types is not None:
                tt[i, :k] = types[j]
            lengths[i] = k
    return Encoded(ids, mask, tt, lengths, dataset.labels.astype(np.int32), dataset.poison.astype(np.int8), bks,
                   pad, int(truncated))
