"""Resumable-loop checkpoints on top of ``orbax.checkpoint.CheckpointManager``.

A loop state is any pytree (NNX ``State`` of parameters, an optax state, numpy copies of the best weights...)
plus a small JSON-able ``meta`` dict (step, epoch, best score, a config fingerprint...). The pytree is saved as a
flat ``{"000000": leaf, ...}`` dict, so no custom pytree node (optax ``NamedTuple`` s, empty states, NNX
containers) ever reaches orbax; restoring rebuilds the tree from a *template* of the same structure (the freshly
initialised state of the loop), and checks every leaf's shape and dtype.

Pitfalls handled here (orbax-checkpoint 0.12.8): the directory is made absolute; saves are synchronous by default
(``async_save=False``), so a donated buffer is never read after the step that donated it; each step is written
under its own folder by the manager (no "already exists" errors); a failed read becomes a :class:`JdupError`.

Example::

    with Checkpointer(out / "ckpt", max_to_keep=2) as ck:
        if ck.latest_step() is not None:
            state, meta = ck.restore(template_state)
        ...
        ck.save(step, state, {"step": step, "epoch": epoch})
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from jdup import atomic
from jdup.errors import JdupError


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (e.g. the settings that must match to resume)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(tree: Any) -> tuple[dict[str, Any], list[str], Any]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {f"{i:06d}": leaf for i, (_, leaf) in enumerate(leaves_with_path)}
    names = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    return flat, names, treedef


def _abstract(leaf: Any) -> Any:
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
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001
            raise JdupError(f"cannot open the checkpoint folder ({type(e).__name__}: {e})", self.directory) from e

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, tree: Any, meta: dict | None = None) -> None:
        """Save ``tree`` (any pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``."""
        flat, names, _ = _flat(tree)
        meta = dict(meta or {})
        meta["_leaves"] = names
        meta["_shapes"] = [[list(np.shape(v)), str(np.asarray(v).dtype) if not isinstance(v, jax.Array)
                            else str(v.dtype)] for v in flat.values()]
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(flat), meta=self._ocp.args.JsonSave(meta))
        with atomic.deferred_interrupt():  # Ctrl-C lands after the step is fully on disk
            self._mngr.save(int(step), args=args, force=True)
            if not self._async:
                self._mngr.wait_until_finished()

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
            raise JdupError("no checkpoint to restore", self.directory)
        where = os.path.join(self.directory, str(step))
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
        tree = jax.tree_util.tree_unflatten(treedef, [state[k] for k in flat])
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
