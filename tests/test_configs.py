"""Every shipped YAML under ``configs/`` parses and builds the dataclasses it is meant for.

* per-stage files (``configs/<stage>.yaml``, stage in poison/train/detect/unlearn): accepted by
  ``jdup <stage> --config`` (the stage function is replaced by a recorder), every key is a field of the stage's
  dataclass, every field is listed (so new fields get documented), every key line carries a comment, and each
  value is the dataclass default except the input/output paths (which chain the example files together);
* run configs (any other top-level file, e.g. ``demo.yaml``, ``tiny.yaml``): known top-level keys, every stage
  section builds its dataclass, nested option dicts (``unlearn.detect``, ``unlearn.projection_options``) build
  theirs;
* sweep configs (``configs/sweeps/*.yaml``): ``jdup.sweep.expand`` builds every cell;
* presets (``jdup/presets/*.yaml``): ``detect:`` / ``unlearn:`` sections of stage keys, every key commented,
  each built into its stage's dataclass as ``jdup <stage> --preset NAME`` does.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from jdup import cli, pipeline
from jdup import config as config_lib

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
STAGE_FILES = ("poison", "train", "detect", "unlearn")
#: Fields whose example value deliberately differs from the (empty) default: they chain the example files.
PATH_FIELDS = {"model", "data", "out"}
#: Module that runs each stage, for the recorder (pipeline.STAGES names the function).
ENTRY = {stage: pipeline.STAGES[stage] for stage in STAGE_FILES}


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def kind(path: Path) -> str:
    if path.parent.name == "sweeps":
        return "sweep"
    if path.parent.name == "presets":
        return "preset"
    if path.parent == CONFIGS and path.stem in STAGE_FILES:
        return "stage"
    return "run"


def test_configs_exist():
    names = {rel(p) for p in ALL}
    for stage in (*STAGE_FILES, "tiny", "demo"):
        assert f"configs/{stage}.yaml" in names


@pytest.mark.parametrize("path", ALL, ids=rel)
def test_parses_and_builds(path):
    data = config_lib.load_yaml(path)
    assert data, f"{path} is empty"
    k = kind(path)
    if k == "sweep":
        from jdup import sweep

        cells = sweep.expand(path)
        assert cells, "the sweep has no cells"
        assert len({c.id for c in cells}) == len(cells)
    elif k == "preset":
        assert set(data) <= set(config_lib.PRESET_STAGES), f"a preset has only {config_lib.PRESET_STAGES}"
        for stage in data:
            values = config_lib.preset_values(path.stem, stage)
            cls, _ = pipeline.stage_classes(stage)
            fields = {f.name for f in dataclasses.fields(cls)}
            assert set(data[stage]) <= fields, f"{rel(path)} [{stage}]: not {cls.__name__} keys"
            _check_nested(stage, values, f"{rel(path)} [{stage}]")
    elif k == "stage":
        cls, _ = pipeline.stage_classes(path.stem)
        cfg = config_lib.build(cls, data, source=str(path))
        _check_nested(path.stem, config_lib.to_dict(cfg), str(path))
    else:
        unknown = set(data) - set(pipeline.RUN_KEYS)
        assert not unknown, f"unknown top-level keys {unknown}"
        assert "out" in data
        sections = [s for s in STAGE_FILES if isinstance(data.get(s), dict)]
        assert sections, "a run config needs at least one stage section"
        for stage in sections:
            values = {k: v for k, v in data[stage].items() if k != "enabled"}
            pipeline.build_stage_config(stage, values, source=f"{path} [{stage}]")
            _check_nested(stage, values, f"{path} [{stage}]")


def _check_nested(stage: str, values: dict, source: str) -> None:
    """Nested option sections (``unlearn.detect``, ``unlearn.projection_options``, ``detect.upgp``) are typed
    dataclasses: building the stage config built and validated them."""
    cfg = pipeline.build_stage_config(stage, values, source=source)
    for name in ("detect", "projection_options", "upgp"):
        if hasattr(cfg, name):
            assert dataclasses.is_dataclass(getattr(cfg, name)), f"{source}: {stage}.{name} is not typed"


@pytest.mark.parametrize("stage", STAGE_FILES)
def test_stage_file_is_accepted_by_the_cli(stage, monkeypatch, capsys):
    """`jdup <stage> --config configs/<stage>.yaml` builds the config and calls the stage's one function."""
    import importlib

    module_name, cls_name, fn_name = ENTRY[stage]
    module = importlib.import_module(module_name)
    seen = []
    monkeypatch.setattr(module, fn_name, lambda cfg: seen.append(cfg) or {"ok": True})
    path = CONFIGS / f"{stage}.yaml"
    rc = cli.main(["--log-level", "warning", stage, "--config", str(path)])
    assert rc == 0, capsys.readouterr().err
    (cfg,) = seen
    assert type(cfg).__name__ == cls_name
    assert cfg == config_lib.build(type(cfg), config_lib.load_yaml(path), source=str(path))


@pytest.mark.parametrize("stage", STAGE_FILES)
def test_stage_file_lists_every_field_with_its_default(stage):
    path = CONFIGS / f"{stage}.yaml"
    data = config_lib.load_yaml(path)
    cls, _ = pipeline.stage_classes(stage)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    assert not unknown, f"{rel(path)} has keys that are not {cls.__name__} fields (renamed?): {unknown}"
    missing = [f for f in fields if f not in data]
    assert not missing, f"{rel(path)} does not document these {cls.__name__} fields: {missing}"
    # dataclass order, except that a stage config extending an algorithm's settings class (UnlearnConfig on
    # UnlearnSettings) lists its own fields (inputs/outputs) first
    own = [f for f in cls.__dict__.get("__annotations__", {}) if f in fields]
    order = own + [f for f in fields if f not in own]
    assert list(data) == order, f"{rel(path)}: keep the keys in the dataclass order (the class's own fields first)"
    built = config_lib.build(cls, data, source=str(path))
    default = cls()
    stale = {
        f: (getattr(built, f), getattr(default, f))
        for f in fields
        if f not in PATH_FIELDS and getattr(built, f) != getattr(default, f)
    }
    assert not stale, f"{rel(path)}: values differ from the {cls.__name__} defaults (file, default): {stale}"


_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):")


@pytest.mark.parametrize("stage", STAGE_FILES)
def test_stage_file_comments_every_key(stage):
    """Each top-level key has an inline comment or sits under a comment block (keys may share one block)."""
    lines = (CONFIGS / f"{stage}.yaml").read_text(encoding="utf-8").splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = _KEY.match(line)
        if not m or " #" in line:
            continue
        j = i - 1
        while j >= 0 and _KEY.match(lines[j]):
            j -= 1
        if j < 0 or not lines[j].lstrip().startswith("#"):
            undocumented.append(m.group(1))
    assert not undocumented, f"configs/{stage}.yaml: keys without a comment: {undocumented}"


def test_stage_files_chain_together():
    """poison.yaml -> train.yaml -> detect.yaml / unlearn.yaml: each reads the folder the previous one writes."""
    f = {s: config_lib.load_yaml(CONFIGS / f"{s}.yaml") for s in STAGE_FILES}
    assert f["train"]["data"] == f["detect"]["data"] == f["unlearn"]["data"] == f["poison"]["out"]
    assert f["detect"]["model"] == f["unlearn"]["model"] == f"{f['train']['out']}/model"
    assert len({f[s]["out"] for s in STAGE_FILES}) == len(STAGE_FILES)


@pytest.mark.parametrize("path", sorted((REPO / "jdup" / "presets").glob("*.yaml")), ids=rel)
def test_preset_comments_every_key(path):
    """Every key line of a preset carries an inline comment (the preset is read by people checking the recipe)."""
    undocumented = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if re.match(r"^\s+[A-Za-z_]+:", line) and " #" not in line]
    assert not undocumented, f"{rel(path)}: keys without a comment: {undocumented}"
