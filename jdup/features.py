"""Pooled per-layer hidden states (DUP's "representations") in one jitted forward pass per batch.

A feature row of a sample is ``[L, D]``: one pooled vector per transformer layer, in Hugging Face order with the
embedding output dropped (slot ``l`` = ``hidden_states[l + 1]``). Pooling (docs/dup-method.md §2.2):

* ``"cls"``: the first position (BERT / RoBERTa [CLS] / <s>);
* ``"last_token"``: the last real token, found from the attention mask (right *or* left padding), as DUP does
  for decoder LMs; the last slot of a decoder is after the final norm (Hugging Face convention, which DUP uses);
* ``"mean"``: mean over real tokens (mask-weighted);
* ``"mean_unmasked"``: mean over all positions, padding included: DUP's BART pooling (``faithful_bart``). Such
  features depend on the padded length; jdup pads to a length bucket, DUP to the longest row of its batch.

BART uses ``encoder_hidden_states[1:] + hidden_states[1:]`` (encoder layers, then decoder layers).

For ``"cls"`` pooling on an encoder (BERT / RoBERTa), the pass calls the model with
``last_layer_positions="cls"``: the last layer computes only the [CLS] row (its attention still reads every
position), which is all that the last feature slot and the logits need. The features are the same (to float32
rounding) and about ``1/L`` of the forward work is saved.

The per-example pooling functions are vmapped over the batch. :func:`make_batch_fn` builds the function of a
detection pass (run over the batches by the one batch loop, :func:`jdup.predict.run_batches`): ``fn(model_state, batch, aux) -> dict of arrays``, running the model once (one jitted forward,
shared by every pass over the same model) and handing the
pooled features ``[B, L, D]`` (float32) and logits to a ``head`` callback (e.g. the scorers), so a pass can keep
only per-row scalars. The model is split once (``nnx.split``) and its state is an argument, not a constant.
Batches come from :func:`jdup.data.batches` (fixed batch size, bucketed lengths), so the forward compiles at most
once per length bucket (shared by all passes over the same model) and the head once per batch size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import aot
from jdup import mesh as mesh_lib
from jdup import predict as predict_lib
from jdup.models.common import CLS_TRIM_ARCHS, Output
from jdup.settings import POOLINGS

Array = jax.Array
#: Archs whose forward takes ``token_type_ids``.
TOKEN_TYPE_ARCHS = ("bert", "roberta")
_DEFAULT_POOLING = {
    "bert": "cls",
    "roberta": "cls",
    "llama": "last_token",
    "qwen2": "last_token",
    "bart": "mean",
}


def default_pooling(arch: str, faithful_bart: bool = False) -> str:
    """DUP's pooling for an arch: CLS for encoders, last token for decoders, mean for BART.

    ``faithful_bart`` selects DUP's unmasked mean for BART (padding included); the default is a masked mean.
    """
    if arch == "bart":
        return "mean_unmasked" if faithful_bart else "mean"
    if arch in _DEFAULT_POOLING:
        return _DEFAULT_POOLING[arch]
    try:
        from jdup.models import registry

        return registry.get(arch).feature_pooling
    except KeyError:
        return "cls"


def resolve_pooling(pooling: str, arch: str, faithful_bart: bool = False) -> str:
    """``"auto"`` -> :func:`default_pooling`; anything else is checked against :data:`POOLINGS`."""
    if pooling in (None, "", "auto"):
        return default_pooling(arch, faithful_bart)
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; use auto or one of {POOLINGS}")
    return pooling


# ---------------------------------------------------------------------------------------------------------------
# Per-example pooling


def last_index(mask: Array) -> Array:
    """Position of the last 1 in a ``[T]`` mask (right or left padding); 0 for an all-zero mask."""
    t = mask.shape[0]
    return jnp.where(jnp.any(mask > 0), t - 1 - jnp.argmax(mask[::-1] > 0), 0)


def pool_one(h: Array, mask: Array, pooling: str) -> Array:
    """Pools one sample's ``[T, D]`` hidden states with its ``[T]`` attention mask to ``[D]``."""
    if pooling == "cls":
        return h[0]
    if pooling == "last_token":
        return h[last_index(mask)]
    if pooling == "mean":
        w = mask.astype(h.dtype)
        return jnp.sum(h * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1)
    if pooling == "mean_unmasked":
        return jnp.mean(h, axis=0)
    raise ValueError(f"unknown pooling {pooling!r}")


def layer_states(out: Output, arch: str) -> tuple[Array, ...]:
    """The ``L`` per-layer hidden states DUP uses (embedding outputs dropped; BART: encoder then decoder)."""
    if out.hidden_states is None:
        raise ValueError("the model returned no hidden states (call it with output_hidden_states=True)")
    if arch == "bart" or out.encoder_hidden_states is not None:
        enc = out.encoder_hidden_states or ()
        return tuple(enc[1:]) + tuple(out.hidden_states[1:])
    return tuple(out.hidden_states[1:])




def model_call_kwargs(arch: str, pooling: str, trim_last_layer: bool = True) -> dict:
    """Extra keyword arguments of the feature forward: ``last_layer_positions="cls"`` when only the [CLS] row of
    the last layer is used (encoder + ``"cls"`` pooling), else none."""
    if trim_last_layer and pooling == "cls" and arch in CLS_TRIM_ARCHS:
        return {"last_layer_positions": "cls"}
    return {}


def pooled_features(out: Output, attention_mask: Array, arch: str, pooling: str) -> Array:
    """``[B, L, D]`` float32 pooled features of a model output."""
    pool = jax.vmap(lambda h, m: pool_one(h, m, pooling))
    feats = [pool(h, attention_mask) for h in layer_states(out, arch)]
    return jnp.stack(feats, axis=1).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# One jitted pass


Head = Callable[[Array, Array, dict, Any], dict]


def features_head(feats: Array, logits: Array, batch: dict, aux: Any) -> dict:
    """A :data:`Head` that keeps the pooled features and logits (for the small calibration pass)."""
    return {"features": feats, "logits": logits}


def make_batch_fn(
    model: nnx.Module,
    head: Head = features_head,
    *,
    pooling: str = "auto",
    faithful_bart: bool = False,
    head_key: Hashable | None = None,
    trim_last_layer: bool = True,
    mesh=None,
) -> tuple[Callable[[Any, dict, Any], dict], Any]:
    """Builds the per-batch function of a pass: a jitted forward, then a jitted head.

    The forward (model + pooling) is compiled once per model structure, pooling and padded length, and shared by
    every pass over the same model (the calibration pass and the scoring pass compile it once per bucket, not
    twice). The head sees only ``[B, ...]`` arrays, so it compiles once per batch size, whatever the bucket.

    Args:
      model: a jdup classifier (``model.config.arch`` picks the layers and the default pooling).
      head: ``(features [B, L, D], logits [B, C], batch, aux) -> dict of [B, ...] arrays``, jitted (e.g.
        Mahalanobis and spectral scores of the batch, so only scalars leave the device); ``batch`` is
        ``{"lengths": int32 [B]}`` (real tokens per row).
      pooling: ``"auto"`` or one of :data:`POOLINGS`.
      faithful_bart: BART only, DUP's unmasked mean when ``pooling="auto"``.
      head_key: a hashable name for ``head`` (its behaviour must depend only on this key). With a key, the
        jitted head is cached per key, so repeated detections reuse compiled code; without one a fresh head
        function is traced (the forward is cached either way).
      trim_last_layer: with ``"cls"`` pooling on an encoder, compute the last layer at position 0 only (see
        :func:`model_call_kwargs`); False runs the full last layer.
      mesh: a :mod:`jdup.mesh` mesh: the returned state is placed on it (:func:`jdup.mesh.put_state`; arrays
        already on the mesh stay where they are). Put ``aux`` on it too (:func:`jdup.mesh.put_replicated`).

    Returns:
      ``(fn, state)``: call ``fn(state, batch, aux)``; ``batch`` holds ``input_ids``, ``attention_mask`` and
      (encoders) ``token_type_ids``; ``aux`` is any pytree (e.g. fitted scorer states). Results are device
      arrays, dispatched asynchronously; :func:`jdup.predict.run_batches` runs a pass.
    """
    arch = model.config.arch
    how = resolve_pooling(pooling, arch, faithful_bart)
    graphdef, state = nnx.split(model)
    state = mesh_lib.put_state(state, mesh, keep=True)
    call_kw = tuple(sorted(model_call_kwargs(arch, how, trim_last_layer).items()))
    fwd = _cached(
        ("forward", graphdef, arch, how, call_kw), lambda: _forward_fn(graphdef, arch, how, call_kw)
    )
    if head is features_head:

        def fn(state, batch: dict, aux: Any) -> dict:
            feats, logits, _ = fwd(state, batch)
            return {"features": feats, "logits": logits}

        return fn, state
    hfn = head_fn(head, head_key)

    def fn(state, batch: dict, aux: Any) -> dict:
        feats, logits, lengths = fwd(state, batch)
        return hfn(feats, logits, {"lengths": lengths}, aux)

    return fn, state


def head_fn(head: Head, head_key: Hashable | None = None) -> Callable:
    """The jitted ``head`` (cached per ``head_key`` when given, see :func:`make_batch_fn`)."""
    return jax.jit(head) if head_key is None else _cached(("head", head_key), lambda: jax.jit(head))


def apply_head(
    head: Head, head_key: Hashable | None, features: np.ndarray, logits: np.ndarray, lengths: np.ndarray, aux: Any,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """``head`` on features already extracted (``[N, L, D]``, with the rows' ``[N, C]`` logits and ``[N]`` real
    lengths), in blocks of ``batch_size`` rows (the last one padded with copies of its first row), so it runs the
    executable the passes of :func:`make_batch_fn` compiled for that batch size. Returns ``{name: [N, ...]}`` as
    NumPy. Used for rows whose features a calibration pass already holds (the scoring pass skips them)."""
    hfn = head_fn(head, head_key)
    n = len(features)
    out: dict[str, np.ndarray] = {}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        got = hfn(jnp.asarray(features[pad], jnp.float32), jnp.asarray(logits[pad], jnp.float32),
                  {"lengths": jnp.asarray(lengths[pad], jnp.int32)}, aux)
        for k, v in got.items():
            v = np.asarray(v)[: len(idx)]
            if k not in out:
                out[k] = np.zeros((n,) + v.shape[1:], v.dtype)
            out[k][idx] = v
    return out


def _forward_fn(graphdef, arch: str, how: str, call_kw: tuple) -> Callable:
    """Jitted ``(state, batch) -> (features [B, L, D] f32, logits [B, C] f32, lengths [B] int32)``."""
    use_tt = arch in TOKEN_TYPE_ARCHS
    kw = dict(call_kw)

    def fwd(state, batch: dict):
        m = nnx.merge(graphdef, state)
        tt = batch.get("token_type_ids") if use_tt else None
        mask = batch["attention_mask"]
        out = m(batch["input_ids"], mask, tt, output_hidden_states=True, deterministic=True, **kw)
        feats = pooled_features(out, mask, arch, how)
        return feats, out.logits.astype(jnp.float32), jnp.sum(mask != 0, axis=-1).astype(jnp.int32)

    # executables kept across processes (a repeated `jdup detect` neither traces nor lowers the forward again)
    return aot.keep_compiled(
        jax.jit(fwd), lambda: f"features.forward {aot.stable_repr(graphdef)} {arch} {how} {call_kw}"
    )


def _cached(key: Hashable, make: Callable[[], Callable]) -> Callable:
    """LRU cache of jitted functions (at most ``_FN_CACHE_SIZE``)."""
    if key in _FN_CACHE:
        _FN_CACHE.move_to_end(key)
        return _FN_CACHE[key]
    fn = _FN_CACHE[key] = make()
    while len(_FN_CACHE) > _FN_CACHE_SIZE:
        _FN_CACHE.popitem(last=False)
    return fn


_FN_CACHE: OrderedDict = OrderedDict()
_FN_CACHE_SIZE = 16



def extract_features(
    model: nnx.Module,
    encoded,
    batch_size: int = 32,
    *,
    pooling: str = "auto",
    faithful_bart: bool = False,
    progress: bool = True,
    trim_last_layer: bool = True,
    mesh=None,
) -> dict[str, np.ndarray]:
    """Pooled features ``[N, L, D]`` and logits ``[N, C]`` of every row of ``encoded`` (a :class:`jdup.data.Encoded`).

    Keeps ``N × L × D`` floats: meant for small sets (the calibration half). Detection scores larger sets with a
    scoring ``head`` in :func:`make_batch_fn` instead. ``mesh``: rows split over its ``data`` axis
    (:func:`jdup.predict.run_batches`); the features do not depend on it.
    """
    from jdup import data

    fn, state = make_batch_fn(
        model, features_head, pooling=pooling, faithful_bart=faithful_bart, trim_last_layer=trim_last_layer,
        mesh=mesh,
    )
    return predict_lib.run_batches(
        lambda inputs: fn(state, inputs, None),
        data.batches(encoded, batch_size, sort_by_length=True),
        len(encoded),
        mesh=mesh,
        desc="features",
        total=data.num_batches(len(encoded), batch_size),
        progress=progress,
    )
