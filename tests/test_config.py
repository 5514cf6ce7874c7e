import dataclasses

import pytest

from jdup import config
from jdup.errors import JdupError


@dataclasses.dataclass(frozen=True)
class Inner:
    rank: int = 8  # LoRA rank
    targets: tuple[str, ...] = ("query", "value")


@dataclasses.dataclass(frozen=True)
class Outer:
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    layers: tuple[int, ...] | None = None
    mode: str = "a"
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_overrides_parse_yaml_values_and_create_sections():
    d = config.apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "x.y=null", "lr=1e-4"])
    assert d == {"a": {"b": 2, "c": [1, 2]}, "x": {"y": None}, "lr": 1e-4}


def test_build_coerces_types_and_nested():
    cfg = config.build(Outer, {"lr": 1, "flag": "true", "layers": [1, 2], "inner": {"targets": "q,k"}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.flag is True
    assert cfg.layers == (1, 2)
    assert cfg.inner == Inner(rank=8, targets=("q", "k"))
    assert config.to_dict(cfg)["inner"]["targets"] == ["q", "k"]


def test_build_rejects_unknown_keys_naming_the_source():
    with pytest.raises(JdupError, match=r"my\.yaml.*unknown key\(s\) \['lrr'\]"):
        config.build(Outer, {"lrr": 1}, source="my.yaml")


def test_build_rejects_bad_types():
    with pytest.raises(JdupError, match="expected an integer"):
        config.build(Outer, {"inner": {"rank": 2.5}})
    with pytest.raises(JdupError, match="true/false"):
        config.build(Outer, {"flag": "maybe"})


def test_load_yaml_errors(tmp_path):
    with pytest.raises(JdupError, match="not found"):
        config.load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(JdupError, match="not valid YAML"):
        config.load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(JdupError, match="mapping"):
        config.load_yaml(lst)


def test_override_without_equals_is_an_error():
    with pytest.raises(JdupError, match="key=value"):
        config.apply_overrides({}, ["lr"])


@dataclasses.dataclass(frozen=True)
class Checked:
    frr: float = 0.05
    batch_size: int = 32
    mode: str = "a"

    __config_aliases__ = {"size": "batch_size"}  # noqa: RUF012

    def validate(self) -> None:
        config.check_range(self, "frr", 0, 1, lo_open=True, hi_open=True)
        config.check_range(self, "batch_size", 1)
        config.check_one_of(self, "mode", ("a", "b"))


@dataclasses.dataclass(frozen=True)
class Holder:
    detect: Checked = dataclasses.field(default_factory=Checked)
    maybe: Checked | None = None


def test_validate_names_the_dotted_key_and_the_source_of_the_value():
    with pytest.raises(JdupError) as e:
        config.build(Holder, {"detect": {"frr": 2}}, source="configs/x.yaml", prefix="unlearn.")
    assert str(e.value) == "configs/x.yaml: unlearn.detect.frr: must lie in (0, 1), got 2.0"
    with pytest.raises(JdupError) as e:
        config.build(Holder, {"detect": {"mode": "c"}}, source="configs/x.yaml",
                     origins={"detect.mode": "command line"})
    assert str(e.value) == "command line: detect.mode: must be one of ['a', 'b'], got 'c'"
    with pytest.raises(JdupError, match=r"maybe.batch_size: must be >= 1, got 0"):
        config.build(Holder, {"maybe": {"batch_size": 0}})
    with pytest.raises(JdupError, match=r"detect: expected a mapping of Checked keys, got 3"):
        config.build(Holder, {"detect": 3})
    with pytest.raises(JdupError, match=r"unknown key\(s\) \['frrr'\] in detect"):
        config.build(Holder, {"detect": {"frrr": 1}})


def test_nested_dataclasses_aliases_and_direct_validation():
    cfg = config.build(Holder, {"detect": {"size": 4}, "maybe": {}})
    assert cfg.detect == Checked(batch_size=4) and cfg.maybe == Checked()
    assert config.build(Holder, config.to_dict(cfg)) == cfg  # round trip through plain dicts
    with pytest.raises(JdupError, match="frr: must lie in"):
        config.validate(Checked(frr=0.0))
    assert config.override_origins(["a.b=1", "c=2"]) == {"a.b": "command line", "c": "command line"}


def test_load_yaml_names_a_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("note: caf\xe9\n".encode("latin-1"))
    with pytest.raises(JdupError, match=r"latin1\.yaml: not UTF-8 text"):
        config.load_yaml(bad)
    with pytest.raises(JdupError, match="is a folder"):
        config.load_yaml(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# --preset dup-official: the DUP authors' recipe (jdup/presets/dup-official.yaml)

#: The official values, read off ManHu2025/DUP (demo_unlearning.py, the defender's class defaults) and
#: docs/dup-method.md; every one must reach the built configs.
OFFICIAL_DETECT = {"method": "dup", "alpha": 0.9, "top_k": 3, "frr": 0.05, "shrinkage": 0.1, "md_layers": "all",
                   "ss_layers": "all", "calib_fraction": 0.5, "split_seed": 2025, "max_dev_samples": None,
                   "max_length": 512, "fit_dtype": "float64", "ss_method": "svd", "faithful_bart": True}
OFFICIAL_UNLEARN = {"forget_loss": "kl", "lambda_asr": 1.0, "lambda_acc": 1.0, "temperature": 1.0, "lora_rank": 32,
                    "lora_alpha": 64.0, "lora_dropout": 0.1, "train_head": True, "model_dropout": True, "epochs": 5,
                    "batch_size": 32, "lr": 5e-4, "weight_decay": 0.01, "warmup_frac": 0.1, "clip_norm": 1.0,
                    "early_stop": "none", "projection": "none", "max_length": 512, "seed": 2025}


def _record(monkeypatch, stage):
    import importlib

    from jdup import pipeline

    module_name, _, fn_name = pipeline.STAGES[stage]
    seen = []
    monkeypatch.setattr(importlib.import_module(module_name), fn_name, lambda cfg: seen.append(cfg) or {"ok": 1})
    return seen


def test_detect_preset_is_the_official_detection_and_overrides_win(monkeypatch, tmp_path, capsys):
    from jdup import cli

    seen = _record(monkeypatch, "detect")
    io = ["--model", "m", "--data", "d", "--out", str(tmp_path / "o")]
    assert cli.main(["detect", *io, "--preset", "dup-official"]) == 0, capsys.readouterr().err
    assert cli.main(["detect", *io, "--preset", "dup-official", "--method", "fisher", "max_length=128"]) == 0
    official, overridden = seen
    for key, value in OFFICIAL_DETECT.items():
        assert getattr(official, key) == value, key
    assert (overridden.method, overridden.max_length, overridden.fit_dtype) == ("fisher", 128, "float64")
    # without the preset the defaults are not the official recipe (what the preset is for)
    assert cli.main(["detect", *io]) == 0
    assert seen[-1].method == "fisher"


def test_unlearn_preset_is_the_official_recipe_and_overrides_win(monkeypatch, tmp_path, capsys):
    from jdup import cli

    seen = _record(monkeypatch, "unlearn")
    cfg_file = tmp_path / "u.yaml"
    cfg_file.write_text("unlearn:\n  epochs: 9\n  forget_loss: suppress_target\n  lr: 1.0e-3\n")
    io = ["--model", "m", "--data", "d", "--out", str(tmp_path / "o")]
    assert cli.main(["unlearn", *io, "--preset", "dup-official"]) == 0, capsys.readouterr().err
    assert cli.main(["unlearn", *io, "-c", str(cfg_file), "--preset", "dup-official", "epochs=3",
                     "detect.frr=0.1"]) == 0
    official, mixed = seen
    for key, value in OFFICIAL_UNLEARN.items():
        assert getattr(official, key) == value, key
    for key, value in OFFICIAL_DETECT.items():  # the built-in detection is the official detection
        assert getattr(official.detect, key) == value, f"detect.{key}"
    assert official.lora_targets == ()  # the family's targets (BERT query,key,value = the official list)
    # the preset sits above the file, overrides above the preset
    assert (mixed.epochs, mixed.forget_loss, mixed.lr, mixed.detect.frr) == (3, "kl", 5e-4, 0.1)
    assert mixed.detect.method == "dup"


def test_unknown_preset_is_one_line_exit_2(capsys):
    from jdup import cli

    for argv in (["detect", "--preset", "dup-offical"], ["unlearn", "--preset", "nope"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "unknown preset" in err and "dup-official" in err


def test_run_preset_key_and_option(monkeypatch, tmp_path, capsys):
    from jdup import cli, pipeline

    run = {"out": str(tmp_path / "r"), "preset": "dup-official",
           "detect": {"model": "m", "data": "d", "frr": 0.2}, "unlearn": {"model": "m", "data": "d", "epochs": 7}}
    p = pipeline.plan(run, source="run.yaml")
    det, un = p["stages"]["detect"], p["stages"]["unlearn"]
    # the file's own keys win over its `preset:`; everything else is the official recipe
    assert (det.frr, det.method, det.max_length) == (0.2, "dup", 512)
    assert (un.epochs, un.forget_loss, un.early_stop, un.max_length, un.detect.method) == (7, "kl", "none", 512, "dup")
    assert "poison" not in p["stages"] and "train" not in p["stages"]  # a preset never enables a stage
    with pytest.raises(JdupError, match="unknown preset"):
        pipeline.plan({**run, "preset": "nope"}, source="run.yaml")

    # --preset on the command line sits above the file's keys, key=value overrides above it
    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, **kw: seen.append(pipeline.plan(cfg)) or
                        {"out": str(tmp_path), "stages": {}})
    monkeypatch.setattr(pipeline, "summary_table", lambda report: "")
    f = tmp_path / "run.yaml"
    f.write_text(f"out: {tmp_path / 'r'}\ndetect:\n  frr: 0.2\nunlearn:\n  epochs: 7\n  batch_size: 16\n")
    assert cli.main(["run", str(f), "--preset", "dup-official", "unlearn.batch_size=8"]) == 0
    (planned,) = seen
    un = planned["stages"]["unlearn"]
    assert (un.epochs, un.batch_size, un.forget_loss) == (5, 8, "kl")
    assert planned["stages"]["detect"].frr == 0.05
