"""The ``jdup detect`` stage (files in, files out) and the detection step of ``jdup unlearn``.

:func:`run_detect` loads the suspect model, reads the calibration split (``dev-clean``) and the scored split of a
DUP-layout folder, runs :func:`jdup.detect.detect` (DUP, DAN, UPGP or the ensemble, in memory) and writes
``scores.npy``, ``flags.npy``, ``components.npz``, ``roc.png``/``hist.png`` and ``detection.json``
(:func:`write_detection`, from the in-memory result). ``jdup unlearn`` detects on the splits it has already read
and writes its ``detection/`` folder with :func:`detect_and_write`; :func:`detect_dev` does the same for a script
holding a loaded model and a data folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from jdup import atomic, manifest, models, runtime
from jdup import config as config_lib
from jdup import data as data_lib
from jdup import plots as plots_lib
from jdup.detect import DetectionResult, detect
from jdup.errors import JdupError
from jdup.settings import DetectConfig, DetectSettings
from jdup.stages.common import StageResult, run_record, stage_mesh, write_record

log = logging.getLogger("jdup.detect")


def _read_scored(cfg: DetectConfig, num_labels: int | None):
    s = cfg.score_set
    if s.endswith(".csv") or os.sep in s or os.path.isfile(s):
        path = s if os.path.isabs(s) or os.path.isfile(s) else os.path.join(cfg.data, s)
        return data_lib.read_dup_csv(path, num_labels)
    return data_lib.read_split(cfg.data, s, num_labels=num_labels)  # dev-detect = dev-clean ‖ dev-poison


def run_detect(cfg: DetectConfig) -> StageResult:
    """The ``jdup detect`` stage: reads the model and data, runs :func:`jdup.detect.detect` with
    ``cfg.settings()``, writes the outputs (:func:`write_detection`).

    Writes under ``cfg.out`` (each file atomically; ``detection.json`` last): ``scores.npy`` (fused score per
    row of the scored file, in file order), ``flags.npy``, ``components.npz`` (md, ss, z_md, z_ss, preds,
    per-layer scores, validation scores, split indices), ``roc.png`` and ``hist.png`` (if the scored rows have
    both poison flags), and ``detection.json`` with ``auroc``, ``auroc_md``, ``auroc_ss``, ``frr``, ``far``,
    ``threshold``, ``layers``, ``n_scored``, ``n_flagged``, ``seconds``, ``mesh``, ``process_count`` and more.

    Returns:
      A :class:`jdup.stages.common.StageResult` whose ``record`` is the ``detection.json`` dict.
    """
    if not cfg.model or not cfg.data or not cfg.out:
        raise JdupError("detect needs model, data and out")
    config_lib.validate(cfg)
    # --out is checked before the model loads; the files are written into <out>.partial, which replaces --out
    # (manifest.json last) only when complete: a failed or killed run leaves the previous output, never a mix
    output = manifest.StageOutput("detect", cfg)
    with output:
        t0 = time.perf_counter()
        mesh = stage_mesh(cfg.mesh)
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        model = models.from_pretrained(cfg.model, dtype=dtype, mesh=mesh)  # straight into its shards
        tokenizer = models.load_tokenizer(cfg.model)
        num_labels = int(model.config.num_labels)
        calib = data_lib.read_split(cfg.data, cfg.calib_set, num_labels=num_labels)
        scored = _read_scored(cfg, num_labels)
        _, record = detect_and_write(cfg, model, tokenizer, calib, scored, output.path, t0=t0, plots=True,
                                     mesh=mesh)
        output.commit(record)
    return StageResult("detect", output.out, record, record["seconds"])


def detect_config_for(options: DetectSettings | dict | None, **where: Any) -> DetectConfig:
    """A :class:`DetectConfig` from a config, the algorithm's :class:`DetectSettings` or a mapping of their fields
    (``seed`` is accepted as an alias of ``split_seed``) with the I/O fields ``where`` set."""
    where = {k: os.fspath(v) for k, v in where.items()}
    if isinstance(options, DetectConfig):
        return dataclasses.replace(options, **where)
    if isinstance(options, DetectSettings):
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(DetectSettings)}
        return DetectConfig(**fields, **where)
    opts = dict(options or {})
    if "seed" in opts:
        opts.setdefault("split_seed", opts.pop("seed"))
    return config_lib.build(DetectConfig, {**opts, **where}, source="unlearn.detect")


def detect_dev(
    model, model_path: str, data: str, out: str, options: DetectSettings | dict | None = None, *, mesh: Any = None
) -> tuple[np.ndarray, dict]:
    """Detection on ``dev-detect = dev-clean ‖ dev-poison`` (calibrated on ``dev-clean``) for a model already in
    memory, written to ``out`` as ``jdup unlearn`` writes its ``detection/`` folder (manifest included).

    Args:
      model: the (already loaded) suspect model.
      model_path: where its tokenizer lives (a folder or ``builtin:`` name).
      data: DUP data folder.
      out: output folder (same files as :func:`run_detect`).
      options: :class:`DetectSettings` (or a :class:`DetectConfig`: its method, feature and decision fields are
        used), or a mapping of :class:`DetectConfig` fields.
      mesh: the device mesh (``None``: the default device).

    Returns:
      ``(flags [n_dev_clean + n_dev_poison] bool, detection.json dict)``.
    """
    cfg = detect_config_for(options, model=model_path, data=data, out=out, score_set="dev-detect")
    t0 = time.perf_counter()
    tokenizer = models.load_tokenizer(cfg.model)
    num_labels = int(model.config.num_labels)
    calib = data_lib.read_split(cfg.data, cfg.calib_set, num_labels=num_labels)
    scored = _read_scored(cfg, num_labels)
    folder = os.path.abspath(cfg.out)
    res, record = detect_and_write(cfg, model, tokenizer, calib, scored, folder, t0=t0, plots=False, mesh=mesh)
    manifest.write(folder, dev_manifest(cfg))  # last: the folder is complete (unlearning may reuse it)
    return np.asarray(res.flags, bool), record


def dev_manifest(cfg: DetectConfig) -> dict:
    """The manifest of a ``dev-detect`` detection folder written with ``cfg`` (see :func:`detect_dev`): unlearning
    reuses a folder only when its stored manifest has the same key."""
    return manifest.make("detect", cfg, manifest.stage_inputs("detect", cfg))


def detect_and_write(
    cfg: DetectConfig, model, tokenizer, calib: data_lib.TextDataset, scored: data_lib.TextDataset, folder: str, *,
    t0: float, plots: bool = True, mesh: Any = None,
) -> tuple[DetectionResult, dict]:
    """:func:`jdup.detect.detect` of ``scored`` calibrated on ``calib`` (in memory, ``cfg.settings()``), then
    :func:`write_detection` into ``folder``. ``t0`` is when the stage started (``seconds`` counts from it, loading
    included); ``plots`` is the default of ``cfg.plots = None``."""
    t_load = time.perf_counter() - t0
    if plots if cfg.plots is None else cfg.plots:
        plots_lib.preload()  # Matplotlib's import overlaps the passes instead of following them
    compile0 = runtime.compile_totals()
    res = detect(model, tokenizer, calib, scored, cfg.settings(), mesh=mesh)
    record = write_detection(folder, cfg, res, scored, t0=t0, t_load=t_load, plots=plots, mesh=mesh,
                             compile_s=runtime.compile_since(compile0))
    return res, record


def write_detection(
    folder: str, cfg: DetectConfig, res: DetectionResult, scored: data_lib.TextDataset, *, t0: float,
    t_load: float = 0.0, plots: bool = True, mesh: Any = None, compile_s: dict | None = None,
) -> dict:
    """Writes a detection's files from its in-memory result: ``scores.npy``, ``flags.npy``, ``components.npz``,
    the plots (``cfg.plots``, default ``plots``; drawn after the timing, ``seconds_plots``) and ``detection.json``
    last. Returns the ``detection.json`` record. ``compile_s``: the JAX compilation work during the detection
    (:func:`jdup.runtime.compile_since`), recorded as ``seconds_compile``."""
    t_write = time.perf_counter()
    out = os.path.abspath(folder)
    os.makedirs(out, exist_ok=True)
    atomic.write_npy(os.path.join(out, "scores.npy"), res.scores.astype(np.float32))
    atomic.write_npy(os.path.join(out, "flags.npy"), res.flags.astype(bool))
    per_method: dict[str, np.ndarray] = {}
    if res.upgp is not None:
        per_method.update(upgp_scores=res.upgp.scores, sensitivity=res.upgp.sensitivity)
    if res.ensemble is not None:
        per_method.update(dataclasses.asdict(res.ensemble))
    atomic.write_npz(
        os.path.join(out, "components.npz"),
        scores=res.scores,
        flags=res.flags,
        md=res.md,
        ss=res.ss,
        z_md=res.z_md,
        z_ss=res.z_ss,
        md_layers=res.md_layers,
        preds=res.preds,
        val_scores=res.val_scores,
        poison=scored.poison,
        labels=scored.labels,
        calib_index=res.calib_index,
        val_index=res.val_index,
        **per_method,
    )
    seconds = time.perf_counter() - t0  # detection, without the plots
    t_write = time.perf_counter() - t_write
    age = runtime.process_seconds()
    startup = None if age is None else max(0.0, age - (time.perf_counter() - t0))
    y = np.asarray(scored.poison).astype(bool)
    t_plots = time.perf_counter()
    want_plots, drawn = (plots if cfg.plots is None else cfg.plots), []
    if want_plots and y.any() and (~y).any():
        where = os.path.join(*os.path.normpath(os.path.abspath(cfg.data)).split(os.sep)[-2:])
        title = f"{cfg.method.upper()}: {where}/{cfg.score_set}"
        extra = {"MD only": res.z_md, "SS only": res.z_ss} if cfg.method in ("dup", "fisher") else None
        if res.ensemble is not None and res.upgp is not None:
            extra = {"DUP": res.ensemble.dup_scores, "UPGP": res.upgp.scores}
        plots_lib.roc_plot(y, res.scores, os.path.join(out, "roc.png"), title=title, extra=extra)
        plots_lib.score_histogram(res.scores, y, res.threshold, os.path.join(out, "hist.png"), title=title)
        drawn = ["roc.png", "hist.png"]
    record = {
        **dict.fromkeys(("auroc", "auroc_md", "auroc_ss", "frr", "far")),  # null when undefined (one class only)
        **res.metrics,
        "threshold": res.threshold,
        "layers": res.layers,
        "method": cfg.method,
        "alpha": cfg.alpha if cfg.method in ("dup", "ensemble") else None,
        **({"upgp": res.upgp.info} if res.upgp is not None else {}),
        "ch": res.ch.tolist(),
        "seconds": seconds,
        "seconds_load": t_load,
        "seconds_plots": time.perf_counter() - t_plots,
        # where a call's time goes (docs/performance.md): process start to t0 (interpreter, imports, CLI), writing
        # the arrays, JAX tracing / lowering / compiling or loading cached executables (inside the passes)
        "seconds_startup": startup,
        "seconds_write": t_write,
        "seconds_compile": compile_s,
        "timings": res.timings,
        "n_calibration": int(len(res.calib_index)),
        "n_validation": int(len(res.val_index)),
        "scored_file": getattr(scored, "source", cfg.score_set),
        "files": ["scores.npy", "flags.npy", "components.npz", *drawn],
        **run_record(mesh),
        "config": config_lib.to_dict(cfg),
    }
    record = write_record(os.path.join(out, "detection.json"), record)
    nan = float("nan")
    log.info(
        "detect: AUROC %.4f (MD %.4f, SS %.4f), FRR %.4f, FAR %.4f, %d/%d flagged, %.1fs",
        record.get("auroc") or nan,
        record.get("auroc_md") or nan,
        record.get("auroc_ss") or nan,
        record.get("frr") or nan,
        record.get("far") or nan,
        record["n_flagged"],
        record["n_scored"],
        record["seconds"],
    )
    return record


__all__ = ["DetectConfig", "DetectionResult", "detect", "detect_and_write", "detect_dev", "dev_manifest",
           "run_detect", "write_detection"]
