"""Sweep grids: the cell config (the stage configs, embedded), grid expansion, cell ids and grouping.

A cell is one ``jdup unlearn`` run (or a detection only) on one attack folder and one victim. Its settings are the
library's configs themselves: ``unlearn`` is a :class:`jdup.unlearn.UnlearnSettings` (plus the sweep switch
``enabled``), ``detect`` a :class:`jdup.stages.detect.DetectConfig`, ``model.train`` a
:class:`jdup.stages.train.TrainConfig`; :func:`stage_unlearn_config` turns a cell into the
:class:`jdup.stages.unlearn.UnlearnConfig` of the ``jdup unlearn`` run it is. A few fields are set by the sweep
from one place (:data:`CARRIED`): the seed comes from ``seed``, the token length from ``data.max_length``, the
compute dtype from ``model.dtype``, and the paths (model, data, output folders) are filled in when the cell runs.
Setting one of them inside a section is an error that names the key to use instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jdup import config as config_lib
from jdup.errors import JdupError
from jdup.stages.detect import DetectConfig
from jdup.stages.train import TrainConfig
from jdup.stages.unlearn import UnlearnConfig
from jdup.unlearn import UnlearnSettings

#: Dotted keys whose cells can share one vmapped training run (scalars that are data, not program structure).
#: ``unlearn.seed`` is the resolved copy of ``seed``.
VMAP_KEYS = ("seed", "unlearn.seed", "unlearn.lr", "unlearn.lambda_asr", "unlearn.lambda_acc")

#: Stage-config fields the sweep sets itself: section -> {field: where its value comes from}.
CARRIED: dict[str, dict[str, str]] = {
    "unlearn": {"seed": "seed", "progress": "the sweep's `progress`"},
    "detect": {
        "model": "model.victim / model.name",
        "data": "data.dir",
        "out": "the sweep folder",
        "score_set": "the sweep (dev-detect, as `jdup unlearn`)",
        "calib_set": "the sweep (dev-clean, as `jdup unlearn`)",
        "dtype": "model.dtype",
        "progress": "the sweep's `progress`",
        "plots": "the sweep (no plots per cell)",
    },
    "model.train": {
        "model": "model.name",
        "data": "data.dir",
        "out": "the sweep folder (victims/<base id>)",
        "rate": "data.poison_rate",
        "num_labels": "data.num_labels",
        "target": "data.target_label",
        "max_length": "data.max_length",
    },
}


@dataclasses.dataclass(frozen=True)
class CellData:
    """Which data a cell defends against."""

    source: str = "dup"  # dup: a DUP-layout attack folder (`dir`) | synthetic: generated sentences (tests)
    dir: str | None = None  # DUP folder, e.g. ../shared/data/sst-2/1/badnets (dev-/test- clean/poison CSVs)
    poison_rate: float = 0.2  # poison rate of the victim's training set (dirty/<rate>/train-poison.csv)
    target_label: int = 1  # target of synthetic data and of a victim the sweep trains; ASR uses the
    #                        folder's target like `jdup unlearn` (poison_config.json, else test-poison's label)
    num_labels: int = 2  # classes of the task
    max_length: int = 128  # tokens per input (-> unlearn.max_length and model.train.max_length)
    max_rows: int = 0  # keep at most this many rows per split (seeded subset; 0 = all): quick local runs
    synthetic_rows: int = 48  # rows per clean split for source=synthetic (poison splits: the non-target rows)
    synthetic_length: int = 10  # words per row for source=synthetic


@dataclasses.dataclass(frozen=True)
class CellModel:
    """The suspect classifier."""

    name: str = "builtin:minilm"  # backbone: builtin:minilm, an HF folder, a hub id, or tiny:bert (random)
    victim: str | None = None  # an already-trained backdoored classifier (HF folder, e.g. `jdup train`'s
    #                            <out>/model, relative to the working directory; wins over train_victim);
    #                            None: `name` (or the victim the sweep trains)
    train_victim: bool = False  # train a victim with `jdup train` (model.train; cached per base)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # the victim's `jdup train` settings
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)


@dataclasses.dataclass(frozen=True)
class CellUnlearn(UnlearnSettings):
    """The unlearning settings (:class:`jdup.unlearn.UnlearnSettings`: every ``unlearn`` key of ``jdup unlearn``
    except its files) plus the sweep switch ``enabled``."""

    enabled: bool = True  # false: detection only (CACC/ASR "after" are then absent)


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """Everything one cell runs: the sweep's ``fixed`` + one grid point, with defaults and carried fields filled."""

    data: CellData = dataclasses.field(default_factory=CellData)
    model: CellModel = dataclasses.field(default_factory=CellModel)
    detect: DetectConfig = dataclasses.field(default_factory=DetectConfig)
    unlearn: CellUnlearn = dataclasses.field(default_factory=CellUnlearn)
    seed: int = 2025  # unlearning seed (unlearn.seed): LoRA init, dropout, batch order, hold-out splits
    tags: dict = dataclasses.field(default_factory=dict)  # free labels copied to the results (attack, ...)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep: shared settings, axes, and how to execute."""

    name: str = "sweep"  # label written into every result line
    out: str | None = None  # sweep folder; `jdup sweep --out` wins
    fixed: dict = dataclasses.field(default_factory=dict)  # CellConfig sections shared by every cell
    axes: dict = dataclasses.field(default_factory=dict)  # dotted key -> list of values (see jdup.sweep)
    vectorize: bool = True  # run vmappable cells together; false = one cell at a time (the library loop)
    max_group_size: int = 0  # at most this many cells per vmapped group (0 = no limit); bounds device memory
    mesh_sweep: int = 0  # devices on the `sweep` mesh axis (0 = as many as divide the group; all devices)
    mesh_data: int = 1  # devices on the `data` mesh axis: each cell's batch rows are split over them (2 x
    #                     unlearn.batch_size must divide evenly); the mesh is sweep x data
    rerun_failed: bool = True  # a restart re-runs cells recorded as errors (ok cells are always skipped)
    progress: bool = True  # tqdm progress bars


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point. ``config`` is the resolved :class:`CellConfig`; ``point`` the axis values that made it."""

    id: str
    config: CellConfig
    point: dict

    def get(self, dotted: str) -> Any:
        return get_dotted(config_lib.to_dict(self.config), dotted)


# ---------------------------------------------------------------------------------------------------------------
# Dotted keys


def get_dotted(tree: Mapping, dotted: str) -> Any:
    node: Any = tree
    for k in dotted.split("."):
        node = node[k]
    return node


def get_or_none(tree: Mapping, dotted: str) -> Any:
    try:
        return get_dotted(tree, dotted)
    except (KeyError, TypeError):
        return None


_OPAQUE = ("tags",)  # mappings whose keys are values, not dotted config keys


def _nest(flat_or_nested: Mapping) -> dict:
    """Turns ``{"a.b": 1, "c": {"d": 2}}`` into ``{"a": {"b": 1}, "c": {"d": 2}}`` (dotted keys at any level)."""
    out: dict = {}
    for k, v in flat_or_nested.items():
        v = _nest(v) if isinstance(v, Mapping) and k not in _OPAQUE else v
        if isinstance(v, dict) and isinstance(get_or_none(out, str(k)), dict):
            _deep_update(get_dotted(out, str(k)), v)
        else:
            config_lib.set_dotted(out, str(k), v)
    return out


def _deep_update(dst: dict, src: Mapping) -> dict:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def canonical_json(obj: Any) -> str:
    """Sorted-key compact JSON (the input of cell ids)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def cell_id(config: CellConfig) -> str:
    """Stable id of a cell: the first 16 hex digits of SHA-256 of its resolved config."""
    return _hash(config_lib.to_dict(config))


# ---------------------------------------------------------------------------------------------------------------
# Expansion


def _axis_points(name: str, values: Any, source: str) -> list[dict]:
    """One axis -> list of ``{dotted key: value}`` assignments."""
    if not isinstance(values, (list, tuple)) or not values:
        raise JdupError(f"axis {name!r} must be a non-empty list, got {values!r}", source)
    keys = [k.strip() for k in name.split(",")]
    points = []
    for v in values:
        if isinstance(v, Mapping):
            points.append({str(k): x for k, x in v.items()})
        elif len(keys) > 1:
            if not isinstance(v, (list, tuple)) or len(v) != len(keys):
                raise JdupError(
                    f"axis {name!r}: each value must be a list of {len(keys)} items, got {v!r}", source
                )
            points.append(dict(zip(keys, v, strict=True)))
        else:
            points.append({keys[0]: v})
    return points


def load_sweep_config(
    cfg: SweepConfig | Mapping | str | os.PathLike, source: str = "sweep config"
) -> SweepConfig:
    """A :class:`SweepConfig` from itself, a mapping (parsed YAML) or a YAML path."""
    if isinstance(cfg, SweepConfig):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        source = os.fspath(cfg)
        cfg = config_lib.load_yaml(cfg)
    return config_lib.build(SweepConfig, cfg, source=source)


def _check_carried(merged: Mapping) -> None:
    for section, fields in CARRIED.items():
        given = get_or_none(merged, section)
        if not isinstance(given, Mapping):
            continue
        for key in sorted(set(given) & set(fields)):
            raise JdupError(f"{section}.{key} is set by the sweep (from {fields[key]}); remove it here")


def resolve(cell: CellConfig) -> CellConfig:
    """Fills the carried fields of the embedded stage configs from the cell's own sections (see :data:`CARRIED`);
    the paths stay empty until the cell runs."""
    d, m = cell.data, cell.model
    train = dataclasses.replace(
        m.train,
        model=m.name,
        data=d.dir or "",
        out="",
        rate=d.poison_rate,
        num_labels=d.num_labels,
        target=d.target_label,
        max_length=d.max_length,
    )
    detect = dataclasses.replace(
        cell.detect,
        score_set="dev-detect",
        calib_set="dev-clean",
        dtype=m.dtype,
        progress=False,
        plots=False,
    )
    unlearn = dataclasses.replace(cell.unlearn, seed=cell.seed, progress=False)
    return dataclasses.replace(
        cell, model=dataclasses.replace(m, train=train), detect=detect, unlearn=unlearn
    )


def build_cell(values: Mapping, source: str = "sweep config") -> CellConfig:
    """A resolved :class:`CellConfig` from a (nested or dotted) mapping; unknown keys, bad types and carried keys
    set by hand raise :class:`JdupError`."""
    merged = _nest(values)
    _check_carried(merged)
    return resolve(config_lib.build(CellConfig, merged, source=source))


def expand(cfg: SweepConfig | Mapping | str, source: str = "sweep config") -> list[Cell]:
    """Expands the grid into cells (Cartesian product of the axes, in axis order; the last axis varies fastest).

    Each cell's config is ``fixed`` updated with its axis values, built into a :class:`CellConfig` (unknown keys,
    bad types and carried keys raise :class:`JdupError` before anything runs). Duplicate cells (same resolved
    config) are dropped.

    Returns:
      The cells, in grid order.
    """
    cfg = load_sweep_config(cfg, source)
    fixed = _nest(cfg.fixed)
    axes = [_axis_points(str(name), values, source) for name, values in cfg.axes.items()]
    cells, seen = [], set()
    for combo in itertools.product(*axes) if axes else [()]:
        merged = json.loads(json.dumps(fixed))
        point: dict = {}
        for assignment in combo:
            for k, v in assignment.items():
                point[k] = v
                config_lib.set_dotted(merged, k, v)
        try:
            cell_cfg = build_cell(merged, source)
        except JdupError as e:
            raise JdupError(f"cell {point}: {e.problem}", source) from None
        cid = cell_id(cell_cfg)
        if cid in seen:
            continue
        seen.add(cid)
        cells.append(Cell(cid, cell_cfg, point))
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Grouping


def _without(d: dict, dotted_keys: Iterable[str]) -> dict:
    d = json.loads(json.dumps(d, default=str))
    for k in dotted_keys:
        parts = k.split(".")
        node = d
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    return d


def base_key(c: CellConfig) -> str:
    """Cells with equal base keys share the victim, the tokenised data and the detections."""
    d = config_lib.to_dict(c)
    return _hash({"data": d["data"], "model": d["model"]})


def detect_key(c: CellConfig) -> str:
    """Cells with equal detect keys share one detection (inside their base)."""
    return _hash(config_lib.to_dict(c.detect))


def group_key(c: CellConfig) -> str:
    """Cells with equal group keys differ only in :data:`VMAP_KEYS` and can train in one vmapped run."""
    return _hash(_without(config_lib.to_dict(c), VMAP_KEYS + ("tags",)))


def group_cells(cells: Sequence[Cell], vectorize: bool = True, max_group_size: int = 0) -> list[list[Cell]]:
    """Splits cells into vmappable groups (grid order kept inside and across groups).

    Args:
      cells: the cells.
      vectorize: False gives one cell per group.
      max_group_size: split larger groups into chunks of at most this size (0 = no limit).

    Returns:
      A list of groups; all cells of a group share everything but :data:`VMAP_KEYS` (and ``tags``).
    """
    if not vectorize:
        return [[c] for c in cells]
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(group_key(c.config), []).append(c)
    out = []
    for g in groups.values():
        size = max_group_size if max_group_size and max_group_size > 0 else len(g)
        out.extend(g[i : i + size] for i in range(0, len(g), size))
    return out


def stage_unlearn_config(cell: CellConfig, *, model: str, data: str, out: str) -> UnlearnConfig:
    """The :class:`jdup.stages.unlearn.UnlearnConfig` of the ``jdup unlearn`` run this cell is: the cell's
    ``unlearn`` settings (every field as is), its ``detect`` section as the built-in detection, the token length
    and dtype of ``data.max_length`` / ``model.dtype``, and the paths."""
    settings = {f.name: getattr(cell.unlearn, f.name) for f in dataclasses.fields(UnlearnSettings)}
    return UnlearnConfig(
        **settings,
        model=model,
        data=data,
        out=out,
        detect=cell.detect,
        max_length=cell.data.max_length,
        dtype=cell.model.dtype,
    )


def stage_train_config(cell: CellConfig, *, out: str) -> TrainConfig:
    """The victim's :class:`TrainConfig` (``jdup train``) with its output folder filled in."""
    return dataclasses.replace(cell.model.train, out=out)
