"""The ``jdup train`` stage: fine-tune a classifier on a poisoned DUP-layout folder, with files in and out.

Reads ``dirty/<rate>/train-poison.csv`` and the four evaluation splits, trains with the in-memory loop of
:mod:`jdup.train` (optimizer, jitted step, epoch loop, evaluation), and writes under ``out``: ``model/`` (Hugging
Face format, tokenizer copied), ``metrics.json``, ``metrics.jsonl`` (one line per logged step and per evaluation),
and ``ckpt/`` (orbax, :mod:`jdup.checkpoint`) while the run is unfinished; a rerun resumes from it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from jdup import atomic
from jdup import data as D
from jdup.errors import JdupError
from jdup.train import (
    DTYPES,
    EVAL_SPLITS,
    LoopPosition,
    TrainConfig,
    _schedule_value,
    cached_train_step,
    evaluate_states,
    train_steps,
    warmup_steps,
)

log = logging.getLogger("jdup.train")

#: Fields that may change between a stopped run and its continuation.
_RESUME_FREE = ("max_steps", "ckpt_every_steps", "keep_checkpoints", "progress", "eval_batch_size", "log_every",
                "out")


def _resolve_target(cfg: TrainConfig, test_poison: D.TextDataset) -> int:
    if cfg.target is not None:
        return int(cfg.target)
    meta = os.path.join(cfg.data, "poison_config.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                return int(json.load(f)["target"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if len(test_poison) == 0:
        raise JdupError("test-poison is empty, cannot infer the target label; set target", cfg.data)
    return int(np.bincount(test_poison.labels).argmax())


def _atomic_json(path: str, obj: Any) -> None:
    atomic.write(path, lambda f: json.dump(obj, f, indent=2, default=str))


def _check_config(cfg: TrainConfig) -> None:
    def bad(field, msg):
        raise JdupError(f"{field}: {msg}", f"config:{field}")

    if not cfg.data:
        bad("data", "set the DUP-layout data folder")
    if cfg.epochs < 1:
        bad("epochs", f"must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        bad("batch_size", "batch sizes must be >= 1")
    if not cfg.lr > 0:
        bad("lr", f"must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup <= 1:
        bad("warmup", f"is a fraction of all steps in [0, 1], got {cfg.warmup}")
    if cfg.warmup_epochs is not None and not 0 <= cfg.warmup_epochs <= cfg.epochs:
        bad("warmup_epochs", f"must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}")
    if cfg.num_labels < 2:
        bad("num_labels", f"must be >= 2, got {cfg.num_labels}")
    if cfg.select not in ("dev_acc", "dev_mean"):
        bad("select", f"must be dev_acc or dev_mean, got {cfg.select!r}")
    if cfg.dtype not in DTYPES:
        bad("dtype", f"must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if cfg.eval_every < 1:
        bad("eval_every", f"must be >= 1, got {cfg.eval_every}")


def run_train(cfg: TrainConfig) -> dict:
    """Train a (backdoored) victim on a DUP-layout folder; resumes from ``<out>/ckpt`` when present.

    Returns:
      The metrics dict written to ``<out>/metrics.json``: ``cacc``, ``asr``, ``dev_acc``, ``dev_asr`` (of the
      selected epoch), ``best_epoch``, ``last`` (metrics of the final epoch), ``epochs``, ``steps``, ``seconds``,
      ``target``, ``model_dir``, ``history``. When ``max_steps`` stops the run early, returns
      ``{"stopped": True, "step": ..., "checkpoint": ...}`` and writes neither ``model/`` nor ``metrics.json``.
    """
    from jdup import models
    from jdup.checkpoint import Checkpointer, fingerprint

    _check_config(cfg)
    t_start = time.perf_counter()
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))

    # ---- data -----------------------------------------------------------------------------------------------
    splits = D.read_dup_folder(cfg.data, cfg.rate, ("train",) + EVAL_SPLITS, num_labels=cfg.num_labels)
    target = _resolve_target(cfg, splits["test-poison"])
    if not 0 <= target < cfg.num_labels:
        raise JdupError(f"target label {target} is out of range for num_labels={cfg.num_labels}", "config:target")

    # ---- model ----------------------------------------------------------------------------------------------
    model = models.from_pretrained(cfg.model, num_labels=cfg.num_labels, dtype=DTYPES[cfg.dtype], seed=cfg.seed)
    if model.config.num_labels != cfg.num_labels:
        raise JdupError(f"the model has {model.config.num_labels} classes but num_labels={cfg.num_labels}",
                        cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    enc = {k: D.encode(tokenizer, v, cfg.max_length, tuple(cfg.buckets), config=model.config)
           for k, v in splits.items()}
    train_enc = enc["train"]

    spe = D.num_batches(len(train_enc), cfg.batch_size)
    total = spe * cfg.epochs
    warm = warmup_steps(cfg, spe)
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    tx, step_fn = cached_train_step(graphdef, float(cfg.lr), total, warm, float(cfg.weight_decay),
                                    float(cfg.clip) if cfg.clip else None)
    rest = tuple(rest)
    del model
    opt_state = jax.jit(tx.init)(params)
    best = jax.device_get(params)

    # ---- resume ---------------------------------------------------------------------------------------------
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE}
    settings["rows"] = {k: len(v) for k, v in splits.items()}
    fp = fingerprint(settings)
    ck = Checkpointer(os.path.join(out, "ckpt"), max_to_keep=2)
    meta: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best_score": None, "best_epoch": -1,
                            "history": [], "elapsed": 0.0, "fingerprint": fp, "best_metrics": {}}
    if ck.latest_step() is not None:
        try:
            (params, opt_state, best), saved = ck.restore((params, opt_state, best))
        except BaseException:
            ck.close()
            raise
        if saved.get("fingerprint") != fp:
            ck.close()
            raise JdupError("the checkpoint was written with different settings (model, data or hyper-parameters); "
                            "delete it or choose another out folder", ck.directory)
        meta.update(saved)
        log.info("resuming from step %d (epoch %d, batch %d)", meta["step"], meta["epoch"], meta["batch"])

    metrics_log = open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8")

    def log_line(obj):
        metrics_log.write(json.dumps(obj) + "\n")
        metrics_log.flush()

    def save_ckpt(params, opt_state):
        meta["elapsed"] = elapsed_before + time.perf_counter() - t_start
        ck.save(meta["step"], (params, opt_state, best), meta)

    from tqdm.auto import tqdm

    elapsed_before = float(meta["elapsed"])
    pos = LoopPosition(int(meta["step"]), int(meta["epoch"]), int(meta["batch"]))
    pending: list[dict] = []
    stopped = False
    bar = tqdm(total=total, initial=pos.step, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    loop = train_steps(step_fn, params, opt_state, rest, train_enc, cfg, pos)
    try:
        for params, opt_state, stats, epoch, b_idx, epoch_end in loop:
            step = pos.step
            meta.update(step=step, epoch=pos.epoch, batch=pos.batch)
            pending.append(stats)
            bar.update(1)
            if step % max(cfg.log_every, 1) == 0 or epoch_end:
                host = jax.device_get(pending)
                loss = float(np.mean([s["loss"] for s in host]))
                acc = float(sum(s["correct"] for s in host) / max(sum(s["count"] for s in host), 1))
                log_line({"step": step, "epoch": epoch + (b_idx + 1) / spe, "loss": loss, "train_acc": acc,
                          "grad_norm": float(host[-1]["grad_norm"]),
                          "lr": _schedule_value(cfg.lr, total, warm, step - 1)})
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
                pending = []
            if epoch_end and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                m = evaluate_states(graphdef, (params, *rest), enc, target, cfg.eval_batch_size,
                                    progress=cfg.progress)
                m.update(epoch=epoch + 1, step=step)
                score = m["dev_acc"] if cfg.select == "dev_acc" else (m["dev_acc"] + m["dev_asr"]) / 2
                if meta["best_score"] is None or score > meta["best_score"]:
                    meta.update(best_score=score, best_epoch=epoch + 1, best_metrics=m)
                    best = jax.device_get(params)
                meta["history"] = [*meta["history"], m]
                log_line({"eval": True, **m})
                log.info("epoch %d: %s", epoch + 1, m)
            hit_max = cfg.max_steps is not None and step >= cfg.max_steps and step < total
            if epoch_end or hit_max or (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0):
                save_ckpt(params, opt_state)
            if hit_max:
                stopped = True
                break
    finally:
        bar.close()
        metrics_log.close()
        ck.close()

    if stopped:
        return {"stopped": True, "step": pos.step, "total_steps": total, "checkpoint": ck.directory}

    # ---- outputs --------------------------------------------------------------------------------------------
    final = nnx.merge(graphdef, jax.device_put(best), *rest)
    model_dir = os.path.join(out, "model")
    models.save_pretrained(final, model_dir, tokenizer_src=cfg.model)
    bm = dict(meta["best_metrics"])
    result = {
        "cacc": bm.get("cacc"), "asr": bm.get("asr"), "dev_acc": bm.get("dev_acc"), "dev_asr": bm.get("dev_asr"),
        "best_epoch": meta["best_epoch"], "last": meta["history"][-1] if meta["history"] else {},
        "epochs": cfg.epochs, "steps": pos.step, "steps_per_epoch": spe, "warmup_steps": warm,
        "seconds": elapsed_before + time.perf_counter() - t_start, "target": target, "model_dir": model_dir,
        "num_truncated": {k: v.num_truncated for k, v in enc.items()},
        "history": meta["history"],
        "config": dataclasses.asdict(cfg),
    }
    _atomic_json(os.path.join(out, "metrics.json"), result)
    if not cfg.keep_checkpoints:
        shutil.rmtree(ck.directory, ignore_errors=True)
    return result


__all__ = ["TrainConfig", "run_train"]
