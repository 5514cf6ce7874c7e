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

from jdup import atomic, manifest, optim
from jdup import config as config_lib
from jdup import data as D
from jdup.errors import JdupError
from jdup.train import (
    DTYPES,
    EVAL_SPLITS,
    LoopPosition,
    TrainConfig,
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


def run_train(cfg: TrainConfig) -> dict:
    """Train a (backdoored) victim on a DUP-layout folder; resumes from the checkpoint an interrupted run left.

    The output is built in ``<out>.partial`` (checkpoints in ``<out>.partial/ckpt``) and renamed over ``out`` once
    ``model/``, ``metrics.json`` and ``manifest.json`` are written: a failed or killed run leaves the previous
    output (or none), and rerunning the same command resumes from the checkpoint.

    Returns:
      The metrics dict written to ``<out>/metrics.json``: ``cacc``, ``asr``, ``dev_acc``, ``dev_asr`` (of the
      selected epoch), ``best_epoch``, ``last`` (metrics of the final epoch), ``epochs``, ``steps``, ``seconds``,
      ``target``, ``model_dir``, ``history``. When ``max_steps`` stops the run early, returns
      ``{"stopped": True, "step": ..., "checkpoint": ...}`` and writes neither ``model/`` nor ``metrics.json``.
    """
    config_lib.validate(cfg)
    if not cfg.data:
        raise JdupError("data: set the DUP-layout data folder", "config:data")
    output = manifest.StageOutput("train", cfg, {"model": cfg.model, "data": cfg.data}, resume=not cfg.overwrite,
                                  keep="ckpt")
    with output:
        return _run_train(cfg, output)


def _run_train(cfg: TrainConfig, output: manifest.StageOutput) -> dict:
    from jdup import models
    from jdup.checkpoint import Checkpointer, fingerprint

    t_start = time.perf_counter()
    out = output.path  # the staging folder; output.out is where the finished output goes
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
    settings["inputs"] = {k: v["fingerprint"] for k, v in output.manifest()["inputs"].items()}
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
                            "pass --overwrite (overwrite=true) to discard it and start again, or choose another "
                            "out folder", ck.directory)
        meta.update(saved)
        log.info("resuming from step %d (epoch %d, batch %d)", meta["step"], meta["epoch"], meta["batch"])

    # metrics.jsonl holds this run only: a new run starts it empty, a resumed one keeps the lines up to its
    # checkpoint's step (the replayed steps are logged again)
    jsonl = os.path.join(out, "metrics.jsonl")
    _truncate_log(jsonl, int(meta["step"]))
    metrics_log = open(jsonl, "a", encoding="utf-8")

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
                          "lr": optim.schedule_value(cfg.lr, total, warm, step - 1)})
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
    model_dir = os.path.join(output.out, "model")
    models.save_pretrained(final, os.path.join(out, "model"), tokenizer_src=cfg.model)
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
    output.commit(result)
    return result


def _truncate_log(path: str, step: int) -> None:
    """Keeps the lines of ``metrics.jsonl`` up to ``step`` (all of them gone for a fresh run, ``step == 0``)."""
    if not os.path.exists(path):
        return
    kept = []
    if step > 0:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by the kill
                    continue
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    atomic.write_text(path, "".join(kept))


__all__ = ["TrainConfig", "run_train"]
