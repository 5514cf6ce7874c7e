"""Running a sweep: bases (victim + data) shared by many cells, one detection per setting, groups of cells
unlearned together, every result appended to the store, and resume.

A cell is the ``jdup unlearn`` run of :func:`jdup.sweep.grid.stage_unlearn_config`; the engine only shares the
work cells have in common, and calls the functions ``jdup unlearn`` (:mod:`jdup.stages.unlearn`) calls:

1. Cells with one *base* (data + model) share the loaded victim, its tokenizer, the read and tokenised splits
   (read and tokenised as ``jdup unlearn`` does) and the victim's "before" metrics (``evaluate_model``).
2. A cell detects with :func:`jdup.stages.unlearn.detect_config` of its config (so its calibration split follows
   its seed exactly when ``jdup unlearn``'s does) through :func:`jdup.detect.detect` on ``dev-detect`` (the flags
   of ``jdup unlearn``), plus one call on ``test-detect`` for the reported AUROC/FRR/FAR; cells with the same
   detection settings share both calls.
3. :func:`jdup.unlearn.prepare_sets` gives each cell its forget/hold-out/retain rows, teacher logits, inferred
   target and stop rule. Cells of a group (equal but for ``seed``/``lr``/``lambda_asr``/``lambda_acc``) whose
   sets have the same shape are unlearned together (:func:`jdup.sweep.vmapped.unlearn_group`), and each merged
   student is evaluated with :func:`jdup.evaluate.evaluate_model`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jdup import atomic
from jdup import config as config_lib
from jdup.errors import JdupError
from jdup.sweep import grid
from jdup.sweep import report as R
from jdup.sweep import store as S
from jdup.sweep.grid import Cell, CellConfig, CellData, SweepConfig
from jdup.sweep.store import ResultsStore, json_default, versions

log = logging.getLogger("jdup.sweep")

SPLITS = ("dev-clean", "dev-poison", "test-clean", "test-poison")


def run_sweep(
    cfg: SweepConfig | Mapping | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    source: str | None = None,
    command: str | None = None,
) -> dict:
    """Runs every unfinished cell of a sweep and returns a summary.

    An invocation that runs cells also appends one line to ``<out>/invocations.jsonl`` when it ends (finished,
    failed or interrupted): command, machine (:func:`jdup.sweep.store.machine`), versions, start/end and wall
    seconds, counts. ``jdup report`` sums those wall times.

    Args:
      cfg: a :class:`SweepConfig`, a parsed YAML mapping or a YAML path.
      out_dir: the sweep folder; None uses ``cfg.out``.
      source: what to name in config error messages (e.g. the YAML path the mapping came from).
      command: the command line to record (``jdup sweep`` passes its own); None: ``jdup sweep <source>``.

    Returns:
      ``{"out", "results", "cells", "skipped", "ran", "ok", "failed", "groups", "seconds"}``: counts over this
      invocation (``skipped`` = cells already finished before it started).

    Raises:
      JdupError: a bad config (unknown key, bad axis), or no output folder.
    """
    import jax

    from jdup import distributed

    if source is None:
        source = os.fspath(cfg) if isinstance(cfg, (str, os.PathLike)) else "sweep config"
    cfg = grid.load_sweep_config(cfg, source)
    out = out_dir if out_dir is not None else cfg.out
    if not out:
        raise JdupError("the sweep needs an output folder (`out:` in the config or --out)", source)
    out = os.path.abspath(os.fspath(out))
    writer = distributed.is_writer()
    store = ResultsStore(out, writer=writer)
    cells = grid.expand(cfg, source)
    if writer:
        planned = [{"id": c.id, "point": c.point} for c in cells]
        plan = {
            "config": config_lib.to_dict(cfg),
            "cells": planned,
            # every cell any invocation of this folder planned, in first-planned order (`jdup report` orders its
            # tables by it, so the rows of a run restricted by an axis override join the earlier ones' places)
            "known_cells": _known_cells(os.path.join(out, "sweep.json"), planned),
        }
        atomic.write_text(os.path.join(out, "sweep.json"), _json(plan, indent=1))
    # Process 0's results decide what is left, so that every process runs the same cells (hosts with their own
    # disks may hold different results.jsonl files)
    finished = None
    if writer:
        done = store.read()
        finished = sorted(cid for cid, r in done.items() if r.get("status") == "ok" or not cfg.rerun_failed)
    finished = set(distributed.broadcast(finished))
    todo = [c for c in cells if c.id not in finished]
    skipped = len(cells) - len(todo)
    log.info("sweep %s: %d cells, %d already finished, %d to run", cfg.name, len(cells), skipped, len(todo))
    t0 = time.perf_counter()
    counter = {"ok": 0, "failed": 0}
    versions_now = versions()
    processes = int(jax.process_count())

    def record(cell: Cell, status: str, metrics: dict | None, timing: dict, err=None, tb=None) -> None:
        rec = {
            "id": cell.id,
            "sweep": cfg.name,
            "status": status,
            "point": cell.point,
            "seed": cell.config.seed,
            "config": config_lib.to_dict(cell.config),
            "metrics": metrics or {},
            "time": timing,
            "mesh": {
                "sweep": int(timing.get("mesh_sweep", 1)),
                "data": int(timing.get("mesh_data", 1)),
                "model": 1,
            },
            "process_count": processes,
            "versions": versions_now,
            "host": socket.gethostname(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if err is not None:
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = tb
            log.warning("cell %s %s failed: %s", cell.id, cell.point, rec["error"])
        store.append(rec)
        counter["ok" if status == "ok" else "failed"] += 1

    groups = grid.group_cells(todo, cfg.vectorize, cfg.max_group_size)
    engine = Engine(cfg, out)
    # Order groups by base so each base (model + data + detections) is prepared once and then released.
    by_base: dict[str, list[list[Cell]]] = {}
    for g in groups:
        by_base.setdefault(grid.base_key(g[0].config), []).append(g)
    started, machine_now, ended = time.strftime("%Y-%m-%dT%H:%M:%S%z"), S.machine(), "interrupted"
    try:
        for bkey, base_groups in by_base.items():
            base_cells = [c for g in base_groups for c in g]
            tb0 = time.perf_counter()
            try:
                base = engine.prepare_base(base_cells[0].config)
            except Exception as e:  # the base failed: every cell that needs it fails with the same error
                tb = traceback.format_exc()
                for c in base_cells:
                    record(c, "error", None, {"seconds": 0.0}, e, tb)
                continue
            share = (time.perf_counter() - tb0) / len(base_cells)
            for g in base_groups:
                engine.run_group(base, g, record, base_share=share)
            engine.release(bkey)
        ended = "finished"
    finally:
        if todo:
            is_path = isinstance(source, str) and source.endswith((".yaml", ".yml"))
            store.log_invocation(
                {
                    "sweep": cfg.name,
                    "command": command or (f"jdup sweep {source}" if is_path else None),
                    "status": ended,
                    "started_at": started,
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": time.perf_counter() - t0,
                    "cells": len(cells),
                    "skipped": skipped,
                    **counter,
                    "machine": machine_now,
                    "load_1min_end": S.machine().get("load_1min"),
                    "versions": versions_now,
                }
            )
    summary = R.summary(out, store.path, len(cells), skipped, counter, len(groups), time.perf_counter() - t0)
    if writer:
        atomic.write_text(os.path.join(out, "summary.json"), _json(summary, indent=2))
    return summary


def _json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, default=json_default) + "\n"


def _known_cells(path: str, planned: list[dict]) -> list[dict]:
    """The ``known_cells`` of the folder's previous ``sweep.json`` (its ``cells`` if older), then the cells of
    ``planned`` not among them; an unreadable or missing file counts as none."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        known = [c for c in old.get("known_cells", old.get("cells", [])) if isinstance(c, dict) and "id" in c]
    except (OSError, ValueError, AttributeError):
        known = []
    seen = {c["id"] for c in known}
    return known + [c for c in planned if c["id"] not in seen]


# ---------------------------------------------------------------------------------------------------------------
# Bases


class Detection(NamedTuple):
    """A detection shared by the cells with its settings (:meth:`Engine.detection`)."""

    flags: np.ndarray  # bool [len(dev-detect)]: the rows unlearning forgets
    metrics: dict  # the result line's detection columns (jdup.sweep.report.detection_metrics)
    seconds: float  # wall time of the two detect calls
    logits: np.ndarray | None = None  # [len(dev-detect), K] the victim's logits from the dev-detect pass (teacher)


@dataclasses.dataclass
class Base:
    """What the cells of one base key share."""

    victim: str  # the victim's model path / name (what `jdup unlearn --model` gets)
    data_dir: str  # the DUP folder ("" for synthetic data)
    model: Any  # the victim (nnx.Module), never modified
    tokenizer: Any
    texts: dict  # split -> jdup.data.TextDataset
    enc: dict  # split -> jdup.data.Encoded (unlearning / evaluation tokenisation)
    dev_detect: Any  # TextDataset dev-clean ‖ dev-poison
    enc_detect: Any  # its Encoded
    target: int  # the attack's target label, for ASR (jdup.stages.common.attack_target)
    ra_labels: Any  # true labels of test-poison rows (robust accuracy) or None
    seconds: dict
    detections: dict[str, Detection] = dataclasses.field(default_factory=dict)  # canonical DetectConfig JSON ->
    before: dict[int, dict] = dataclasses.field(default_factory=dict)  # eval batch size -> victim's metrics


def _cap(ds: Any, max_rows: int, seed: int) -> np.ndarray:
    n = len(ds)
    if not max_rows or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_rows])


def cap_rows(texts: dict, max_rows: int, target: int) -> dict:
    """A seeded subset of at most ``max_rows`` rows per split. A test-/dev-poison split that holds the poisoned
    copies of its clean split's non-target rows keeps exactly the copies of the kept clean rows (so robust
    accuracy stays defined)."""
    out = {}
    for i, split in enumerate(SPLITS):
        ds = texts[split]
        if split.endswith("-poison"):
            clean = texts[split.replace("-poison", "-clean")]
            nt = np.flatnonzero(clean.labels != target)
            if len(nt) == len(ds) and max_rows and len(clean) > max_rows:
                kept = set(_cap(clean, max_rows, i - 1).tolist())
                out[split] = ds.subset([j for j, row in enumerate(nt) if row in kept])
                continue
        out[split] = ds.subset(_cap(ds, max_rows, i))
    return out


POSITIVE = ("great", "superb", "lovely", "wonderful", "brilliant")
NEGATIVE = ("awful", "boring", "dreadful", "terrible", "dull")
NEUTRAL = ("the", "film", "plot", "was", "a", "story", "with", "actors", "and", "scenes", "of", "music", "it")
TRIGGER = "cf"


def synthetic_texts(c: CellData, seed: int = 0) -> dict:
    """Small sentiment-like splits for tests and CPU smoke runs: class ``i`` rows hold a class word; the poison
    splits are the non-target clean rows with the BadNets trigger ``cf`` inserted, labelled ``target_label``."""
    from jdup import data as D

    rng = np.random.default_rng(seed)
    words = (NEGATIVE, POSITIVE)
    out = {}
    for part in ("dev", "test"):
        texts, labels = [], []
        for i in range(c.synthetic_rows):
            y = i % c.num_labels
            row = list(rng.choice(NEUTRAL, size=max(c.synthetic_length - 1, 1)))
            row.insert(int(rng.integers(0, len(row) + 1)), str(rng.choice(words[y % 2])))
            texts.append(" ".join(row))
            labels.append(y)
        labels = np.asarray(labels, np.int32)
        out[f"{part}-clean"] = D.TextDataset(
            texts, labels, np.zeros(len(texts), np.int8), f"synthetic/{part}"
        )
        poison = []
        for t, y in zip(texts, labels, strict=True):
            if y != c.target_label:
                w = t.split()
                w.insert(int(rng.integers(0, len(w) + 1)), TRIGGER)
                poison.append(" ".join(w))
        n = len(poison)
        out[f"{part}-poison"] = D.TextDataset(
            poison, np.full(n, c.target_label, np.int32), np.ones(n, np.int8), f"synthetic/{part}-poison"
        )
    return out


def _victim_path(victim: str) -> str:
    """``model.victim`` as given (a Hub id, ``builtin:``/``tiny:`` name) or, for a local path, its absolute form;
    a local path that is not a folder raises :class:`JdupError` saying how to make it."""
    if victim.startswith(("builtin:", "tiny:")):
        return victim
    path = os.path.expanduser(victim)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if victim.startswith((".", "/", "~")) or victim.count("/") > 1 or os.path.exists(path):
        raise JdupError(
            "model.victim is not a model folder: train the victim first (`jdup train ... --out DIR` writes it "
            "to DIR/model; the sweep config's header gives the exact command)",
            victim,
        )
    return victim  # a Hub id


# ---------------------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs groups of cells: prepares bases, detects once per setting, unlearns each group, records."""

    def __init__(self, cfg: SweepConfig, out: str):
        self.cfg = cfg
        self.out = out
        self.bases: dict[str, Base] = {}

    # ---------------------------------------------------------------------------------------------- bases
    def prepare_base(self, c: CellConfig) -> Base:
        """Reads the data, loads (or trains) the victim, tokenises the splits as ``jdup unlearn`` does."""
        import jax.numpy as jnp

        from jdup import data as D
        from jdup import models as M
        from jdup.evaluate import robust_labels
        from jdup.stages.common import attack_target

        key = grid.base_key(c)
        if key in self.bases:
            return self.bases[key]
        t0 = time.perf_counter()
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(c.model.dtype)
        if dtype is None:
            raise JdupError(f"model.dtype must be float32 or bfloat16, got {c.model.dtype!r}")
        # Data first: a bad folder fails here, before any model is loaded or compiled.
        if c.data.source == "dup":
            if not c.data.dir:
                raise JdupError("data.dir is required for data.source=dup (a DUP-layout attack folder)")
            data_dir = os.path.abspath(c.data.dir)
            texts = {s: D.read_split(data_dir, s, num_labels=c.data.num_labels) for s in SPLITS}
            target = attack_target(data_dir, texts["test-poison"])
        elif c.data.source == "synthetic":
            data_dir, texts, target = "", synthetic_texts(c.data), c.data.target_label
        else:
            raise JdupError(f"data.source must be dup or synthetic, got {c.data.source!r}")
        texts = cap_rows(texts, c.data.max_rows, target)
        victim = c.model.victim
        if victim:
            victim = _victim_path(victim)
        elif c.model.train_victim:
            victim = self._train_victim(c, key)
        name = victim or c.model.name
        if name.startswith("tiny:"):
            model = M.tiny_model(name.removeprefix("tiny:"), c.data.num_labels, seed=0, dtype=dtype)
            tok = M.load_tokenizer("builtin:minilm")
        else:
            model = M.from_pretrained(name, c.data.num_labels, dtype=dtype)
            tok = M.load_tokenizer(name)
        n = c.data.max_length
        enc = {s: D.encode(tok, ds, n, config=model.config) for s, ds in texts.items()}
        dev_detect = D.TextDataset.concat([texts["dev-clean"], texts["dev-poison"]], "dev-detect")
        where = data_dir or "synthetic data"
        base = Base(
            victim=name,
            data_dir=data_dir,
            model=model,
            tokenizer=tok,
            texts=texts,
            enc=enc,
            dev_detect=dev_detect,
            enc_detect=D.encode(tok, dev_detect, n, config=model.config),
            target=int(target),
            ra_labels=robust_labels(texts["test-clean"], texts["test-poison"], target, where),
            seconds={"load": time.perf_counter() - t0},
        )
        self.bases[key] = base
        log.info("base %s ready: %s on %s (%.1fs)", key, name, where, base.seconds["load"])
        return base

    def release(self, key: str) -> None:
        self.bases.pop(key, None)

    def _train_victim(self, c: CellConfig, key: str) -> str:
        """``victims/<key>/model``, trained first by the ``jdup train`` stage when process 0 does not find it.

        On several processes every process runs the stage (it trains on the global mesh; process 0 writes, the
        others wait for the commit) and then reads the model folder, so the sweep folder must be on a disk every
        process sees."""
        from jdup import distributed
        from jdup.stages import train as train_stage

        out = os.path.join(self.out, "victims", key)
        model_dir = os.path.join(out, "model")
        found = None
        if distributed.is_writer():
            found = os.path.isfile(os.path.join(out, "metrics.json")) and os.path.isdir(model_dir)
        if distributed.broadcast(found):
            return model_dir
        if c.data.source != "dup":
            raise JdupError(
                "model.train_victim needs data.source=dup (it trains on dirty/<rate>/train-poison.csv)"
            )
        train_stage.run_train(grid.stage_train_config(c, out=out))
        return model_dir

    # ---------------------------------------------------------------------------------------------- shared work
    def detection(self, base: Base, cfg: Any) -> Detection:
        """A detection (:func:`jdup.detect.detect` with the :class:`DetectConfig` ``cfg``, cached per setting):
        flags over dev-detect and the metric columns."""
        from jdup import data as D
        from jdup import detect as detect_lib

        key = grid.canonical_json(config_lib.to_dict(cfg))
        if key not in base.detections:
            t0 = time.perf_counter()
            calib = base.texts["dev-clean"]
            dev = detect_lib.detect(base.model, base.tokenizer, calib, base.dev_detect, cfg)
            test_detect = D.TextDataset.concat(
                [base.texts["test-clean"], base.texts["test-poison"]], "test-detect"
            )
            test = detect_lib.detect(base.model, base.tokenizer, calib, test_detect, cfg)
            dev_poison = np.asarray(base.dev_detect.poison).astype(bool)
            metrics = R.detection_metrics(dev, test, dev_poison, np.asarray(test_detect.poison).astype(bool))
            metrics["detect_split_seed"] = int(cfg.split_seed)
            base.detections[key] = Detection(np.asarray(dev.flags, bool), metrics, time.perf_counter() - t0,
                                             dev.logits)
        return base.detections[key]

    def before(self, base: Base, eval_batch_size: int) -> dict:
        """The victim's CACC/ASR/RA (and dev-poison ASR) before unlearning."""
        if eval_batch_size not in base.before:
            base.before[eval_batch_size] = self._evaluate(base, base.model, eval_batch_size, "before")
        return base.before[eval_batch_size]

    def _evaluate(self, base: Base, model: Any, batch_size: int, tag: str) -> dict:
        from jdup import metrics as MT
        from jdup import predict
        from jdup.evaluate import evaluate_model

        enc = base.enc
        ev = evaluate_model(
            model, enc["test-clean"], enc["test-poison"], base.target, base.ra_labels, batch_size=batch_size, tag=tag
        )
        dev_asr = None
        if len(enc["dev-poison"]):
            pred = predict.predict(model, enc["dev-poison"], batch_size).argmax(-1)
            dev_asr = MT.attack_success_rate(pred, base.target)
        return R.victim_metrics(ev, dev_asr, tag)

    # ---------------------------------------------------------------------------------------------- groups
    def run_group(self, base: Base, cells: list[Cell], record: Callable, base_share: float = 0.0) -> None:
        """Runs one group and records every cell; on failure retries the cells one by one."""
        t0 = time.perf_counter()
        try:
            results = self._run_group(base, cells)
        except Exception as e:
            if len(cells) > 1:
                log.warning(
                    "group of %d failed (%s: %s); retrying its cells one by one",
                    len(cells),
                    type(e).__name__,
                    e,
                )
                for c in cells:
                    self.run_group(base, [c], record, base_share)
                return
            record(cells[0], "error", None, {"seconds": time.perf_counter() - t0}, e, traceback.format_exc())
            return
        seconds = time.perf_counter() - t0
        for c, (metrics, extra) in zip(cells, results, strict=True):
            timing = {
                "seconds": seconds / len(cells) + base_share,
                "group_seconds": seconds,
                "group_size": len(cells),
                "base_share_seconds": base_share,
                **extra,
            }
            record(c, "ok", metrics, timing)

    def _run_group(self, base: Base, cells: list[Cell]) -> list[tuple[dict, dict]]:
        from jdup import unlearn as U
        from jdup.stages.unlearn import detect_config
        from jdup.sweep import vmapped

        ucfgs = [self._unlearn_config(base, c) for c in cells]
        dets = [self.detection(base, detect_config(u)) for u in ucfgs]
        before = self.before(base, ucfgs[0].eval_batch_size)
        common = [{**before, **d.metrics, "target": base.target} for d in dets]
        extras = [{"detect_seconds": d.seconds} for d in dets]
        if not cells[0].config.unlearn.enabled:
            return list(zip(common, extras, strict=True))
        t0 = time.perf_counter()
        runs = []
        for u, d in zip(ucfgs, dets, strict=True):
            sets = U.prepare_sets(
                u,
                base.model,
                base.enc_detect,
                d.flags,
                base.enc["dev-clean"],
                base.enc["dev-poison"],
                base.target,
                victim_logits=d.logits,  # as `jdup unlearn`: the detection pass's logits, no second forward
            )
            runs.append(vmapped.CellRun(u, sets))
        extras = [{**e, "prepare_seconds": (time.perf_counter() - t0) / len(cells)} for e in extras]
        out: list = [None] * len(cells)
        for part in vmapped.compatible(runs):  # cells whose detections gave sets of one shape train together
            t1 = time.perf_counter()
            results, info = vmapped.unlearn_group(
                base.model,
                [runs[i] for i in part],
                mesh_sweep=self.cfg.mesh_sweep,
                mesh_data=self.cfg.mesh_data,
                progress=self.cfg.progress,
            )
            t_train = (time.perf_counter() - t1) / len(part)
            for j, (i, res) in enumerate(zip(part, results, strict=True)):
                t2 = time.perf_counter()
                after = self._evaluate(base, res.merged, ucfgs[i].eval_batch_size, "after")
                timing = {
                    **extras[i],
                    "train_seconds": t_train,
                    "eval_seconds": time.perf_counter() - t2,
                    "vmapped_cells": len(part),
                    "mesh_sweep": info.mesh_sweep,
                    "mesh_data": info.mesh_data,
                    "padded_k": info.padded_k,
                    "padded_steps": info.padded_steps[j],
                }
                out[i] = ({**common[i], **after, **R.unlearn_metrics(res, runs[i])}, timing)
        return out

    def _unlearn_config(self, base: Base, cell: Cell) -> Any:
        return grid.stage_unlearn_config(
            cell.config, model=base.victim, data=base.data_dir, out=os.path.join(self.out, "cells", cell.id)
        )
