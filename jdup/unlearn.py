"""DUP purification: LoRA unlearning of the samples a detector flagged, then merge and export (spec §3).

Pipeline of :func:`run_unlearn` (``jdup unlearn --model M --data DIR --out OUT [--detection DET]``):

1. Load the backdoored victim (the *teacher*, frozen) and the DUP data folder.
2. Detect on ``dev-detect = dev-clean ‖ dev-poison`` (calibrated on dev-clean), or reuse ``--detection``. The
   flagged rows (true and false positives) are the forget set ``D_p``; all of dev-clean with its labels is the
   retain set.
3. Teacher logits on ``D_p``: one jitted pass, stored as an ``[N, K]`` array.
4. Student = victim + LoRA (``jdup.lora``) + a trainable copy of the head. Per step, one flagged batch and one
   clean batch (cycled; :class:`BatchPlan`: length-grouped and paired by length, padded to a multiple of 8
   tokens) go through **one** forward pass (concatenated, padded to a common length) and

   ``L = λ_asr · forget(student, teacher)[D_p batch] + λ_acc · CE(student, y)[clean batch]``

   where the faithful ``forget`` is ``−KL(p_T ‖ p_S)`` (``jdup.losses``; bounded variants selectable).
5. Optimiser (:func:`make_optimizer`): ``clip_by_global_norm(1) → scale_by_adam → [projection slot] → decoupled
   weight decay (off when projecting) → −lr(t)``, linear warm-up 10 % then linear decay (first update lr 0).
   With a projection (UPGP) the two loss terms get separate streams (:class:`TwoStreams`): the forgetting
   gradient goes through ``clip → Adam → projection → −lr·λ_asr``, the clean CE through its own unprojected
   ``clip → Adam → −lr·λ_acc``, and the two updates are added.
6. Early stopping (``early_stop``): ``proxy`` (default; uses only what a defender has), ``oracle_dev_poison``
   (the official rule: ground-truth dev-poison ASR, an oracle) or ``none``.
7. Merge the adapters (exact), evaluate CACC / ASR / RA before and after on test-clean / test-poison, write
   ``OUT/model/`` (Hugging Face format) and ``OUT/metrics.json``. Orbax checkpoints under ``OUT/ckpt`` let a
   killed run resume.

Building blocks are public for the UPGP stage (``jdup.upgp``): :func:`build_student` (the trainable/frozen split),
:func:`loss_pieces` (the forget and retain terms separately, so each can be differentiated on its own),
:func:`make_optimizer` (its ``projection`` argument is the documented slot), :func:`make_train_step`, and the
``on_step`` hook of :func:`unlearn` for per-step extra metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
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

log = logging.getLogger("jdup.unlearn")

EARLY_STOP = ("none", "proxy", "oracle_dev_poison")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """Settings of ``jdup unlearn``. Defaults follow the official DUP code (spec §4.2) except ``lambda_asr``."""

    # --- inputs / outputs
    model: str = ""  # backdoored classifier: HF folder, hub id or builtin:...
    data: str = ""  # DUP-layout folder with dev-clean/dev-poison/test-clean/test-poison.csv
    out: str = ""  # output folder: model/ (purified, HF format), metrics.json, detection/, ckpt/
    detection: str | None = (
        None  # reuse a detection folder (flags over dev-clean ‖ dev-poison) instead of detecting
    )
    detect: dict = dataclasses.field(
        default_factory=dict
    )  # extra DetectConfig fields for the built-in detection
    max_length: int = 128  # tokens per text (truncation); batches are padded to length buckets
    dtype: str = "float32"  # compute dtype of the model: float32 | bfloat16

    # --- objective (spec §3.4)
    lambda_asr: float = (
        1.0  # weight of the forgetting term. The official demo ships 0, which DISABLES unlearning
    )
    #                          (it then only fine-tunes LoRA on clean dev data); 1 is the setting the paper implies.
    lambda_acc: float = 1.0  # weight of CE on labelled clean dev batches (official: 1)
    forget_loss: str = "kl"  # kl (official, −KL(p_T‖p_S), unbounded) | kl_capped | suppress_target (bounded)
    temperature: float = 1.0  # softmax temperature of the KL terms (official: 1, no temperature)
    kl_cap: float = 2.0  # kl_capped: per-sample cap on the KL being maximised (nats)
    suppress_eps: float = 1e-4  # suppress_target: −log(1 − p_target + eps)
    target_label: int | None = None  # backdoor target for suppress_target / proxy; None = inferred (majority
    #                                   teacher prediction on the flagged rows, which a defender can compute)

    # --- LoRA (spec §3.3)
    lora_rank: int = 32  # r
    lora_alpha: float = 64.0  # α; the adapter output is scaled by α/r (= 2)
    lora_dropout: float = 0.1  # dropout on the adapter input (training only)
    lora_targets: tuple[
        str, ...
    ] = ()  # linear-layer names to adapt; () = the family default (BERT query,key,value)
    train_head: bool = True  # train a full copy of the classification head (PEFT SEQ_CLS behaviour)
    model_dropout: bool = True  # the student's own dropout on during training (official: train() mode)

    # --- optimisation (spec §3.5)
    epochs: int = 5  # passes over the flagged (training) rows; clean batches are cycled in lock-step
    batch_size: int = 32  # rows per flagged batch and per clean batch (official: 32 PLM, 4 LLM)
    lr: float = 5e-4  # peak learning rate of AdamW
    weight_decay: float = 0.01  # decoupled weight decay (torch AdamW default), on all trainable leaves
    warmup_frac: float = 0.1  # warm-up steps = int(warmup_frac · total steps); lr 0 at the first update
    clip_norm: float = 1.0  # global gradient-norm clip (0 disables)
    eval_batch_size: int = 64  # rows per forward pass in evaluation
    fused_step: bool = (
        True  # one forward on [flagged; clean] padded to a common bucket (fewer compiles) vs two
    )
    #                          forwards at their own lengths (less padding; measured faster on CPU when the two
    #                          batches fall in different buckets, equal otherwise)
    length_group: int = 8  # length-grouped batches: rows are shuffled, cut into groups of this many batches,
    #                        sorted by length inside each group (HF group_by_length), the batches visited in a
    #                        random order; inside each epoch the flagged batches are paired with the clean
    #                        batches of the same steps by length rank. ~2x fewer padded tokens on SST-2;
    #                        0 = plain shuffled batches, paired in order
    pad_multiple: int = 8  # unlearning batches are padded to a multiple of this many tokens (each distinct
    #                        length compiles the step once); 0 = the encoding's buckets (32/64/128/...)

    # --- early stopping (spec §3.6, §10.4)
    early_stop: str = "proxy"  # proxy | oracle_dev_poison (official, uses ground-truth dev-poison) | none
    eval_every_steps: int = 0  # how often the stop rule is evaluated; 0 = once per epoch
    holdout_frac: float = (
        0.2  # proxy: fraction of the flagged rows held out (not trained on) to measure forgetting
    )
    proxy_asr_stop: float = 0.1  # proxy: stop once this fraction (or less) of the held-out flagged rows is
    #                               predicted as the target
    max_cacc_drop: float = (
        0.03  # proxy: a state is acceptable only if held-out clean accuracy fell by <= this
    )
    clean_holdout_frac: float = 0.2  # proxy: fraction of dev-clean held out of the CE set to measure accuracy
    #                                   honestly (accuracy on the CE rows themselves is optimistic); 0 = measure
    #                                   on the CE rows
    asr_threshold: float = 0.2  # oracle_dev_poison: stop once dev-poison ASR <= this (official 0.2)

    # --- UPGP projection slot
    projection: str = "none"  # none | gradient | representation | inflora (filled by jdup.upgp)
    projection_options: dict = dataclasses.field(default_factory=dict)  # options for the projection builder

    # --- infrastructure
    seed: int = 2025  # one seed for LoRA init, data order and dropout
    ckpt_every_steps: int = 20  # orbax checkpoint period (0 = never); a killed run resumes from OUT/ckpt
    resume: bool = True  # resume from OUT/ckpt when it matches this config
    progress: bool = True  # tqdm progress bars


# ---------------------------------------------------------------------------------------------------------------
# Student, losses, optimiser, train step (building blocks, also used by jdup.upgp)
# ---------------------------------------------------------------------------------------------------------------


class Student(NamedTuple):
    """The adapted model and its functional split.

    Attributes:
      model: victim + LoRA + head copy (an ``nnx.Module``; shares frozen base weights with the victim).
      graphdef: ``nnx.GraphDef`` of ``model``.
      trainable: ``nnx.State`` of the differentiated leaves (adapters + head); the optimizer's params.
      frozen: ``nnx.State`` of everything else.
    """

    model: nnx.Module
    graphdef: Any
    trainable: Any
    frozen: Any


def build_student(model: nnx.Module, cfg: UnlearnConfig, key: jax.Array | None = None) -> Student:
    """Add LoRA to ``model`` (the teacher is left untouched) and split it into trainable and frozen state.

    Args:
      model: the backdoored classifier.
      cfg: reads ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_targets``, ``train_head``, ``seed``.
      key: ``jax.random.key`` for the LoRA ``A`` init; default from ``cfg.seed``.
    """
    key = jax.random.key(cfg.seed) if key is None else key
    student = lora_lib.add_lora(
        model,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        targets=cfg.lora_targets or None,
        train_head=cfg.train_head,
        rngs=nnx.Rngs(params=key),
    )
    graphdef, trainable, frozen = lora_lib.split_trainable(student, cfg.train_head)
    return Student(student, graphdef, trainable, frozen)


class LossSettings(NamedTuple):
    """Hashable loss settings baked into a jitted step (python scalars only)."""

    forget_loss: str = "kl"
    lambda_asr: float = 1.0
    lambda_acc: float = 1.0
    temperature: float = 1.0
    kl_cap: float = 2.0
    suppress_eps: float = 1e-4
    target_label: int = 1
    lora_dropout: bool = True
    model_dropout: bool = True

    @classmethod
    def from_config(cls, cfg: UnlearnConfig, target_label: int) -> LossSettings:
        return cls(
            cfg.forget_loss,
            cfg.lambda_asr,
            cfg.lambda_acc,
            cfg.temperature,
            cfg.kl_cap,
            cfg.suppress_eps,
            int(target_label),
            cfg.lora_dropout > 0,
            cfg.model_dropout,
        )


def student_logits(graphdef, trainable, frozen, batch: dict, key: jax.Array | None, settings: LossSettings):
    """Logits of the student on ``batch`` (dropout on when ``key`` is given and the settings ask for it)."""
    model = nnx.merge(graphdef, trainable, frozen)
    if key is None:
        return model(*(batch[k] for k in _MODEL_INPUTS), deterministic=True).logits
    k_lora, k_model = jax.random.split(key)
    with lora_lib.lora_dropout(k_lora if settings.lora_dropout else None):
        if settings.model_dropout:
            out = model(
                *(batch[k] for k in _MODEL_INPUTS), deterministic=False, rngs=nnx.Rngs(dropout=k_model)
            )
        else:
            out = model(*(batch[k] for k in _MODEL_INPUTS), deterministic=True)
    return out.logits


def loss_pieces(graphdef, trainable, frozen, batch: dict, key: jax.Array | None, settings: LossSettings):
    """The two loss terms on a joint batch, separately (both to be minimised).

    Args:
      graphdef, trainable, frozen: the student split (:func:`build_student`).
      batch: a joint batch from :func:`joint_batch`: model inputs ``[2B, S]`` (flagged rows first) or, unfused,
        ``forget_inputs``/``retain_inputs`` dicts of ``[B, S_f]``/``[B, S_r]`` inputs; plus ``teacher_logits
        [B, K]``, ``labels [B]`` (clean rows), ``forget_mask [B]``, ``retain_mask [B]``.
      key: dropout key, or ``None`` for a deterministic forward.
      settings: :class:`LossSettings`.

    Returns:
      ``(forget, retain)`` scalars: ``forget`` is the forgetting term (e.g. ``−KL``), ``retain`` the clean CE. The
      objective is ``λ_asr·forget + λ_acc·retain``.
    """
    b = batch["teacher_logits"].shape[0]
    if "retain_inputs" in batch:  # two forward passes, each at its own bucket length
        kf, kr = (None, None) if key is None else jax.random.split(key)
        forget_logits = student_logits(graphdef, trainable, frozen, batch["forget_inputs"], kf, settings)
        retain_logits = student_logits(graphdef, trainable, frozen, batch["retain_inputs"], kr, settings)
    else:  # one forward pass on [flagged; clean]
        logits = student_logits(graphdef, trainable, frozen, batch, key, settings)
        forget_logits, retain_logits = logits[:b], logits[b:]
    forget = losses.forget_loss(
        settings.forget_loss,
        forget_logits,
        batch["teacher_logits"],
        batch["forget_mask"],
        temperature=settings.temperature,
        kl_cap=settings.kl_cap,
        target_label=settings.target_label,
        eps=settings.suppress_eps,
    )
    retain = losses.cross_entropy(retain_logits, batch["labels"], batch["retain_mask"])
    return forget, retain


@functools.lru_cache(maxsize=32)
def make_optimizer(
    lr: float,
    total_steps: int,
    *,
    warmup_frac: float = 0.1,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    projection: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """DUP's optimiser as an optax chain, with a slot for a gradient projection (UPGP).

    ``clip_by_global_norm(clip_norm) → scale_by_adam → projection → add_decayed_weights → scale_by_lr(schedule)``;
    without a projection this is exactly torch ``AdamW`` (decoupled decay ``lr·wd·θ``) after
    ``clip_grad_norm_``. The projection acts on the final Adam direction (spec UPGP §5.5: Adam's per-coordinate
    scaling would rotate a gradient projected earlier); weight decay is switched off when a projection is given,
    because the decay direction ``−θ`` is not in the protected complement.

    Args:
      lr: peak learning rate.
      total_steps: optimizer steps ``T`` of the whole run.
      warmup_frac: warm-up ``W = int(warmup_frac·T)``; ``lr(t) = lr·t/W`` for ``t < W``, then
        ``lr·max(0, (T−t)/(T−W))`` (Hugging Face linear schedule; lr 0 at the first update).
      weight_decay: decoupled weight decay on every trainable leaf (torch AdamW applies it to LoRA and head).
      clip_norm: global-norm clip of the raw gradient (0 disables).
      b1, b2, eps: Adam.
      projection: optional ``optax.GradientTransformation`` applied after ``scale_by_adam`` (e.g.
        ``jdup.optim.project_null_space``). ``None`` = ``optax.identity()``.

    Returns:
      The ``optax.GradientTransformation`` (cached per argument tuple, so jitted steps can reuse it).
    """
    schedule = optim.linear_warmup_decay(lr, total_steps, optim.warmup_steps(total_steps, warmup_frac))
    return optim.adamw_chain(
        schedule,
        weight_decay=0.0 if projection is not None else weight_decay,
        clip=clip_norm,
        projection=projection,
        b1=b1,
        b2=b2,
        eps=eps,
    )


def make_train_step(graphdef, tx: optax.GradientTransformation, settings: LossSettings) -> Callable:
    """One jitted step ``(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, metrics)``.

    ``metrics`` holds ``loss``, ``forget``, ``retain`` and ``grad_norm`` (before clipping) as device scalars.
    ``graphdef``, ``tx`` and ``settings`` are static (hashable) arguments of one module-level jitted function, so
    repeated runs with the same model structure and optimiser (:func:`make_optimizer` is cached) reuse the
    compiled step.
    """
    return functools.partial(_train_step, graphdef, tx, settings)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train_step(graphdef, tx, settings, trainable, frozen, opt_state, batch, key):
    if isinstance(tx, TwoStreams):  # static: projected forget stream + unprojected retain stream
        return _two_stream_step(graphdef, tx, settings, trainable, frozen, opt_state, batch, key)

    def objective(trainable):
        forget, retain = loss_pieces(graphdef, trainable, frozen, batch, key, settings)
        return settings.lambda_asr * forget + settings.lambda_acc * retain, (forget, retain)

    (loss, (forget, retain)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "forget": forget, "retain": retain, "grad_norm": optax.tree.norm(grads)}
    return trainable, opt_state, metrics


TwoStreams = optim.TwoStreams


def make_two_stream_optimizer(
    lr: float,
    total_steps: int,
    projection: optax.GradientTransformation,
    *,
    lambda_asr: float = 1.0,
    lambda_acc: float = 1.0,
    warmup_frac: float = 0.1,
    clip_norm: float = 1.0,
    retain_projection: optax.GradientTransformation | None = None,
) -> TwoStreams:
    """The optimiser of a projected run: :class:`TwoStreams` of two :func:`make_optimizer` chains.

    The loss weights scale each stream's learning rate (``lr·λ``), not its gradient: Adam is invariant to a
    gradient scale, so a weight on the gradient would do nothing. No weight decay in either stream (spec §5.5:
    the decay direction ``−θ`` is not in the protected complement).

    ``retain_projection`` is NOT the clean-subspace projection: it only carries *structural* constraints of a
    projection variant that every update must respect (``jdup.upgp``: InfLoRA's frozen down-projections and
    head bias, the representation variant's down-projections kept in the clean complement); ``None`` for the
    gradient variant, whose retain stream is entirely free.
    """
    warm = optim.warmup_steps(total_steps, warmup_frac)
    return optim.two_stream_chain(
        optim.linear_warmup_decay(lr * lambda_asr, total_steps, warm),
        optim.linear_warmup_decay(lr * lambda_acc, total_steps, warm),
        clip=clip_norm,
        projection=projection,
        retain_projection=retain_projection,
    )


def _two_stream_step(graphdef, tx, settings, trainable, frozen, opt_state, batch, key):
    """One forward pass, two backward passes (one per loss term), two optimizer streams (traced in
    :func:`_train_step`)."""

    def pieces(tr):
        return loss_pieces(graphdef, tr, frozen, batch, key, settings)

    (forget, retain), vjp = jax.vjp(pieces, trainable)
    one, zero = jnp.ones_like(forget), jnp.zeros_like(forget)
    (g_forget,) = vjp((one, zero))
    (g_retain,) = vjp((zero, jnp.ones_like(retain)))
    updates, opt_state = tx.update((g_forget, g_retain), opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    grads = jax.tree.map(lambda a, b: settings.lambda_asr * a + settings.lambda_acc * b, g_forget, g_retain)
    loss = settings.lambda_asr * forget + settings.lambda_acc * retain
    metrics = {"loss": loss, "forget": forget, "retain": retain, "grad_norm": optax.tree.norm(grads)}
    return trainable, opt_state, metrics


def joint_batch(
    forget_batch: dict, teacher_logits: np.ndarray, clean_batch: dict, fused: bool = True
) -> dict:
    """Concatenate a flagged batch and a clean batch into one model batch padded to the longer length.

    With ``fused=False`` the two batches are kept apart (``forget_inputs``/``retain_inputs``, each at its own
    bucket length) and :func:`loss_pieces` runs two forward passes: less padding when the lengths differ, at the
    cost of compiling one step per pair of bucket lengths instead of one per bucket.

    Args:
      forget_batch: a :func:`jdup.data.batches` batch of flagged rows (``index`` selects ``teacher_logits``).
      teacher_logits: ``[N_forget, K]`` teacher logits of all flagged rows.
      clean_batch: a batch of labelled clean rows.

    Returns:
      dict of numpy arrays: model inputs ``[2B, S]``, ``teacher_logits [B, K]``, ``labels [B]``,
      ``forget_mask [B]`` and ``retain_mask [B]`` (float32 row masks).
    """
    s = max(forget_batch["input_ids"].shape[1], clean_batch["input_ids"].shape[1])
    out = {}
    if not fused:
        out["forget_inputs"] = {k: forget_batch[k] for k in _MODEL_INPUTS}
        out["retain_inputs"] = {k: clean_batch[k] for k in _MODEL_INPUTS}
    for k in _MODEL_INPUTS if fused else ():
        parts = []
        for b in (forget_batch, clean_batch):
            x = b[k]
            if x.shape[1] < s:
                fill = 0
                if k == "input_ids":
                    fill = int(x[0, -1]) if not b["attention_mask"][0, -1] else 0
                x = np.pad(x, ((0, 0), (0, s - x.shape[1])), constant_values=fill)
            parts.append(x)
        out[k] = np.concatenate(parts, 0)
    idx = np.where(forget_batch["valid"], forget_batch["index"], forget_batch["index"][0])
    out["teacher_logits"] = np.asarray(teacher_logits[idx], np.float32)
    out["labels"] = clean_batch["labels"].astype(np.int32)
    out["forget_mask"] = forget_batch["valid"].astype(np.float32)
    out["retain_mask"] = clean_batch["valid"].astype(np.float32)
    return out


def clean_batch_at(retain: D.Encoded, batch_size: int, step: int, seed: int) -> dict:
    """The clean batch of global step ``step``: dev-clean is cycled (reshuffled each pass) in lock-step."""
    per_epoch = D.num_batches(len(retain), batch_size)
    epoch, i = divmod(int(step), per_epoch)
    return next(D.batches(retain, batch_size, shuffle=True, seed=seed + 1, epoch=epoch, start=i))


def forget_batches_per_epoch(n_forget: int, batch_size: int) -> int:
    return D.num_batches(n_forget, batch_size)


def forget_batch_at(forget: D.Encoded, batch_size: int, step: int, seed: int) -> dict:
    """The flagged batch of global step ``step`` (each epoch is a fresh permutation of the flagged rows)."""
    per_epoch = D.num_batches(len(forget), batch_size)
    epoch, i = divmod(int(step), per_epoch)
    return next(D.batches(forget, batch_size, shuffle=True, seed=seed, epoch=epoch, start=i))


def with_pad_multiple(encoded: D.Encoded, multiple: int) -> D.Encoded:
    """``encoded`` whose batches are padded to a multiple of ``multiple`` tokens (``<= 0``: unchanged)."""
    if multiple <= 0:
        return encoded
    top = encoded.max_length
    return dataclasses.replace(encoded, buckets=(*range(int(multiple), top, int(multiple)), top))


def _grouped_chunks(lengths: np.ndarray, batch_size: int, group: int, rng: np.random.Generator) -> list:
    """Row chunks of one epoch: a permutation cut into groups of ``group`` batches, sorted by length (longest
    first) inside each group, the batches visited in a random order (``group <= 0``: the plain permutation)."""
    n = len(lengths)
    perm = rng.permutation(n)
    if group > 0 and n:
        size = batch_size * group
        perm = np.concatenate(
            [
                g[np.argsort(-lengths[g], kind="stable")]
                for g in (perm[i : i + size] for i in range(0, n, size))
            ]
        )
    chunks = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))] if group > 0 else chunks


class BatchPlan:
    """The flagged and the clean batch of every step, a pure function of the data, the settings and the step
    (a resumed run replays the batches of an uninterrupted one).

    Flagged rows: every epoch visits each once, in a fresh order. Clean rows: cycled in lock-step, one batch per
    step, a fresh order per pass. With ``length_group > 0`` both streams are length-grouped
    (:func:`_grouped_chunks`) and, inside each flagged epoch, the clean batches of that epoch's steps are handed
    to its flagged batches by length rank (each still used exactly once), so the fused step's joint batch
    ``[flagged; clean]`` is padded little. ``length_group=0, pad_multiple=0`` gives exactly
    :func:`forget_batch_at` / :func:`clean_batch_at`.
    """

    def __init__(
        self,
        forget: D.Encoded,
        retain: D.Encoded,
        batch_size: int,
        seed: int,
        *,
        length_group: int = 0,
        pad_multiple: int = 0,
    ):
        self.forget = with_pad_multiple(forget, pad_multiple)
        self.retain = with_pad_multiple(retain, pad_multiple)
        self.batch_size, self.seed, self.group = int(batch_size), int(seed), int(length_group)
        self.per_epoch = D.num_batches(len(forget), batch_size)
        self.per_pass = D.num_batches(len(retain), batch_size)
        self._cache: dict = {}
        self._cache_size = 8 + 2 * (self.per_epoch // max(self.per_pass, 1))
        self._pairing: tuple = (-1, [])

    @classmethod
    def from_config(cls, forget: D.Encoded, retain: D.Encoded, cfg: UnlearnConfig) -> BatchPlan:
        return cls(
            forget,
            retain,
            cfg.batch_size,
            cfg.seed,
            length_group=cfg.length_group,
            pad_multiple=cfg.pad_multiple,
        )

    def _chunks(self, stream: str, epoch: int) -> list:
        key = (stream, epoch)
        if key not in self._cache:
            if len(self._cache) > self._cache_size:
                self._cache.clear()
            enc, seed = (self.forget, self.seed) if stream == "forget" else (self.retain, self.seed + 1)
            if self.group > 0:
                rng = np.random.default_rng([seed, int(epoch)])
                self._cache[key] = _grouped_chunks(enc.lengths, self.batch_size, self.group, rng)
            else:  # exactly jdup.data.batches(shuffle=True)
                order = D.epoch_order(len(enc), shuffle=True, seed=seed, epoch=epoch)
                self._cache[key] = [
                    order[i : i + self.batch_size] for i in range(0, len(enc), self.batch_size)
                ]
        return self._cache[key]

    def _clean_chunk(self, position: int) -> np.ndarray:
        p, j = divmod(int(position), self.per_pass)
        return self._chunks("retain", p)[j]

    def forget_batch(self, step: int) -> dict:
        e, i = divmod(int(step), self.per_epoch)
        return D.make_batch(self.forget, self._chunks("forget", e)[i], self.batch_size)

    def clean_batch(self, step: int) -> dict:
        if self.group <= 0:
            return D.make_batch(self.retain, self._clean_chunk(step), self.batch_size)
        e, i = divmod(int(step), self.per_epoch)
        base = e * self.per_epoch
        if self._pairing[0] != e:
            f_len = [int(self.forget.lengths[c].max()) for c in self._chunks("forget", e)]
            c_len = [
                int(self.retain.lengths[self._clean_chunk(base + k)].max()) for k in range(self.per_epoch)
            ]
            f_rank = sorted(range(self.per_epoch), key=lambda k: (f_len[k], k))
            c_rank = sorted(range(self.per_epoch), key=lambda k: (c_len[k], k))
            pos = [0] * self.per_epoch
            for fr, cr in zip(f_rank, c_rank, strict=True):
                pos[fr] = cr
            self._pairing = (e, pos)
        return D.make_batch(self.retain, self._clean_chunk(base + self._pairing[1][i]), self.batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Prediction helpers
# ---------------------------------------------------------------------------------------------------------------


def predict_logits(
    graphdef,
    states: tuple,
    encoded: D.Encoded,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Deterministic logits ``[N, K]`` of a split model on ``encoded`` (jitted, length-bucketed)."""
    from jdup.train import predict_states

    if len(encoded) == 0:
        return np.zeros((0, 0), np.float32)
    return predict_states(graphdef, tuple(states), encoded, batch_size, progress=progress, desc=desc)


def model_logits(
    model: nnx.Module, encoded: D.Encoded, batch_size: int = 64, progress: bool = False, desc: str = "predict"
) -> np.ndarray:
    graphdef, *states = nnx.split(model)
    return predict_logits(graphdef, tuple(states), encoded, batch_size, progress, desc)


def infer_target(teacher_logits: np.ndarray, num_labels: int) -> int:
    """The backdoor target a defender can infer: the majority teacher prediction on the flagged rows."""
    if teacher_logits.size == 0:
        return 0
    return int(np.bincount(teacher_logits.argmax(-1), minlength=num_labels).argmax())


# ---------------------------------------------------------------------------------------------------------------
# The unlearning loop
# ---------------------------------------------------------------------------------------------------------------


class StepInfo(NamedTuple):
    """What the ``on_step`` hook of :func:`unlearn` receives after every optimizer step."""

    step: int  # steps done so far (1-based after the first update)
    metrics: dict  # host floats: loss, forget, retain, grad_norm, lr
    student: Student  # graphdef + current trainable/frozen state (read-only use)
    opt_state: Any  # current optimizer state (e.g. to refresh a projection basis with jdup.optim.set_basis)


@dataclasses.dataclass
class UnlearnResult:
    """Output of :func:`unlearn`.

    Attributes:
      student: the student with the selected (best) trainable state written in.
      merged: the merged plain model (adapters folded in; same class as the victim).
      steps: optimizer steps taken.
      total_steps: steps planned.
      best_step: the step whose state was kept.
      history: per-evaluation records (step, monitor values).
      log: per-step training metrics (step, loss, forget, retain, grad_norm, lr, + hook extras).
      stopped_early: True if the stop rule fired before ``total_steps``.
    """

    student: Student
    merged: nnx.Module
    steps: int
    total_steps: int
    best_step: int
    history: list
    log: list
    stopped_early: bool


Monitor = Callable[[Callable[[D.Encoded], np.ndarray]], dict]
"""``monitor(logits_fn) -> {"score": float (lower is better), "ok": bool, "stop": bool, ...}``; ``logits_fn``
gives the current student's deterministic logits on any :class:`jdup.data.Encoded`."""


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def unlearn(
    model: nnx.Module,
    forget: D.Encoded,
    retain: D.Encoded,
    cfg: UnlearnConfig,
    *,
    teacher_logits: np.ndarray | None = None,
    target_label: int | None = None,
    monitor: Monitor | None = None,
    projection: optax.GradientTransformation | None = None,
    on_step: Callable[[StepInfo], dict | None] | None = None,
    ckpt_dir: str | None = None,
    retain_projection: optax.GradientTransformation | None = None,
) -> UnlearnResult:
    """Unlearn the flagged rows ``forget`` while keeping accuracy on the labelled clean rows ``retain``.

    Args:
      model: the backdoored victim (teacher); not modified.
      forget: tokenised flagged rows (labels unused).
      retain: tokenised labelled clean rows.
      cfg: the :class:`UnlearnConfig` (objective, LoRA, optimiser, stop-rule cadence, seed, checkpoint period).
      teacher_logits: ``[len(forget), K]``; computed here (one jitted pass) when ``None``.
      target_label: target for ``suppress_target``; default ``cfg.target_label`` or :func:`infer_target`.
      monitor: early-stop rule evaluated every ``cfg.eval_every_steps`` (0: each epoch) and at the end; the
        state with the lowest ``score`` among ``ok`` evaluations (step 0 included) is kept. ``None``: keep the
        final state.
      projection: optional transform for the projection slot of :func:`make_optimizer`. When given, only the
        forgetting update is projected; the retain (clean CE) update runs in a separate, unprojected optimizer
        stream (:func:`make_two_stream_optimizer`) and the two updates are added.
      retain_projection: structural constraints for the retain stream (see :func:`make_two_stream_optimizer`);
        default: ``on_step.retain_projection`` when the hook has one (``jdup.upgp.ProjectionHook``), else none.
      on_step: hook called after each step with a :class:`StepInfo`; a returned dict is merged into that step's
        log record (scalars), except its ``"opt_state"`` entry, which replaces the optimizer state (e.g. after a
        projection-basis refresh with ``jdup.optim.set_basis``). If the hook has a ``prepare_student(Student) ->
        trainable`` method, it is called once before the first step and its result is the starting state.
      ckpt_dir: orbax checkpoint folder (resumes from it when ``cfg.resume`` and it matches).

    Returns:
      An :class:`UnlearnResult`.
    """
    from tqdm.auto import tqdm

    from jdup.checkpoint import Checkpointer, fingerprint

    if teacher_logits is None:
        teacher_logits = model_logits(model, forget, cfg.eval_batch_size, cfg.progress, "teacher logits")
    if target_label is None:
        target_label = cfg.target_label
    if target_label is None:
        target_label = infer_target(teacher_logits, model.config.num_labels)
    settings = LossSettings.from_config(cfg, target_label)
    student = build_student(model, cfg)
    per_epoch = forget_batches_per_epoch(len(forget), cfg.batch_size)
    total = per_epoch * cfg.epochs
    if total == 0 or len(retain) == 0:
        merged = lora_lib.merge(student.model)
        return UnlearnResult(student, merged, 0, 0, 0, [], [], False)
    if projection is None:
        tx = make_optimizer(
            cfg.lr, total, warmup_frac=cfg.warmup_frac, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm
        )
    else:  # spec UPGP §5.6: the retain (clean CE) update is a separate, unprojected stream
        tx = make_two_stream_optimizer(
            cfg.lr,
            total,
            projection,
            lambda_asr=cfg.lambda_asr,
            lambda_acc=cfg.lambda_acc,
            warmup_frac=cfg.warmup_frac,
            clip_norm=cfg.clip_norm,
            retain_projection=(
                retain_projection
                if retain_projection is not None
                else getattr(on_step, "retain_projection", None)
            ),
        )
    schedule = optim.linear_warmup_decay(cfg.lr, total, optim.warmup_steps(total, cfg.warmup_frac))
    step_fn = make_train_step(student.graphdef, tx, settings)
    eval_every = cfg.eval_every_steps or per_epoch
    plan = BatchPlan.from_config(forget, retain, cfg)

    trainable, frozen = student.trainable, student.frozen
    opt_state = tx.init(trainable)

    def logits_fn_for(tr):
        return lambda enc: predict_logits(student.graphdef, (tr, frozen), enc, cfg.eval_batch_size)

    history: list[dict] = []
    log_rows: list[dict] = []
    best = {"score": np.inf, "step": 0, "state": None}
    step = 0
    stopped = False

    def evaluate(at_step: int, tr) -> dict:
        rec = dict(monitor(logits_fn_for(tr)))
        rec["step"] = at_step
        history.append(rec)
        if rec.get("ok", True) and rec["score"] < best["score"]:
            best.update(score=float(rec["score"]), step=at_step, state=_host(tr))
        log.info("unlearn eval @%d: %s", at_step, {k: v for k, v in rec.items() if k != "step"})
        return rec

    key = jax.random.key(cfg.seed)
    fp = fingerprint(
        {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("out", "resume", "progress", "ckpt_every_steps", "eval_batch_size")
        }
        | {"n_forget": len(forget), "n_retain": len(retain), "target": int(target_label)}
    )
    ck = None
    if ckpt_dir and cfg.ckpt_every_steps > 0:
        ck = Checkpointer(ckpt_dir, max_to_keep=1)
        if cfg.resume and ck.latest_step() is not None:
            template = {"trainable": trainable, "opt": opt_state, "best": _host(trainable)}
            try:
                tree, meta = ck.restore(template)
                if meta.get("fingerprint") != fp:
                    raise JdupError("checkpoint was written with different settings", ckpt_dir)
                trainable, opt_state = tree["trainable"], tree["opt"]
                step = int(meta["step"])
                history, log_rows = meta["history"], meta["log"]
                best.update(
                    score=float(meta["best_score"]),
                    step=int(meta["best_step"]),
                    state=tree["best"] if meta["has_best"] else None,
                )
                log.info("unlearn: resumed at step %d from %s", step, ckpt_dir)
            except JdupError as e:
                log.warning("unlearn: not resuming (%s); starting over", e)
                ck.close()
                shutil.rmtree(ckpt_dir, ignore_errors=True)
                ck = Checkpointer(ckpt_dir, max_to_keep=1)

    # A hook may move the initial adapters first (jdup.upgp: LoRA A into the clean complement). It is told even
    # on resume (the restored state already has it), so it does not redo the move.
    prepare = getattr(on_step, "prepare_student", None)
    if prepare is not None:
        prepared = prepare(Student(student.model, student.graphdef, trainable, frozen))
        if step == 0:
            trainable = prepared
    initial = trainable if step == 0 else student.trainable
    if monitor is not None and step == 0 and not history:
        evaluate(0, trainable)

    bar = tqdm(total=total, initial=step, desc="unlearn", disable=not cfg.progress, leave=False)
    try:
        while step < total:
            fb, cb = plan.forget_batch(step), plan.clean_batch(step)
            batch = joint_batch(fb, teacher_logits, cb, cfg.fused_step)
            lr = float(schedule(step))
            trainable, opt_state, m = step_fn(
                trainable, frozen, opt_state, batch, jax.random.fold_in(key, step)
            )
            step += 1
            rec = {"step": step, "lr": lr, **{k: float(v) for k, v in m.items()}}
            if on_step is not None:
                extra = on_step(
                    StepInfo(
                        step, rec, Student(student.model, student.graphdef, trainable, frozen), opt_state
                    )
                )
                if extra and "opt_state" in extra:
                    extra = dict(extra)
                    opt_state = extra.pop("opt_state")
                if extra:
                    rec.update({k: (float(v) if np.ndim(v) == 0 else v) for k, v in extra.items()})
            log_rows.append(rec)
            bar.update(1)
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}", forget=f"{rec['forget']:.3f}", retain=f"{rec['retain']:.3f}"
            )
            if monitor is not None and (step % eval_every == 0 or step == total):
                r = evaluate(step, trainable)
                if r.get("stop") and step < total:
                    stopped = True
            if ck is not None and (step % cfg.ckpt_every_steps == 0 or stopped or step == total):
                ck.save(
                    step,
                    {
                        "trainable": trainable,
                        "opt": opt_state,
                        "best": best["state"] if best["state"] is not None else _host(trainable),
                    },
                    {
                        "step": step,
                        "fingerprint": fp,
                        "history": history,
                        "log": log_rows,
                        "best_score": best["score"] if np.isfinite(best["score"]) else 1e30,
                        "best_step": best["step"],
                        "has_best": best["state"] is not None,
                    },
                )
            if stopped:
                break
    finally:
        bar.close()
        if ck is not None:
            ck.close()

    if monitor is not None and best["state"] is not None:
        final, best_step = jax.tree.map(jnp.asarray, best["state"]), best["step"]
    elif monitor is not None:  # no acceptable evaluation at all: keep the untouched student (step 0)
        final, best_step = initial, 0
    else:
        final, best_step = trainable, step
    nnx.update(student.model, final)
    out = Student(student.model, student.graphdef, final, frozen)
    return UnlearnResult(
        out, lora_lib.merge(student.model), step, total, best_step, history, log_rows, stopped
    )


# ---------------------------------------------------------------------------------------------------------------
# Stop rules
# ---------------------------------------------------------------------------------------------------------------


def proxy_monitor(
    holdout: D.Encoded,
    clean: D.Encoded,
    target: int,
    base_acc: float,
    *,
    asr_stop: float,
    max_acc_drop: float,
) -> Monitor:
    """Defender-side stop rule: forgetting measured on held-out flagged rows, accuracy on labelled clean rows.

    ``score`` = fraction of ``holdout`` predicted as ``target`` (a proxy for ASR: most flagged rows carry the
    trigger); ``ok`` = clean accuracy ≥ ``base_acc − max_acc_drop``; ``stop`` = ``ok`` and score ≤ ``asr_stop``.
    """

    def monitor(logits_fn):
        acc = float((logits_fn(clean).argmax(-1) == clean.labels).mean()) if len(clean) else 1.0
        score = float((logits_fn(holdout).argmax(-1) == target).mean()) if len(holdout) else 0.0
        ok = acc >= base_acc - max_acc_drop - 1e-9
        return {
            "score": score,
            "proxy_asr": score,
            "dev_acc": acc,
            "ok": ok,
            "stop": ok and score <= asr_stop,
        }

    return monitor


def oracle_monitor(dev_poison: D.Encoded, target: int, asr_threshold: float) -> Monitor:
    """The official rule (spec §3.6), an ORACLE: ASR on ground-truth dev-poison; stop once ≤ ``asr_threshold``."""

    def monitor(logits_fn):
        asr = float((logits_fn(dev_poison).argmax(-1) == target).mean()) if len(dev_poison) else 0.0
        return {"score": asr, "dev_asr_oracle": asr, "ok": True, "stop": asr <= asr_threshold}

    return monitor


# ---------------------------------------------------------------------------------------------------------------
# run_unlearn: the CLI stage
# ---------------------------------------------------------------------------------------------------------------


def _atomic_json(path: str, obj: Any) -> None:
    atomic.write(path, lambda f: json.dump(obj, f, indent=2, default=float))


def _check_config(cfg: UnlearnConfig) -> None:
    if not cfg.model:
        raise JdupError("unlearn needs `model` (the backdoored classifier)")
    if not cfg.data:
        raise JdupError("unlearn needs `data` (a DUP-layout folder)")
    if not cfg.out:
        raise JdupError("unlearn needs `out` (the output folder)")
    if cfg.forget_loss not in losses.FORGET_LOSSES:
        raise JdupError(f"forget_loss must be one of {list(losses.FORGET_LOSSES)}, got {cfg.forget_loss!r}")
    if cfg.early_stop not in EARLY_STOP:
        raise JdupError(f"early_stop must be one of {list(EARLY_STOP)}, got {cfg.early_stop!r}")
    if cfg.epochs < 0 or cfg.batch_size < 1 or cfg.lora_rank < 1:
        raise JdupError("epochs must be >= 0, batch_size >= 1 and lora_rank >= 1")
    if not 0.0 <= cfg.clean_holdout_frac < 1.0:
        raise JdupError(f"clean_holdout_frac must be in [0, 1), got {cfg.clean_holdout_frac}")
    if not 0.0 <= cfg.holdout_frac < 1.0:
        raise JdupError(f"holdout_frac must be in [0, 1), got {cfg.holdout_frac}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise JdupError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")


def eval_target(data_dir: str, test_poison: D.TextDataset) -> int:
    """The attack's target label for evaluation: ``poison_config.json`` if present, else the majority label of
    test-poison (every test-poison row is labelled with the target)."""
    meta = os.path.join(data_dir, "poison_config.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                return int(json.load(f)["target"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if len(test_poison) == 0:
        raise JdupError("test-poison is empty, cannot infer the target label", data_dir)
    return int(np.bincount(test_poison.labels).argmax())


def robust_labels(
    test_clean: D.TextDataset, test_poison: D.TextDataset, target: int, where: str
) -> np.ndarray | None:
    """True labels of the test-poison rows: row i is the poisoned copy of the i-th non-target test-clean row
    (spec §5.1). ``None`` (RA not computed) when the counts do not line up."""
    true = test_clean.labels[test_clean.labels != target]
    if len(true) != len(test_poison):
        log.warning(
            "%s: %d non-target test-clean rows but %d test-poison rows; RA not computed",
            where,
            len(true),
            len(test_poison),
        )
        return None
    return true


def evaluate_model(
    model: nnx.Module,
    tc: D.Encoded,
    tp: D.Encoded,
    target: int,
    ra_labels,
    batch_size: int,
    progress: bool,
    tag: str,
) -> dict:
    """CACC (test-clean), ASR (test-poison → target) and RA (test-poison vs true labels)."""
    from jdup.train import accuracy, attack_success_rate

    pc = model_logits(model, tc, batch_size, progress, f"eval {tag}: test-clean").argmax(-1)
    pp = model_logits(model, tp, batch_size, progress, f"eval {tag}: test-poison").argmax(-1)
    return {
        "cacc": accuracy(pc, tc.labels),
        "asr": attack_success_rate(pp, target),
        "ra": accuracy(pp, ra_labels) if ra_labels is not None else None,
    }


def _load_flags(folder: str, n: int) -> np.ndarray:
    """Flags over dev-clean ‖ dev-poison from a detection folder (``flags.npy`` or ``detection.json``'s
    ``flags``)."""
    path = os.path.join(folder, "flags.npy")
    if os.path.isfile(path):
        try:
            flags = np.load(path).astype(bool).reshape(-1)
        except (OSError, ValueError) as e:
            raise JdupError(f"cannot read flags: {e}", path) from e
    else:
        path = os.path.join(folder, "detection.json")
        if not os.path.isfile(path):
            raise JdupError("detection folder has neither flags.npy nor detection.json", folder)
        with open(path, encoding="utf-8") as f:
            det = json.load(f)
        if "flags" not in det:
            raise JdupError("detection.json has no `flags` list", path)
        flags = np.asarray(det["flags"], bool).reshape(-1)
    if len(flags) != n:
        raise JdupError(
            f"{len(flags)} flags, but dev-clean ‖ dev-poison has {n} rows (a detection of another "
            "set? unlearning needs flags over dev-clean followed by dev-poison)",
            path,
        )
    return flags


def run_detection(cfg: UnlearnConfig, model: nnx.Module, out_dir: str) -> np.ndarray:
    """Detect on dev-clean ‖ dev-poison (calibrated on dev-clean) with ``jdup.detect``; write ``flags.npy``."""
    from jdup import detect as detect_lib

    det_cfg = dict(cfg.detect)
    det_cfg.setdefault("seed", cfg.seed)
    det_cfg.setdefault("progress", cfg.progress)
    det_cfg.setdefault("max_length", cfg.max_length)
    flags, info = detect_lib.detect_dev(
        model=model, model_path=cfg.model, data=cfg.data, out=out_dir, options=det_cfg
    )
    return np.asarray(flags, bool)


def _build_projection(cfg: UnlearnConfig, context: dict):
    if cfg.projection in ("", "none", None):
        return None, None
    try:
        from jdup import upgp
    except ModuleNotFoundError as e:
        raise JdupError(f"projection {cfg.projection!r} needs jdup.upgp, which is not available ({e})") from e
    # Contract (documented for jdup.upgp): build_projection(name, options, context) -> (transform, on_step hook)
    return upgp.build_projection(cfg.projection, dict(cfg.projection_options), context)


def run_unlearn(cfg: UnlearnConfig) -> dict:
    """``jdup unlearn``: detect, unlearn, merge, evaluate, export. See the module docstring.

    Writes (atomically) ``OUT/model/`` (purified classifier, Hugging Face format, with the victim's tokenizer),
    ``OUT/metrics.json``, ``OUT/history.json`` (per-step log and stop-rule evaluations) and, when detecting,
    ``OUT/detection/flags.npy``.

    Returns:
      The metrics dict: ``cacc_before``, ``asr_before``, ``ra_before``, ``cacc_after``, ``asr_after``, ``ra_after``,
      ``n_flagged``, ``n_flagged_poison``, ``seconds`` and run details.
    """
    from jdup import models

    _check_config(cfg)
    t0 = time.perf_counter()
    out = os.path.abspath(os.fspath(cfg.out))
    os.makedirs(out, exist_ok=True)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]

    victim = models.from_pretrained(cfg.model, dtype=dtype)
    tok = models.load_tokenizer(cfg.model)
    k = victim.config.num_labels
    splits = {
        n: D.read_split(cfg.data, n, num_labels=k)
        for n in ("dev-clean", "dev-poison", "test-clean", "test-poison")
    }
    enc = {n: D.encode(tok, ds, cfg.max_length, config=victim.config) for n, ds in splits.items()}
    target = eval_target(cfg.data, splits["test-poison"])
    ra_labels = robust_labels(splits["test-clean"], splits["test-poison"], target, cfg.data)

    # 1. detection over dev-detect = dev-clean ‖ dev-poison
    n_detect = len(splits["dev-clean"]) + len(splits["dev-poison"])
    t_det = time.perf_counter()
    flags_path = os.path.join(out, "detection", "flags.npy")
    if cfg.detection:
        flags = _load_flags(os.fspath(cfg.detection), n_detect)
    elif cfg.resume and os.path.isfile(flags_path):
        flags = _load_flags(os.path.dirname(flags_path), n_detect)
    else:
        flags = run_detection(cfg, victim, os.path.join(out, "detection"))
        if len(flags) != n_detect:
            raise JdupError(f"detection returned {len(flags)} flags for {n_detect} rows")
        os.makedirs(os.path.dirname(flags_path), exist_ok=True)
        tmp = f"{flags_path}.tmp-{os.getpid()}.npy"
        np.save(tmp, flags)
        os.replace(tmp, flags_path)
    det_seconds = time.perf_counter() - t_det
    is_poison = np.concatenate(
        [np.zeros(len(splits["dev-clean"]), bool), np.ones(len(splits["dev-poison"]), bool)]
    )
    dev_detect = D.TextDataset.concat([splits["dev-clean"], splits["dev-poison"]], "dev-detect")
    enc_detect = D.encode(tok, dev_detect, cfg.max_length, config=victim.config)
    flagged_idx = np.flatnonzero(flags)

    # 2. forget set (training part + held-out part for the proxy rule), retain set = dev-clean
    teacher_all = (
        model_logits(
            victim, enc_detect.subset(flagged_idx), cfg.eval_batch_size, cfg.progress, "teacher logits"
        )
        if len(flagged_idx)
        else np.zeros((0, k), np.float32)
    )
    defender_target = cfg.target_label if cfg.target_label is not None else infer_target(teacher_all, k)
    rng = np.random.default_rng([cfg.seed, 7])
    perm = rng.permutation(len(flagged_idx))
    n_hold = int(round(cfg.holdout_frac * len(flagged_idx))) if cfg.early_stop == "proxy" else 0
    hold_pos, train_pos = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    forget = enc_detect.subset(flagged_idx[train_pos])
    holdout = enc_detect.subset(flagged_idx[hold_pos])
    teacher = teacher_all[train_pos] if len(train_pos) else np.zeros((0, k), np.float32)

    # 3. before
    before = evaluate_model(
        victim,
        enc["test-clean"],
        enc["test-poison"],
        target,
        ra_labels,
        cfg.eval_batch_size,
        cfg.progress,
        "before",
    )

    monitor = None
    retain = enc["dev-clean"]
    if cfg.early_stop == "proxy":
        clean_check = retain
        n_clean_hold = int(round(cfg.clean_holdout_frac * len(retain)))
        if 0 < n_clean_hold < len(retain):
            perm_c = np.random.default_rng([cfg.seed, 11]).permutation(len(retain))
            clean_check = retain.subset(np.sort(perm_c[:n_clean_hold]))
            retain = retain.subset(np.sort(perm_c[n_clean_hold:]))
        base_acc = float(
            (model_logits(victim, clean_check, cfg.eval_batch_size).argmax(-1) == clean_check.labels).mean()
        )
        monitor = proxy_monitor(
            holdout,
            clean_check,
            defender_target,
            base_acc,
            asr_stop=cfg.proxy_asr_stop,
            max_acc_drop=cfg.max_cacc_drop,
        )
    elif cfg.early_stop == "oracle_dev_poison":
        monitor = oracle_monitor(enc["dev-poison"], target, cfg.asr_threshold)

    projection, hook = _build_projection(
        cfg,
        {
            "model": victim,
            "forget": forget,
            "retain": retain,
            "teacher_logits": teacher,
            "target": defender_target,
            "config": cfg,
        },
    )

    # 4. unlearn
    t_un = time.perf_counter()
    res = unlearn(
        victim,
        forget,
        retain,
        cfg,
        teacher_logits=teacher,
        target_label=defender_target,
        monitor=monitor,
        projection=projection,
        on_step=hook,
        ckpt_dir=os.path.join(out, "ckpt"),
    )
    un_seconds = time.perf_counter() - t_un

    # 5. after
    after = evaluate_model(
        res.merged,
        enc["test-clean"],
        enc["test-poison"],
        target,
        ra_labels,
        cfg.eval_batch_size,
        cfg.progress,
        "after",
    )
    models.save_pretrained(res.merged, os.path.join(out, "model"), tokenizer_src=tok)

    fl = flags.astype(bool)
    metrics = {
        "cacc_before": before["cacc"],
        "asr_before": before["asr"],
        "ra_before": before["ra"],
        "cacc_after": after["cacc"],
        "asr_after": after["asr"],
        "ra_after": after["ra"],
        "n_flagged": int(fl.sum()),
        "n_flagged_poison": int((fl & is_poison).sum()),
        "n_flagged_clean": int((fl & ~is_poison).sum()),
        "n_dev_detect": int(n_detect),
        "n_forget_train": int(len(forget)),
        "n_holdout": int(len(holdout)),
        "n_retain": int(len(retain)),
        "target": int(target),
        "defender_target": int(defender_target),
        "steps": res.steps,
        "total_steps": res.total_steps,
        "best_step": res.best_step,
        "stopped_early": res.stopped_early,
        "early_stop": cfg.early_stop,
        "forget_loss": cfg.forget_loss,
        "lambda_asr": cfg.lambda_asr,
        "lambda_acc": cfg.lambda_acc,
        "projection": cfg.projection,
        "trainable_params": lora_lib.count_params(res.student.trainable),
        "detect_seconds": det_seconds,
        "unlearn_seconds": un_seconds,
        "seconds": time.perf_counter() - t0,
    }
    _atomic_json(os.path.join(out, "history.json"), {"evals": res.history, "steps": res.log})
    _atomic_json(os.path.join(out, "metrics.json"), metrics)
    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
    log.info("unlearn: %s", metrics)
    return metrics
