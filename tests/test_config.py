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
