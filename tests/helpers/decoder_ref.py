"""Helpers shared by the decoder / BART / GGUF / sharding tests: torch reference models and padded batches."""

from __future__ import annotations

import numpy as np


def torch_state(model) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 numpy arrays (HF names)."""
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def padded_batch(lengths, seq_len, vocab, pad_id, side="right", seed=0, low=3):
    """Random ids in ``[low, vocab)`` (so never equal to special ids below ``low``), padded with ``pad_id``.

    Returns:
      ``(input_ids, attention_mask)`` int32 numpy arrays ``[batch, seq_len]``.
    """
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), seq_len), pad_id, np.int32)
    mask = np.zeros((len(lengths), seq_len), np.int32)
    for r, n in enumerate(lengths):
        toks = rng.integers(low, vocab, n)
        if side == "right":
            ids[r, :n], mask[r, :n] = toks, 1
        else:
            ids[r, seq_len - n :], mask[r, seq_len - n :] = toks, 1
    return ids, mask


def assert_states_close(ours, theirs, mask, atol, what=""):
    """Compare ``[batch, seq, dim]`` hidden-state tuples on real positions only (padding rows are arbitrary)."""
    assert len(ours) == len(theirs), f"{what}: {len(ours)} hidden states vs {len(theirs)}"
    m = np.asarray(mask).astype(bool)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape, f"{what} state {i}: shape {a.shape} vs {b.shape}"
        err = np.abs(a[m] - b[m]).max()
        assert err < atol, f"{what} hidden state {i}: max abs err {err:.3g} >= {atol}"
