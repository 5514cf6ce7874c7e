"""``jdup run CONFIG``: poison (optional) -> train (optional) -> detect -> unlearn -> report.

The run config is a YAML mapping with one section per stage plus a few top-level keys::

    out: runs/demo          # every stage writes under this folder
    seed: 2025              # default seed of every stage that has one (a section's own value wins)
    preset: dup-official    # optional: jdup/presets/<name>.yaml under the detect/unlearn sections' own keys
    poison:  {...}          # PoisonConfig fields, or omit / `enabled: false` to use existing data
    train:   {...}          # TrainConfig fields, or omit / `enabled: false` to use an existing victim
    detect:  {...}          # DetectConfig fields
    unlearn: {...}          # UnlearnConfig fields

Stages are chained by their folders: the poisoned data folder feeds ``train.data``/``detect.data``/
``unlearn.data``; the trained victim folder (``<out>/victim/model``) feeds ``detect.model``/``unlearn.model``;
unlearning runs its own detection on dev-clean ∪ dev-poison unless ``unlearn.detection`` names one. A key given
in a section always wins over the chained value.

Every section is validated and every stage config built before the first stage runs (a bad value in ``unlearn:``
fails before poisoning starts, naming the key and the file). With ``resume: true`` (default) a stage is reused
only when its folder's ``manifest.json`` matches its config and inputs; otherwise it reruns, and so does every
stage after it that reads its output (their input fingerprints change). Stages that checkpoint (training,
unlearning) also resume inside themselves after a kill.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from jdup import atomic, distributed, plots
from jdup import config as config_lib
from jdup.errors import Interrupted, JdupError

log = logging.getLogger("jdup")

# stage name -> (module, config class, entry function)
STAGES: dict[str, tuple[str, str, str]] = {
    "poison": ("jdup.stages.poison", "PoisonConfig", "run_poison"),
    "train": ("jdup.stages.train", "TrainConfig", "run_train"),
    "detect": ("jdup.stages.detect", "DetectConfig", "run_detect"),
    "unlearn": ("jdup.stages.unlearn", "UnlearnConfig", "run_unlearn"),
    "sweep": ("jdup.sweep", "SweepConfig", "run_sweep"),
}

RUN_KEYS = ("out", "seed", "resume", "overwrite", "preset", "poison", "train", "detect", "unlearn", "report")
ORDER = ("poison", "train", "detect", "unlearn")
#: Default folder of each stage under the run's `out`.
FOLDERS = {"poison": "poison", "train": "victim", "detect": "detect", "unlearn": "unlearn"}
#: The file holding each stage's returned metrics (what a reused stage contributes to the report).
RESULT_FILES = {"poison": "metrics.json", "train": "metrics.json", "detect": "detection.json",
                "unlearn": "metrics.json"}

# metrics shown in the report table, in order, with how to print them
_REPORT_ROWS = (
    ("train", "cacc", "victim CACC (test-clean accuracy)"),
    ("train", "asr", "victim ASR (test-poison -> target)"),
    ("detect", "auroc", "detection AUROC (test-detect)"),
    ("detect", "auroc_md", "detection AUROC, Mahalanobis only"),
    ("detect", "auroc_ss", "detection AUROC, spectral only"),
    ("detect", "frr", "detection FRR (clean rows flagged)"),
    ("detect", "far", "detection FAR (poison rows missed)"),
    ("detect", "seconds", "detection time (s)"),
    ("unlearn", "n_flagged", "rows flagged for unlearning"),
    ("unlearn", "cacc_before", "CACC before unlearning"),
    ("unlearn", "cacc_after", "CACC after unlearning"),
    ("unlearn", "asr_before", "ASR before unlearning"),
    ("unlearn", "asr_after", "ASR after unlearning"),
    ("unlearn", "ra_before", "robust accuracy before"),
    ("unlearn", "ra_after", "robust accuracy after"),
    ("unlearn", "asr_trigger_after", "ASR caused by the trigger alone, after"),
    ("unlearn", "seconds", "unlearning time (s)"),
)


#: Where a stage's config class can be imported without JAX (:mod:`jdup.settings`); the stage module re-exports it.
#: Building and validating a config (and every config error) then imports no JAX, Flax or transformers.
CONFIG_MODULES: dict[str, str] = {"train": "jdup.settings", "detect": "jdup.settings", "unlearn": "jdup.settings"}


def stage_classes(stage: str) -> tuple[type, Any]:
    """``(ConfigClass, run_function)`` of a stage. The config class comes from :data:`CONFIG_MODULES` (no JAX); the
    stage module itself (JAX, models) is imported only when ``run_function`` is called."""
    module_name, cls_name, fn_name = STAGES[stage]
    cls = getattr(importlib.import_module(CONFIG_MODULES.get(stage, module_name)), cls_name)

    def run(cfg: Any) -> Any:
        return getattr(importlib.import_module(module_name), fn_name)(cfg)

    run.__name__ = run.__qualname__ = fn_name
    return cls, run


def build_stage_config(stage: str, values: Mapping, *, source: str, prefix: str = "",
                       origins: Mapping[str, str] | None = None) -> Any:
    cls, _ = stage_classes(stage)
    return config_lib.build(cls, values, source=source, prefix=prefix, origins=origins)


def stage_inputs(stage: str, cfg: Any) -> dict[str, Any]:
    """What a stage reads (:func:`jdup.manifest.stage_inputs`)."""
    from jdup import manifest

    return manifest.stage_inputs(stage, cfg)


def _fields(stage: str) -> set[str]:
    cls, _ = stage_classes(stage)
    return {f.name for f in dataclasses.fields(cls)}


def interrupted_message(stage: str, out: str | None, command: str = "") -> str:
    """What Ctrl-C interrupted, where its checkpoint is (if any) and how to go on, in one line."""
    again = f"run `{command}` again" if command else "run the same command again"
    if not out:
        return f"{stage} was interrupted; nothing was written; {again} to start over"
    out = os.path.abspath(os.fspath(out))
    ckpt = atomic.checkpoint_of(out)
    if ckpt is None and os.path.isdir(os.path.join(out, "ckpt")) and os.listdir(os.path.join(out, "ckpt")):
        ckpt = os.path.join(out, "ckpt")
    if ckpt:
        return f"{stage} was interrupted; its checkpoint is in {ckpt}; {again} to resume from it"
    kept = "the previous output is unchanged" if os.path.isdir(out) else "no output was written"
    return f"{stage} was interrupted before it finished ({out}: {kept}, no checkpoint); {again} to redo it"


def _section(cfg: Mapping, stage: str, source: str, origins: Mapping[str, str]) -> dict | None:
    """The stage's section as a dict (None = not run). A present section must be a mapping."""
    if stage not in cfg:
        return None
    section = cfg[stage]
    where = config_lib.origin_of(origins, stage, source)
    if not isinstance(section, Mapping):
        raise JdupError(f"{stage}: the section must be a mapping of {stage} settings (write `{stage}: {{}}` for the "
                        f"defaults, or `enabled: false` inside it to skip the stage), got {section!r}", where)
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise JdupError(f"{stage}.enabled: must be true or false, got {enabled!r}",
                        config_lib.origin_of(origins, f"{stage}.enabled", source))
    return {k: v for k, v in section.items() if k != "enabled"} if enabled else None


def plan(cfg: Mapping, *, source: str = "config", origins: Mapping[str, str] | None = None) -> dict:
    """Checks a run config and builds every stage's config (with the chained folders) before any work.

    Returns ``{"out", "resume", "overwrite", "stages": {stage: config}}`` in run order. Raises ``JdupError``
    naming the key and its source for unknown keys, sections that are not mappings, bad or out-of-range values.
    """
    origins = dict(origins or {})
    if not isinstance(cfg, Mapping):
        raise JdupError(f"the run config must be a mapping, got {type(cfg).__name__}", source)
    unknown = sorted(set(cfg) - set(RUN_KEYS))
    if unknown:
        raise JdupError(f"unknown top-level key(s) {unknown}; valid: {list(RUN_KEYS)}", source)
    preset = cfg.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise JdupError(f"preset: must be a preset name, got {preset!r}", config_lib.origin_of(origins, "preset", source))
    # `preset: NAME` (jdup/presets/NAME.yaml) sits below the file's own detect/unlearn keys
    cfg = config_lib.apply_run_preset({k: v for k, v in cfg.items() if k != "preset"}, preset, over=False)
    if not cfg.get("out") or not isinstance(cfg["out"], (str, os.PathLike)):
        raise JdupError("the run config needs `out:` (the folder every stage writes under)", source)
    for key, kinds, what in (("seed", (int,), "an integer"), ("resume", (bool,), "true or false"),
                             ("overwrite", (bool,), "true or false")):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, kinds) or (key == "seed" and isinstance(v, bool))):
            raise JdupError(f"{key}: must be {what}, got {v!r}", config_lib.origin_of(origins, key, source))
    out = os.path.abspath(os.fspath(cfg["out"]))
    seed = cfg.get("seed")
    sections = {stage: _section(cfg, stage, source, origins) for stage in ORDER}
    if not any(v is not None for v in sections.values()):
        raise JdupError(f"nothing to run: the config enables none of the stages {list(ORDER)}", source)
    chained: dict[str, Any] = {"seed": seed, "overwrite": True if cfg.get("overwrite") else None}
    built: dict[str, Any] = {}
    for stage in ORDER:
        section = sections[stage]
        if section is None:
            continue
        values = dict(section)
        values.setdefault("out", os.path.join(out, FOLDERS[stage]))
        names = _fields(stage)
        for k, v in chained.items():
            if k in names and k not in values and v is not None:
                values[k] = v
        stage_cfg = build_stage_config(stage, values, source=source, prefix=f"{stage}.", origins=origins)
        built[stage] = stage_cfg
        if stage == "poison":
            chained["data"] = os.path.abspath(os.fspath(stage_cfg.out))
        elif stage == "train":
            chained["model"] = os.path.join(os.path.abspath(os.fspath(stage_cfg.out)), "model")
    return {"out": out, "resume": bool(cfg.get("resume", True)), "overwrite": bool(cfg.get("overwrite", False)),
            "stages": built}


def _load_result(stage: str, folder: str) -> dict:
    path = os.path.join(folder, RESULT_FILES[stage])
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise JdupError(f"cannot read the finished {stage} stage's results ({e}); pass resume=false to rerun it",
                        path) from None


def run_pipeline(cfg: Mapping, *, source: str = "config", origins: Mapping[str, str] | None = None,
                 overwrite: bool | None = None) -> dict:
    """Runs the stages named in ``cfg`` in order and writes ``report.json``/``report.md`` under ``cfg['out']``.

    Every section is validated and every stage config built before the first stage starts. With ``resume``
    (default) a stage whose output folder holds a manifest matching its config and inputs is reused; any
    difference (a changed setting, a rerun upstream stage) reruns it, and so everything downstream.

    Returns the report dict ``{"stages": {stage: metrics}, "out", "seconds", "stage_seconds", "reused"}`` (each
    stage's metrics are the ``record`` of its :class:`jdup.stages.common.StageResult`).
    """
    from jdup import manifest
    from jdup.stages.common import StageResult, as_stage_result

    if overwrite is not None:
        cfg = {**cfg, "overwrite": overwrite}
    p = plan(cfg, source=source, origins=origins)
    out, resume, overwrite = p["out"], p["resume"], p["overwrite"]
    if os.path.lexists(out) and not os.path.isdir(out):
        raise JdupError("exists and is a file, not a folder: choose a folder for the run's `out`", out)
    for stage, stage_cfg in p["stages"].items():
        manifest.check_output(stage, stage_cfg.out, stage_inputs(stage, stage_cfg),
                              overwrite=overwrite or bool(getattr(stage_cfg, "overwrite", False)))
    if distributed.is_writer():  # several processes: only process 0 writes (jdup.distributed)
        os.makedirs(out, exist_ok=True)
        atomic.clean_temp_files(out)
    t0 = time.perf_counter()
    results: dict[str, StageResult] = {}
    reused: list[str] = []
    for stage, stage_cfg in p["stages"].items():
        stage_out = os.path.abspath(os.fspath(stage_cfg.out))
        expected = manifest.make(stage, stage_cfg, stage_inputs(stage, stage_cfg))
        if resume and distributed.broadcast(os.path.isdir(stage_out)):  # process 0 decides for every process
            same, why = distributed.broadcast(manifest.matches(stage_out, expected))
            if same:
                log.info("%s: already done with these settings and inputs (%s), reusing it", stage, stage_out)
                results[stage] = as_stage_result(stage, stage_out, _load_result(stage, stage_out), reused=True)
                reused.append(stage)
                continue
            log.warning("%s: rerunning, the existing output differs: %s", stage, why)
        log.info("%s: %s", stage, json.dumps(config_lib.to_dict(stage_cfg), default=str))
        _, fn = stage_classes(stage)
        try:
            results[stage] = as_stage_result(stage, stage_out, fn(stage_cfg))
        except KeyboardInterrupt:
            raise Interrupted(interrupted_message(stage, stage_out, f"jdup run {source}") +
                              " (finished stages are reused)") from None
        if results[stage].stopped:
            raise JdupError(f"{stage} stopped at step {results[stage].record.get('step')} (max_steps) before "
                            "finishing; rerun to continue from its checkpoint", stage_out)
        got = manifest.read(stage_out)
        if distributed.is_writer() and os.path.isdir(stage_out) and (got is None or got.get("key") != expected["key"]):
            # a stage function that writes no manifest of its own (a plugged-in or legacy one)
            manifest.write(stage_out, expected, seconds=results[stage].seconds)
    stage_seconds = sum(float(r.seconds or 0.0) for r in results.values())
    report = {"out": out, "seconds": time.perf_counter() - t0, "stage_seconds": stage_seconds, "reused": reused,
              "stages": {stage: dict(r.record) for stage, r in results.items()}}
    if distributed.is_writer():
        write_report(report, out)
    return report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def summary_table(report: Mapping) -> str:
    """The Markdown table of a ``jdup run``: each stage's headline metrics and the times (``report.md``, stdout)."""
    stages = report.get("stages", {})
    lines = ["| stage | metric | value |", "|---|---|---|"]
    for stage, key, label in _REPORT_ROWS:
        value = stages.get(stage, {}).get(key)
        if value is not None:
            lines.append(f"| {stage} | {label} | {_fmt(value)} |")
    total = report.get("stage_seconds", report.get("seconds", 0.0))
    lines.append(f"| all | total time of the stages (s) | {_fmt(total)} |")
    if report.get("reused"):
        lines.append(f"| all | reused from an earlier run | {', '.join(report['reused'])} |")
        lines.append(f"| all | time of this run (s) | {_fmt(report.get('seconds', 0.0))} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: str) -> None:
    """Writes ``report.json``, ``report.md`` and ``report.png`` (before/after bars) atomically under ``out``
    (a ``report.png`` of an earlier run without unlearning results is removed)."""
    atomic.write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2, default=str))
    md = f"# jdup run: {out}\n\n" + summary_table(report)
    atomic.write_text(os.path.join(out, "report.md"), md)
    unlearn = report.get("stages", {}).get("unlearn", {})
    png = os.path.join(out, "report.png")
    if "cacc_after" in unlearn:
        plots.before_after_bars(unlearn, png)
    elif os.path.exists(png):
        os.remove(png)
