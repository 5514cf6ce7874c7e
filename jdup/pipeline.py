"""``jdup run CONFIG``: poison (optional) -> train (optional) -> detect -> unlearn -> report.

The run config is a YAML mapping with one section per stage plus a few top-level keys::

    out: runs/demo          # every stage writes under this folder
    seed: 2025              # default seed of every stage that has one (a section's own value wins)
    poison:  {...}          # PoisonConfig fields, or omit / `enabled: false` to use existing data
    train:   {...}          # TrainConfig fields, or omit / `enabled: false` to use an existing victim
    detect:  {...}          # DetectConfig fields
    unlearn: {...}          # UnlearnConfig fields

Stages are chained by their folders: the poisoned data folder feeds ``train.data``/``detect.data``/
``unlearn.data``; the trained victim folder (``<out>/victim/model``) feeds ``detect.model``/``unlearn.model``;
unlearning runs its own detection on dev-clean ∪ dev-poison unless ``unlearn.detection`` names one. A key given in a section always wins over the chained value.
A stage whose ``metrics.json`` already exists is skipped when ``resume: true`` (default), so a killed run picks
up where it stopped; stages that checkpoint (training, unlearning) also resume inside themselves.
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

from jdup import atomic
from jdup import config as config_lib
from jdup.errors import JdupError

log = logging.getLogger("jdup")

# stage name -> (module, config class, entry function)
STAGES: dict[str, tuple[str, str, str]] = {
    "poison": ("jdup.attacks", "PoisonConfig", "run_poison"),
    "train": ("jdup.train", "TrainConfig", "run_train"),
    "detect": ("jdup.detect", "DetectConfig", "run_detect"),
    "unlearn": ("jdup.unlearn", "UnlearnConfig", "run_unlearn"),
    "sweep": ("jdup.sweep", "SweepConfig", "run_sweep"),
}

RUN_KEYS = ("out", "seed", "resume", "poison", "train", "detect", "unlearn", "report")

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
    ("unlearn", "seconds", "unlearning time (s)"),
)


def stage_classes(stage: str) -> tuple[type, Any]:
    """Imports a stage lazily and returns ``(ConfigClass, run_function)``."""
    module_name, cls_name, fn_name = STAGES[stage]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), getattr(module, fn_name)


def build_stage_config(stage: str, values: Mapping, *, source: str) -> Any:
    cls, _ = stage_classes(stage)
    return config_lib.build(cls, values, source=source)


def _fields(stage: str) -> set[str]:
    cls, _ = stage_classes(stage)
    return {f.name for f in dataclasses.fields(cls)}


def _enabled(section: Any) -> bool:
    return isinstance(section, Mapping) and section.get("enabled", True) is not False


def _chain(stage: str, section: dict, defaults: dict) -> dict:
    """Fills keys the stage has but the section left out, from the chained defaults."""
    names = _fields(stage)
    out = {k: v for k, v in section.items() if k != "enabled"}
    for k, v in defaults.items():
        if k in names and k not in out and v is not None:
            out[k] = v
    return out


def run_pipeline(cfg: Mapping, *, source: str = "config") -> dict:
    """Runs the stages named in ``cfg`` in order and writes ``report.json``/``report.md`` under ``cfg['out']``.

    Returns the report dict ``{"stages": {stage: metrics}, "out": ..., "seconds": ...}``.
    """
    unknown = sorted(set(cfg) - set(RUN_KEYS))
    if unknown:
        raise JdupError(f"unknown top-level key(s) {unknown}; valid: {list(RUN_KEYS)}", source)
    if "out" not in cfg:
        raise JdupError("the run config needs `out:` (the folder every stage writes under)", source)
    out = os.path.abspath(os.fspath(cfg["out"]))
    seed = cfg.get("seed")
    resume = bool(cfg.get("resume", True))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    paths: dict[str, Any] = {"seed": seed}

    # Validate every enabled section before any stage runs: a typo in `unlearn:` must not cost a training run.
    for stage in ("poison", "train", "detect", "unlearn"):
        section = cfg.get(stage)
        if _enabled(section):
            probe = {**section, "out": section.get("out") or os.path.join(out, stage)}
            built = build_stage_config(stage, _chain(stage, probe, {"seed": seed, "data": out, "model": out}),
                                       source=f"{source} [{stage}]")
            _check_detection_options(stage, built, f"{source} [{stage}]")

    def run_stage(stage: str, section: dict) -> dict:
        stage_out = section.get("out") or os.path.join(out, {"train": "victim"}.get(stage, stage))
        section = {**section, "out": stage_out}
        values = _chain(stage, section, paths)
        stage_cfg = build_stage_config(stage, values, source=f"{source} [{stage}]")
        done = os.path.join(os.fspath(getattr(stage_cfg, "out", stage_out)), "metrics.json")
        if stage == "detect":
            done = os.path.join(os.fspath(stage_cfg.out), "detection.json")
        if resume and os.path.isfile(done):
            log.info("%s: already done (%s), skipping", stage, done)
            with open(done, encoding="utf-8") as f:
                return json.load(f)
        log.info("%s: %s", stage, json.dumps(config_lib.to_dict(stage_cfg), default=str))
        _, fn = stage_classes(stage)
        return fn(stage_cfg)

    if _enabled(cfg.get("poison")):
        results["poison"] = run_stage("poison", dict(cfg["poison"]))
        paths["data"] = os.path.join(out, "poison")
        if isinstance(cfg["poison"], Mapping) and cfg["poison"].get("out"):
            paths["data"] = os.path.abspath(os.fspath(cfg["poison"]["out"]))
    for stage in ("train", "detect", "unlearn"):
        section = cfg.get(stage)
        if not _enabled(section):
            continue
        section = dict(section)
        if stage == "train":
            results[stage] = run_stage(stage, section)
            victim = section.get("out") or os.path.join(out, "victim")
            paths["model"] = os.path.join(os.path.abspath(os.fspath(victim)), "model")
        else:
            # The detect stage evaluates the detector on test-detect; unlearning runs its own detection on
            # dev-clean ∪ dev-poison (its forget set), so the two are deliberately not chained.
            results[stage] = run_stage(stage, section)
    report = {"out": out, "seconds": time.perf_counter() - t0, "stages": results}
    write_report(report, out)
    return report


def _check_detection_options(stage: str, stage_cfg: Any, source: str) -> None:
    """Nested detection options (``detect.upgp``, ``unlearn.detect``) are otherwise only checked when their stage
    runs; check them up front so a typo does not cost the stages before it."""
    if stage not in ("detect", "unlearn"):
        return
    from jdup import detect as detect_lib

    if stage == "unlearn":
        opts = dict(stage_cfg.detect or {})
        if "seed" in opts:  # documented alias of split_seed
            opts["split_seed"] = opts.pop("seed")
        stage_cfg = config_lib.build(detect_lib.DetectConfig, opts, source=f"{source} detect")
    if stage_cfg.method in ("upgp", "ensemble"):
        detect_lib.upgp_config(stage_cfg)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def report_markdown(report: Mapping) -> str:
    stages = report.get("stages", {})
    lines = ["| stage | metric | value |", "|---|---|---|"]
    for stage, key, label in _REPORT_ROWS:
        value = stages.get(stage, {}).get(key)
        if value is not None:
            lines.append(f"| {stage} | {label} | {_fmt(value)} |")
    lines.append(f"| all | total time (s) | {_fmt(report.get('seconds', 0.0))} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: str) -> None:
    """Writes ``report.json``, ``report.md`` and ``report.png`` (before/after bars) atomically under ``out``."""
    _atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=2, default=str))
    md = f"# jdup run: {out}\n\n" + report_markdown(report)
    _atomic_write(os.path.join(out, "report.md"), md)
    unlearn = report.get("stages", {}).get("unlearn", {})
    if "cacc_after" in unlearn:
        _plot_before_after(unlearn, os.path.join(out, "report.png"))


def _atomic_write(path: str, text: str) -> None:
    atomic.write_text(path, text)


def _plot_before_after(m: Mapping, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("cacc", "asr", "ra") if f"{n}_before" in m and f"{n}_after" in m]
    before = [m[f"{n}_before"] for n in names]
    after = [m[f"{n}_after"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="backdoored", color="#c44e52")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="purified", color="#4c72b0")
    for x, b, a in zip(xs, before, after, strict=True):
        ax.text(x - 0.2, b + 0.01, f"{b:.2f}", ha="center", fontsize=8)
        ax.text(x + 0.2, a + 0.01, f"{a:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [n.upper() for n in names])
    ax.set_ylim(0, 1.1)
    ax.set_title("before / after unlearning")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
