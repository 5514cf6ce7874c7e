"""The one prediction loop of jdup: logits of a classifier on tokenised rows, jitted and length-bucketed.

Every stage that needs plain logits (victim evaluation in training, the UPGP perturbation's stop rule and
sensitivity scores, unlearning's teacher logits and evaluations) goes through :func:`predict` (a whole model) or
:func:`predict_states` (a split model ``(graphdef, *states)``, e.g. a LoRA student's trainable and frozen parts).
Detection passes that also need hidden states use :mod:`jdup.features` instead.

The forward is one ``jax.jit`` function keyed on the graph definition, so it compiles once per model structure
and padded length, and is shared by all callers in a process. Rows are sorted by length into fixed-size batches
(:func:`jdup.data.batches`) padded to the fine inference lengths that enough rows use
(:func:`jdup.data.for_inference`), dropout is off, a [CLS]-head encoder computes its last layer at [CLS] only,
and the logits come back as float32 NumPy in dataset order.

:data:`MODEL_INPUTS` is the one tuple of batch keys a jdup model's forward takes positionally.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import data as D
from jdup.models.common import CLS_TRIM_ARCHS

#: A fine padded length is compiled only when at least this many rows of a pass use it (else they pad further):
#: see :func:`jdup.data.for_inference`.
MIN_BUCKET_ROWS = 128

#: The batch keys passed (in this order) to a jdup classifier's forward.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The :data:`MODEL_INPUTS` entries of a batch (a new dict, same arrays)."""
    return {k: batch[k] for k in MODEL_INPUTS}


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, states: tuple, input_ids, attention_mask, token_type_ids):
    model = nnx.merge(graphdef, *states)
    # a [CLS]-head encoder needs only position 0 of its last layer (exact; about 1/num_layers less work)
    trim = getattr(getattr(model, "config", None), "arch", None) in CLS_TRIM_ARCHS
    out = model(input_ids, attention_mask, token_type_ids, deterministic=True,
                **({"last_layer_positions": "cls"} if trim else {}))
    return out.logits.astype(jnp.float32)


def predict_states(
    graphdef,
    states: tuple,
    encoded: D.Encoded,
    batch_size: int = 64,
    *,
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
      progress: show a tqdm bar.
      desc: its label.
    """
    from tqdm.auto import tqdm

    states = tuple(states)
    n = len(encoded)
    out = None
    # rows sorted by length and padded to fine buckets: ~1.15x the real tokens on SST-2 instead of ~1.6x
    encoded = D.for_inference(encoded, max(MIN_BUCKET_ROWS, 2 * batch_size))
    it = D.batches(encoded, batch_size, sort_by_length=True)
    for b in tqdm(it, total=D.num_batches(n, batch_size), desc=desc, disable=not progress, leave=False):
        logits = np.asarray(_forward_logits(graphdef, states, *(b[k] for k in MODEL_INPUTS)))
        if out is None:
            out = np.zeros((n, logits.shape[-1]), np.float32)
        out[b["index"][b["valid"]]] = logits[b["valid"]]
    return out if out is not None else np.zeros((0, 0), np.float32)


def predict(
    model: nnx.Module,
    encoded: D.Encoded,
    batch_size: int = 64,
    *,
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
    return predict_states(graphdef, tuple(states), encoded, batch_size, progress=progress, desc=desc)


__all__ = ["MODEL_INPUTS", "model_inputs", "predict", "predict_states"]
