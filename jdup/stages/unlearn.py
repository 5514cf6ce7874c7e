"""The ``jdup unlearn`` stage: purify a backdoored classifier, with files in and out.

``jdup unlearn --model M --data DIR --out OUT [--detection DET]``:

1. Load the backdoored victim (the *teacher*, frozen) and the DUP data folder (dev-clean, dev-poison, test-clean,
   test-poison).
2. Detect on ``dev-detect = dev-clean ‖ dev-poison`` (calibrated on dev-clean) with :mod:`jdup.stages.detect`
   (:func:`detect_config` gives its settings), or reuse ``--detection``. The flagged rows (true and false
   positives) are the forget set; dev-clean with its labels is the retain set (:func:`jdup.unlearn.prepare_sets`).
3. Unlearn in memory (:func:`jdup.unlearn.unlearn`: LoRA student, ``λ_asr·forget + λ_acc·CE``, AdamW, optional
   UPGP projection, early stopping).
4. Merge the adapters (exact), evaluate CACC / ASR / RA before and after on test-clean / test-poison, write
   ``OUT/model/`` (Hugging Face format), ``OUT/metrics.json``, ``OUT/history.json`` and
   ``OUT/detection/flags.npy``; each file atomically (:mod:`jdup.atomic`). Orbax checkpoints under ``OUT/ckpt``
   let a killed run resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import atomic, manifest, models
from jdup import config as config_lib
from jdup import data as D
from jdup import lora as lora_lib
from jdup import metrics as metrics_lib
from jdup.detect import DetectConfig
from jdup.errors import JdupError
from jdup.settings import UnlearnConfig
from jdup.stages import detect as detect_stage
from jdup.predict import predict
from jdup.unlearn import prepare_sets, unlearn

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


def eval_target(data_dir: str, test_poison: D.TextDataset | None, required: bool = True) -> int | None:
    """The attack's target label for evaluation: ``poison_config.json`` if present, else the majority label of
    test-poison (every test-poison row is labelled with the target). Without either: an error, or ``None`` when
    ``required`` is false (a defender's folder without test-poison: no ASR/RA is reported)."""
    meta = os.path.join(data_dir, "poison_config.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                return int(json.load(f)["target"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if test_poison is None or len(test_poison) == 0:
        if not required:
            return None
        raise JdupError("test-poison is empty, cannot infer the target label", data_dir)
    return int(np.bincount(test_poison.labels).argmax())


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


def robust_labels(
    test_clean: D.TextDataset, test_poison: D.TextDataset, target: int, where: str
) -> np.ndarray | None:
    """True labels of the test-poison rows: row i is the poisoned copy of the i-th non-target test-clean row
    (docs/dup-method.md §5.1). ``None`` (RA not computed) when the counts do not line up."""
    true = test_clean.labels[test_clean.labels != target]
    if len(true) != len(test_poison):
        log.warning(
            "%s: %d non-target test-clean rows but %d test-poison rows; RA not computed",
            where,
            len(true),
            len(test_poison),
        )
        return None
    return true


def evaluate_model(
    model: nnx.Module,
    tc: D.Encoded,
    tp: D.Encoded | None,
    target: int | None,
    ra_labels,
    batch_size: int,
    progress: bool,
    tag: str,
) -> dict:
    """CACC (test-clean), ASR (test-poison → target) and RA (test-poison vs true labels); ASR and RA are
    ``None`` without test-poison rows (``tp`` or ``target`` ``None``)."""
    pc = predict(model, tc, batch_size, progress=progress, desc=f"eval {tag}: test-clean").argmax(-1)
    out = {"cacc": metrics_lib.accuracy(pc, tc.labels), "asr": None, "ra": None}
    if tp is not None and target is not None:
        pp = predict(model, tp, batch_size, progress=progress, desc=f"eval {tag}: test-poison").argmax(-1)
        out["asr"] = metrics_lib.attack_success_rate(pp, target)
        out["ra"] = metrics_lib.accuracy(pp, ra_labels) if ra_labels is not None else None
    return out


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


def run_detection(cfg: UnlearnConfig, model: nnx.Module, out_dir: str) -> np.ndarray:
    """Detect on dev-clean ‖ dev-poison (calibrated on dev-clean) with :func:`jdup.stages.detect.detect_dev` and
    :func:`detect_config`; the detection stage writes its files into ``out_dir``."""
    flags, _ = detect_stage.detect_dev(model, cfg.model, cfg.data, out_dir, detect_config(cfg))
    return np.asarray(flags, bool)


def run_unlearn(cfg: UnlearnConfig) -> dict:
    """``jdup unlearn``: detect, unlearn, merge, evaluate, export. See the module docstring.

    Writes (atomically) ``OUT/model/`` (purified classifier, Hugging Face format, with the victim's tokenizer),
    ``OUT/metrics.json``, ``OUT/history.json`` (per-step log and stop-rule evaluations) and, when detecting,
    ``OUT/detection/flags.npy``.

    Returns:
      The metrics dict: ``cacc_before``, ``asr_before``, ``ra_before``, ``cacc_after``, ``asr_after``, ``ra_after``,
      ``n_flagged``, ``n_flagged_poison``, ``seconds`` and run details.
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


def _flags(cfg: UnlearnConfig, output: manifest.StageOutput, victim: nnx.Module, n: int) -> tuple[np.ndarray, str]:
    """Flags over dev-clean ‖ dev-poison and where they came from: ``--detection``, a finished or interrupted
    detection of this output whose manifest matches this run's detection settings, or a new detection."""
    if cfg.detection:
        return _given_detection(cfg, output, n), os.path.abspath(os.fspath(cfg.detection))
    work = os.path.join(output.path, "detection")
    expected = detect_stage.dev_manifest(_dev_detect_config(cfg, work))
    if cfg.resume and not cfg.overwrite:
        for folder in (work, os.path.join(output.out, "detection")):
            if not os.path.isdir(folder):
                continue
            same, why = manifest.matches(folder, expected)
            if same:
                log.info("unlearn: reusing the detection in %s (same settings, model and data)", folder)
                if folder != work:
                    shutil.copytree(folder, work)
                return _load_flags(work, n), folder
            log.info("unlearn: detecting again, %s differs: %s", folder, why)
    shutil.rmtree(work, ignore_errors=True)
    flags = run_detection(cfg, victim, work)
    if len(flags) != n:
        raise JdupError(f"detection returned {len(flags)} flags for {n} rows")
    return flags, "detected"


def _run_unlearn(cfg: UnlearnConfig, output: manifest.StageOutput) -> dict:
    t0 = time.perf_counter()
    out = output.path  # the staging folder; output.out is where the finished output goes

    victim = models.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype])
    tok = models.load_tokenizer(cfg.model)
    k = victim.config.num_labels
    splits = _read_eval_splits(cfg, k)
    enc = {n: D.encode(tok, ds, cfg.max_length, config=victim.config) if ds is not None else None
           for n, ds in splits.items()}
    target = eval_target(cfg.data, splits["test-poison"], required=cfg.early_stop == "oracle_dev_poison")
    ra_labels = None
    if splits["test-poison"] is not None:
        ra_labels = robust_labels(splits["test-clean"], splits["test-poison"], target, cfg.data)

    # 1. detection over dev-detect = dev-clean ‖ dev-poison
    n_detect = len(splits["dev-clean"]) + len(splits["dev-poison"])
    t_det = time.perf_counter()
    flags, flags_from = _flags(cfg, output, victim, n_detect)
    if not flags.any() and not cfg.allow_empty_forget:
        raise JdupError(f"detection flagged none of the {n_detect} dev-clean ‖ dev-poison rows, so there is nothing "
                        "to unlearn; lower the detection threshold (e.g. detect.frr=0.2) or set "
                        "allow_empty_forget=true to export the model unchanged",
                        flags_from if flags_from != "detected" else os.path.join(output.out, "detection"))
    det_seconds = time.perf_counter() - t_det
    is_poison = np.concatenate(
        [np.zeros(len(splits["dev-clean"]), bool), np.ones(len(splits["dev-poison"]), bool)]
    )
    dev_detect = D.TextDataset.concat([splits["dev-clean"], splits["dev-poison"]], "dev-detect")
    enc_detect = D.encode(tok, dev_detect, cfg.max_length, config=victim.config)

    # 2. forget set (training part + held-out part for the proxy rule), retain set, teacher, monitor
    sets = prepare_sets(cfg, victim, enc_detect, flags, enc["dev-clean"], enc["dev-poison"], target)

    # 3. before
    before = evaluate_model(
        victim,
        enc["test-clean"],
        enc["test-poison"],
        target,
        ra_labels,
        cfg.eval_batch_size,
        cfg.progress,
        "before",
    )

    # 4. unlearn (the UPGP projection, if any, is built by unlearn() on its student)
    t_un = time.perf_counter()
    res = unlearn(
        victim,
        sets.forget,
        sets.retain,
        cfg,
        teacher_logits=sets.teacher,
        target_label=sets.target,
        monitor=sets.monitor,
        ckpt_dir=os.path.join(out, "ckpt"),
    )
    un_seconds = time.perf_counter() - t_un

    # 5. after
    after = evaluate_model(
        res.merged,
        enc["test-clean"],
        enc["test-poison"],
        target,
        ra_labels,
        cfg.eval_batch_size,
        cfg.progress,
        "after",
    )
    models.save_pretrained(res.merged, os.path.join(out, "model"), tokenizer_src=tok)

    fl = flags.astype(bool)
    metrics = {
        "cacc_before": before["cacc"],
        "asr_before": before["asr"],
        "ra_before": before["ra"],
        "cacc_after": after["cacc"],
        "asr_after": after["asr"],
        "ra_after": after["ra"],
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
        "early_stop": cfg.early_stop,
        "forget_loss": cfg.forget_loss,
        "lambda_asr": cfg.lambda_asr,
        "lambda_acc": cfg.lambda_acc,
        "projection": cfg.projection,
        "trainable_params": lora_lib.count_params(res.student.trainable),
        "detect_seconds": det_seconds,
        "unlearn_seconds": un_seconds,
        "seconds": time.perf_counter() - t0,
    }
    atomic.write_json(
        os.path.join(out, "history.json"), {"evals": res.history, "steps": res.log}, default=float
    )
    atomic.write_json(os.path.join(out, "metrics.json"), metrics, default=float)
    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
    output.commit(metrics)
    log.info("unlearn: %s", metrics)
    return metrics


__all__ = [
    "UnlearnConfig",
    "detect_config",
    "run_unlearn",
    "run_detection",
    "evaluate_model",
    "eval_target",
    "robust_labels",
]
