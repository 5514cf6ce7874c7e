"""Fixed-size batches of an :class:`~jdup.data.encode.Encoded` dataset.

Every batch has ``batch_size`` rows and a bucket sequence length, so a jitted consumer compiles at most once per
bucket. :func:`batches` / :func:`make_batch` serve training, detection and prediction; :class:`BatchPlan` gives
the flagged and the clean batch of every unlearning step (length-grouped, paired by length).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jdup.data.encode import Encoded

#: Batches per length-sorted group when ``sort_by_length`` and ``shuffle`` are both on.
LENGTH_GROUP = 50


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int = 0) -> np.ndarray:
    """Row order for one epoch: ``arange(n)`` or a permutation from ``default_rng([seed, epoch])``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch for ``n`` rows."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    encoded: Encoded,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    sort_by_length: bool = False,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield fixed-size batches of numpy arrays.

    Every batch has exactly ``batch_size`` rows; a last partial batch is filled with copies of its first row and
    marked by ``valid == False`` (copies of real rows, so models never see an all-padding row). The sequence
    length of a batch is the smallest bucket holding its longest row, so at most ``len(encoded.buckets)`` shapes
    occur.

    Args:
      encoded: the tokenised data.
      batch_size: rows per batch.
      shuffle: permute rows (``default_rng([seed, epoch])``). With ``sort_by_length``: rows are permuted, cut into
        groups of ``LENGTH_GROUP`` batches, sorted by length inside each group, and the batches shuffled (as
        Hugging Face ``group_by_length``), so batches mix less padding but still change every epoch.
      seed, epoch: shuffling seed and epoch number (a resumed run replays the same order).
      sort_by_length: group rows of similar length (fewer padded tokens; good for inference).
      drop_last: drop a last partial batch instead of padding it.
      start: skip the first ``start`` batches (resuming in the middle of an epoch).

    Yields:
      dicts with ``input_ids``, ``attention_mask``, ``token_type_ids`` (``int32 [B, S]``), ``labels`` (``int32
      [B]``), ``poison`` (``int8 [B]``), ``valid`` (``bool [B]``) and ``index`` (``int64 [B]``, row numbers in
      ``encoded``; ``-1`` on padding rows, so scatter with ``out[b["index"][b["valid"]]]``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(encoded)
    if sort_by_length and shuffle:
        # Length grouping as Hugging Face's LengthGroupedSampler: a random permutation cut into "megabatches" of
        # `LENGTH_GROUP` batches, each sorted by length, then the batches visited in a random order.
        rng = np.random.default_rng([int(seed), int(epoch)])
        perm = rng.permutation(n)
        mega = batch_size * LENGTH_GROUP
        order = np.concatenate([g[np.argsort(-encoded.lengths[g], kind="stable")]
                                for g in (perm[i : i + mega] for i in range(0, n, mega))]) if n else perm
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    elif sort_by_length:
        order = np.argsort(-encoded.lengths, kind="stable")
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    else:
        order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last:
        chunks = [c for c in chunks if len(c) == batch_size]
    for c in chunks[start:]:
        yield make_batch(encoded, c, batch_size)


def make_batch(encoded: Encoded, rows: np.ndarray, batch_size: int) -> dict:
    """One batch of :func:`batches` from the row numbers ``rows`` (at most ``batch_size``): padded to the smallest
    bucket holding its longest row; missing rows repeat the first one with ``valid`` False and ``index`` -1."""
    k = len(rows)
    idx = np.concatenate([rows, np.full(batch_size - k, rows[0], rows.dtype)]) if k < batch_size else rows
    index = idx.astype(np.int64).copy()
    index[k:] = -1
    seq = encoded.bucket_for(int(encoded.lengths[rows].max()))
    return {
        "input_ids": encoded.input_ids[idx, :seq],
        "attention_mask": encoded.attention_mask[idx, :seq],
        "token_type_ids": encoded.token_type_ids[idx, :seq],
        "labels": encoded.labels[idx],
        "poison": encoded.poison[idx],
        "valid": np.arange(batch_size) < k,
        "index": index,
    }
