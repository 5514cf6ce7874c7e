"""Resumable-loop checkpoints on top of ``orbax.checkpoint.CheckpointManager``.

A loop state is any pytree (NNX ``State`` of parameters, an optax state, numpy copies of the best weights...)
plus a small JSON-able ``meta`` dict (step, epoch, best score, a config fingerprint...). The pytree is saved as a
flat ``{"000000": leaf, ...}`` dict, so no custom pytree node (optax ``NamedTuple`` s, empty states, NNX
containers) ever reaches orbax; restoring rebuilds the tree from a *template* of the same structure (the freshly
initialised state of the loop), and checks every leaf's shape and dtype.

Pitfalls handled here (orbax-checkpoint 0.12.8): the directory is made absolute; saves are synchronous by default
(``async_save=False``), so a donated buffer is never read after the step that donated it; each step is written
under its own folder by the manager (no "already exists" errors); a failed read becomes a :class:`JdupError`.

Several processes (:mod:`jdup.distributed`): every process creates the :class:`Checkpointer` and calls every
method in the same order (orbax's manager synchronises them). Arrays sharded over a global mesh are saved as they
are (each process writes its shards: the folder must be on a disk every process sees); arrays every process holds
in full on its own devices (host-local: orbax refuses them on several processes) are saved from process 0 as NumPy
arrays and put back on the template's devices when restored. :meth:`Checkpointer.latest_step` is process 0's view,
so every process resumes from the same step. Only process 0 creates the folder. On a process other than the writer,
a folder inside the stage's private scratch folder (:class:`jdup.atomic.StagedDir`) stands for the shared one of
the same name (``<out>.partial/<name>``). Ctrl-C and a failure of another process are acted on before and after each
save (:func:`jdup.distributed.stop_point`); a save itself is never cut half-way.

Example::

    with Checkpointer(out / "ckpt", max_to_keep=2) as ck:
        if ck.latest_step() is not None:
            state, meta = ck.restore(template_state)
        ...
        ck.save(step, state, {"step": step, "epoch": epoch})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jdup import atomic, distributed
from jdup.errors import JdupError


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a resumable loop (:func:`jdup.train.train`, :func:`jdup.unlearn.unlearn`) keeps its checkpoints, and
    what else must match to resume from them.

    Attributes:
      directory: orbax checkpoint folder (created; a run resumes from its newest step).
      identity: JSON-able facts a checkpoint must have been written with besides the algorithm's settings and
        set sizes (e.g. the fingerprints of the input files). Training: a mismatch is an error; unlearning: the
        run starts over.
      max_to_keep: step folders kept (``None``: the loop's own, 2 for training, 1 for unlearning).
    """

    directory: str
    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_to_keep: int | None = None


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (e.g. the settings that must match to resume)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(tree: Any) -> tuple[dict[str, Any], list[str], Any]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {f"{i:06d}": leaf for i, (_, leaf) in enumerate(leaves_with_path)}
    names = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    return flat, names, treedef


def _host_local(leaf: Any) -> bool:
    """A jax.Array held in full by this process alone while several processes run (orbax cannot save those)."""
    return isinstance(leaf, jax.Array) and jax.process_count() > 1 and leaf.is_fully_addressable


def _savable(leaf: Any) -> Any:
    return np.asarray(jax.device_get(leaf)) if _host_local(leaf) else leaf


def _abstract(leaf: Any) -> Any:
    if _host_local(leaf):
        return np.empty(leaf.shape, leaf.dtype)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, np.ndarray | np.generic):
        return np.empty(np.shape(leaf), np.asarray(leaf).dtype)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    arr = np.asarray(leaf)
    return np.empty(arr.shape, arr.dtype)


class Checkpointer:
    """Numbered checkpoints of ``(pytree, meta)`` in one folder; keeps the newest ``max_to_keep``.

    Args:
      directory: checkpoint folder (made absolute and created).
      max_to_keep: how many step folders to keep.
      async_save: let orbax write in a background thread (call :meth:`wait` / :meth:`close` before reading).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._async = async_save
        self.directory = os.path.abspath(os.fspath(directory))
        self._where = atomic.shared_path(self.directory)  # the folder orbax uses (the same on every process)
        if distributed.is_writer():
            os.makedirs(self._where, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        try:
            self._mngr = ocp.CheckpointManager(self._where, options=options)
        except Exception as e:  # noqa: BLE001
            raise JdupError(f"cannot open the checkpoint folder ({type(e).__name__}: {e})", self.directory) from e

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None (process 0's answer on every process)."""
        return distributed.broadcast(self._mngr.latest_step() if distributed.is_writer() else None)

    def all_steps(self) -> list[int]:
        return distributed.broadcast(list(self._mngr.all_steps()) if distributed.is_writer() else None)

    def save(self, step: int, tree: Any, meta: dict | None = None) -> None:
        """Save ``tree`` (any pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``."""
        distributed.stop_point()  # a Ctrl-C or a failed process: stop before writing
        flat, names, _ = _flat(tree)
        flat = {k: _savable(v) for k, v in flat.items()}
        meta = dict(meta or {})
        meta["_leaves"] = names
        meta["_shapes"] = [[list(np.shape(v)), str(np.asarray(v).dtype) if not isinstance(v, jax.Array)
                            else str(v.dtype)] for v in flat.values()]
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(flat), meta=self._ocp.args.JsonSave(meta))
        with distributed.deferred_interrupt():  # Ctrl-C lands after the step is fully on disk
            self._mngr.save(int(step), args=args, force=True)
            if not self._async:
                self._mngr.wait_until_finished()
        distributed.stop_point()  # the step is on disk: a Ctrl-C held back (or swallowed earlier) stops here

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Load checkpoint ``step`` (default: the latest) into the structure of ``template``.

        Args:
          template: a pytree with the same structure, shapes and dtypes as the one saved (jax leaves come back
            as jax arrays with the template's sharding, numpy leaves as numpy).
          step: which checkpoint.

        Returns:
          ``(tree, meta)``.

        Raises:
          JdupError: no checkpoint, unreadable files, or a structure / shape mismatch (e.g. a different model).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise JdupError("no checkpoint to restore", self._where)
        where = os.path.join(self._where, str(step))
        ocp = self._ocp
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise JdupError(f"cannot read checkpoint metadata ({type(e).__name__}: {e})", where) from e
        flat, names, treedef = _flat(template)
        saved = meta.get("_leaves")
        if saved is not None and saved != names:
            diff = next((f"{a} != {b}" for a, b in zip(saved, names, strict=False) if a != b),
                        f"{len(saved)} leaves saved, {len(names)} expected")
            raise JdupError(f"checkpoint does not match this model/optimizer (first difference: {diff}); delete "
                            "the folder or use a new output folder", where)
        for (key, leaf), shape in zip(flat.items(), meta.get("_shapes", [None] * len(flat)), strict=False):
            if shape is not None and list(np.shape(leaf)) != shape[0]:
                raise JdupError(f"checkpoint leaf {names[int(key)]} has shape {shape[0]}, expected "
                                f"{list(np.shape(leaf))}", where)
        abstract = {k: _abstract(v) for k, v in flat.items()}
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001
            raise JdupError(f"cannot read checkpoint arrays ({type(e).__name__}: {e})", where) from e
        state = out["state"]
        leaves = [jax.device_put(state[k], v.sharding) if _host_local(v) else state[k] for k, v in flat.items()]
        tree = jax.tree_util.tree_unflatten(treedef, leaves)
        meta = {k: v for k, v in meta.items() if k not in ("_leaves", "_shapes")}
        return tree, meta

    def wait(self) -> None:
        """Block until pending (async) saves are on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
