"""The ``jdup unlearn`` stage: purify a backdoored classifier, with files in and out.

``jdup unlearn --model M --data DIR --out OUT [--detection DET]``:

1. Load the backdoored victim (the *teacher*, frozen) and read the DUP data folder once (dev-clean, dev-poison,
   test-clean, test-poison).
2. Detect in memory on ``dev-detect = dev-clean ‖ dev-poison`` (calibrated on dev-clean; :func:`detect_config`
   gives the settings) and write ``OUT/detection/`` from the result (:func:`jdup.stages.detect.detect_and_write`),
   or reuse ``--detection``. The flagged rows (true and false positives) are the forget set; dev-clean with its
   labels is the retain set (:func:`jdup.unlearn.prepare_sets`).
3. Unlearn in memory (:func:`jdup.unlearn.unlearn` with ``cfg.settings()``: LoRA student,
   ``λ_asr·forget + λ_acc·CE``, AdamW, optional UPGP projection, early stopping).
4. Merge the adapters (exact), evaluate CACC / ASR / RA before and after on test-clean / test-poison
   (:func:`jdup.evaluate.evaluate_model`), write ``OUT/model/`` (Hugging Face format), ``OUT/metrics.json`` and
   ``OUT/history.json``, each file atomically (:mod:`jdup.atomic`). Orbax checkpoints under ``OUT/ckpt`` let a
   killed run resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import atomic, distributed, manifest, models, runtime
from jdup import config as config_lib
from jdup import data as D
from jdup import lora as lora_lib
from jdup import predict as predict_lib
from jdup.checkpoint import Checkpoint
from jdup.detect import DetectionResult
from jdup.errors import JdupError
from jdup.evaluate import evaluate_model, robust_labels
from jdup.settings import DetectConfig, UnlearnConfig
from jdup.stages import detect as detect_stage
from jdup.stages.common import StageResult, attack_target, run_record, stage_mesh, write_record
from jdup.unlearn import prepare_sets, unlearn
from jdup.unlearn.tilt import apply_tilt, choose_tilt

log = logging.getLogger("jdup.unlearn")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def detect_config(cfg: UnlearnConfig) -> DetectConfig:
    """The settings of ``jdup unlearn``'s built-in detection: ``cfg.detect`` whose ``split_seed``, ``max_length``
    (when left at the :class:`DetectConfig` defaults) and ``progress`` follow ``cfg``'s ``seed``, ``max_length``
    and ``progress``."""
    d, default = cfg.detect, DetectConfig()
    changes: dict = {}
    if d.split_seed == default.split_seed:
        changes["split_seed"] = int(cfg.seed)
    if d.max_length == default.max_length:
        changes["max_length"] = int(cfg.max_length)
    if not cfg.progress:
        changes["progress"] = False
    return dataclasses.replace(d, **changes)


def _check_config(cfg: UnlearnConfig) -> None:
    if not cfg.model:
        raise JdupError("unlearn needs `model` (the backdoored classifier)")
    if not cfg.data:
        raise JdupError("unlearn needs `data` (a DUP-layout folder)")
    if not cfg.out:
        raise JdupError("unlearn needs `out` (the output folder)")
    config_lib.validate(cfg, source="unlearn")


def _read_eval_splits(cfg: UnlearnConfig, num_labels: int) -> dict[str, D.TextDataset | None]:
    """dev-clean, dev-poison, test-clean and test-poison of ``cfg.data``. test-poison is optional (a defender
    rarely has triggered test rows): when its file is missing or has no rows it is ``None``, and unlearning
    reports CACC only (ASR/RA ``None``)."""
    splits: dict[str, D.TextDataset | None] = {
        n: D.read_split(cfg.data, n, num_labels=num_labels) for n in ("dev-clean", "dev-poison", "test-clean")
    }
    tp = None
    if os.path.isfile(D.split_path(cfg.data, "test-poison")):
        tp = D.read_split(cfg.data, "test-poison", num_labels=num_labels)
    if tp is None or len(tp) == 0:
        log.warning("unlearn: %s has no test-poison rows; ASR and RA are not computed (CACC only)", cfg.data)
        tp = None
    splits["test-poison"] = tp
    return splits


def _load_flags(folder: str, n: int) -> np.ndarray:
    """Flags over dev-clean ‖ dev-poison from a detection folder (``flags.npy`` or ``detection.json``'s
    ``flags``)."""
    path = os.path.join(folder, "flags.npy")
    if os.path.isfile(path):
        try:
            flags = np.load(path).astype(bool).reshape(-1)
        except (OSError, ValueError) as e:
            raise JdupError(f"cannot read flags: {e}", path) from e
    else:
        path = os.path.join(folder, "detection.json")
        if not os.path.isfile(path):
            raise JdupError("detection folder has neither flags.npy nor detection.json", folder)
        with open(path, encoding="utf-8") as f:
            det = json.load(f)
        if "flags" not in det:
            raise JdupError("detection.json has no `flags` list", path)
        flags = np.asarray(det["flags"], bool).reshape(-1)
    if len(flags) != n:
        raise JdupError(
            f"{len(flags)} flags, but dev-clean ‖ dev-poison has {n} rows (a detection of another "
            "set? unlearning needs flags over dev-clean followed by dev-poison)",
            path,
        )
    return flags


def run_unlearn(cfg: UnlearnConfig) -> StageResult:
    """``jdup unlearn``: detect, unlearn, merge, evaluate, export. See the module docstring.

    Writes (atomically) ``OUT/model/`` (purified classifier, Hugging Face format, with the victim's tokenizer),
    ``OUT/metrics.json``, ``OUT/history.json`` (per-step log and stop-rule evaluations) and, when detecting,
    ``OUT/detection/`` (the files of ``jdup detect``).

    Returns:
      A :class:`jdup.stages.common.StageResult` whose ``record`` is ``metrics.json``: ``cacc_before``,
      ``asr_before``, ``ra_before``, ``cacc_after``, ``asr_after``, ``ra_after``, ``asr_trigger_before``,
      ``asr_trigger_after``, ``n_flagged``,
      ``n_flagged_poison``, ``seconds``, ``mesh``, ``process_count`` and run details.
    """
    _check_config(cfg)
    # --out is checked before any work; the output is built in <out>.partial (checkpoints in <out>.partial/ckpt,
    # resumed by the next run) and replaces --out with manifest.json last, only when complete
    output = manifest.StageOutput("unlearn", cfg, resume=cfg.resume and not cfg.overwrite, keep=("ckpt", "detection"))
    with output:
        return _run_unlearn(cfg, output)


def _dev_detect_config(cfg: UnlearnConfig, folder: str) -> DetectConfig:
    """The full settings of the built-in detection writing into ``folder`` (what its manifest records)."""
    return dataclasses.replace(detect_config(cfg), model=os.fspath(cfg.model), data=os.fspath(cfg.data),
                               out=os.fspath(folder), score_set="dev-detect")


def _given_detection(cfg: UnlearnConfig, output: manifest.StageOutput, n: int) -> np.ndarray:
    """Flags of ``--detection DIR``, accepted only when DIR's manifest was made for this model and data."""
    folder = os.fspath(cfg.detection)
    got = manifest.read(folder)
    if got is None:
        log.warning("%s has no manifest.json: cannot check that it was made for this model and data", folder)
    else:
        mine = output.manifest()["inputs"]
        diffs = [name for name in ("model", "data")
                 if got.get("inputs", {}).get(name, {}).get("fingerprint") != mine[name]["fingerprint"]]
        if got.get("stage") != "detect" or got.get("config", {}).get("score_set") != "dev-detect":
            diffs.append("scored set (needs a detection of dev-detect, as `jdup unlearn` writes it)")
        if diffs:
            raise JdupError(f"this detection was made for another {' and '.join(diffs)}; run without --detection "
                            "to detect again, or pass the detection of this model and data", folder)
    return _load_flags(folder, n)


def _flags(cfg: UnlearnConfig, output: manifest.StageOutput, victim: nnx.Module, tokenizer: Any,
           splits: dict[str, D.TextDataset | None], dev_detect: D.TextDataset, mesh: Any
           ) -> tuple[np.ndarray, str, np.ndarray | None]:
    """Flags over dev-clean ‖ dev-poison, where they came from (``--detection``, a finished or interrupted
    detection of this output whose manifest matches this run's detection settings, or a new detection, run in
    memory on the splits already read, its folder written from the result) and, from a new detection, the victim's
    logits on those rows (else None)."""
    n = len(dev_detect)
    if cfg.detection:
        return _given_detection(cfg, output, n), os.path.abspath(os.fspath(cfg.detection)), None
    work = os.path.join(output.path, "detection")
    dcfg = _dev_detect_config(cfg, work)
    expected = detect_stage.dev_manifest(dcfg)
    if cfg.resume and not cfg.overwrite:
        reuse = None  # process 0 decides (the others' `work` is a scratch folder): all run the same program
        for folder in (work, os.path.join(output.out, "detection")) if output.writer else ():
            if not os.path.isdir(folder):
                continue
            same, why = manifest.matches(folder, expected)
            if same:
                reuse = folder
                break
            log.info("unlearn: detecting again, %s differs: %s", folder, why)
        reuse = distributed.broadcast(reuse)
        if reuse is not None:
            log.info("unlearn: reusing the detection in %s (same settings, model and data)", reuse)
            if output.writer and reuse != work:
                shutil.copytree(reuse, work)
            return _load_flags(work if output.writer else reuse, n), reuse, None
    shutil.rmtree(work, ignore_errors=True)
    res = run_detection(dcfg, victim, tokenizer, splits, dev_detect, work, mesh=mesh, manifest_=expected)
    if len(res.flags) != n:
        raise JdupError(f"detection returned {len(res.flags)} flags for {n} rows")
    return np.asarray(res.flags, bool), "detected", res.logits


def run_detection(dcfg: DetectConfig, victim: nnx.Module, tokenizer: Any, splits: dict[str, D.TextDataset | None],
                  dev_detect: D.TextDataset, folder: str, *, mesh: Any = None, manifest_: dict | None = None
                  ) -> DetectionResult:
    """The built-in detection: :func:`jdup.detect.detect` on ``dev_detect`` calibrated on the dev-clean split
    already read, in memory; its files are written into ``folder`` from the result (manifest last). Returns the
    result (flags, and the victim's logits on ``dev_detect`` that the unlearning's teacher reuses)."""
    calib = splits["dev-clean"]
    if dcfg.calib_set != "dev-clean":
        calib = D.read_split(dcfg.data, dcfg.calib_set, num_labels=int(victim.config.num_labels))
    res, _ = detect_stage.detect_and_write(dcfg, victim, tokenizer, calib, dev_detect, folder,
                                           t0=time.perf_counter(), plots=False, mesh=mesh)
    manifest.write(folder, manifest_ or detect_stage.dev_manifest(dcfg))  # last: the folder is complete
    return res


def _guard_checkpoint(cfg: UnlearnConfig, output: manifest.StageOutput, flags: np.ndarray) -> str:
    """The checkpoint folder of this run. The unlearning loop fingerprints its checkpoints from the algorithm's
    settings and set sizes; what the stage adds (the input files, the flags, the tokenisation, the dtype) is kept
    next to it, and a checkpoint written for other ones is discarded."""
    ckpt = os.path.join(output.path, "ckpt")
    identity = {
        "inputs": {k: v["fingerprint"] for k, v in output.manifest()["inputs"].items()},
        "flags": hashlib.sha256(np.packbits(np.asarray(flags, bool)).tobytes()).hexdigest()[:16],
        "n_flags": int(len(flags)), "max_length": int(cfg.max_length), "dtype": cfg.dtype,
    }
    path = os.path.join(output.path, "ckpt-inputs.json")
    try:
        with open(path, encoding="utf-8") as f:
            same = json.load(f) == identity
    except (OSError, ValueError):
        same = False
    if not same and os.path.isdir(ckpt):
        log.info("unlearn: not resuming %s (written for other inputs, flags or tokenisation)", ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
    atomic.write_json(path, identity)
    return ckpt


def _run_unlearn(cfg: UnlearnConfig, output: manifest.StageOutput) -> StageResult:
    t0 = time.perf_counter()
    age, compile0 = runtime.process_seconds(), runtime.compile_totals()
    phases: dict[str, Any] = {"startup": age}  # where the call's time goes (docs/performance.md)
    compile_phases: dict[str, float] = {}  # JAX's compile work (trace + lower + XLA compile or cache load) per phase
    clock = [compile0]

    def compiled(name: str) -> None:
        d = runtime.compile_since(clock[0])
        clock[0] = runtime.compile_totals()
        compile_phases[name] = d["trace_s"] + d["lower_s"] + d["compile_s"]
    out = output.path  # the staging folder; output.out is where the finished output goes
    settings = cfg.settings()
    mesh = stage_mesh(cfg.mesh)

    # read once: the model, its tokenizer, the four splits (tokenised once at max_length)
    victim = models.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype], mesh=mesh)  # straight into its shards
    tok = models.load_tokenizer(cfg.model)
    k = victim.config.num_labels
    splits = _read_eval_splits(cfg, k)
    enc = {n: D.encode(tok, ds, cfg.max_length, config=victim.config) if ds is not None else None
           for n, ds in splits.items()}
    target = attack_target(cfg.data, splits["test-poison"], required=cfg.early_stop == "oracle_dev_poison")
    ra_labels = None
    if splits["test-poison"] is not None:
        ra_labels = robust_labels(splits["test-clean"], splits["test-poison"], target, cfg.data)

    phases["load"] = time.perf_counter() - t0
    compiled("load")
    # 1. detection over dev-detect = dev-clean ‖ dev-poison, in memory
    dev_detect = D.TextDataset.concat([splits["dev-clean"], splits["dev-poison"]],
                                      os.path.join(os.fspath(cfg.data), "dev-detect"))
    n_detect = len(dev_detect)
    t_det = time.perf_counter()
    flags, flags_from, detect_logits = _flags(cfg, output, victim, tok, splits, dev_detect, mesh)
    if not flags.any() and not cfg.allow_empty_forget:
        raise JdupError(f"detection flagged none of the {n_detect} dev-clean ‖ dev-poison rows, so there is nothing "
                        "to unlearn; lower the detection threshold (e.g. detect.frr=0.2) or set "
                        "allow_empty_forget=true to export the model unchanged",
                        flags_from if flags_from != "detected" else os.path.join(output.out, "detection"))
    det_seconds = time.perf_counter() - t_det
    compiled("detect")
    is_poison = np.concatenate(
        [np.zeros(len(splits["dev-clean"]), bool), np.ones(len(splits["dev-poison"]), bool)]
    )
    enc_detect = D.Encoded.concat([enc["dev-clean"], enc["dev-poison"]])

    # 2. forget set (training part + held-out part for the proxy rule), retain set, teacher, monitor
    t = time.perf_counter()
    sets = prepare_sets(settings, victim, enc_detect, flags, enc["dev-clean"], enc["dev-poison"], target,
                        victim_logits=detect_logits)  # the detection pass's logits: no second forward
    phases["prepare"] = time.perf_counter() - t
    compiled("prepare")

    # 3. before
    t = time.perf_counter()
    eval_kw = dict(batch_size=cfg.eval_batch_size, progress=cfg.progress, mesh=mesh)
    before = (evaluate_model(victim, enc["test-clean"], enc["test-poison"], target, ra_labels, tag="before",
                             **eval_kw) if cfg.evaluate_before else None)
    phases["before"] = time.perf_counter() - t
    compiled("before")

    # 4. unlearn (the UPGP projection, if any, is built by unlearn() on its student)
    t_un = time.perf_counter()
    res = unlearn(
        victim,
        sets.forget,
        sets.retain,
        settings,
        teacher_logits=sets.teacher,
        target_label=sets.target,
        monitor=sets.monitor,
        checkpoint=Checkpoint(_guard_checkpoint(cfg, output, flags), max_to_keep=1),
        mesh=mesh,
    )
    un_seconds = time.perf_counter() - t_un
    tilt = None
    if cfg.target_tilt and sets.clean_check is not None:  # lower the target logit as held-out accuracy allows
        held = predict_lib.predict(res.merged, sets.clean_check, cfg.eval_batch_size, mesh=mesh)
        tilt = choose_tilt(held, sets.clean_check.labels, sets.target, sets.base_acc, cfg.tilt_tol)
        apply_tilt(res.merged, sets.target, tilt.shift)
        log.info("unlearn: target tilt %s", tilt)
    compiled("unlearn")

    # 5. after
    t = time.perf_counter()
    after = evaluate_model(res.merged, enc["test-clean"], enc["test-poison"], target, ra_labels, tag="after",
                           **eval_kw)
    phases["after"] = time.perf_counter() - t
    compiled("after")
    t = time.perf_counter()
    models.save_pretrained(res.merged, os.path.join(out, "model"), tokenizer_src=tok)
    phases["save"] = time.perf_counter() - t
    compiled("save")
    phases["compile"] = runtime.compile_since(compile0)  # inside the phases above (tracing, XLA or cache load)
    phases["compile_phases"] = compile_phases

    fl = flags.astype(bool)
    record = {
        "cacc_before": before.cacc if before is not None else None,  # None: evaluate_before=false
        "asr_before": before.asr if before is not None else None,
        "ra_before": before.ra if before is not None else None,
        "cacc_after": after.cacc,
        "asr_after": after.asr,
        "ra_after": after.ra,
        "asr_trigger_before": before.asr_trigger if before is not None else None,
        "asr_trigger_after": after.asr_trigger,
        "n_flagged": int(fl.sum()),
        "flags_from": flags_from,
        "n_flagged_poison": int((fl & is_poison).sum()),
        "n_flagged_clean": int((fl & ~is_poison).sum()),
        "n_dev_detect": int(n_detect),
        "n_forget_train": int(len(sets.forget)),
        "n_holdout": int(len(sets.holdout)),
        "n_retain": int(len(sets.retain)),
        "target": int(target) if target is not None else None,
        "defender_target": int(sets.target),
        "steps": res.steps,
        "total_steps": res.total_steps,
        "best_step": res.best_step,
        "stopped_early": res.stopped_early,
        "collapsed": res.collapsed,
        "early_stop": cfg.early_stop,
        "forget_loss": cfg.forget_loss,
        "lambda_asr": cfg.lambda_asr,
        "lambda_acc": cfg.lambda_acc,
        "projection": cfg.projection,
        "target_tilt": tilt._asdict() if tilt is not None else None,
        "trainable_params": lora_lib.count_params(res.student.trainable),
        "detect_seconds": det_seconds,
        "unlearn_seconds": un_seconds,
        "seconds_phases": {"detect": det_seconds, "unlearn": un_seconds, **phases},
        **run_record(mesh),
        "seconds": time.perf_counter() - t0,
    }
    atomic.write_json(
        os.path.join(out, "history.json"), {"evals": res.history, "steps": res.log}, default=float
    )
    record = write_record(os.path.join(out, "metrics.json"), record)
    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
    os.remove(os.path.join(out, "ckpt-inputs.json"))
    output.commit(record)
    log.info("unlearn: %s", record)
    return StageResult("unlearn", output.out, record, record["seconds"])


__all__ = ["UnlearnConfig", "detect_config", "run_detection", "run_unlearn"]
