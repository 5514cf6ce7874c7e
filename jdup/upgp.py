"""UPGP: detection by unlearning sensitivity, and unlearning projected onto the clean null space.

Reconstruction of "UPGP: backdoor defense via unlearning perturbation and orthogonality-constraint gradient
projection" (spec: ``upgp-spec.md``; the paper's full text is not public, so the algorithm follows its abstract and
the standard techniques it names).

Detection (spec §3-§4, :func:`detect_upgp`):

1. *Unlearning perturbation*: a throw-away LoRA on the victim is trained to forget the normal (clean, labelled)
   set by label-flip cross-entropy, and stopped once normal accuracy falls near chance (``<= 1/C + margin``).
2. *Sensitivity*: ``s(x) = l(x, y; theta0 + dtheta) - l(x, y; theta0)`` per scored row (two forward passes),
   averaged over perturbations learned on disjoint halves of the normal set. Clean rows lose their fit (large
   ``s``); backdoored rows keep it (the trigger feature is not what was forgotten), so **low ``s`` = suspicious**.
3. Per-class robust z-scores ``z = (s - med_c) / (1.4826 MAD_c)``; the suspected target class is the one with the
   heaviest low tail; rows of that class with ``z < -threshold`` are flagged.
4. First-order score (spec §4.2, :func:`first_order_scores`): the cosine between each row's loss gradient and the
   perturbation direction (the mean label-flip descent direction on the normal set), both on the parameters of a
   fresh LoRA adapter, with ``jax.vmap(jax.grad(...))`` over rows.

Projected unlearning (spec §5-§6, :func:`build_projection`): plugs into ``jdup.unlearn`` through its projection
slot (``clip -> scale_by_adam -> projection -> -lr``) and its ``on_step`` hook. Only the forgetting update is
projected: ``jdup.unlearn`` runs the retain (clean CE) update in a separate, unprojected optimizer stream (spec
§5.6), which keeps only the variant's structure (``ProjectionHook.retain_projection``):

* ``gradient``: block-wise (or global) basis of ``k`` clean mini-batch gradients of the retain loss over the
  trainable (LoRA + head) parameters, energy threshold ``eps``, refreshed every ``refresh`` steps;
* ``representation``: GPM basis of each adapted module's clean token inputs; LoRA down-projections ``A`` are put
  into (and their updates kept in) the orthogonal complement, the head kernel is projected on its input side, the
  head bias is frozen, the up-projections ``B`` train freely: clean pre-activations do not move;
* ``inflora``: ``A`` fixed to the top directions of the flagged inputs inside that complement (InfLoRA), only
  ``B`` (and the protected head) train.

The hook logs per step ``sens_before``/``sens_after`` (cosine between the update and the protected subspace before
and after projection) and ``clean_loss``/``clean_loss_change`` on a fixed clean probe batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdup import atomic, losses, optim
from jdup import data as D
from jdup import lora as lora_lib
from jdup.errors import JdupError

log = logging.getLogger("jdup.upgp")

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PROJECTIONS = ("none", "gradient", "representation", "inflora")


# ---------------------------------------------------------------------------------------------------------------
# Detection config
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UPGPDetectConfig:
    """Settings of UPGP sensitivity detection (spec §8.1 defaults, adapted to LoRA on small encoders)."""

    # --- inputs / outputs (only for run_upgp_detect; detect_upgp takes data directly)
    model: str = ""  # backdoored classifier: HF folder or builtin:...
    data: str = ""  # DUP-layout folder
    out: str = ""  # output folder: scores.npy, flags.npy, detection.json
    normal_split: str = "dev-clean"  # trusted labelled clean rows the perturbation forgets
    scored_split: str = "test-detect"  # rows to score (test-detect = test-clean || test-poison)
    max_length: int = 128  # tokens per text
    # --- perturbation (Stage A)
    lora_rank: int = 8  # rank of the throw-away adapter
    lora_alpha: float = 16.0  # its alpha (scale alpha/r)
    lora_targets: tuple[str, ...] = (
        "query",
        "value",
    )  # adapted linear layers (BERT names; Llama: q_proj,v_proj)
    lr: float = 1e-3  # Adam learning rate of the perturbation
    batch_size: int = 16  # normal rows per step
    max_steps: int = 200  # hard cap on perturbation steps
    eval_every: int = 10  # steps between accuracy checks of the stop rule
    eval_rows: int = 128  # normal rows used by the stop rule
    stop_margin: float = 0.1  # stop once normal accuracy <= 1/C + stop_margin
    n_perturbations: int = 2  # perturbations from disjoint parts of the normal set (scores averaged)
    calib_frac: float = 0.25  # normal rows held out of the perturbations; per-class median/MAD come from them
    score: str = "loss"  # loss: l(theta') - l(theta0) | prob: p_theta0(y) - p_theta'(y)
    # --- first-order score
    first_order: bool = True  # also compute the vmapped gradient-cosine score
    first_order_batch: int = 16  # rows per vmapped per-sample-gradient batch
    # --- flagging (spec §4.3-4.4)
    z_threshold: float = 2.5  # flag rows with robust z < -z_threshold in the suspected target class
    min_flag_frac: float = 0.005  # at least this fraction of the scored rows is flagged
    max_flag_frac: float = 0.5  # at most this fraction (the DUP benchmark sets are ~1/3 poison)
    # --- infrastructure
    eval_batch_size: int = 64  # rows per forward pass
    seed: int = 0  # adapter init, data order, label draws
    progress: bool = True  # tqdm bars


class UPGPDetection(NamedTuple):
    """Result of :func:`detect_upgp` (same shape of result as the other detectors).

    Attributes:
      scores: ``[N]`` suspicion, higher = more likely poisoned (``-z`` of the zeroth-order sensitivity).
      flags: ``[N]`` bool, flagged rows.
      threshold: flag rule on ``scores``: ``scores > threshold`` within ``target_class`` (then clipped to
        ``[min_flag_frac, max_flag_frac]`` of ``N``).
      target_class: the suspected backdoor target label.
      auroc: AUROC of ``scores`` when ground-truth poison flags are known, else ``None``.
      sensitivity: ``[N]`` raw zeroth-order sensitivity ``s`` (low = suspicious).
      z: ``[N]`` per-class robust z of ``s``.
      first_order: ``[N]`` gradient cosine (low = suspicious), or ``None``.
      info: perturbation statistics, timings and the AUROCs of every score variant.
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


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------


def _fresh_adapter(
    model: nnx.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    key: jax.Array,
    train_head: bool = False,
):
    """Victim + fresh LoRA (no dropout), split ``(graphdef, trainable, frozen)``."""
    student = lora_lib.add_lora(
        model,
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        targets=tuple(targets) or None,
        train_head=train_head,
        rngs=nnx.Rngs(params=key),
    )
    return lora_lib.split_trainable(student, train_head)


def _logits_of(graphdef, states: tuple, encoded: D.Encoded, batch_size: int) -> np.ndarray:
    from jdup.train import predict_states

    return predict_states(graphdef, tuple(states), encoded, batch_size)


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


def robust_z(
    scores: np.ndarray,
    labels: np.ndarray,
    ref_scores: np.ndarray | None = None,
    ref_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Per-class robust z-score ``(s - median_c) / (1.4826 MAD_c)`` (spec §4.3).

    The median and MAD of class ``c`` come from the reference rows of that class when given (known-clean rows
    scored the same way), else from the scored rows themselves. A reference matters when the scored set is
    heavily poisoned: in the DUP benchmark sets about half the target-class rows are poisoned, which drags the
    in-set median between the two groups and inflates the MAD.

    Args:
      scores, labels: ``[N]`` scores and given labels of the scored rows.
      ref_scores, ref_labels: optional ``[M]`` reference (clean) scores and labels.

    Returns:
      ``[N]`` float64 z-scores.
    """
    s = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    z = np.zeros_like(s)
    for c in np.unique(labels):
        i = labels == c
        ref = s[i]
        if ref_scores is not None:
            r = np.asarray(ref_scores, np.float64)[np.asarray(ref_labels) == c]
            if len(r) >= 5:
                ref = r
        med = np.median(ref)
        mad = 1.4826 * np.median(np.abs(ref - med))
        if mad <= 1e-12:
            mad = np.std(ref) + 1e-12
        z[i] = (s[i] - med) / mad
    return z


def flag_low_tail(
    z: np.ndarray, labels: np.ndarray, threshold: float, min_frac: float = 0.005, max_frac: float = 0.5
) -> tuple[np.ndarray, int]:
    """Flag the low-z tail of the suspected target class (spec §4.3-4.4).

    The target class is the one with the largest fraction of rows below ``-threshold``; its rows below it are
    flagged; the count is then clipped to ``[min_frac, max_frac]`` of all rows by taking the lowest z in that
    class.

    Returns:
      ``(flags [N] bool, target_class)``.
    """
    n = len(z)
    classes = np.unique(labels)
    frac = [float(np.mean(z[labels == c] < -threshold)) for c in classes]
    target = int(classes[int(np.argmax(frac))])
    in_c = np.flatnonzero(labels == target)
    order = in_c[np.argsort(z[in_c], kind="stable")]
    count = int(np.sum(z[in_c] < -threshold))
    count = int(np.clip(count, int(np.ceil(min_frac * n)), int(np.floor(max_frac * n))))
    count = min(count, len(in_c))
    flags = np.zeros(n, bool)
    flags[order[:count]] = True
    return flags, target


def ensemble_scores(
    scores: Sequence[np.ndarray],
    calib: np.ndarray | None = None,
    weights: Sequence[float] | None = None,
    standardize: bool = True,
    rank: bool = False,
) -> np.ndarray:
    """Average of robustly standardised suspicion scores (each: higher = more suspicious).

    Each score is mapped to ``(x - median) / (1.4826 MAD)`` with the median/MAD taken on the calibration rows
    ``calib`` (e.g. known-clean rows; default: all rows), so scores on different scales (Mahalanobis distances,
    loss changes, cosines) count equally.

    Args:
      scores: sequence of ``[N]`` arrays.
      calib: optional boolean mask or index array of calibration rows.
      weights: optional per-score weights (default equal).
      rank: average rank fractions in ``[0, 1)`` instead (scale-free, insensitive to heavy tails; on the SST-2
        badnets MiniLM victim DUP+UPGP: rank 0.891 vs robust-z 0.805 AUROC).
      standardize: ``False`` averages the scores as given -- right when each is already a z-score against its
        own clean calibration rows (DUP's fused score, ``UPGPDetection.scores``).

    Returns:
      ``[N]`` float64 ensemble score (higher = more suspicious).
    """
    out = None
    weights = [1.0] * len(scores) if weights is None else list(weights)
    for s, w in zip(scores, weights, strict=True):
        s = np.asarray(s, np.float64)
        if rank:
            s = np.argsort(np.argsort(s, kind="stable"), kind="stable") / len(s)
        elif standardize:
            ref = s if calib is None else s[calib]
            med = np.median(ref)
            mad = 1.4826 * np.median(np.abs(ref - med)) + 1e-12
            s = (s - med) / mad
        t = w * s
        out = t if out is None else out + t
    return out / float(sum(weights))


# ---------------------------------------------------------------------------------------------------------------
# Stage A: the unlearning perturbation
# ---------------------------------------------------------------------------------------------------------------


def _ce_step(graphdef, tx):
    @jax.jit
    def step(trainable, frozen, opt_state, batch):
        def loss_fn(tr):
            model = nnx.merge(graphdef, tr, frozen)
            logits = model(*(batch[k] for k in _MODEL_INPUTS), deterministic=True).logits
            return losses.cross_entropy(logits, batch["labels"], batch["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def learn_perturbation(model: nnx.Module, normal: D.Encoded, cfg: UPGPDetectConfig, seed: int) -> tuple:
    """Train a throw-away LoRA to forget ``normal`` by label flipping; stop near chance accuracy (spec §3).

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
    tx = optax.adam(cfg.lr)
    opt_state = tx.init(trainable0)
    step = _ce_step(graphdef, tx)
    stop_acc = 1.0 / k + cfg.stop_margin
    trainable, t, acc, loss = trainable0, 0, None, float("nan")
    epoch = 0
    while t < cfg.max_steps:
        for b in D.batches(flipped, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch):
            batch = {kk: b[kk] for kk in _MODEL_INPUTS}
            batch["labels"], batch["mask"] = b["labels"], b["valid"].astype(np.float32)
            trainable, opt_state, loss = step(trainable, frozen, opt_state, batch)
            t += 1
            if t % cfg.eval_every == 0 or t >= cfg.max_steps:
                pred = _logits_of(graphdef, (trainable, frozen), ev, cfg.eval_batch_size).argmax(-1)
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
    model: nnx.Module, scored: D.Encoded, normal: D.Encoded, cfg: UPGPDetectConfig
) -> tuple[np.ndarray, dict]:
    """Zeroth-order unlearning sensitivity of every scored row (spec §4.1), averaged over perturbations.

    A calibration part of the normal set (``calib_frac``) is held out of every perturbation and scored the same
    way as the scored rows; the perturbations are learned on disjoint parts of the rest.

    Returns:
      ``(s [N], info)`` with ``s = l(theta') - l(theta0)`` (or the probability drop for ``score="prob"``);
      ``info["calib_scores"]``/``info["calib_labels"]`` hold the held-out normal rows' scores and labels.
    """
    n_p = max(1, int(cfg.n_perturbations))
    perm = np.random.default_rng([cfg.seed, 3]).permutation(len(normal))
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
    labels = np.asarray(both.labels)
    for j, part in enumerate(parts):
        graphdef, tr0, tr, frozen, info = learn_perturbation(
            model, normal.subset(np.sort(part)), cfg, cfg.seed + 101 * j
        )
        if base is None:
            base = _logits_of(graphdef, (tr0, frozen), both, cfg.eval_batch_size)
        pert = _logits_of(graphdef, (tr, frozen), both, cfg.eval_batch_size)
        if cfg.score == "prob":
            total += np.exp(-per_sample_loss(base, labels)) - np.exp(-per_sample_loss(pert, labels))
        else:
            total += per_sample_loss(pert, labels) - per_sample_loss(base, labels)
        infos.append(info)
    total /= len(parts)
    n = len(scored)
    return total[:n], {"perturbations": infos, "calib_scores": total[n:], "calib_labels": labels[n:]}


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
def _mean_grad(graphdef, trainable, frozen, batch):
    def loss_fn(tr):
        model = nnx.merge(graphdef, tr, frozen)
        logits = model(*(batch[k] for k in _MODEL_INPUTS), deterministic=True).logits
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
    model: nnx.Module, scored: D.Encoded, normal: D.Encoded, cfg: UPGPDetectConfig
) -> np.ndarray:
    """First-order "unlearning sensitivity" (spec §4.2): ``cos(g_x, d)`` per scored row.

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
        model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, jax.random.key(cfg.seed + 7)
    )
    flipped = dataclasses.replace(normal, labels=flipped_labels(normal.labels, k, cfg.seed))
    direction = None
    total = 0
    for b in D.batches(flipped, cfg.eval_batch_size, sort_by_length=True):
        batch = {kk: b[kk] for kk in _MODEL_INPUTS}
        batch["labels"], batch["mask"] = b["labels"], b["valid"].astype(np.float32)
        n = int(b["valid"].sum())
        g = jax.tree.map(lambda x, n=n: -x * n, _mean_grad(graphdef, tr0, frozen, batch))
        direction = g if direction is None else jax.tree.map(jnp.add, direction, g)
        total += n
    direction = jax.tree.map(lambda x: x / max(total, 1), direction)
    dnorm = float(jnp.sqrt(_tree_vdot(direction, direction)))
    out = np.zeros(len(scored))
    for b in D.batches(scored, cfg.first_order_batch, sort_by_length=True):
        dots, norms = _per_sample_dots(
            graphdef, tr0, frozen, direction, {kk: b[kk] for kk in (*_MODEL_INPUTS, "labels")}
        )
        cos = np.asarray(dots, np.float64) / (np.asarray(norms, np.float64) * dnorm + 1e-30)
        out[b["index"][b["valid"]]] = cos[b["valid"]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Detection entry points
# ---------------------------------------------------------------------------------------------------------------


def detect_upgp(
    model: nnx.Module,
    scored: D.Encoded,
    normal: D.Encoded,
    cfg: UPGPDetectConfig,
    is_poison: np.ndarray | None = None,
) -> UPGPDetection:
    """UPGP sensitivity detection of ``scored`` rows, with the perturbation learned on ``normal`` rows.

    Args:
      model: the backdoored victim (not modified).
      scored: tokenised rows to score, with their given labels (poisoned rows carry the target label).
      normal: tokenised trusted clean rows with true labels (e.g. dev-clean).
      cfg: :class:`UPGPDetectConfig`.
      is_poison: optional ground truth (default ``scored.poison``) used only for AUROC.

    Returns:
      :class:`UPGPDetection`.
    """
    from jdup import metrics

    t0 = time.perf_counter()
    s, info = sensitivity_scores(model, scored, normal, cfg)
    t1 = time.perf_counter()
    labels = np.asarray(scored.labels)
    z = robust_z(s, labels, info["calib_scores"], info["calib_labels"])
    flags, target = flag_low_tail(z, labels, cfg.z_threshold, cfg.min_flag_frac, cfg.max_flag_frac)
    fo = first_order_scores(model, scored, normal, cfg) if cfg.first_order else None
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
    )


def _atomic_json(path: str, obj: Any) -> None:
    atomic.write(path, lambda f: json.dump(obj, f, indent=2, default=lambda o: np.asarray(o).tolist()))


def _atomic_npy(path: str, arr: np.ndarray) -> None:
    atomic.write(path, lambda f: np.save(f, arr), binary=True)


def run_upgp_detect(cfg: UPGPDetectConfig) -> dict:
    """Standalone ``detect --method upgp`` stage: load, score ``scored_split``, write results atomically.

    Writes ``OUT/scores.npy`` (higher = more suspicious), ``OUT/flags.npy``, ``OUT/sensitivity.npy``,
    ``OUT/first_order.npy`` (if computed) and ``OUT/detection.json`` (metrics, flags as a list).

    Returns:
      The metrics dict (AUROCs, FRR/FAR, target class, perturbation info, seconds).
    """
    from jdup import models

    if not cfg.model or not cfg.data or not cfg.out:
        raise JdupError("upgp detection needs `model`, `data` and `out`")
    t0 = time.perf_counter()
    victim = models.from_pretrained(cfg.model)
    tok = models.load_tokenizer(cfg.model)
    k = victim.config.num_labels
    normal = D.encode(
        tok, D.read_split(cfg.data, cfg.normal_split, num_labels=k), cfg.max_length, config=victim.config
    )
    scored = D.encode(
        tok, D.read_split(cfg.data, cfg.scored_split, num_labels=k), cfg.max_length, config=victim.config
    )
    det = detect_upgp(victim, scored, normal, cfg)
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    _atomic_npy(os.path.join(out, "scores.npy"), det.scores)
    _atomic_npy(os.path.join(out, "flags.npy"), det.flags)
    _atomic_npy(os.path.join(out, "sensitivity.npy"), det.sensitivity)
    if det.first_order is not None:
        _atomic_npy(os.path.join(out, "first_order.npy"), det.first_order)
    result = {
        "method": "upgp",
        "auroc": det.auroc,
        "threshold": det.threshold,
        "target_class": det.target_class,
        **det.info,
        "seconds": time.perf_counter() - t0,
    }
    _atomic_json(os.path.join(out, "detection.json"), {**result, "flags": det.flags.astype(int).tolist()})
    return result


# ---------------------------------------------------------------------------------------------------------------
# Clean-subspace estimation for projected unlearning
# ---------------------------------------------------------------------------------------------------------------


def _fixed_batches(encoded: D.Encoded, batch_size: int, count: int, seed: int, length: int | None = None):
    """``count`` batches of ``batch_size`` rows, all padded to one length (one compiled shape)."""
    length = length or encoded.bucket_for(int(encoded.lengths.max()))
    out = []
    epoch = 0
    while len(out) < count:
        for b in D.batches(encoded, batch_size, shuffle=True, seed=seed, epoch=epoch):
            s = b["input_ids"].shape[1]
            batch = {}
            for kk in _MODEL_INPUTS:
                x = b[kk]
                fill = encoded.pad_id if kk == "input_ids" else 0
                batch[kk] = np.pad(x, ((0, 0), (0, length - s)), constant_values=fill) if s < length else x
            batch["labels"] = b["labels"].astype(np.int32)
            batch["mask"] = b["valid"].astype(np.float32)
            out.append(batch)
            if len(out) == count:
                break
        epoch += 1
    return out


def clean_gradient_stack(graphdef, trainable, frozen, retain: D.Encoded, k: int, batch_size: int, seed: int):
    """``k`` mini-batch gradients of the clean CE (dropout off) w.r.t. ``trainable``, stacked on axis 0.

    All batches are padded to one length so the gradient function compiles once.
    """
    grads = [_mean_grad(graphdef, trainable, frozen, b) for b in _fixed_batches(retain, batch_size, k, seed)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *grads)


_CAPTURE_LOCK = threading.Lock()


@functools.partial(jax.jit, static_argnums=0)
def _input_covariances(graphdef, states, batch):
    """Uncentred covariance ``sum x x^T`` of the inputs of every ``nnx.Linear`` over real tokens of ``batch``."""
    model = nnx.merge(graphdef, *states)
    paths = {
        id(node): "/".join(map(str, p)) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)
    }
    records: dict[str, jax.Array] = {}
    original = nnx.Linear.__call__

    def recording_call(self, x, *args, **kwargs):
        p = paths.get(id(self))
        if p is not None and p not in records:
            records[p] = x
        return original(self, x, *args, **kwargs)

    nnx.Linear.__call__ = recording_call
    try:
        model(*(batch[k] for k in _MODEL_INPUTS), deterministic=True)
    finally:
        nnx.Linear.__call__ = original
    row = batch["mask"].astype(jnp.float32)
    tok = batch["attention_mask"].astype(jnp.float32) * row[:, None]
    out = {}
    hi = jax.lax.Precision.HIGHEST
    for p, x in records.items():
        x = x.astype(jnp.float32)
        if x.ndim == 3:
            xw = x * tok[..., None]
            out[p] = jnp.einsum("bsd,bse->de", xw, x, precision=hi)
        else:
            xw = x * row[:, None]
            out[p] = jnp.einsum("bd,be->de", xw, x, precision=hi)
    return out


def module_input_covariances(
    graphdef, states: tuple, encoded: D.Encoded, *, max_rows: int = 256, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Token-input covariances of every linear layer of a split model over (up to) ``max_rows`` rows.

    Keys are module paths joined by ``/`` (a LoRA layer's base is ``.../query/base``; the head ``classifier``).
    Padding tokens and padding rows are excluded. Accumulated in float64 on the host.
    """
    rows = encoded.subset(np.arange(min(max_rows, len(encoded))))
    total: dict[str, np.ndarray] = {}
    with _CAPTURE_LOCK:
        for b in D.batches(rows, batch_size, sort_by_length=True):
            batch = {kk: b[kk] for kk in _MODEL_INPUTS}
            batch["mask"] = b["valid"].astype(np.float32)
            covs = _input_covariances(graphdef, tuple(states), batch)
            for p, c in covs.items():
                c = np.asarray(c, np.float64)
                total[p] = c if p not in total else total[p] + c
    return total


# ---------------------------------------------------------------------------------------------------------------
# Projection for jdup.unlearn
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectionOptions:
    """Options of ``unlearn --projection`` (``projection_options`` in the unlearn config; spec §8.2-8.3)."""

    eps: float = 0.99  # gradient mode: energy threshold of the clean-gradient SVD
    k: int = 32  # gradient mode: clean mini-batch gradients per basis (= padded basis width)
    basis_batch_size: int = 16  # gradient mode: rows per clean mini-batch gradient
    refresh: int = (
        20  # gradient mode: recompute the basis every this many steps at the current parameters (0: never)
    )
    per_block: bool = True  # gradient mode: one basis per parameter leaf (True) or one global basis (False)
    beta: float = 1.0  # projection strength in [0, 1] (soft projection for beta < 1)
    repr_eps: float = 0.97  # representation/inflora: energy threshold of the clean token-input covariance
    repr_rows: int = 256  # representation/inflora: clean rows for the covariances
    forget_rows: int = 512  # inflora: flagged rows for the forget-input covariances
    min_free: int = (
        0  # representation/inflora: keep at least this many input directions free (0: max(16, 4r))
    )
    freeze_head_bias: bool = (
        True  # representation/inflora: freeze head biases (they shift every pre-activation)
    )
    probe_rows: int = 64  # clean rows of the fixed probe batch for per-step clean-loss logging
    log_every: int = 1  # compute the probe clean loss every this many steps


def _leaf_paths(tree) -> list[tuple]:
    """Plain key paths (str/int) of every array leaf of an NNX state (the Variable ``value`` hop removed)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = []
        for p in path:
            if isinstance(p, jax.tree_util.DictKey):
                keys.append(p.key)
            elif isinstance(p, jax.tree_util.SequenceKey):
                keys.append(p.idx)
            elif isinstance(p, jax.tree_util.GetAttrKey) and p.name != "value":
                keys.append(p.name)
        out.append(tuple(keys))
    return out


def _with_leaves(tree, leaves: list):
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


class ProjectionHook:
    """``on_step`` hook of ``jdup.unlearn.unlearn`` for a projected run (built by :func:`build_projection`).

    Call protocol: ``hook(StepInfo) -> dict`` after every step (metrics, and ``"opt_state"`` after a basis
    refresh). Before the first step the loop should call ``hook.prepare_student(student) -> trainable`` (puts the
    LoRA down-projections into the clean complement for ``representation``/``inflora``). If the loop does not,
    the first hook call rewrites the down-projections in place in the loop's current state (a fallback: with a
    warm-up schedule the first update has learning rate 0, so nothing is lost).
    """

    def __init__(
        self,
        kind: str,
        opts: ProjectionOptions,
        graphdef,
        frozen,
        retain: D.Encoded,
        seed: int,
        new_a: dict | None,
        probe: dict,
        base_loss: float,
        mode: str,
    ):
        self.kind = kind
        self.opts = opts
        self.graphdef = graphdef
        self.frozen = frozen
        self.retain = retain
        self.seed = seed
        self.new_a = new_a or {}
        self.probe = probe
        self.prev_loss = base_loss
        self.mode = mode
        self.prepared = not self.new_a
        self.refreshes = 0

    def _rewrite_a(self, trainable) -> Any:
        leaves = jax.tree.leaves(trainable)
        paths = _leaf_paths(trainable)
        new = [self._new_value(p, x) if p in self.new_a else x for p, x in zip(paths, leaves, strict=True)]
        return _with_leaves(trainable, new)

    def _new_value(self, path: tuple, current: jax.Array) -> jax.Array:
        """``set``: the stored InfLoRA ``A``; ``perp``: the current ``A`` projected into the complement
        (idempotent, so a resumed run keeps what ``A`` learned)."""
        how, value = self.new_a[path]
        if how == "set":
            return jnp.asarray(value, current.dtype)
        a = jnp.asarray(current, jnp.float32)
        return (a - value @ (value.T @ a)).astype(current.dtype)

    def prepare_student(self, student) -> Any:
        """The trainable state to start from (down-projections moved into the complement when needed)."""
        self.prepared = True
        return self._rewrite_a(student.trainable)

    def _rewrite_in_place(self, trainable) -> None:
        variables = jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
        paths = _leaf_paths(trainable)
        for p, var in zip(paths, variables, strict=True):
            if p in self.new_a and isinstance(var, nnx.Variable):
                var.set_value(self._new_value(p, var.get_value()))

    def __call__(self, info) -> dict:
        rec: dict[str, Any] = {}
        trainable = info.student.trainable
        if not self.prepared:
            log.warning(
                "upgp: the unlearning loop did not call prepare_student; moving LoRA A into the clean "
                "complement in place after step %d",
                info.step,
            )
            self._rewrite_in_place(trainable)
            self.prepared = True
        ns = optim.get_basis(info.opt_state)
        rec["sens_before"] = float(ns.cos_in)
        rec["sens_after"] = float(ns.cos_out)
        if self.opts.log_every and info.step % self.opts.log_every == 0:
            loss = float(_probe_loss(self.graphdef, trainable, self.frozen, self.probe))
            rec["clean_loss"] = loss
            rec["clean_loss_change"] = loss - self.prev_loss
            self.prev_loss = loss
        if self.kind == "gradient" and self.opts.refresh and info.step % self.opts.refresh == 0:
            stack = clean_gradient_stack(
                self.graphdef,
                trainable,
                self.frozen,
                self.retain,
                self.opts.k,
                self.opts.basis_batch_size,
                self.seed + info.step,
            )
            bases, ranks = optim.gradient_basis(
                stack, self.opts.eps, per_block=self.opts.per_block, max_rank=self.opts.k
            )
            rec["opt_state"] = optim.set_basis(info.opt_state, bases)
            rec["basis_rank"] = float(np.mean([int(r) for r in jax.tree.leaves(ranks)]))
            self.refreshes += 1
        return rec


@functools.partial(jax.jit, static_argnums=0)
def _probe_loss(graphdef, trainable, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(*(batch[k] for k in _MODEL_INPUTS), deterministic=True).logits
    return losses.cross_entropy(logits, batch["labels"], batch["mask"])


def _module_of(path: tuple) -> str:
    return "/".join(map(str, path[:-1]))


def build_projection(name: str, options: dict, context: dict):
    """Projection transform and ``on_step`` hook for ``jdup.unlearn`` (``UnlearnConfig.projection``).

    Args:
      name: ``none`` | ``gradient`` | ``representation`` | ``inflora``.
      options: :class:`ProjectionOptions` fields (``UnlearnConfig.projection_options``).
      context: ``{"model": victim, "forget": Encoded flagged rows, "retain": Encoded clean rows,
        "config": UnlearnConfig, ...}`` as passed by ``jdup.unlearn.run_unlearn``.

    Returns:
      ``(transform, hook)``: an ``optax.GradientTransformation`` for the slot after ``scale_by_adam`` (bases
      already estimated at the initial student), and a :class:`ProjectionHook`; ``(None, None)`` for ``none``.
    """
    from jdup import config as config_lib
    from jdup import unlearn as unlearn_lib

    if name in ("", "none", None):
        return None, None
    if name not in PROJECTIONS:
        raise JdupError(f"projection must be one of {list(PROJECTIONS)}, got {name!r}")
    opts = config_lib.build(ProjectionOptions, options, source="projection_options")
    if not 0.0 <= opts.beta <= 1.0:
        raise JdupError(f"projection beta must be in [0, 1], got {opts.beta}")
    cfg = context["config"]
    model, retain = context["model"], context["retain"]
    if len(retain) == 0:
        raise JdupError("projected unlearning needs labelled clean rows (the retain set is empty)")
    # The same student the unlearning loop builds (same seed => same initial adapters).
    student = unlearn_lib.build_student(model, cfg)
    graphdef, trainable, frozen = student.graphdef, student.trainable, student.frozen
    seed = int(cfg.seed)
    probe = _fixed_batches(
        retain.subset(np.arange(min(opts.probe_rows, len(retain)))),
        min(opts.probe_rows, len(retain)),
        1,
        seed,
    )[0]
    new_a: dict = {}
    module_bases: dict = {}
    retain_projection = None
    t0 = time.perf_counter()
    if name == "gradient":
        stack = clean_gradient_stack(graphdef, trainable, frozen, retain, opts.k, opts.basis_batch_size, seed)
        bases, ranks = optim.gradient_basis(stack, opts.eps, per_block=opts.per_block, max_rank=opts.k)
        mode = "block" if opts.per_block else "global"
        tx = optim.project_null_space(opts.k, opts.beta, mode=mode, bases=bases)
        rank_info = float(np.mean([int(r) for r in jax.tree.leaves(ranks)]))
    else:
        mode = "rows"
        covs = module_input_covariances(graphdef, (trainable, frozen), retain, max_rows=opts.repr_rows)
        fcovs = {}
        if name == "inflora":
            forget = context["forget"]
            if len(forget) == 0:
                raise JdupError("inflora projection needs flagged rows (the forget set is empty)")
            fcovs = module_input_covariances(graphdef, (trainable, frozen), forget, max_rows=opts.forget_rows)
        heads = set(lora_lib.head_names(model))
        rank = int(cfg.lora_rank)
        min_free = opts.min_free or max(16, 4 * rank)
        leaves = jax.tree.leaves(trainable)
        cache: dict[str, tuple] = {}
        bases_leaves, ranks = [], []
        retain_leaves = []  # structural constraints only (A in the complement / frozen, frozen head bias)
        for path, x in zip(_leaf_paths(trainable), leaves, strict=True):
            module, pname = _module_of(path), path[-1]
            if pname == "lora_a":
                cov_key = module + "/base"
                if cov_key not in covs:
                    raise JdupError(f"no captured inputs for LoRA module {module!r}")
                if cov_key not in cache:
                    cache[cov_key] = optim.covariance_basis(covs[cov_key], opts.repr_eps, min_free=min_free)
                u, r = cache[cov_key]
                ranks.append(int(r))
                if name == "representation":
                    new_a[path] = ("perp", np.asarray(u))  # A <- (I - U U^T) A, applied to the current A
                    bases_leaves.append(u)
                else:  # inflora: A fixed inside the complement, its updates fully removed
                    new_a[path] = (
                        "set",
                        np.asarray(
                            optim.inflora_from_covariance(
                                u, fcovs[cov_key], x.shape[1], key=jax.random.key(seed)
                            )
                        ),
                    )
                    bases_leaves.append(jnp.eye(x.shape[0], dtype=jnp.float32))
                retain_leaves.append(bases_leaves[-1])
            elif pname == "lora_b":
                bases_leaves.append(None)
                retain_leaves.append(None)
            elif str(path[0]) in heads:
                if x.ndim >= 2:
                    if module not in covs:
                        raise JdupError(f"no captured inputs for head module {module!r}")
                    u, r = optim.covariance_basis(
                        covs[module], opts.repr_eps, min_free=min(min_free, x.shape[0] // 2)
                    )
                    ranks.append(int(r))
                    bases_leaves.append(u)
                    retain_leaves.append(None)  # the retain stream may move the head freely
                else:
                    n = int(np.prod(x.shape))
                    bases_leaves.append(jnp.eye(n, dtype=jnp.float32) if opts.freeze_head_bias else None)
                    retain_leaves.append(bases_leaves[-1])
            else:
                bases_leaves.append(None)
                retain_leaves.append(None)
        bases = _with_leaves(trainable, bases_leaves)
        retain_projection = optim.project_null_space(
            0, opts.beta, mode="rows", bases=_with_leaves(trainable, retain_leaves), track=False
        )
        module_bases = {k[: -len("/base")]: v[0] for k, v in cache.items()}
        tx = optim.project_null_space(0, opts.beta, mode="rows", bases=bases)
        rank_info = float(np.mean(ranks)) if ranks else 0.0
    base_loss = float(_probe_loss(graphdef, trainable, frozen, probe))
    log.info(
        "upgp projection %s: mean basis rank %.1f, built in %.1fs", name, rank_info, time.perf_counter() - t0
    )
    hook = ProjectionHook(name, opts, graphdef, frozen, retain, seed, new_a, probe, base_loss, mode)
    hook.initial_rank = rank_info
    hook.module_bases = module_bases  # representation/inflora: clean-input basis U [d, d] per LoRA module
    # jdup.unlearn runs the retain (clean CE) update in a separate, unprojected stream (spec §5.6); it still has
    # to respect the variant's structure (representation: A stays in the clean complement; inflora: A and the
    # head bias frozen), else a retain step would undo what makes the forget stream safe. None for gradient.
    hook.retain_projection = retain_projection
    return tx, hook
