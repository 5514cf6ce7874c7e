"""The one batch loop of jdup (predictions and features) and the logits of a classifier, jitted and length-bucketed.

:func:`run_batches` is the loop every inference pass goes through: logits (:func:`predict`, :func:`predict_states`)
and the detection passes of :mod:`jdup.features` (pooled hidden states, per-row scores). Dispatch is asynchronous:
every batch is queued on the device(s) while the host prepares the next one, the results stay on the device, and
they come back to the host in one transfer at the end (the host blocks once). With a device mesh
(:mod:`jdup.mesh`) each batch is padded to a multiple of the ``data`` axis, its rows are split over ``data``, the
model is replicated over ``data`` (and split over ``model``), and the per-row outputs come back whole on every
process, padding dropped; the results do not depend on the mesh (up to float rounding).

Every stage that needs plain logits (victim evaluation in training, the UPGP perturbation's stop rule and
sensitivity scores, unlearning's teacher logits and evaluations) goes through :func:`predict` (a whole model) or
:func:`predict_states` (a split model ``(graphdef, *states)``, e.g. a LoRA student's trainable and frozen parts).

The forward is one ``jax.jit`` function keyed on the graph definition, so it compiles once per model structure
and padded length, and is shared by all callers in a process. Rows are sorted by length into fixed-size batches
(:func:`jdup.data.batches`) padded to the fine inference lengths that enough rows use
(:func:`jdup.data.for_inference`), dropout is off, a [CLS]-head encoder computes its last layer at [CLS] only,
and the logits come back as float32 NumPy in dataset order.

:data:`MODEL_INPUTS` is the one tuple of batch keys a jdup model's forward takes positionally;
:func:`model_inputs` takes them out of a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import aot
from jdup import data as D
from jdup import mesh as mesh_lib
from jdup.models.common import CLS_TRIM_ARCHS

#: A fine padded length is compiled only when at least this many rows of a pass use it (else they pad further):
#: see :func:`jdup.data.for_inference`.
MIN_BUCKET_ROWS = 128

#: The batch keys passed (in this order) to a jdup classifier's forward.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The :data:`MODEL_INPUTS` entries of a batch (a new dict, same arrays)."""
    return {k: batch[k] for k in MODEL_INPUTS}


def run_batches(
    fn: Callable[[dict], dict],
    batches: Iterable[dict],
    n_rows: int,
    *,
    mesh=None,
    desc: str = "batches",
    total: int | None = None,
    progress: bool = False,
    max_ahead: int = 64,
) -> dict[str, np.ndarray]:
    """Runs ``fn`` on every batch and scatters its per-row outputs back to row order by ``batch["index"]``.

    Args:
      fn: ``fn(inputs) -> {name: [B, ...] array}``; ``inputs`` holds the :data:`MODEL_INPUTS` of a batch as
        device arrays (split over the mesh's ``data`` axis). Typically a closure over a jitted function and the
        model state (placed on the same mesh: :func:`jdup.mesh.put_model`).
      batches: dicts of :func:`jdup.data.batches` (``index``, ``valid`` and the model inputs).
      n_rows: rows of the output (the dataset size).
      mesh: a :mod:`jdup.mesh` mesh or None (the default device). Batches are padded to a multiple of its
        ``data`` axis (copies of their first row, dropped from the outputs).
      desc, total, progress: a tqdm bar (it follows dispatch, not completion).
      max_ahead: the host waits (without transferring anything) when it is more than this many batches ahead of
        the device, which bounds the memory of queued inputs.

    Returns:
      ``{name: array [n_rows, ...]}`` as NumPy, whole on every process; only rows with ``valid`` are written.
    """
    from tqdm.auto import tqdm

    d = mesh_lib.data_size(mesh)
    many = mesh is not None and jax.process_count() > 1
    pending: list = []
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        padded, _ = mesh_lib.pad_rows({k: batch[k] for k in (*MODEL_INPUTS, "index", "valid")}, d)
        res = fn(mesh_lib.put_rows(model_inputs(padded), mesh))
        if many:  # whole on every device, so every process reads its own copy at the end
            res = mesh_lib.replicate(res, mesh)
        pending.append((padded["index"], padded["valid"], res))
        if max_ahead and len(pending) > max_ahead:
            jax.block_until_ready(pending[-max_ahead - 1][2])
    results = mesh_lib.gather([r for _, _, r in pending])  # one transfer for the whole pass
    out: dict[str, np.ndarray] = {}
    for (index, valid, _), res in zip(pending, results, strict=True):
        for k, v in res.items():
            if k not in out:
                out[k] = np.zeros((n_rows,) + v.shape[1:], v.dtype)
            out[k][index[valid]] = v[valid]
    return out


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, states: tuple, input_ids, attention_mask, token_type_ids):
    model = nnx.merge(graphdef, *states)
    # a [CLS]-head encoder needs only position 0 of its last layer (exact; about 1/num_layers less work)
    trim = getattr(getattr(model, "config", None), "arch", None) in CLS_TRIM_ARCHS
    out = model(input_ids, attention_mask, token_type_ids, deterministic=True,
                **({"last_layer_positions": "cls"} if trim else {}))
    return out.logits.astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _kept_logits(graphdef):
    """:func:`_forward_logits` with its executables kept across processes (:func:`jdup.aot.keep_compiled`)."""
    return aot.keep_compiled(_forward_logits, lambda: f"predict.logits {aot.stable_repr(graphdef)}", (0,))


def predict_states(
    graphdef,
    states: tuple,
    encoded: D.Encoded,
    batch_size: int = 64,
    *,
    mesh=None,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Logits ``float32 [N, num_labels]`` in dataset order, from a split model ``(graphdef, *states)``.

    Args:
      graphdef: the model's graph definition (from ``nnx.split``).
      states: the states that ``nnx.merge(graphdef, *states)`` needs, e.g. ``(params, rest)`` or
        ``(trainable, frozen)``.
      encoded: tokenised rows (:func:`jdup.data.encode`).
      batch_size: rows per forward pass (fixed; the last batch is padded).
      mesh: a :mod:`jdup.mesh` mesh (rows split over ``data``; states not yet on it are placed by
        :func:`jdup.mesh.put_state`) or None (the default device).
      progress: show a tqdm bar.
      desc: its label.
    """
    states = mesh_lib.put_state(tuple(states), mesh, keep=True)
    # rows sorted by length and padded to fine buckets: ~1.15x the real tokens on SST-2 instead of ~1.6x
    encoded = D.for_inference(encoded, max(MIN_BUCKET_ROWS, 2 * batch_size))
    got = run_batches(
        lambda inputs: {"logits": _kept_logits(graphdef)(graphdef, states, *(inputs[k] for k in MODEL_INPUTS))},
        D.batches(encoded, batch_size, sort_by_length=True),
        len(encoded),
        mesh=mesh,
        desc=desc,
        total=D.num_batches(len(encoded), batch_size),
        progress=progress,
    )
    return got.get("logits", np.zeros((0, 0), np.float32))


def predict(
    model: nnx.Module,
    encoded: D.Encoded,
    batch_size: int = 64,
    *,
    mesh=None,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Logits of ``model`` on every row of ``encoded`` (jitted, length-bucketed, dropout off).

    The model is split as ``(graphdef, params, rest)``, the same structure victim training uses, so evaluation
    inside training and a later prediction share compiled code.

    Returns:
      ``float32 [N, num_labels]`` NumPy logits in the order of ``encoded``.
    """
    graphdef, *states = nnx.split(model, nnx.Param, ...)
    return predict_states(graphdef, tuple(states), encoded, batch_size, mesh=mesh, progress=progress, desc=desc)


__all__ = ["MODEL_INPUTS", "model_inputs", "predict", "predict_states", "run_batches"]
