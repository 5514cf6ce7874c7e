"""The ``jdup detect`` stage (files in, files out) and the detection step of ``jdup unlearn``.

:func:`run_detect` loads the suspect model, reads the calibration split (``dev-clean``) and the scored split of a
DUP-layout folder, runs :func:`jdup.detect.detect` (DUP, DAN, UPGP or the ensemble, in memory) and writes
``scores.npy``, ``flags.npy``, ``components.npz``, ``roc.png``/``hist.png`` and ``detection.json``;
:func:`detect_dev` does the same on ``dev-clean ‖ dev-poison`` for a model unlearning has already loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from jdup import atomic, manifest, models
from jdup import config as config_lib
from jdup import data as data_lib
from jdup import plots as plots_lib
from jdup.detect import DetectConfig, DetectionResult, detect
from jdup.errors import JdupError

log = logging.getLogger("jdup.detect")


def _read_scored(cfg: DetectConfig, num_labels: int | None):
    s = cfg.score_set
    if s.endswith(".csv") or os.sep in s or os.path.isfile(s):
        path = s if os.path.isabs(s) or os.path.isfile(s) else os.path.join(cfg.data, s)
        return data_lib.read_dup_csv(path, num_labels)
    return data_lib.read_split(cfg.data, s, num_labels=num_labels)  # dev-detect = dev-clean ‖ dev-poison


def _atomic_bytes(path: str, write) -> None:
    atomic.write(path, write, binary=True)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    return x


def run_detect(cfg: DetectConfig) -> dict:
    """The ``jdup detect`` stage: loads the model and data, runs :func:`detect`, writes the outputs.

    Writes under ``cfg.out`` (each file atomically; ``detection.json`` last): ``scores.npy`` (fused score per
    row of the scored file, in file order), ``flags.npy``, ``components.npz`` (md, ss, z_md, z_ss, preds,
    per-layer scores, validation scores, split indices), ``roc.png`` and ``hist.png`` (if the scored rows have
    both poison flags), and ``detection.json`` with ``auroc``, ``auroc_md``, ``auroc_ss``, ``frr``, ``far``,
    ``threshold``, ``layers``, ``n_scored``, ``n_flagged``, ``seconds`` and more.

    Returns:
      The ``detection.json`` dict.
    """
    if not cfg.model or not cfg.data or not cfg.out:
        raise JdupError("detect needs model, data and out")
    config_lib.validate(cfg)
    # --out is checked before the model loads; the files are written into <out>.partial, which replaces --out
    # (manifest.json last) only when complete: a failed or killed run leaves the previous output, never a mix
    output = manifest.StageOutput("detect", cfg)
    with output:
        t0 = time.perf_counter()
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        model = models.from_pretrained(cfg.model, dtype=dtype)
        tokenizer = models.load_tokenizer(cfg.model)
        result = _detect_and_write(cfg, model, tokenizer, t0, folder=output.path, plots=True)
        output.commit(result)
    return result


def detect_dev(
    model, model_path: str, data: str, out: str, options: DetectConfig | dict | None = None
) -> tuple[np.ndarray, dict]:
    """Detection for unlearning: scores ``dev-detect = dev-clean ‖ dev-poison``, calibrated on ``dev-clean``.

    The truncation length is the detect config's own ``max_length`` (512 by default, as ``jdup detect``), not the
    shorter length unlearning trains with.

    Args:
      model: the (already loaded) suspect model.
      model_path: where its tokenizer lives (a folder or ``builtin:`` name).
      data: DUP data folder.
      out: output folder (same files as :func:`run_detect`).
      options: a :class:`DetectConfig` (its method, feature and decision fields are used), or a mapping of
        :class:`DetectConfig` fields (``seed`` is accepted as an alias of ``split_seed``).

    Returns:
      ``(flags [n_dev_clean + n_dev_poison] bool, detection.json dict)``.
    """
    where = dict(
        model=os.fspath(model_path), data=os.fspath(data), out=os.fspath(out), score_set="dev-detect"
    )
    if isinstance(options, DetectConfig):
        cfg = dataclasses.replace(options, **where)
    else:
        opts = dict(options or {})
        if "seed" in opts:
            seed = opts.pop("seed")
            opts.setdefault("split_seed", seed)
        cfg = config_lib.build(DetectConfig, {**opts, **where}, source="unlearn.detect")
    t0 = time.perf_counter()
    tokenizer = models.load_tokenizer(cfg.model)
    folder = os.path.abspath(cfg.out)
    result = _detect_and_write(cfg, model, tokenizer, t0, plots=False)
    manifest.write(folder, dev_manifest(cfg))  # last: the folder is complete (unlearning may reuse it)
    flags = np.load(os.path.join(folder, "flags.npy"))
    return flags, result


def dev_manifest(cfg: DetectConfig) -> dict:
    """The manifest of a ``dev-detect`` detection folder written with ``cfg`` (see :func:`detect_dev`): unlearning
    reuses a folder only when its stored manifest has the same key."""
    return manifest.make("detect", cfg, manifest.stage_inputs("detect", cfg))


def _detect_and_write(
    cfg: DetectConfig, model, tokenizer, t0: float, folder: str | None = None, plots: bool = True
) -> dict:
    """Detect and write the files; ``plots`` is the default of ``cfg.plots = None``. ``seconds`` stops before the
    plots (drawn last, outside the timing; ``seconds_plots``)."""
    num_labels = int(model.config.num_labels)
    calib = data_lib.read_split(cfg.data, cfg.calib_set, num_labels=num_labels)
    scored = _read_scored(cfg, num_labels)
    t_load = time.perf_counter() - t0
    res = detect(model, tokenizer, calib, scored, cfg)

    out = os.path.abspath(folder or cfg.out)
    os.makedirs(out, exist_ok=True)
    _atomic_bytes(os.path.join(out, "scores.npy"), lambda f: np.save(f, res.scores.astype(np.float32)))
    _atomic_bytes(os.path.join(out, "flags.npy"), lambda f: np.save(f, res.flags.astype(bool)))
    _atomic_bytes(
        os.path.join(out, "components.npz"),
        lambda f: np.savez(
            f,
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
            **{k: v for k, v in res.extra.items() if isinstance(v, np.ndarray)},
        ),
    )
    seconds = time.perf_counter() - t0  # detection, without the plots
    y = np.asarray(scored.poison).astype(bool)
    t_plots = time.perf_counter()
    want_plots, plots = (plots if cfg.plots is None else cfg.plots), []
    if want_plots and y.any() and (~y).any():
        where = os.path.join(*os.path.normpath(os.path.abspath(cfg.data)).split(os.sep)[-2:])
        title = f"{cfg.method.upper()}: {where}/{cfg.score_set}"
        extra = {"MD only": res.z_md, "SS only": res.z_ss} if cfg.method in ("dup", "fisher") else None
        if cfg.method == "ensemble":
            extra = {"DUP": res.extra["dup_scores"], "UPGP": res.extra["upgp_scores"]}
        plots_lib.roc_plot(y, res.scores, os.path.join(out, "roc.png"), title=title, extra=extra)
        plots_lib.score_histogram(res.scores, y, res.threshold, os.path.join(out, "hist.png"), title=title)
        plots = ["roc.png", "hist.png"]
    result = {
        **dict.fromkeys(("auroc", "auroc_md", "auroc_ss", "frr", "far")),  # null when undefined (one class only)
        **res.metrics,
        "threshold": res.threshold,
        "layers": res.layers,
        "method": cfg.method,
        "alpha": cfg.alpha if cfg.method in ("dup", "ensemble") else None,
        **({"upgp": res.extra["upgp_info"]} if "upgp_info" in res.extra else {}),
        "ch": res.ch.tolist(),
        "seconds": seconds,
        "seconds_load": t_load,
        "seconds_plots": time.perf_counter() - t_plots,
        "timings": res.timings,
        "n_calibration": int(len(res.calib_index)),
        "n_validation": int(len(res.val_index)),
        "scored_file": getattr(scored, "source", cfg.score_set),
        "files": ["scores.npy", "flags.npy", "components.npz", *plots],
        "config": config_lib.to_dict(cfg),
    }
    result = _json_safe(result)
    _atomic_bytes(
        os.path.join(out, "detection.json"), lambda f: f.write((json.dumps(result, indent=2) + "\n").encode())
    )
    nan = float("nan")
    log.info(
        "detect: AUROC %.4f (MD %.4f, SS %.4f), FRR %.4f, FAR %.4f, %d/%d flagged, %.1fs",
        result.get("auroc") or nan,
        result.get("auroc_md") or nan,
        result.get("auroc_ss") or nan,
        result.get("frr") or nan,
        result.get("far") or nan,
        result["n_flagged"],
        result["n_scored"],
        result["seconds"],
    )
    return result


__all__ = ["DetectConfig", "DetectionResult", "detect", "detect_dev", "run_detect"]
