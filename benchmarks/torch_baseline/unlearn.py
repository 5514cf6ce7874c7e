"""DUP unlearning as the official PyTorch code does it (docs/dup-method.md §3): PEFT LoRA student, frozen teacher logits.

* teacher logits precomputed once on the flagged ("poison") set and on dev-clean, tokenised batches cached on the
  host in a shuffled order that then stays fixed for every epoch;
* student = a copy of the teacher with PEFT ``LoraConfig(r=32, lora_alpha=64, lora_dropout=0.1, bias="none",
  task_type="SEQ_CLS")`` (so the classifier head is a fully trainable copy);
* per step: next poison batch, next clean batch (cycled), both padded to a common length, two forward passes, one
  backward on ``L = −λ_asr·KL(p_T‖p_S) + λ_acc·CE``, ``clip_grad_norm_(1.0)``, ``AdamW(lr=5e-4, wd=0.01)``,
  ``get_linear_schedule_with_warmup`` (10 % warm-up).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.torch_baseline.data import Row

# model_type -> LoRA target modules of the reference (docs/dup-method.md §3.3)
_TARGETS = {
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclasses.dataclass(frozen=True)
class BaselineUnlearnConfig:
    """Knobs of the reference unlearning (defaults = docs/dup-method.md Appendix A)."""

    lambda_asr: float = 1.0  # weight of the (negated) KL on flagged samples; the shipped demo uses 0
    lambda_acc: float = 1.0  # weight of the CE on clean dev samples
    lr: float = 5e-4  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW's torch default
    epochs: int = 5  # passes over the flagged batches
    warmup_frac: float = 0.1  # linear warm-up fraction of all steps
    clip: float = 1.0  # global gradient-norm clip
    batch_size: int = 32  # 32 for BERT/BART, 4 for LLMs
    lora_r: int = 32  # LoRA rank
    lora_alpha: int = 64  # LoRA alpha (scale alpha / r = 2)
    lora_dropout: float = 0.1  # dropout on the LoRA branch input
    target_modules: tuple[str, ...] | None = None  # None: by model_type (BERT: query, key, value)
    seed: int = 2025  # Python / NumPy / torch seeds
    max_length: int = 512  # tokenizer truncation
    max_steps: int | None = None  # stop after this many optimiser steps (benchmarks); None = all epochs
    device: str = "cpu"  # torch device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch as the reference does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def build_cache(teacher, tokenizer, rows: Sequence[Row], cfg: BaselineUnlearnConfig) -> list[dict[str, Any]]:
    """Shuffled batches (seeded torch permutation, as a ``DataLoader(shuffle=True)``), tokenised, with logits."""
    teacher.eval()
    order = torch.randperm(len(rows)).tolist()
    cache = []
    for i in range(0, len(order), cfg.batch_size):
        batch = [rows[j] for j in order[i : i + cfg.batch_size]]
        enc = tokenizer(
            [r.text for r in batch],
            padding=True,
            truncation=True,
            max_length=cfg.max_length,
            return_tensors="pt",
        )
        enc = {k: v.to(cfg.device) for k, v in enc.items()}
        logits = teacher(**enc).logits.detach()
        cache.append({"inputs": enc, "logits": logits, "labels": torch.tensor([r.label for r in batch])})
    return cache


def _pad_to(inputs: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    cur = inputs["input_ids"].shape[1]
    if cur == length:
        return inputs
    out = {}
    for k, v in inputs.items():
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.nn.functional.pad(v, (0, length - cur), value=fill)
    return out


def add_lora(student: torch.nn.Module, cfg: BaselineUnlearnConfig):
    """Wrap the student with PEFT LoRA (and the trainable head copy that ``SEQ_CLS`` adds)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules or _TARGETS.get(student.config.model_type, ["query", "value", "key"])
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        task_type="SEQ_CLS",
        target_modules=list(targets),
    )
    return get_peft_model(student, lcfg)


@torch.no_grad()
def attack_success_rate(model, tokenizer, rows: Sequence[Row], target: int, batch_size: int = 64) -> float:
    """Fraction of ``rows`` predicted as ``target`` (the reference's ``eval_asr``)."""
    return _accuracy(model, tokenizer, rows, batch_size, target=target)


@torch.no_grad()
def _accuracy(model, tokenizer, rows, batch_size, target: int | None = None) -> float:
    model.eval()
    hits = 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        enc = tokenizer(
            [r.text for r in batch], padding=True, truncation=True, max_length=512, return_tensors="pt"
        )
        enc = {k: v.to(device) for k, v in enc.items()}
        pred = model(**enc).logits.argmax(-1).cpu().numpy()
        want = np.full(len(batch), target) if target is not None else np.array([r.label for r in batch])
        hits += int(np.sum(pred == want))
    return hits / max(1, len(rows))


def unlearn(
    teacher: torch.nn.Module,
    tokenizer: Any,
    forget: Sequence[Row],
    retain: Sequence[Row],
    cfg: BaselineUnlearnConfig = BaselineUnlearnConfig(),
) -> dict[str, Any]:
    """Run the reference LoRA unlearning.

    Args:
      teacher: the backdoored torch ``*ForSequenceClassification`` model (kept frozen; not modified).
      tokenizer: its tokenizer.
      forget: the flagged rows (labels unused).
      retain: clean labelled rows (all of dev-clean in the reference).
      cfg: settings.

    Returns:
      A dict with ``model`` (the merged student, a plain transformers model), ``losses`` (per step),
      ``steps``, ``steps_per_epoch``, ``trainable_params``, ``step_lengths`` (real token counts of the sequences
      of every step, for FLOP counting), and ``timings`` (``teacher``: cache + teacher logits, ``setup``: copy +
      LoRA + optimiser, ``train_steps``: all optimiser steps, ``epoch``: list of per-epoch step times,
      ``step``: list of per-step times, ``merge``, ``total``).
    """
    t_start = time.perf_counter()
    timings: dict[str, Any] = {}
    seed_everything(cfg.seed)
    teacher.to(cfg.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    poison_cache = build_cache(teacher, tokenizer, forget, cfg)
    clean_cache = build_cache(teacher, tokenizer, retain, cfg)
    timings["teacher"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    student = add_lora(student, cfg)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    total_steps = cfg.epochs * len(poison_cache)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_frac * total_steps), total_steps)
    kl_fn = torch.nn.KLDivLoss(reduction="batchmean")
    ce_fn = torch.nn.CrossEntropyLoss()
    pad_id = tokenizer.pad_token_id or 0
    timings["setup"] = time.perf_counter() - t0

    losses, step_times, epoch_times, step_lengths = [], [], [], []
    steps = 0
    for _ in range(cfg.epochs):
        student.train()
        e0 = time.perf_counter()
        for k, pb in enumerate(poison_cache):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            s0 = time.perf_counter()
            cb = clean_cache[k % len(clean_cache)]
            length = max(pb["inputs"]["input_ids"].shape[1], cb["inputs"]["input_ids"].shape[1])
            p_in, c_in = _pad_to(pb["inputs"], length, pad_id), _pad_to(cb["inputs"], length, pad_id)
            logits_p = student(**p_in).logits
            logits_c = student(**c_in).logits
            kl = kl_fn(torch.log_softmax(logits_p, dim=-1), torch.softmax(pb["logits"], dim=-1))
            ce = ce_fn(logits_c, cb["labels"].to(cfg.device))
            loss = -cfg.lambda_asr * kl + cfg.lambda_acc * ce
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
            steps += 1
            step_times.append(time.perf_counter() - s0)
            step_lengths.append(
                p_in["attention_mask"].sum(1).tolist() + c_in["attention_mask"].sum(1).tolist()
            )
        epoch_times.append(time.perf_counter() - e0)
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    timings["train_steps"] = float(sum(step_times))
    timings["epoch"] = epoch_times
    timings["step"] = step_times

    t0 = time.perf_counter()
    merged = student.merge_and_unload()
    merged.eval()
    timings["merge"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return {
        "model": merged,
        "losses": losses,
        "steps": steps,
        "steps_per_epoch": len(poison_cache),
        "trainable_params": int(trainable),
        "step_lengths": step_lengths,
        "timings": timings,
    }
