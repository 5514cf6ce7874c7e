"""Shared pieces of the accelerator set (``run_accel_set.py``): sizes, SST-2-like synthetic data, FLOP counts.

No network and no data files: models are random-initialised presets, texts are synthetic words ``w<id>`` whose
token counts follow SST-2's length histogram (embedded below), tokenised by a word-level tokenizer built in memory.
Both workers (jdup, torch) generate exactly the same rows from the same seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: Token counts ([CLS] and [SEP] included, BERT uncased tokenizer) of SST-2 BadNets ``test-detect.csv``
#: (2,733 rows; min 4, max 71, mean 25.4, median 24, p90 40, p99 54), in bins of 4 tokens:
#: ``(first length of the bin, rows)``. Read once from ../shared/data/sst-2/1/badnets/test-detect.csv; the data
#: itself is not shipped.
SST2_LENGTH_HIST = (
    (4, 42), (8, 199), (12, 333), (16, 347), (20, 357), (24, 373), (28, 321), (32, 246), (36, 209),
    (40, 135), (44, 78), (48, 42), (52, 28), (56, 14), (60, 5), (64, 2), (68, 2),
)  # fmt: skip
SST2_DEV_CLEAN_ROWS = 872  # calibration split (dev-clean) of SST-2
SST2_TEST_DETECT_ROWS = 2733  # scored split (test-detect)

# word-level synthetic tokenizer: ids 0-3 special, every other id is the word "w<id>"
PAD, UNK, CLS, SEP = 0, 1, 2, 3
FIRST_WORD = 4


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of the set; ``FULL`` for a GPU/TPU, ``DRY`` for the CPU dry run."""

    encoder: str  # "bert-base" | "tiny"
    decoder: str  # "llama-3.2-3b" | "tiny"
    enc_batch: int  # encoder forward: rows per batch
    enc_len: int  # encoder forward: padded length
    dec_batch: int
    dec_len: int
    fwd_reps: int  # timed repetitions (min / median over them)
    fwd_iters: int  # forward calls per repetition
    calib_rows: int  # detection: calibration split (dev-clean size)
    scored_rows: int  # detection: scored rows (test-detect size)
    detect_reps: int  # timed detection calls after the warm-up call
    jdup_detect_batch: int
    torch_detect_batch: int  # the official detection demo's defender batch (4)
    unlearn_rows: int  # flagged rows = clean rows = batch size of one unlearning step
    unlearn_steps: int  # steps run (the first compiles; the rest are timed)
    sweep_ks: tuple[int, ...]  # cells per vmapped group
    sweep_steps: int  # optimizer steps per cell
    sweep_batch: int
    sweep_rows: int  # synthetic rows per clean split
    sweep_len: int  # synthetic row length
    peak_n: int  # square matmul size of the bf16 / fp32 peaks
    peak_n_cpu_ref: int  # the CPU set's 2048² fp32 peak, for comparison with the CPU records
    max_length: int  # tokenizer truncation


FULL = Sizes(
    encoder="bert-base", decoder="llama-3.2-3b", enc_batch=128, enc_len=64, dec_batch=32, dec_len=64,
    fwd_reps=5, fwd_iters=10, calib_rows=SST2_DEV_CLEAN_ROWS, scored_rows=SST2_TEST_DETECT_ROWS, detect_reps=2,
    jdup_detect_batch=32, torch_detect_batch=4, unlearn_rows=32, unlearn_steps=8, sweep_ks=(1, 8, 32),
    sweep_steps=10, sweep_batch=16, sweep_rows=64, sweep_len=64, peak_n=8192, peak_n_cpu_ref=2048, max_length=128,
)  # fmt: skip
DRY = Sizes(
    encoder="tiny", decoder="tiny", enc_batch=4, enc_len=16, dec_batch=2, dec_len=16, fwd_reps=1, fwd_iters=1,
    calib_rows=40, scored_rows=48, detect_reps=1, jdup_detect_batch=16, torch_detect_batch=8, unlearn_rows=4,
    unlearn_steps=3, sweep_ks=(1, 2), sweep_steps=2, sweep_batch=4, sweep_rows=16, sweep_len=16, peak_n=128,
    peak_n_cpu_ref=128, max_length=32,
)  # fmt: skip


def sample_lengths(n: int, rng: np.random.Generator, max_len: int | None = None) -> np.ndarray:
    """``n`` token counts drawn from :data:`SST2_LENGTH_HIST` (uniform inside a bin), capped at ``max_len``."""
    starts = np.array([s for s, _ in SST2_LENGTH_HIST])
    w = np.array([c for _, c in SST2_LENGTH_HIST], np.float64)
    b = rng.choice(len(starts), size=n, p=w / w.sum())
    lengths = starts[b] + rng.integers(0, 4, size=n)
    if max_len is not None:
        lengths = np.minimum(lengths, max_len)
    return lengths.astype(np.int32)


def token_batch(
    batch: int, padded: int, vocab: int, seed: int, *, pad_id: int = PAD, bos: int | None = CLS, eos=SEP
) -> dict[str, np.ndarray]:
    """A right-padded batch with SST-2 lengths: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32)
    and ``lengths``. Word ids avoid ``pad_id`` and the special ids; ``bos``/``eos`` (None: none) frame each row."""
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(batch, rng, padded)
    ids = rng.integers(FIRST_WORD, vocab, size=(batch, padded)).astype(np.int32)
    ids[ids == pad_id] = (
        FIRST_WORD + 1 if pad_id == FIRST_WORD else FIRST_WORD
    )  # words never equal the pad id
    mask = (np.arange(padded)[None, :] < lengths[:, None]).astype(np.int32)
    if bos is not None:
        ids[:, 0] = bos
    if eos is not None:
        ids[np.arange(batch), lengths - 1] = eos
    ids = np.where(mask == 1, ids, pad_id).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "lengths": lengths,
    }


def synthetic_rows(n: int, seed: int, vocab: int, max_len: int, poison_frac: float = 0.0) -> list[tuple]:
    """``n`` rows ``(text, label, poison)``: texts of ``length - 2`` words ``w<id>`` (so that with [CLS]/[SEP]
    they have SST-2's token counts), random labels, the first ``poison_frac`` of rows marked poison."""
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(n, rng, max_len)
    labels = rng.integers(0, 2, size=n)
    n_poison = int(round(poison_frac * n))
    rows = []
    for i, t in enumerate(lengths):
        words = rng.integers(FIRST_WORD, vocab, size=max(1, int(t) - 2))
        rows.append((" ".join(f"w{w}" for w in words), int(labels[i]), int(i < n_poison)))
    return rows


def synthetic_tokenizer(vocab: int, max_length: int = 512):
    """An in-memory word-level fast tokenizer: ``[PAD] [UNK] [CLS] [SEP]`` + ``w4 … w<vocab-1>``, BERT framing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": PAD, "[UNK]": UNK, "[CLS]": CLS, "[SEP]": SEP}
    words.update({f"w{i}": i for i in range(FIRST_WORD, vocab)})
    tk = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=max_length,
    )


def token_lengths(rows: list[tuple]) -> list[int]:
    """Token counts of synthetic rows under :func:`synthetic_tokenizer` (words + [CLS] + [SEP])."""
    return [len(text.split()) + 2 for text, _, _ in rows]


def decoder_forward_flops(lengths, cfg: dict[str, Any]) -> float:
    """Model FLOPs of a Llama-style decoder classifier forward over sequences of the given real lengths.

    Per layer and token: ``2·(d·H·h + 2·d·KV·h + H·h·d + 3·d·ff)`` (q, k, v, o projections and SwiGLU); per layer
    and sequence ``4·T²·H·h`` (QKᵀ and AV, counted in full, not halved for the causal mask, on both sides); the
    score head is ignored (one row per sequence); embeddings and norms are not counted.
    """
    d, ff, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = cfg.get("head_dim") or d // H
    per_tok = 2.0 * (d * H * h + 2 * d * KV * h + H * h * d + 3 * d * ff)
    return float(sum(L * (t * per_tok + 4.0 * t * t * H * h) for t in lengths))


def encoder_cfg_dict(cfg: dict[str, Any]) -> dict[str, int]:
    """The four numbers :func:`benchmarks.common.encoder_forward_flops` needs, from an HF ``config.json`` dict."""
    return {
        "hidden": cfg["hidden_size"],
        "layers": cfg["num_hidden_layers"],
        "intermediate": cfg["intermediate_size"],
        "num_labels": len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 2)),
    }
