"""Every stage output knows what made it: ``manifest.json``, written last into the output folder.

A manifest records the stage, the jdup version, the resolved config and a fingerprint of every input (model
folder, data folder or file, an upstream stage's manifest); its ``key`` hashes the parts that decide the result
(the config without :data:`NOT_RESULT` fields, the version, the input fingerprints). Output is reused — the pipeline
skipping a finished stage, unlearning reusing its detection, ``unlearn --detection`` — only when the stored key
equals the expected one; otherwise :func:`difference` says in one line what changed.

:func:`check_output` runs before any work: ``--out`` must not be a file, must not be (or lie inside, or contain)
an input folder, its parent must be writable, and an existing non-empty folder must be a jdup output of the same
stage unless ``overwrite``.

:class:`StageOutput` ties it together for a stage: the checks, the staging folder (:class:`jdup.atomic.StagedDir`)
and the manifest written last on :meth:`StageOutput.commit`. On several processes (:mod:`jdup.distributed`) every
process runs the stage; only process 0 writes (:attr:`StageOutput.writer`): the others write into a private scratch
folder that is thrown away, and wait at :meth:`StageOutput.commit` until process 0 has committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from jdup import atomic
from jdup.errors import JdupError

log = logging.getLogger("jdup")

NAME = "manifest.json"
FORMAT = 1
#: Config fields that do not change a stage's result (where it is written, progress bars, checkpoint cadence,
#: the device mesh).
NOT_RESULT = frozenset(
    {"out", "progress", "resume", "overwrite", "ckpt_every_steps", "keep_checkpoints", "max_steps", "log_every",
     "mesh"}
)
#: Files up to this size are fingerprinted by content; larger ones (weights) by size and modification time.
HASH_LIMIT = 16 << 20
#: Folders with more files than this are fingerprinted by their top level only.
MAX_FILES = 20000
_SKIP = (NAME, atomic.OWNER)
#: Outputs of jdup versions before manifests, recognised by a file only that stage writes.
LEGACY_MARKERS = {"poison": "poison_config.json"}


def version() -> str:
    from jdup import __version__

    return __version__


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _file_entry(path: str) -> list:
    st = os.stat(path)
    if st.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return [st.st_size, h.hexdigest()[:20]]
    return [st.st_size, st.st_mtime_ns]


def fingerprint(path_or_name: str | os.PathLike | None) -> dict:
    """``{"path", "fingerprint", "upstream"}`` of an input: a file or folder (content of small files, size and
    time of large ones; ``upstream`` = the key of the jdup manifest in it or in its parent folder), or a name
    that is not a local path (``builtin:minilm``, a Hub id): the name itself."""
    if path_or_name is None or path_or_name == "":
        return {"path": None, "fingerprint": None}
    s = os.fspath(path_or_name)
    if s.startswith("builtin:") or not os.path.exists(s):
        return {"path": s, "fingerprint": _digest(["name", s])}
    path = os.path.abspath(s)
    if os.path.isfile(path):
        return {"path": path, "fingerprint": _digest(["file", _file_entry(path)])}
    entries = []
    count = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.endswith(atomic.PARTIAL) and ".tmp-" not in d)
        for name in sorted(files):
            if name in _SKIP or ".tmp-" in name:
                continue
            full = os.path.join(root, name)
            entries.append([os.path.relpath(full, path), _file_entry(full)])
            count += 1
        if count > MAX_FILES:
            entries = [[n, os.stat(os.path.join(path, n)).st_size] for n in sorted(os.listdir(path))]
            break
    out = {"path": path, "fingerprint": _digest(["folder", entries])}
    up = read(path) or read(os.path.dirname(path))
    if up is not None:
        out["upstream"] = {"stage": up.get("stage"), "key": up.get("key")}
    return out


def stage_inputs(stage: str, cfg: Any) -> dict[str, Any]:
    """What a stage reads (``{name: path or name}``): what its manifest fingerprints and what its output must
    never replace. The pipeline and the stages both use this, so their manifests agree."""
    if stage == "poison":
        return {"source": cfg.source}
    inputs = {"model": cfg.model, "data": cfg.data}
    if stage == "detect":
        s = cfg.score_set
        if s.endswith(".csv") or os.sep in s:
            inputs["score_set"] = s if os.path.isabs(s) or os.path.isfile(s) else os.path.join(cfg.data, s)
    if stage == "unlearn" and getattr(cfg, "detection", None):
        inputs["detection"] = cfg.detection
    return inputs


def result_config(config: Mapping) -> dict:
    """The part of a resolved config that decides the result (drops :data:`NOT_RESULT` fields)."""
    return {k: v for k, v in config.items() if k not in NOT_RESULT}


def _config_dict(cfg: Any) -> dict:
    from jdup import config as config_lib

    return config_lib.to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def make(stage: str, cfg: Any, inputs: Mapping[str, Any]) -> dict:
    """The manifest a run of ``stage`` with config ``cfg`` on ``inputs`` (``{name: path or name}``) writes.

    Input paths are fingerprinted now; the config's own copies of the input paths are kept for the record but
    only the fingerprints enter the key (so moving a folder does not invalidate its outputs).
    """
    config = json.loads(json.dumps(_config_dict(cfg), default=str))
    prints = {name: fingerprint(value) for name, value in inputs.items()}
    decided = {k: v for k, v in result_config(config).items() if k not in inputs}
    key = _digest([stage, version(), decided, {k: v["fingerprint"] for k, v in prints.items()}])
    return {
        "jdup_manifest": FORMAT,
        "stage": stage,
        "jdup_version": version(),
        "key": key,
        "config": config,
        "inputs": prints,
    }


def read(folder: str | os.PathLike) -> dict | None:
    """The manifest of an output folder, or None (no manifest, unreadable, or not a jdup manifest)."""
    path = os.path.join(os.fspath(folder), NAME)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and "jdup_manifest" in m and "stage" in m else None


def write(folder: str | os.PathLike, manifest: Mapping, **extra: Any) -> dict:
    """Writes ``manifest`` (plus ``extra`` fields, the list of files and a timestamp) as the folder's last file."""
    folder = os.fspath(folder)
    files = []
    for root, _, names in os.walk(folder):
        for n in names:
            if n not in _SKIP:
                files.append(os.path.relpath(os.path.join(root, n), folder))
    m = {**manifest, **extra, "files": sorted(files), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic.write_json(os.path.join(folder, NAME), m)
    return m


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def difference(old: Mapping | None, new: Mapping, *, limit: int = 3) -> str:
    """One line saying how the stored manifest ``old`` differs from the expected ``new`` ('' when it matches)."""
    if old is None:
        return "no manifest.json (not a complete jdup output)"
    if old.get("key") == new.get("key"):
        return ""
    if old.get("stage") != new.get("stage"):
        return f"it is a {old.get('stage')} output, not a {new.get('stage')} output"
    diffs = []
    if old.get("jdup_version") != new.get("jdup_version"):
        diffs.append(f"jdup version {old.get('jdup_version')} -> {new.get('jdup_version')}")
    a = _flat(result_config(old.get("config", {})))
    b = _flat(result_config(new.get("config", {})))
    inputs = set(new.get("inputs", {}))
    for k in sorted(set(a) | set(b)):
        if k in inputs or a.get(k, "<unset>") == b.get(k, "<unset>"):
            continue
        diffs.append(f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}")
    for name, fp in new.get("inputs", {}).items():
        before = old.get("inputs", {}).get(name, {})
        if before.get("fingerprint") != fp.get("fingerprint"):
            where = fp.get("path") or name
            diffs.append(f"input {name} changed ({where})" if before.get("path") == fp.get("path")
                         else f"input {name}: {before.get('path')} -> {where}")
    if not diffs:
        diffs.append("made with other settings")
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def matches(folder: str | os.PathLike, expected: Mapping) -> tuple[bool, str]:
    """``(True, "")`` when ``folder`` holds a complete output with the expected manifest key, else
    ``(False, what differs)``."""
    got = read(folder)
    why = difference(got, expected)
    return (not why), why


# ---------------------------------------------------------------------------------------------------------------
# output folder checks


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def check_output(
    stage: str,
    out: str | os.PathLike,
    inputs: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    same_stage: bool = True,
) -> str:
    """Checks ``out`` before any work; returns it as an absolute path.

    Raises :class:`JdupError` (one line naming the path and what to do) when ``out`` is an existing file, equal
    to / inside / around one of ``inputs`` (``{name: path}``; names that are not local paths are ignored), not
    writable, or (``same_stage``) an existing non-empty folder that is not a jdup ``stage`` output and
    ``overwrite`` is off.
    """
    if not out:
        raise JdupError(f"{stage} needs an output folder (out)")
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise JdupError("exists and is a file, not a folder: choose a folder for the output", out)
    real_out = _real(out)
    for name, value in (inputs or {}).items():
        if value is None or value == "" or str(value).startswith("builtin:") or not os.path.exists(value):
            continue
        real_in = _real(os.fspath(value))
        if _inside(real_out, real_in):
            what = "is" if real_out == real_in else "lies inside"
            raise JdupError(f"the output folder {what} the {name} input {value}: inputs are never overwritten; "
                            "choose another output folder", out)
        if _inside(real_in, real_out):
            raise JdupError(f"the output folder contains the {name} input {value}, which replacing the output "
                            "would delete; choose another output folder", out)
    probe = out
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise JdupError("is a file, so the output folder cannot be made below it", probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        ro = False
        try:
            ro = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            pass
        problem = "read-only file system" if ro else "permission denied"
        raise JdupError(f"cannot write here ({problem}): choose a writable output folder", probe)
    if same_stage and os.path.isdir(out) and not overwrite:
        if any(n not in (atomic.OWNER,) for n in os.listdir(out)):
            got = read(out)
            legacy = LEGACY_MARKERS.get(stage)
            if got is None and legacy and os.path.isfile(os.path.join(out, legacy)):
                return out
            if got is None:
                raise JdupError(f"exists and is not a jdup {stage} output (no manifest.json); pass --overwrite "
                                "(overwrite=true) to replace it, or choose another output folder", out)
            if got.get("stage") != stage:
                raise JdupError(f"holds a jdup {got.get('stage')} output, not a {stage} output; pass --overwrite "
                                "(overwrite=true) to replace it, or choose another output folder", out)
    return out


class StageOutput:
    """The output of one stage run: checks (:func:`check_output`), staging folder and manifest.

    Args:
      stage: ``poison`` | ``train`` | ``detect`` | ``unlearn``.
      cfg: the stage's config dataclass (``out`` and ``overwrite`` are read from it).
      inputs: ``{name: path or name}`` the stage reads (fingerprinted into the manifest); default
        :func:`stage_inputs`.
      resume: keep a resumable ``<out>.partial`` of an earlier, dead run (see :class:`jdup.atomic.StagedDir`).
      keep: entry of the staging folder that makes it worth keeping after a failure (e.g. ``"ckpt"``).

    Use::

        with StageOutput("detect", cfg, {"model": cfg.model, "data": cfg.data}) as so:
            ... write files under so.path ...
            so.commit(result)          # manifest.json last, then the folder replaces cfg.out
    """

    def __init__(self, stage: str, cfg: Any, inputs: Mapping[str, Any] | None = None, *, resume: bool = False,
                 keep: str | tuple[str, ...] | None = None):
        self.stage = stage
        self.cfg = cfg
        self.inputs = dict(stage_inputs(stage, cfg) if inputs is None else inputs)
        self.out = check_output(stage, cfg.out, self.inputs,
                                overwrite=bool(getattr(cfg, "overwrite", False)))
        self.staged = atomic.StagedDir(self.out, resume=resume, keep=keep)
        self.expected: dict | None = None

    @property
    def path(self) -> str:
        """The staging folder to write into (a private scratch folder on processes other than the writer)."""
        return self.staged.path

    @property
    def writer(self) -> bool:
        """Whether this process writes the output (process 0); the others' files are thrown away."""
        return self.staged.writer

    def checkpoint_dir(self, name: str = "ckpt") -> str:
        """``<out>.partial/<name>``, the same folder on every process."""
        return self.staged.checkpoint_dir(name)

    def manifest(self) -> dict:
        if self.expected is None:
            self.expected = make(self.stage, self.cfg, self.inputs)
        return self.expected

    def commit(self, result: Mapping | None = None) -> dict:
        """Writes ``manifest.json`` (with ``result`` and its seconds) last and moves the folder to ``out``.

        On several processes every process calls it; process 0 writes and commits once all have finished, and
        every process returns once the output is in place."""
        extra = {}
        if result is not None and "seconds" in result:
            extra["seconds"] = result["seconds"]
        m = write(self.path, self.manifest(), **extra) if self.writer else {**self.manifest(), **extra}
        self.staged.commit()
        return m

    def __enter__(self) -> StageOutput:
        self.manifest()  # fingerprints of the inputs as they are when the run starts
        self.staged.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.staged.close()
