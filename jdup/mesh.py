"""The device mesh of every stage: a ``("data", "model")`` ``jax.sharding.Mesh`` over every device of every process.

* :func:`make_mesh` builds it from a spec: ``"auto"`` (every device on ``data``), ``"DxM"`` (``data`` x
  ``model``, e.g. ``"2x4"``; ``D * M`` must be the device count), ``"1"`` (one device), or a ready ``Mesh``.
* Rows (batches, per-row inputs) are split over ``data``: :func:`pad_rows` pads a batch to a multiple of the
  ``data`` size (copies of its first row, marked invalid), :func:`put_rows` makes the global arrays.
* Models are replicated over ``data`` and split over ``model`` by the tensor-parallel rules of
  :mod:`jdup.models.sharding` (with ``fsdp=True`` also over ``data``): :func:`put_model` / :func:`put_state`.
* :func:`gather` brings a result back whole, as NumPy, on every process.

Arrays are made with ``jax.make_array_from_callback`` from host data that every process holds, so the same code
runs on one process and on several joined by ``jax.distributed`` (each process then builds only its own shards).
``mesh=None`` everywhere means "the default device, no mesh".
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdup.errors import Invalid
from jdup.models.sharding import DATA, MODEL, state_shardings

AXES = (DATA, MODEL)
log = logging.getLogger("jdup.mesh")

_SPEC = re.compile(r"^\s*(\d+)\s*(?:x\s*(\d+)\s*)?$", re.IGNORECASE)


def make_mesh(spec: str | int | Mesh | None = "auto") -> Mesh:
    """The ``("data", "model")`` mesh named by ``spec``.

    Args:
      spec: ``"auto"`` or None (every device of every process on ``data``); ``"DxM"`` (``D`` x ``M`` devices,
        ``D * M`` = the device count); ``"1"`` or ``1`` (one device: the first local one, one process only); an
        integer or ``"N"`` (the first ``N`` devices on ``data``; on several processes ``N`` must be the device
        count); a ``Mesh`` with axes ``("data", "model")`` (returned as is).

    Raises:
      Invalid: a malformed spec, or sizes that do not match the devices (one line that says what exists).
    """
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise Invalid("mesh", f"a Mesh needs the axes {AXES}", tuple(spec.axis_names))
        return spec
    devices = jax.devices()
    n = len(devices)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        data, model = n, 1
    else:
        m = _SPEC.match(str(spec))
        if not m:
            raise Invalid("mesh", "must be 'auto', '1' or DATAxMODEL such as '2x4'", spec)
        data, model = int(m.group(1)), int(m.group(2) or 1)
        if data < 1 or model < 1:
            raise Invalid("mesh", "sizes must be >= 1", spec)
    if data * model == 1:
        if jax.process_count() > 1:
            raise Invalid(
                "mesh", f"one device, but {jax.process_count()} processes run: use 'auto' or DxM with D*M = {n}", spec
            )
        return Mesh(np.asarray(jax.local_devices()[:1], dtype=object).reshape(1, 1), AXES)
    plain = not isinstance(spec, str) or "x" not in spec.lower()  # "N": N devices on data
    if plain and data < n and jax.process_count() == 1:
        return _check_rng(Mesh(np.asarray(devices[:data], dtype=object).reshape(data, 1), AXES))
    if data * model != n:
        raise Invalid(
            "mesh",
            f"{data}x{model} needs {data * model} devices but {n} are visible ({jax.process_count()} process(es)): "
            f"use 'auto', '1' or DxM with D*M = {n}",
            spec,
        )
    try:  # topology-aware order (TPU ICI rings, hosts); falls back to the plain device order
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, model), devices=devices)
    except Exception:  # noqa: BLE001 - any failure of the optional optimisation
        grid = np.asarray(devices, dtype=object).reshape(data, model)
    return _check_rng(Mesh(grid, AXES))


def _check_rng(mesh: Mesh) -> Mesh:
    """Dropout masks are the same on every mesh only with JAX's partitionable threefry (the default since JAX
    0.5): its bits for a row do not depend on how many rows a (padded) batch has, nor on how they are split."""
    if mesh.shape[DATA] > 1 and not jax.config.jax_threefry_partitionable:
        log.warning("jax_threefry_partitionable is off: dropout masks of padded batches differ from one device's; "
                    "set jax.config.update('jax_threefry_partitionable', True)")
    return mesh


def mesh_record(mesh: Mesh | None) -> dict[str, int]:
    """``{"data": D, "model": M}`` of a mesh (None: one device, ``{"data": 1, "model": 1}``), for records."""
    if mesh is None:
        return {DATA: 1, MODEL: 1}
    return {DATA: int(mesh.shape[DATA]), MODEL: int(mesh.shape[MODEL])}


def data_size(mesh: Mesh | None) -> int:
    """Devices on the ``data`` axis (1 without a mesh): batches are padded to a multiple of it."""
    return 1 if mesh is None else int(mesh.shape[DATA])


def pad_rows(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pads every leaf of ``tree`` along its leading (row) axis to a multiple of ``multiple`` rows.

    The added rows are copies of the first row (a model never sees an all-padding row); in a dict batch of
    :func:`jdup.data.batches`, ``valid`` is False and ``index`` is -1 on them, as on that function's own padding.

    Returns:
      ``(padded_tree, n_real)``: ``n_real`` is the number of rows before padding (drop ``[n_real:]`` of a result).
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return tree, 0
    n = int(np.shape(leaves[0])[0])
    multiple = max(1, int(multiple))
    extra = -n % multiple
    if extra == 0 or n == 0:
        return tree, n

    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[:1], extra, axis=0)], axis=0)

    out = jax.tree.map(pad, tree)
    if isinstance(out, dict):
        if "valid" in out:
            out["valid"][n:] = False
        if "index" in out:
            out["index"][n:] = -1
    return out, n


def put_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array of the host value ``x`` (the same on every process) laid out as ``sharding``: each process
    builds only its own shards (``jax.make_array_from_callback``), so no device ever holds more than its part."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx], dtype=x.dtype)


def row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """``[rows@data, ...]`` (replicated over ``model``) for an ``ndim``-dimensional array."""
    return NamedSharding(mesh, PartitionSpec(DATA, *([None] * (ndim - 1))) if ndim else PartitionSpec())


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def put_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Global arrays of a host batch, split along the leading (row) axis over ``data``.

    Every process passes the same host values (the whole batch); each builds only its own shards. The row count
    must be a multiple of the ``data`` size (:func:`pad_rows`). ``mesh=None``: plain arrays on the default device.

    Raises:
      Invalid: a leaf whose row count the ``data`` axis does not divide.
    """
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    d = data_size(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(row_sharding(mesh, x.ndim), x.ndim):
            return x
        x = np.asarray(x)
        if x.ndim and x.shape[0] % d:
            raise Invalid("rows", f"do not split over a data axis of {d}: pad them with pad_rows", x.shape[0])
        return put_host(x, row_sharding(mesh, x.ndim))

    return jax.tree.map(put, tree)


def put_replicated(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of ``tree`` whole on every device of ``mesh`` (e.g. fitted scorer states); None: unchanged."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _put_leaf(x, replicated(mesh)), tree)


def put(tree: Any, sharding: Any) -> Any:
    """Host or device arrays of ``tree`` laid out as ``sharding`` (one sharding for every leaf, or a matching tree
    of them) on any number of processes (host values must be the same on every process); None: unchanged."""
    if sharding is None:
        return tree
    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda x: _put_leaf(x, sharding), tree)
    return jax.tree.map(_put_leaf, tree, sharding)


def commit(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of ``tree`` not yet spread over the mesh's devices made whole on each of them (e.g. an
    optimizer's step count, made on the default device by ``tx.init``); arrays already on the mesh keep their
    layout. None: unchanged."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _put_leaf(x, replicated(mesh), keep=True), tree)


def _put_leaf(x, sharding: NamedSharding, keep: bool = False):
    """One leaf onto ``sharding`` (typed PRNG keys through their key data); already there (or, with ``keep``,
    already spread over exactly the mesh's devices): unchanged."""
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if keep and x.sharding.device_set == set(sharding.mesh.devices.flat):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = _put_leaf(jax.random.key_data(x), NamedSharding(sharding.mesh, _key_spec(sharding.spec)))
            return jax.random.wrap_key_data(data, impl=impl)
        if jax.process_count() > 1 and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # global -> global: resharded on the devices
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
    elif not hasattr(x, "shape"):
        return x
    return put_host(np.asarray(x), sharding)


def _key_spec(spec: PartitionSpec) -> PartitionSpec:
    return PartitionSpec(*spec, None)  # key data has one trailing dimension


def put_state(state: Any, mesh: Mesh | None, *, fsdp: bool = False, keep: bool = False) -> Any:
    """An ``nnx.State`` (or a tuple of them) placed as :func:`put_model` places a model's; None: unchanged.

    ``keep=True`` leaves alone every array already spread over exactly the mesh's devices, whatever its layout
    (e.g. a model loaded with ``fsdp=True``): the loops use it so a placed model is never moved again."""
    if mesh is None:
        return state
    shardings = state_shardings(state, mesh, fsdp=fsdp)
    return jax.tree.map(lambda x, s: _put_leaf(x, s, keep), state, shardings)


def put_model(model, mesh: Mesh | None, *, fsdp: bool = False):
    """Places a model's state on ``mesh`` (in place; also returns the model).

    Replicated over ``data``; split over ``model`` by :data:`jdup.models.sharding.DEFAULT_RULES` (column- and
    row-parallel kernels, embeddings). ``fsdp=True`` also splits the other dimension over ``data`` (each device
    stores ``1/(D*M)`` of every large matrix). Leaves already in place are not moved; ``mesh=None``: unchanged.
    """
    if mesh is None:
        return model
    from flax import nnx

    nnx.update(model, put_state(nnx.state(model), mesh, fsdp=fsdp))
    return model


@functools.lru_cache(maxsize=8)
def _replicator(mesh: Mesh):
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Device arrays made whole on every device of ``mesh`` (an all-gather on the devices, no host transfer), so
    each process can read them (:func:`gather`) without a collective of its own; None: unchanged."""
    return tree if mesh is None else _replicator(mesh)(tree)


def gather(x: Any) -> Any:
    """A (pytree of) jax arrays as whole NumPy arrays on every process (one transfer for the whole tree)."""
    leaves, treedef = jax.tree.flatten(x)
    local = [i for i, a in enumerate(leaves)
             if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated]
    out = list(leaves)
    got = jax.device_get([leaves[i] for i in local])
    for i, v in zip(local, got, strict=True):
        out[i] = np.asarray(v)
    rest = [i for i in range(len(leaves)) if i not in set(local)]
    if rest:
        from jax.experimental import multihost_utils

        for i, v in zip(rest, multihost_utils.process_allgather([leaves[i] for i in rest], tiled=True),
                        strict=True):
            out[i] = np.asarray(v)
    return jax.tree.unflatten(treedef, out)


__all__ = [
    "AXES",
    "DATA",
    "MODEL",
    "commit",
    "data_size",
    "gather",
    "make_mesh",
    "mesh_record",
    "pad_rows",
    "put",
    "put_host",
    "put_model",
    "put_replicated",
    "put_rows",
    "put_state",
    "replicate",
    "replicated",
    "row_sharding",
]
