"""Sharding rules: where each parameter of a model lives on a 2-D ``jax.sharding.Mesh`` with axes ``("data", "model")``.

The mesh itself, batches and placement are in :mod:`jdup.mesh` (``make_mesh``, ``put_rows``, ``put_model``); this
module holds the rules they apply.

* **Parameters** are split Megatron-style along ``model`` (column-parallel ``q/k/v/gate/up/fc1`` kernels
  ``[in, out@model]``, row-parallel ``o/down/out_proj/fc2`` kernels ``[in@model, out]``, embeddings
  ``[vocab@model, dim]``) and, with ``fsdp=True``, *also* along ``data`` on the other dimension (FSDP / ZeRO-3
  style: each device stores ``1/(data*model)`` of every large matrix; XLA all-gathers it for the matmul). That is
  what lets a 3B model's fp32 weights plus AdamW state (~48 GB) fit on a slice of 16 GB chips. With
  ``fsdp=False`` (what :func:`jdup.mesh.put_model` does by default) parameters are replicated over ``data``.
* Norm scales, biases of row-parallel layers and anything no rule names are replicated. A dimension that the
  mesh axis does not divide is left unsplit, so the rules work for any model size and any mesh.
* LoRA adapters (``jdup.lora.LoRALinear``: ``<layer>.base.kernel``, ``<layer>.lora_a [in, r]``, ``<layer>.lora_b
  [r, out]``) follow their base kernel: ``lora_a`` is split like the kernel's input dim, ``lora_b`` like its
  output dim.

The model code is mesh-agnostic: with sharded parameters and batch, ``jax.jit`` (GSPMD) propagates the layout
through the forward and backward pass, so the same code runs on 1 device, 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), several hosts joined by ``jax.distributed`` and a TPU
slice. :func:`jdup.models.from_pretrained` (``mesh=``) puts each checkpoint tensor straight into its shard under
these rules, so a stage can load a 3B decoder over a ``model`` axis without ever holding a full copy on one device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
MODEL = "model"

# logical names used in the rules: "fsdp" -> DATA when fsdp=True (else unsplit), "tp" -> MODEL
_COLUMN = r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|query|key|value|intermediate)"
_ROW = r"(^|\.)(o_proj|down_proj|out_proj|fc2|dense|output)"

#: ``(regex on the dotted parameter path, logical spec per dimension)``; the first match wins.
DEFAULT_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (_COLUMN + r"(\.base)?\.kernel$", ("fsdp", "tp")),
    (_ROW + r"(\.base)?\.kernel$", ("tp", "fsdp")),
    (_COLUMN + r"(\.base)?\.bias$", ("tp",)),
    (r"(^|\.)(embed_tokens|shared|word_embeddings)\.embedding$", ("tp", "fsdp")),
    (r"^(score|classifier)(\.base)?\.kernel$", ("fsdp", None)),
)


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def _logical_spec(path: str, ndim: int, rules) -> tuple[str | None, ...]:
    lora = re.search(r"\.(lora_a|lora_b)$", path)
    if (
        lora
    ):  # follow the base kernel's split: lora_a [in, r] like its in-dim, lora_b [r, out] like its out-dim
        base = path[: lora.start()] + ".base.kernel"
        k = _logical_spec(base, 2, rules)
        return (k[0], None) if lora.group(1) == "lora_a" else (None, k[1])
    for rx, spec in rules:
        if re.search(rx, path) and len(spec) == ndim:
            return spec
    return (None,) * ndim


def param_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    fsdp: bool = True,
    rules=DEFAULT_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` of one parameter.

    Args:
      path: dotted NNX path (``model.layers.3.self_attn.q_proj.kernel``).
      shape: its shape.
      mesh: the mesh (axis sizes decide divisibility).
      fsdp: also split along ``data`` (FSDP); False keeps parameters replicated across ``data``.
      rules: ``(regex, logical spec)`` table, see :data:`DEFAULT_RULES`.

    Returns:
      A spec naming mesh axes; a dimension the axis size does not divide (or of an axis of size 1) is unsplit.
    """
    axes = {"fsdp": DATA if fsdp else None, "tp": MODEL, None: None}
    out = []
    for dim, logical in zip(shape, _logical_spec(path, len(shape), rules), strict=True):
        axis = axes[logical]
        size = mesh.shape[axis] if axis is not None else 1
        out.append(axis if axis is not None and size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(state, mesh: Mesh, *, fsdp: bool = True, rules=DEFAULT_RULES):
    """A pytree of ``NamedSharding`` matching ``state`` (an ``nnx.State``, concrete or abstract)."""

    def one(path, leaf):
        return NamedSharding(mesh, param_spec(_path_str(path), leaf.shape, mesh, fsdp=fsdp, rules=rules))

    return jax.tree_util.tree_map_with_path(one, state)


def init_sharded(build: Callable[[], nnx.Module], mesh: Mesh, *, fsdp: bool = True, rules=DEFAULT_RULES):
    """Initialise a model directly into its sharded layout (no device ever holds the full model).

    Args:
      build: zero-argument constructor, e.g. ``lambda: decoder.build(cfg, rngs=nnx.Rngs(0))``.
      mesh: target mesh.

    Returns:
      The model with sharded parameters.
    """
    abstract = nnx.eval_shape(build)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, fsdp=fsdp, rules=rules)
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def describe(model_or_state, mesh: Mesh | None = None) -> dict[str, str]:
    """``{path: "PartitionSpec(...)"}`` of a model's current parameter shardings (for logs and tests)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        sh = getattr(leaf, "sharding", None)
        out[_path_str(path)] = str(getattr(sh, "spec", sh))
    return out


def per_device_bytes(state, mesh: Mesh, *, fsdp: bool = True, rules=DEFAULT_RULES) -> int:
    """Bytes of ``state`` (abstract is fine) each device stores under these rules (parameters only)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = param_spec(_path_str(path), leaf.shape, mesh, fsdp=fsdp, rules=rules)
        n = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for axis in spec:
            if axis is not None:
                n //= mesh.shape[axis]
        total += n
    return total
