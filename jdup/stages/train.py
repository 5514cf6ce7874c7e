"""The ``jdup train`` stage: fine-tune a classifier on a poisoned DUP-layout folder, with files in and out.

Reads ``dirty/<rate>/train-poison.csv`` and the four evaluation splits, trains with the in-memory
:func:`jdup.train.train` (optimizer, jitted step, epoch loop, evaluation, model selection, checkpoints), and
writes under ``out``: ``model/`` (Hugging Face format, tokenizer copied), ``metrics.json``, ``metrics.jsonl`` (one
line per logged step and per evaluation), and ``ckpt/`` (orbax, :mod:`jdup.checkpoint`) while the run is
unfinished; a rerun resumes from it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time

from jdup import atomic, manifest
from jdup import config as config_lib
from jdup import data as D
from jdup.checkpoint import Checkpoint
from jdup.errors import JdupError
from jdup.stages.common import StageResult, attack_target, run_record, stage_mesh, write_record
from jdup.train import DTYPES, EVAL_SPLITS, TrainConfig, train

log = logging.getLogger("jdup.train")


def run_train(cfg: TrainConfig) -> StageResult:
    """Train a (backdoored) victim on a DUP-layout folder; resumes from the checkpoint an interrupted run left.

    Reads the folder, calls :func:`jdup.train.train` with ``cfg.settings()`` and a checkpoint in
    ``<out>.partial/ckpt``, writes the outputs. The output is built in ``<out>.partial`` and renamed over ``out``
    once ``model/``, ``metrics.json`` and ``manifest.json`` are written: a failed or killed run leaves the previous
    output (or none), and rerunning the same command resumes from the checkpoint.

    Returns:
      A :class:`jdup.stages.common.StageResult` whose ``record`` is ``<out>/metrics.json``: ``cacc``, ``asr``,
      ``dev_acc``, ``dev_asr`` (of the selected epoch), ``best_epoch``, ``last`` (metrics of the final epoch),
      ``epochs``, ``steps``, ``seconds``, ``target``, ``model_dir``, ``history``, ``mesh``, ``process_count``.
      When ``max_steps`` stops the run early: ``stopped`` and the record ``{"stopped": True, "step": ...,
      "total_steps": ..., "checkpoint": ...}``; neither ``model/`` nor ``metrics.json`` is written.
    """
    config_lib.validate(cfg)
    if not cfg.data:
        raise JdupError("data: set the DUP-layout data folder", "config:data")
    output = manifest.StageOutput("train", cfg, {"model": cfg.model, "data": cfg.data}, resume=not cfg.overwrite,
                                  keep="ckpt")
    with output:
        return _run_train(cfg, output)


def _run_train(cfg: TrainConfig, output: manifest.StageOutput) -> StageResult:
    from jdup import models

    t_start = time.perf_counter()
    out = output.path  # the staging folder; output.out is where the finished output goes
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    mesh = stage_mesh(cfg.mesh)

    # ---- read ---------------------------------------------------------------------------------------------
    splits = D.read_dup_folder(cfg.data, cfg.rate, ("train",) + EVAL_SPLITS, num_labels=cfg.num_labels)
    target = cfg.target if cfg.target is not None else attack_target(cfg.data, splits["test-poison"])
    if not 0 <= target < cfg.num_labels:
        raise JdupError(f"target label {target} is out of range for num_labels={cfg.num_labels}", "config:target")
    model = models.from_pretrained(cfg.model, num_labels=cfg.num_labels, dtype=DTYPES[cfg.dtype], seed=cfg.seed,
                                    mesh=mesh)  # straight into its shards
    if model.config.num_labels != cfg.num_labels:
        raise JdupError(f"the model has {model.config.num_labels} classes but num_labels={cfg.num_labels}",
                        cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    enc = {k: D.encode(tokenizer, v, cfg.max_length, tuple(cfg.buckets), config=model.config)
           for k, v in splits.items()}
    t_read = time.perf_counter() - t_start

    # ---- train (metrics.jsonl holds this run only: a new run starts it empty, a resumed one keeps the lines up to
    # its checkpoint's step; the replayed steps are logged again) ---------------------------------------------
    jsonl = os.path.join(out, "metrics.jsonl")
    identity = {k: v["fingerprint"] for k, v in output.manifest()["inputs"].items()}
    res = train(model, enc, cfg.settings(), target=target, mesh=mesh, donate_model=True,
                checkpoint=Checkpoint(os.path.join(out, "ckpt"), identity=identity),
                on_start=lambda step: _truncate_log(jsonl, step),
                on_record=lambda rec: atomic.append_jsonl(jsonl, rec))
    del model
    if res.stopped:
        return StageResult("train", None, {"stopped": True, "step": res.steps, "total_steps": res.total_steps,
                                           "checkpoint": res.checkpoint}, stopped=True)

    # ---- write --------------------------------------------------------------------------------------------
    model_dir = os.path.join(output.out, "model")
    models.save_pretrained(res.model, os.path.join(out, "model"), tokenizer_src=cfg.model)
    bm = res.metrics
    record = {
        "cacc": bm.get("cacc"), "asr": bm.get("asr"), "dev_acc": bm.get("dev_acc"), "dev_asr": bm.get("dev_asr"),
        "best_epoch": res.best_epoch, "last": res.history[-1] if res.history else {},
        "epochs": cfg.epochs, "steps": res.steps, "steps_per_epoch": res.steps_per_epoch,
        "warmup_steps": res.warmup_steps, "seconds": res.seconds + t_read, "target": res.target,
        "model_dir": model_dir, "num_truncated": {k: v.num_truncated for k, v in enc.items()},
        "history": res.history, **run_record(mesh), "config": dataclasses.asdict(cfg),
    }
    record = write_record(os.path.join(out, "metrics.json"), record)
    if not cfg.keep_checkpoints:
        shutil.rmtree(res.checkpoint, ignore_errors=True)
    output.commit(record)
    return StageResult("train", output.out, record, record["seconds"])


def _truncate_log(path: str, step: int) -> None:
    """Keeps the lines of ``metrics.jsonl`` up to ``step`` (all of them gone for a fresh run, ``step == 0``)."""
    kept = []
    if step > 0 and os.path.exists(path):
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
