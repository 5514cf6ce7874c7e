"""What every stage shares: its typed result, the attack's target of a data folder, the device mesh, JSON records.

* :class:`StageResult`: what ``run_<stage>(cfg)`` returns (the record written to the stage's result file, where
  it went, its time; ``stopped`` when a step budget ended a resumable run first). :mod:`jdup.pipeline` and the
  sweep read it by attribute; it is also a read-only mapping of its ``record`` for scripts.
* :func:`attack_target`: the backdoor's target label of a DUP-layout folder (``poison_config.json``, else the
  majority label of ``test-poison``) -- the evaluator's knowledge, used for ASR. The label a *defender* infers
  from the victim's predictions is :func:`jdup.unlearn.infer_target`.
* :func:`stage_mesh` / :func:`run_record`: the stage's ``mesh`` setting as a device mesh, and the
  ``{"mesh": {"data": D, "model": M}, "process_count": P}`` every result record carries.
* :func:`json_record` / :func:`write_record`: one way a result record becomes JSON (NaN and infinities as
  ``null``, NumPy scalars and arrays as numbers and lists), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jdup import atomic
from jdup import data as D
from jdup.errors import Invalid, JdupError


@dataclasses.dataclass(frozen=True, eq=False)
class StageResult(Mapping):
    """What a stage returns.

    Attributes:
      stage: ``train``, ``detect``, ``unlearn`` or ``poison``.
      out: the finished output folder (``None`` when nothing was committed, e.g. a stopped run).
      record: the JSON record written to the stage's result file (``metrics.json``, ``detection.json``).
      seconds: the stage's time (``None`` when unknown).
      stopped: a step budget (``max_steps``) ended the run before the end; a checkpoint holds it.
      reused: :mod:`jdup.pipeline` reused a finished output instead of running the stage.
    """

    stage: str
    out: str | None
    record: Mapping[str, Any]
    seconds: float | None = None
    stopped: bool = False
    reused: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    def __repr__(self) -> str:
        return (f"StageResult(stage={self.stage!r}, out={self.out!r}, seconds={self.seconds!r}, "
                f"stopped={self.stopped!r}, reused={self.reused!r}, record={dict(self.record)!r})")


def as_stage_result(stage: str, out: str | None, value: Any, *, reused: bool = False) -> StageResult:
    """``value`` as a :class:`StageResult` (a stage function returning a plain mapping, or a record read back)."""
    if isinstance(value, StageResult):
        return value if not reused else dataclasses.replace(value, reused=True)
    record = dict(value or {})
    seconds = record.get("seconds")
    return StageResult(stage, out, record, float(seconds) if seconds is not None else None,
                       stopped=bool(record.get("stopped", False)), reused=reused)


def attack_target(data_dir: str, test_poison: D.TextDataset | None, *, required: bool = True) -> int | None:
    """The attack's target label of a DUP-layout folder: ``target`` of its ``poison_config.json`` if present, else
    the majority label of ``test_poison`` (every triggered row is labelled with the target). Without either: an
    error, or ``None`` when ``required`` is false (a defender's folder without triggered rows: no ASR)."""
    meta = os.path.join(data_dir, "poison_config.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                return int(json.load(f)["target"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if test_poison is None or len(test_poison) == 0:
        if not required:
            return None
        raise JdupError("test-poison is empty, cannot infer the target label; set target", data_dir)
    return int(np.bincount(test_poison.labels).argmax())


def stage_mesh(spec: str = "auto") -> Any:
    """The device mesh of a stage's ``mesh`` setting (:func:`jdup.mesh.make_mesh`); a spec the devices cannot
    satisfy is a :class:`JdupError` naming the ``mesh`` key."""
    from jdup import mesh as mesh_lib

    try:
        return mesh_lib.make_mesh(spec)
    except Invalid as e:
        raise JdupError(str(e), "config:mesh") from None


def run_record(mesh: Any = None) -> dict[str, Any]:
    """``{"mesh": {"data": D, "model": M}, "process_count": P}`` of a run on ``mesh`` (``None``: one device)."""
    from jdup import distributed
    from jdup import mesh as mesh_lib

    return {"mesh": mesh_lib.mesh_record(mesh), "process_count": int(distributed.process_count())}


def json_record(x: Any) -> Any:
    """A JSON-able copy of ``x``: NaN and infinities become ``None``, NumPy scalars and arrays plain numbers and
    lists, tuples lists."""
    if isinstance(x, Mapping):
        return {k: json_record(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_record(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return json_record(x.tolist())
    return x


def write_record(path: str, record: Mapping[str, Any]) -> dict:
    """Writes ``record`` (made JSON-able by :func:`json_record`) atomically as indented JSON; returns what was
    written."""
    rec = json_record(record)
    atomic.write_json(path, rec)
    return rec


__all__ = ["StageResult", "as_stage_result", "attack_target", "json_record", "run_record", "stage_mesh",
           "write_record"]
