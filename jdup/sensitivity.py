"""UPGP detection: score rows by how much a learned "unlearning" perturbation changes their loss.

Reconstruction of the detection half of "UPGP: backdoor defense via unlearning perturbation and
orthogonality-constraint gradient projection" (method: ``docs/upgp-method.md`` §3-§4; the paper's full text is not public,
so the algorithm follows its abstract and the standard techniques it names). The unlearning half (projected
purification) is :mod:`jdup.projection`.

1. *Unlearning perturbation* (:func:`learn_perturbation`): a throw-away LoRA on the victim is trained to forget the
   normal (clean, labelled) set by label-flip cross-entropy, and stopped once normal accuracy falls near chance
   (``<= 1/C + margin``).
2. *Sensitivity* (:func:`sensitivity_scores`): ``s(x) = l(x, y; theta0 + dtheta) - l(x, y; theta0)`` per scored row
   (two forward passes), averaged over perturbations learned on disjoint parts of the normal set. Clean rows lose
   their fit (large ``s``); backdoored rows keep it (the trigger feature is not what was forgotten), so **low
   ``s`` = suspicious**.
3. Per-class robust z-scores against held-out normal rows (:func:`jdup.fusion.robust_z`) and the low-tail flag rule
   of the suspected target class (:func:`jdup.fusion.flag_low_tail`).
4. First-order score (docs/upgp-method.md §4.2, :func:`first_order_scores`): the cosine between each row's loss gradient and the
   perturbation direction (the mean label-flip descent direction on the normal set), both on the parameters of a
   fresh LoRA adapter, with ``jax.vmap(jax.grad(...))`` over rows.

Everything here is in memory (tokenised :class:`jdup.data.Encoded` rows in, arrays out); ``jdup detect --method
upgp|ensemble`` reaches it through :func:`jdup.detect.detect`, with the options of :class:`UPGPConfig` under the
nested ``upgp:`` key of the detect config.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdup import data as D
from jdup import lora as lora_lib
from jdup import losses, metrics, optim
from jdup.errors import Invalid, JdupError
from jdup.fusion import flag_low_tail, robust_z
from jdup.predict import MODEL_INPUTS, model_inputs, predict_states
from jdup.settings import UPGPConfig

#: LoRA target names of the query and value projections (BERT/RoBERTa; Llama/Qwen2 and BART).
QUERY_VALUE = ("query", "value", "q_proj", "v_proj")


class UPGPDetection(NamedTuple):
    """Result of :func:`detect_upgp` (same shape of result as the other detectors).

    Attributes:
      scores: ``[N]`` suspicion, higher = more likely poisoned (``-z`` of the zeroth-order sensitivity).
      flags: ``[N]`` bool, flagged rows.
      threshold: flag rule on ``scores``: ``scores > threshold`` among the rows of ``target_class`` that the
        victim fits (then clipped to ``[min_flag_frac, max_flag_frac]`` of ``N``; :func:`jdup.fusion.flag_low_tail`).
      target_class: the suspected backdoor target label.
      auroc: AUROC of ``scores`` when ground-truth poison flags are known, else ``None``.
      sensitivity: ``[N]`` raw zeroth-order sensitivity ``s`` (low = suspicious).
      z: ``[N]`` per-class robust z of ``s``.
      first_order: ``[N]`` gradient cosine (low = suspicious), or ``None``.
      info: perturbation statistics, timings and the AUROCs of every score variant.
      fit: ``[N]`` bool, the victim predicts the row's given label (only such rows are flagged).
    """

    scores: np.ndarray
    flags: np.ndarray
    threshold: float
    target_class: int
    auroc: float | None
    sensitivity: np.ndarray
    z: np.ndarray
    first_order: np.ndarray | None
    info: dict
    fit: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------


def _seed(cfg: UPGPConfig) -> int:
    return 0 if cfg.seed is None else int(cfg.seed)


def lora_targets(model: nnx.Module, targets: Sequence[str] = ()) -> tuple[str, ...]:
    """The linear layers the perturbation adapts: ``targets`` if given, else the query and value projections among
    the architecture's LoRA targets (:func:`jdup.lora.default_targets`), else all of those."""
    if targets:
        return tuple(targets)
    arch = lora_lib.default_targets(model)
    return tuple(t for t in arch if t in QUERY_VALUE) or arch


def _fresh_adapter(
    model: nnx.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    key: jax.Array,
    train_head: bool = False,
):
    """Victim + fresh LoRA (no dropout), split ``(graphdef, trainable, frozen)``."""
    targets = lora_targets(model, targets)
    try:
        student = lora_lib.add_lora(
            model,
            rank=rank,
            alpha=alpha,
            dropout=0.0,
            targets=targets or None,
            train_head=train_head,
            rngs=nnx.Rngs(params=key),
        )
    except ValueError as e:
        default = ",".join(lora_targets(model)) or "none"
        raise JdupError(
            f"upgp.lora_targets: {e}; leave it empty for this architecture's default ({default})"
        ) from None
    return lora_lib.split_trainable(student, train_head)


def per_sample_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of every row (float64 on host)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), np.asarray(labels)]


def flipped_labels(labels: np.ndarray, num_labels: int, seed: int) -> np.ndarray:
    """Label-flip targets: the other class (binary) or a uniformly drawn wrong class (drawn once per row)."""
    labels = np.asarray(labels, np.int64)
    if num_labels == 2:
        return (1 - labels).astype(np.int32)
    shift = np.random.default_rng([seed, 11]).integers(1, num_labels, size=len(labels))
    return ((labels + shift) % num_labels).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Stage A: the unlearning perturbation
# ---------------------------------------------------------------------------------------------------------------


def _ce_step(graphdef, tx):
    @jax.jit
    def step(trainable, frozen, opt_state, batch):
        def loss_fn(tr):
            model = nnx.merge(graphdef, tr, frozen)
            logits = model(*(batch[k] for k in MODEL_INPUTS), deterministic=True).logits
            return losses.cross_entropy(logits, batch["labels"], batch["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def learn_perturbation(
    model: nnx.Module, normal: D.Encoded, cfg: UPGPConfig, seed: int, *, eval_batch_size: int = 64
) -> tuple:
    """Train a throw-away LoRA to forget ``normal`` by label flipping; stop near chance accuracy (docs/upgp-method.md §3).

    Args:
      model: the victim (not modified).
      normal: labelled clean rows.
      cfg: perturbation settings.
      seed: adapter init / data order seed.

    Returns:
      ``(graphdef, trainable0, trainable, frozen, info)``: the untouched (``B = 0``, i.e. exactly the victim) and
      the trained adapter states, and ``info`` (steps, final normal accuracy, losses).
    """
    k = model.config.num_labels
    graphdef, trainable0, frozen = _fresh_adapter(
        model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, jax.random.key(seed)
    )
    flipped = dataclasses.replace(normal, labels=flipped_labels(normal.labels, k, seed))
    ev = normal.subset(np.arange(min(cfg.eval_rows, len(normal))))
    tx = optim.adamw_chain(cfg.lr, clip=None)  # plain Adam
    opt_state = tx.init(trainable0)
    step = _ce_step(graphdef, tx)
    stop_acc = 1.0 / k + cfg.stop_margin
    trainable, t, acc, loss = trainable0, 0, None, float("nan")
    epoch = 0
    while t < cfg.max_steps:
        for b in D.batches(flipped, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch):
            batch = model_inputs(b)
            batch["labels"], batch["mask"] = b["labels"], b["valid"].astype(np.float32)
            trainable, opt_state, loss = step(trainable, frozen, opt_state, batch)
            t += 1
            if t % cfg.eval_every == 0 or t >= cfg.max_steps:
                pred = predict_states(graphdef, (trainable, frozen), ev, eval_batch_size).argmax(-1)
                acc = float((pred == ev.labels).mean())
                if acc <= stop_acc:
                    break
            if t >= cfg.max_steps:
                break
        if acc is not None and acc <= stop_acc:
            break
        epoch += 1
    info = {
        "steps": t,
        "normal_acc": acc,
        "flip_loss": float(loss),
        "stopped": bool(acc is not None and acc <= stop_acc),
    }
    return graphdef, trainable0, trainable, frozen, info


def sensitivity_scores(
    model: nnx.Module, scored: D.Encoded, normal: D.Encoded, cfg: UPGPConfig, *, eval_batch_size: int = 64
) -> tuple[np.ndarray, dict]:
    """Zeroth-order unlearning sensitivity of every scored row (docs/upgp-method.md §4.1), averaged over perturbations.

    A calibration part of the normal set (``calib_frac``) is held out of every perturbation and scored the same
    way as the scored rows; the perturbations are learned on disjoint parts of the rest.

    The scored rows' labels ``y`` are the victim's predictions (``cfg.scored_labels="predicted"``, from the
    unperturbed forward pass the score needs anyway) or their label column (``"given"``); the held-out normal rows
    always use their true labels.

    Returns:
      ``(s [N], info)`` with ``s = l(theta') - l(theta0)`` (or the probability drop for ``score="prob"``);
      ``info["calib_scores"]``/``info["calib_labels"]`` hold the held-out normal rows' scores and labels,
      ``info["scored_labels"]`` the labels used for the scored rows, ``info["fit"]`` marks the scored rows the
      victim predicts as that label (every row with predicted labels).
    """
    n_p = max(1, int(cfg.n_perturbations))
    seed = _seed(cfg)
    perm = np.random.default_rng([seed, 3]).permutation(len(normal))
    n_cal = int(round(cfg.calib_frac * len(normal)))
    cal_idx, train_idx = np.sort(perm[:n_cal]), perm[n_cal:]
    parts = (
        np.array_split(train_idx, n_p) if len(train_idx) >= 2 * n_p * cfg.batch_size else [train_idx] * n_p
    )
    calib = normal.subset(cal_idx)
    both = _concat_encoded(scored, calib)
    total = np.zeros(len(both))
    infos = []
    base = None
    n = len(scored)
    labels = np.array(both.labels, copy=True)
    for j, part in enumerate(parts):
        graphdef, tr0, tr, frozen, info = learn_perturbation(
            model, normal.subset(np.sort(part)), cfg, seed + 101 * j, eval_batch_size=eval_batch_size
        )
        if base is None:  # the fresh adapter starts at B = 0: these are the victim's own logits
            base = predict_states(graphdef, (tr0, frozen), both, eval_batch_size)
            if cfg.scored_labels == "predicted":
                labels[:n] = base[:n].argmax(-1)
        pert = predict_states(graphdef, (tr, frozen), both, eval_batch_size)
        if cfg.score == "prob":
            total += np.exp(-per_sample_loss(base, labels)) - np.exp(-per_sample_loss(pert, labels))
        else:
            total += per_sample_loss(pert, labels) - per_sample_loss(base, labels)
        infos.append(info)
    total /= len(parts)
    fit = (
        base.argmax(-1) == labels
    )  # the victim predicts the row's label (poisoned rows it obeys: the target)
    info = {"perturbations": infos, "calib_scores": total[n:], "calib_labels": labels[n:], "fit": fit[:n],
            "scored_labels": labels[:n]}
    return total[:n], info


def _concat_encoded(a: D.Encoded, b: D.Encoded) -> D.Encoded:
    """Rows of ``a`` then ``b`` (padded to the longer width; buckets/pad id of ``a``)."""
    width = max(a.max_length, b.max_length)

    def pad(x, fill):
        return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill) if x.shape[1] < width else x

    buckets = tuple(sorted(set(a.buckets) | set(b.buckets)))
    return D.Encoded(
        np.concatenate([pad(a.input_ids, a.pad_id), pad(b.input_ids, a.pad_id)]),
        np.concatenate([pad(a.attention_mask, 0), pad(b.attention_mask, 0)]),
        np.concatenate([pad(a.token_type_ids, 0), pad(b.token_type_ids, 0)]),
        np.concatenate([a.lengths, b.lengths]),
        np.concatenate([a.labels, b.labels]),
        np.concatenate([a.poison, b.poison]),
        buckets,
        a.pad_id,
        a.num_truncated + b.num_truncated,
    )


# ---------------------------------------------------------------------------------------------------------------
# First-order score: per-sample gradients (vmap of grad) on fresh LoRA parameters
# ---------------------------------------------------------------------------------------------------------------


def _tree_vdot(a, b):
    return sum(
        jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@functools.partial(jax.jit, static_argnums=0)
def mean_grad(graphdef, trainable, frozen, batch):
    def loss_fn(tr):
        model = nnx.merge(graphdef, tr, frozen)
        logits = model(*(batch[k] for k in MODEL_INPUTS), deterministic=True).logits
        return losses.cross_entropy(logits, batch["labels"], batch["mask"])

    return jax.grad(loss_fn)(trainable)


@functools.partial(jax.jit, static_argnums=0)
def _per_sample_dots(graphdef, trainable, frozen, direction, batch):
    """``(<g_x, d>, |g_x|)`` per row, ``g_x`` = gradient of the row's CE w.r.t. the adapter (vmapped)."""

    def one(ids, mask, tt, y):
        def loss_fn(tr):
            model = nnx.merge(graphdef, tr, frozen)
            logits = model(ids[None], mask[None], tt[None], deterministic=True).logits
            return losses.cross_entropy(logits, y[None])

        g = jax.grad(loss_fn)(trainable)
        return _tree_vdot(g, direction), jnp.sqrt(_tree_vdot(g, g))

    return jax.vmap(one)(
        batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["labels"]
    )


def first_order_scores(
    model: nnx.Module, scored: D.Encoded, normal: D.Encoded, cfg: UPGPConfig, *, eval_batch_size: int = 64
) -> np.ndarray:
    """First-order "unlearning sensitivity" (docs/upgp-method.md §4.2): ``cos(g_x, d)`` per scored row.

    ``d = -grad F_n`` is the direction the label-flip perturbation starts along (``F_n`` = flipped-label CE on
    the normal set), i.e. the mean normal gradient reweighted by ``p/(1-p)``; to first order the loss change
    of row ``x`` under the perturbation is ``eta <g_x, d>``. Gradients are taken w.r.t. a fresh LoRA adapter
    (``B = 0``: only ``B`` receives gradient, a random sketch ``A^T G`` of each adapted kernel's gradient),
    one row at a time with ``jax.vmap(jax.grad(...))``. Low cosine = insensitive = suspicious.

    Returns:
      ``[N]`` float64 cosines.
    """
    k = model.config.num_labels
    graphdef, tr0, frozen = _fresh_adapter(
        model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, jax.random.key(_seed(cfg) + 7)
    )
    flipped = dataclasses.replace(normal, labels=flipped_labels(normal.labels, k, _seed(cfg)))
    direction = None
    total = 0
    for b in D.batches(flipped, eval_batch_size, sort_by_length=True):
        batch = model_inputs(b)
        batch["labels"], batch["mask"] = b["labels"], b["valid"].astype(np.float32)
        n = int(b["valid"].sum())
        g = jax.tree.map(lambda x, n=n: -x * n, mean_grad(graphdef, tr0, frozen, batch))
        direction = g if direction is None else jax.tree.map(jnp.add, direction, g)
        total += n
    direction = jax.tree.map(lambda x: x / max(total, 1), direction)
    dnorm = float(jnp.sqrt(_tree_vdot(direction, direction)))
    out = np.zeros(len(scored))
    for b in D.batches(scored, cfg.first_order_batch, sort_by_length=True):
        dots, norms = _per_sample_dots(
            graphdef, tr0, frozen, direction, {**model_inputs(b), "labels": b["labels"]}
        )
        cos = np.asarray(dots, np.float64) / (np.asarray(norms, np.float64) * dnorm + 1e-30)
        out[b["index"][b["valid"]]] = cos[b["valid"]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Detection entry point
# ---------------------------------------------------------------------------------------------------------------


def detect_upgp(
    model: nnx.Module,
    scored: D.Encoded,
    normal: D.Encoded,
    cfg: UPGPConfig,
    is_poison: np.ndarray | None = None,
    *,
    eval_batch_size: int = 64,
) -> UPGPDetection:
    """UPGP sensitivity detection of ``scored`` rows, with the perturbation learned on ``normal`` rows.

    Args:
      model: the backdoored victim (not modified).
      scored: tokenised rows to score. Their label column is read only with ``cfg.scored_labels="given"``
        (labelled training data); by default the victim's predictions label them.
      normal: tokenised trusted clean rows with true labels (e.g. dev-clean).
      cfg: :class:`UPGPConfig`.
      is_poison: optional ground truth (default ``scored.poison``) used only for AUROC.
      eval_batch_size: rows per forward pass (scoring, the stop rule, the first-order direction).

    Returns:
      :class:`UPGPDetection`.
    """
    try:
        cfg.validate()
    except Invalid as e:
        raise JdupError(f"upgp: {e}") from None
    t0 = time.perf_counter()
    s, info = sensitivity_scores(model, scored, normal, cfg, eval_batch_size=eval_batch_size)
    t1 = time.perf_counter()
    labels = info.pop("scored_labels")
    z = robust_z(s, labels, info["calib_scores"], info["calib_labels"])
    fit = info.pop("fit")
    flags, target = flag_low_tail(z, labels, cfg.z_threshold, cfg.min_flag_frac, cfg.max_flag_frac, fit=fit)
    labelled = dataclasses.replace(scored, labels=np.asarray(labels, np.asarray(scored.labels).dtype))
    fo = (
        first_order_scores(model, labelled, normal, cfg, eval_batch_size=eval_batch_size)
        if cfg.first_order
        else None
    )
    t2 = time.perf_counter()
    truth = np.asarray(scored.poison if is_poison is None else is_poison).astype(bool)
    have_truth = truth.any() and not truth.all()
    au = {}
    if have_truth:
        au["auroc_z"] = metrics.auroc(truth, -z)
        au["auroc_z_in_set"] = metrics.auroc(truth, -robust_z(s, labels))
        au["auroc_raw"] = metrics.auroc(truth, -s)
        if fo is not None:
            au["auroc_first_order"] = metrics.auroc(truth, -fo)
            au["auroc_first_order_z"] = metrics.auroc(truth, -robust_z(fo, labels))
        au.update(metrics.detection_metrics(truth, flags))
    info.update(au)
    info.pop("calib_scores", None)
    info["n_calib"] = int(len(info.pop("calib_labels", ())))
    info.update(
        target_class=target,
        n_flagged=int(flags.sum()),
        sensitivity_seconds=t1 - t0,
        first_order_seconds=t2 - t1,
    )
    return UPGPDetection(
        scores=-z,
        flags=flags,
        threshold=float(cfg.z_threshold),
        target_class=target,
        auroc=au.get("auroc_z"),
        sensitivity=s,
        z=z,
        first_order=fo,
        info=info,
        fit=fit,
    )


__all__ = [
    "QUERY_VALUE",
    "UPGPConfig",
    "UPGPDetection",
    "detect_upgp",
    "first_order_scores",
    "flipped_labels",
    "learn_perturbation",
    "lora_targets",
    "mean_grad",
    "per_sample_loss",
    "sensitivity_scores",
]
