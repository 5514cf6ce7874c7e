"""Fixed-size batches of an :class:`~jdup.data.encode.Encoded` dataset.

Every batch has ``batch_size`` rows and a bucket sequence length, so a jitted consumer compiles at most once per
bucket. :func:`batches` / :func:`make_batch` serve training, detection and prediction; :class:`BatchPlan` gives
the flagged and the clean batch of every unlearning step (length-grouped, paired by length).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from jdup.data.encode import Encoded, merge_sparse_buckets

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


# --------------------------------------------------------------------------------------------------------------
# Unlearning: the flagged (forget) and the clean (retain) batch of every step
# --------------------------------------------------------------------------------------------------------------


def clean_batch_at(retain: Encoded, batch_size: int, step: int, seed: int) -> dict:
    """The clean batch of global step ``step``: dev-clean is cycled (reshuffled each pass) in lock-step."""
    per_epoch = num_batches(len(retain), batch_size)
    epoch, i = divmod(int(step), per_epoch)
    return next(batches(retain, batch_size, shuffle=True, seed=seed + 1, epoch=epoch, start=i))


def forget_batches_per_epoch(n_forget: int, batch_size: int) -> int:
    return num_batches(n_forget, batch_size)


def forget_batch_at(forget: Encoded, batch_size: int, step: int, seed: int) -> dict:
    """The flagged batch of global step ``step`` (each epoch is a fresh permutation of the flagged rows)."""
    per_epoch = num_batches(len(forget), batch_size)
    epoch, i = divmod(int(step), per_epoch)
    return next(batches(forget, batch_size, shuffle=True, seed=seed, epoch=epoch, start=i))


def with_pad_multiple(encoded: Encoded, multiple: int) -> Encoded:
    """``encoded`` whose batches are padded to a multiple of ``multiple`` tokens (``<= 0``: unchanged)."""
    if multiple <= 0:
        return encoded
    top = encoded.max_length
    return dataclasses.replace(encoded, buckets=(*range(int(multiple), top, int(multiple)), top))


def _grouped_chunks(lengths: np.ndarray, batch_size: int, group: int, rng: np.random.Generator) -> list:
    """Row chunks of one epoch: a permutation cut into groups of ``group`` batches, sorted by length (longest
    first) inside each group, the batches visited in a random order (``group <= 0``: the plain permutation)."""
    n = len(lengths)
    perm = rng.permutation(n)
    if group > 0 and n:
        size = batch_size * group
        perm = np.concatenate(
            [
                g[np.argsort(-lengths[g], kind="stable")]
                for g in (perm[i : i + size] for i in range(0, n, size))
            ]
        )
    chunks = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))] if group > 0 else chunks


class BatchPlan:
    """The flagged and the clean batch of every step, a pure function of the data, the settings and the step
    (a resumed run replays the batches of an uninterrupted one).

    Flagged rows: every epoch visits each once, in a fresh order. Clean rows: cycled in lock-step, one batch per
    step, a fresh order per pass. With ``length_group > 0`` both streams are length-grouped
    (:func:`_grouped_chunks`) and, inside each flagged epoch, the clean batches of that epoch's steps are handed
    to its flagged batches by length rank (each still used exactly once), so the fused step's joint batch
    ``[flagged; clean]`` is padded little. ``length_group=0, pad_multiple=0`` gives exactly
    :func:`forget_batch_at` / :func:`clean_batch_at`.
    """

    def __init__(
        self,
        forget: Encoded,
        retain: Encoded,
        batch_size: int,
        seed: int,
        *,
        length_group: int = 0,
        pad_multiple: int = 0,
    ):
        self.forget = with_pad_multiple(forget, pad_multiple)
        self.retain = with_pad_multiple(retain, pad_multiple)
        self.batch_size, self.seed, self.group = int(batch_size), int(seed), int(length_group)
        self.per_epoch = num_batches(len(forget), batch_size)
        self.per_pass = num_batches(len(retain), batch_size)
        self._cache: dict = {}
        self._cache_size = 8 + 2 * (self.per_epoch // max(self.per_pass, 1))
        self._pairing: tuple = (-1, [])

    @classmethod
    def from_config(cls, forget: Encoded, retain: Encoded, cfg: Any) -> BatchPlan:
        """From an ``UnlearnConfig`` (any object with ``batch_size``, ``seed``, ``length_group``, ``pad_multiple``;
        with ``pad_min_steps`` and ``epochs`` too, the padded lengths are thinned by :meth:`merge_sparse_lengths`
        over the run's ``epochs`` epochs)."""
        plan = cls(
            forget,
            retain,
            cfg.batch_size,
            cfg.seed,
            length_group=cfg.length_group,
            pad_multiple=cfg.pad_multiple,
        )
        min_steps = int(getattr(cfg, "pad_min_steps", 0) or 0)
        if min_steps > 1 and hasattr(cfg, "epochs"):
            plan.merge_sparse_lengths(plan.per_epoch * int(cfg.epochs), min_steps)
        return plan

    def step_lengths(self, steps: int) -> np.ndarray:
        """``int64 [steps]``: the longest real row of the flagged and the clean batch of each of the first
        ``steps`` steps (the joint batch is padded to the bucket holding it)."""
        out = np.zeros(int(steps), np.int64)
        for step in range(int(steps)):
            e, i = divmod(step, self.per_epoch)
            f = self.forget.lengths[self._chunks("forget", e)[i]]
            c = self.retain.lengths[self._clean_rows(step)]
            out[step] = max(int(f.max()) if f.size else 0, int(c.max()) if c.size else 0)
        return out

    def merge_sparse_lengths(self, steps: int, min_steps: int) -> tuple[int, ...]:
        """Drop the padded lengths that fewer than ``min_steps`` of the first ``steps`` steps would use; those steps
        are padded to the next longer kept length (:func:`jdup.data.merge_sparse_buckets`). Each distinct length
        compiles the training step once; on a short run a compilation costs more than the padding it saves. The
        rows of every batch stay the same; only their padding changes (and with it the dropout masks, which depend
        on the padded shape). Returns the kept lengths."""
        if self.per_epoch == 0 or steps <= 0 or min_steps <= 1:
            return self.forget.buckets
        keep = merge_sparse_buckets(self.step_lengths(steps), self.forget.buckets, min_steps)
        for name in ("forget", "retain"):
            enc = getattr(self, name)
            top = enc.max_length
            setattr(self, name, dataclasses.replace(enc, buckets=(*(b for b in keep if b < top), top)))
        return keep

    def _chunks(self, stream: str, epoch: int) -> list:
        key = (stream, epoch)
        if key not in self._cache:
            if len(self._cache) > self._cache_size:
                self._cache.clear()
            enc, seed = (self.forget, self.seed) if stream == "forget" else (self.retain, self.seed + 1)
            if self.group > 0:
                rng = np.random.default_rng([seed, int(epoch)])
                self._cache[key] = _grouped_chunks(enc.lengths, self.batch_size, self.group, rng)
            else:  # exactly jdup.data.batches(shuffle=True)
                order = epoch_order(len(enc), shuffle=True, seed=seed, epoch=epoch)
                self._cache[key] = [
                    order[i : i + self.batch_size] for i in range(0, len(enc), self.batch_size)
                ]
        return self._cache[key]

    def _clean_chunk(self, position: int) -> np.ndarray:
        p, j = divmod(int(position), self.per_pass)
        return self._chunks("retain", p)[j]

    def forget_batch(self, step: int) -> dict:
        e, i = divmod(int(step), self.per_epoch)
        return make_batch(self.forget, self._chunks("forget", e)[i], self.batch_size)

    def clean_batch(self, step: int) -> dict:
        return make_batch(self.retain, self._clean_rows(step), self.batch_size)

    def _clean_rows(self, step: int) -> np.ndarray:
        """Row indices of the clean batch of ``step``."""
        if self.group <= 0:
            return self._clean_chunk(step)
        e, i = divmod(int(step), self.per_epoch)
        base = e * self.per_epoch
        if self._pairing[0] != e:
            f_len = [int(self.forget.lengths[c].max()) for c in self._chunks("forget", e)]
            c_len = [
                int(self.retain.lengths[self._clean_chunk(base + k)].max()) for k in range(self.per_epoch)
            ]
            f_rank = sorted(range(self.per_epoch), key=lambda k: (f_len[k], k))
            c_rank = sorted(range(self.per_epoch), key=lambda k: (c_len[k], k))
            pos = [0] * self.per_epoch
            for fr, cr in zip(f_rank, c_rank, strict=True):
                pos[fr] = cr
            self._pairing = (e, pos)
        return self._clean_chunk(base + self._pairing[1][i])
