"""YAML configs with ``key=value`` overrides, turned into the frozen config dataclasses of each stage.

Each stage module (``jdup.train``, ``jdup.detect``, ``jdup.unlearn``, ...) owns a frozen dataclass with every
field commented. This module only moves values between YAML, the command line and those dataclasses:

* :func:`load_yaml` reads a file (one clear :class:`~jdup.errors.JdupError` if it is missing or malformed);
* :func:`apply_overrides` applies dotted ``key=value`` strings (values parsed as YAML: ``lr=1e-4``,
  ``layers=[1,2]``, ``alpha=null``);
* :func:`build` makes a dataclass from a mapping, rejecting unknown keys, coercing simple types (``tuple``
  fields from lists, ``float`` from ints) and nested dataclass fields from mappings, then runs the class's
  ``validate()`` (value constraints written with :func:`check_range`, :func:`check_one_of`, ...), so a typo or an
  out-of-range value fails before any work is done, with a message naming the key and its source::

      configs/x.yaml: detect.frr: must lie in (0, 1), got 2.0
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

from jdup import errors
from jdup.errors import JdupError

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict:
    """Reads a YAML mapping. Missing file, bad YAML or a non-mapping top level raise ``JdupError``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise JdupError("is a folder, not a config file", path)
    if not os.path.isfile(path):
        raise JdupError("config file not found", path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise JdupError(f"not valid YAML: {where}{problem}", path) from None
    except UnicodeDecodeError as e:
        raise JdupError(f"not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8", path) from None
    except OSError as e:
        raise JdupError(f"cannot read: {e.strerror}", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JdupError(f"the top level must be a mapping of keys, got {type(data).__name__}", path)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"unlearn.lr=1e-4"`` -> ``(["unlearn", "lr"], 1e-4)``. Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise JdupError(f"override {item!r} is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise JdupError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string; numbers are what users mean
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(config: Mapping, overrides: Iterable[str]) -> dict:
    """Returns a deep copy of ``config`` with dotted ``key=value`` overrides applied (creating sections)."""
    out = _deepcopy(config)
    for item in overrides:
        keys, value = parse_override(item)
        set_dotted(out, keys, value)
    return out


def set_dotted(tree: dict, keys: str | list[str], value: Any) -> None:
    """``tree[k1][k2]...[kn] = value`` for a dotted key ``"k1.k2.kn"`` (or a key list), creating sections."""
    keys = keys.split(".") if isinstance(keys, str) else keys
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def override_origins(overrides: Iterable[str], source: str = "command line") -> dict[str, str]:
    """``{dotted key: source}`` of ``key=value`` overrides, for :func:`build`'s ``origins``."""
    out = {}
    for item in overrides:
        if "=" in item:
            keys, _ = parse_override(item)
            out[".".join(keys)] = source
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# --------------------------------------------------------------------------------------------------------------
# Presets: named bundles of stage settings in jdup/presets/<name>.yaml (``--preset NAME``)

#: Folder of the shipped presets: package data (``jdup/presets``), so an installed wheel has them too.
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
#: Stages a preset may carry settings for.
PRESET_STAGES = ("detect", "unlearn")


def preset_names() -> list[str]:
    """Names of the shipped presets (files ``jdup/presets/<name>.yaml``)."""
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(f[: -len(".yaml")] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_preset(name: str) -> dict:
    """The preset ``name`` (a shipped name or a path to a YAML file): ``{"detect": {...}, "unlearn": {...}}``.

    An unknown name or a file with other top-level keys raises ``JdupError`` (one line naming the valid presets).
    """
    name = str(name).strip()
    path = name if name.endswith((".yaml", ".yml")) or os.sep in name else os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        raise JdupError(f"unknown preset {name!r}; valid presets: {preset_names()} (or a path to a YAML file)")
    data = load_yaml(path)
    bad = sorted(k for k in data if k not in PRESET_STAGES or not isinstance(data[k], Mapping))
    if bad:
        raise JdupError(f"a preset has only the mappings {list(PRESET_STAGES)}, got {bad}", path)
    return {k: _deepcopy(v) for k, v in data.items()}


def preset_values(name: str, stage: str) -> dict:
    """The settings the preset ``name`` gives ``stage``: its ``detect:`` section for ``detect``; its ``unlearn:``
    section with the ``detect:`` section nested as ``unlearn.detect`` (the built-in detection) for ``unlearn``;
    ``{}`` for other stages."""
    preset = load_preset(name)
    if stage == "detect":
        return dict(preset.get("detect", {}))
    if stage == "unlearn":
        out = dict(preset.get("unlearn", {}))
        if "detect" in preset:
            out["detect"] = merge(preset["detect"], out.get("detect") or {})
        return out
    return {}


def merge(base: Mapping, over: Mapping) -> dict:
    """A deep copy of ``base`` with ``over``'s keys on top (mappings merged key by key, other values replaced)."""
    out = _deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = _deepcopy(v)
    return out


def apply_run_preset(run: Mapping, name: str | None, *, over: bool) -> dict:
    """A run config (``jdup run``) with the preset ``name`` applied to the stage sections it has (a section absent
    from ``run`` stays absent: a preset never enables a stage). ``over=True`` (``--preset`` on the command line)
    puts the preset's values above the file's; ``over=False`` (the file's own ``preset:`` key) below them."""
    out = _deepcopy(dict(run))
    if not name:
        return out
    for stage in PRESET_STAGES:
        section = out.get(stage)
        if not isinstance(section, Mapping):
            continue
        values = preset_values(name, stage)
        out[stage] = merge(section, values) if over else merge(values, section)
    return out


def flat_keys(tree: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a nested mapping (``{"a": {"b": 1}}`` -> ``["a.b"]``)."""
    keys = []
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# Value constraints live with the config classes, in a ``validate(self)`` method made of the ``check_*`` one-liners
# of :mod:`jdup.errors` (importable by every module), re-exported here.
Invalid = errors.Invalid
check = errors.check
check_range = errors.check_range
check_one_of = errors.check_one_of
check_set = errors.check_set


def validate(cfg: T, *, source: str = "config", prefix: str = "") -> T:
    """Runs ``cfg.validate()`` (if any) on a config built directly in Python (``build`` already does this), turning
    :class:`Invalid` into ``JdupError``; returns ``cfg``. Stages call it first, so library callers get the checks."""
    check_fn = getattr(cfg, "validate", None)
    if callable(check_fn):
        try:
            check_fn()
        except Invalid as e:
            raise JdupError(f"{prefix}{e}", source) from None
    return cfg


def _hints(cls: type) -> dict[str, Any]:
    """Field types of a dataclass; a field whose annotation cannot be resolved falls back to the class of its
    ``default_factory`` when that is a dataclass (so nested configs are still built), else ``Any``."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        pass
    out: dict[str, Any] = {}
    module = __import__(cls.__module__, fromlist=["_"]).__dict__
    for f in dataclasses.fields(cls):
        tp: Any = f.type
        if isinstance(tp, str):
            try:
                tp = eval(tp, dict(module), {})  # noqa: S307 - annotations of our own config classes
            except Exception:  # noqa: BLE001
                factory = f.default_factory
                tp = factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else Any
        out[f.name] = tp
    return out


def origin_of(origins: Mapping[str, str] | None, path: str, source: str) -> str:
    """Where the value at dotted ``path`` came from: the longest prefix of it in ``origins``, else ``source``."""
    if origins:
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            got = origins.get(".".join(parts[:n]))
            if got:
                return got
    return source


def build(
    cls: type[T],
    values: Mapping | None,
    *,
    source: str = "config",
    prefix: str = "",
    origins: Mapping[str, str] | None = None,
) -> T:
    """Builds the frozen dataclass ``cls`` from a mapping, then runs its ``validate()`` (if it has one).

    Unknown keys, bad types and values ``validate()`` rejects raise ``JdupError`` naming the key (dotted, with
    ``prefix``) and where it came from.

    Args:
      cls: a dataclass type; fields that are dataclasses are built recursively from mappings (``a.b`` keys).
      values: the mapping (e.g. one section of a YAML file after overrides).
      source: what to name in error messages (a file path or ``"command line"``).
      prefix: dotted path of this mapping in the whole config (``"detect."``), for messages.
      origins: ``{dotted key: source}`` for values that came from elsewhere (e.g. command-line overrides).
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        where = prefix.rstrip(".") or cls.__name__
        raise JdupError(f"{where}: expected a mapping of {cls.__name__} keys, got {values!r}", source)
    values = dict(values)
    aliases = getattr(cls, "__config_aliases__", {})
    for alias, name in aliases.items():
        if alias in values:
            value = values.pop(alias)
            values.setdefault(name, value)
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise JdupError(
            f"unknown key(s) {unknown}{where} for {cls.__name__}; valid keys: {sorted(known)}",
            origin_of(origins, prefix + unknown[0], source),
        )
    kwargs = {}
    for name, value in values.items():
        path = prefix + name
        src = origin_of(origins, path, source)
        try:
            kwargs[name] = _coerce(hints.get(name, Any), value, path, src, origins)
        except JdupError:
            raise
        except (TypeError, ValueError) as e:
            raise JdupError(f"{path}: bad value {value!r}: {e}", src) from None
    try:
        cfg = cls(**kwargs)
    except Invalid as e:
        raise JdupError(f"{prefix}{e}", origin_of(origins, prefix + e.key, source)) from None
    except (TypeError, ValueError) as e:
        raise JdupError(f"invalid {prefix.rstrip('.') or cls.__name__}: {e}", source) from None
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except Invalid as e:
            raise JdupError(f"{prefix}{e}", origin_of(origins, prefix + e.key, source)) from None
    return cfg


def _coerce(tp: Any, value: Any, where: str, source: str, origins: Mapping[str, str] | None = None) -> Any:
    if tp is Any or value is None:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the clearest
            return _coerce(options[0], value, where, source, origins)
        nested = [a for a in options if dataclasses.is_dataclass(a) and isinstance(a, type)]
        if nested and isinstance(value, Mapping):
            return _coerce(nested[0], value, where, source, origins)
        for opt in options:
            try:
                return _coerce(opt, value, where, source, origins)
            except (JdupError, TypeError, ValueError):
                continue
        names = [getattr(o, "__name__", str(o)) for o in options]
        raise JdupError(f"{where}: {value!r} matches none of {names}", source)
    if origin is typing.Literal:
        if value not in args:
            raise JdupError(f"{where}: {value!r} is not one of {list(args)}", source)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise JdupError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}", source)
        return build(tp, value, source=source, prefix=where + ".", origins=origins)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v, where, source) for v in value]
        elif origin is tuple and args:
            items = [_coerce(a, v, where, source) for a, v in zip(args, value, strict=False)]
        else:
            inner = args[0] if args else Any
            items = [_coerce(inner, v, where, source) for v in value]
        return tuple(items) if origin is tuple else list(items)
    if origin in (dict, Mapping) or tp in (dict,):
        if not isinstance(value, Mapping):
            raise JdupError(f"{where}: expected a mapping, got {value!r}", source)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise JdupError(f"{where}: expected true/false, got {value!r}", source)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise JdupError(f"{where}: expected a number, got {value!r}", source) from None
    if tp is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise JdupError(f"{where}: expected an integer, got {value!r}", source) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise JdupError(f"{where}: expected a string, got {value!r}", source)
        return str(value)
    return value


def to_dict(cfg: Any) -> dict:
    """A JSON-friendly dict of a (possibly nested) config dataclass, for logs and result files."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
