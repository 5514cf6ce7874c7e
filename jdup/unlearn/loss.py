"""The unlearning objective: student logits, the forgetting and retain terms, and the joint batch they run on.

``L = λ_asr · forget(student, teacher)[flagged batch] + λ_acc · CE(student, y)[clean batch]`` where the faithful
``forget`` is ``−KL(p_T ‖ p_S)`` (:mod:`jdup.losses`; bounded variants selectable). :class:`LossSettings` holds only
what shapes the traced computation (static); the weights ``λ`` are traced arrays (:class:`StepHParams` in
:mod:`jdup.unlearn.step`), so K cells of a sweep with different weights share one compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import lora as lora_lib
from jdup import losses
from jdup.models.common import CLS_TRIM_ARCHS
from jdup.predict import MODEL_INPUTS, model_inputs


class LossSettings(NamedTuple):
    """Hashable loss settings baked into a jitted step (Python scalars only; no loss weights, they are traced)."""

    forget_loss: str = "kl"
    temperature: float = 1.0
    kl_cap: float = 2.0
    suppress_eps: float = 1e-4
    target_label: int = 1
    lora_dropout: bool = True
    model_dropout: bool = True
    # a [CLS]-head encoder computes its last layer at [CLS] only (the row the loss reads; same dropout masks as
    # the full layer, so the same numbers up to float rounding); False: every position
    trim_last_layer: bool = True

    @classmethod
    def from_config(cls, cfg: Any, target_label: int) -> LossSettings:
        """From an :class:`~jdup.unlearn.UnlearnSettings` and the (defender's) target label."""
        return cls(
            cfg.forget_loss,
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
    trim = settings.trim_last_layer and getattr(getattr(model, "config", None), "arch", None) in CLS_TRIM_ARCHS
    kw = {"last_layer_positions": "cls"} if trim else {}
    if key is None:
        return model(*(batch[k] for k in MODEL_INPUTS), deterministic=True, **kw).logits
    k_lora, k_model = jax.random.split(key)
    with lora_lib.lora_dropout(k_lora if settings.lora_dropout else None):
        if settings.model_dropout:
            out = model(
                *(batch[k] for k in MODEL_INPUTS), deterministic=False, rngs=nnx.Rngs(dropout=k_model), **kw
            )
        else:
            out = model(*(batch[k] for k in MODEL_INPUTS), deterministic=True, **kw)
    return out.logits


def loss_pieces(graphdef, trainable, frozen, batch: dict, key: jax.Array | None, settings: LossSettings):
    """The two loss terms on a joint batch, separately (both to be minimised): :func:`loss_terms` without the
    clean-batch accuracy."""
    forget, retain, _ = loss_terms(graphdef, trainable, frozen, batch, key, settings)
    return forget, retain


def loss_terms(graphdef, trainable, frozen, batch: dict, key: jax.Array | None, settings: LossSettings):
    """The two loss terms on a joint batch, separately (both to be minimised), and the student's accuracy on the
    batch's clean rows (no gradient flows through it).

    Args:
      graphdef, trainable, frozen: the student split (:func:`~jdup.unlearn.build_student`).
      batch: a joint batch from :func:`joint_batch`: model inputs ``[2B, S]`` (flagged rows first) or, unfused,
        ``forget_inputs``/``retain_inputs`` dicts of ``[B, S_f]``/``[B, S_r]`` inputs; plus ``teacher_logits
        [B, K]``, ``labels [B]`` (clean rows), ``forget_mask [B]``, ``retain_mask [B]``.
      key: dropout key, or ``None`` for a deterministic forward.
      settings: :class:`LossSettings`.

    Returns:
      ``(forget, retain, retain_acc)`` scalars: ``forget`` is the forgetting term (e.g. ``−KL``), ``retain`` the
      clean CE, ``retain_acc`` the share of the clean rows whose label the student predicts (dropout on, as in
      training; the collapse guard of :mod:`jdup.unlearn.guard` reads it). The objective is
      ``λ_asr·forget + λ_acc·retain`` (:func:`objective`).
    """
    b = batch["teacher_logits"].shape[0]
    if "retain_inputs" in batch:  # two forward passes, each at its own bucket length
        kf, kr = (None, None) if key is None else jax.random.split(key)
        forget_logits = student_logits(graphdef, trainable, frozen, batch["forget_inputs"], kf, settings)[:b]
        retain_logits = student_logits(graphdef, trainable, frozen, batch["retain_inputs"], kr, settings)[:b]
    else:  # one forward pass on [flagged; clean]
        logits = student_logits(graphdef, trainable, frozen, batch, key, settings)
        forget_logits, retain_logits = logits[:b], logits[b : 2 * b]  # rows after 2B: padding (jdup.mesh)
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
    hits = jax.lax.stop_gradient(jnp.argmax(retain_logits, -1) == batch["labels"]).astype(jnp.float32)
    mask = batch["retain_mask"]
    retain_acc = jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return forget, retain, retain_acc


def objective(forget, retain, lambda_asr, lambda_acc):
    """``λ_asr·forget + λ_acc·retain`` (weights: Python floats or traced float32 arrays, same numbers)."""
    return lambda_asr * forget + lambda_acc * retain


class ForgetAugment(NamedTuple):
    """How the flagged rows of one step are perturbed before the forward pass (:func:`forget_augment_at`).

    Attributes:
      drop: probability that each inner token of a flagged row (every real token but the first and the last, e.g.
        BERT's ``[CLS]``/``[SEP]``) is removed; the remaining tokens close up and the row is right-padded again.
      rng: the step's random generator.
      pad_id: the id written into the positions freed at the end of a row (masked out).
    """

    drop: float
    rng: np.random.Generator
    pad_id: int = 0
    mix: float = 0.0  # probability that a flagged row also gets a window of a clean row's tokens (mix_tokens)
    target: int | None = None  # the defender's target: windows come from clean rows of the other classes only


def forget_augment_at(cfg: Any, step: int, pad_id: int = 0, target: int | None = None) -> ForgetAugment | None:
    """The augmentation of step ``step`` (0-based) of a run with settings ``cfg`` (``forget_drop``,
    ``forget_mix``, ``seed``), or ``None`` when both are 0. The generator is ``default_rng([seed, 17, step])``, so a
    resumed run and a sweep cell draw the same tokens as a single run."""
    drop = float(getattr(cfg, "forget_drop", 0.0) or 0.0)
    mix = float(getattr(cfg, "forget_mix", 0.0) or 0.0)
    if drop <= 0.0 and mix <= 0.0:
        return None
    rng = np.random.default_rng([int(cfg.seed), 17, int(step)])
    return ForgetAugment(drop, rng, int(pad_id), mix, None if target is None else int(target))


def mix_tokens(batch: dict, clean: dict, mix: float, rng: np.random.Generator, pad_id: int = 0,
               exclude_label: int | None = None) -> dict:
    """A copy of the flagged ``batch`` where each row, with probability ``mix``, gets a contiguous window of the
    inner tokens of a random valid row of the ``clean`` batch (whose label is not ``exclude_label``, the target:
    the mixed row then still belongs where the forgetting term pushes it), put right after its first token or
    right before its last one (at random). The window fills the row up to the wider of the two batches' lengths (what the joint
    batch pads to anyway), so no new length is compiled; after :func:`drop_tokens` the dropped tokens make room.
    Forgetting then sees the flagged rows' trigger inside ordinary clean text, as a triggered test row shows it."""
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]).astype(bool)
    c_ids, c_mask = np.asarray(clean["input_ids"]), np.asarray(clean["attention_mask"]).astype(bool)
    b, s = ids.shape[0], max(ids.shape[1], c_ids.shape[1])
    out_ids = np.full((b, s), pad_id, ids.dtype)
    out_mask = np.zeros((b, s), bool)
    out_ids[:, : ids.shape[1]] = np.where(mask, ids, pad_id)
    out_mask[:, : ids.shape[1]] = mask
    usable = np.asarray(clean.get("valid", np.ones(len(c_ids), bool)), bool)
    if exclude_label is not None and "labels" in clean:
        usable = usable & (np.asarray(clean["labels"]) != exclude_label)
    c_valid = np.flatnonzero(usable)
    lengths, c_len = mask.sum(1), c_mask.sum(1)
    for i in range(b):
        n = int(lengths[i])
        if n < 2 or not len(c_valid) or rng.random() >= mix:
            continue
        j = int(c_valid[rng.integers(len(c_valid))])
        inner = c_ids[j, 1 : max(1, int(c_len[j]) - 1)]
        w = min(len(inner), s - n)
        if w <= 0:
            continue
        start = int(rng.integers(len(inner) - w + 1))
        window = inner[start : start + w]
        row = ids[i, :n]
        row = np.concatenate([row[:1], window, row[1:]]) if rng.random() < 0.5 else np.concatenate(
            [row[:-1], window, row[-1:]])
        out_ids[i, : len(row)] = row
        out_mask[i, : len(row)] = True
    out = dict(batch)
    out["input_ids"] = out_ids
    out["attention_mask"] = out_mask.astype(np.asarray(batch["attention_mask"]).dtype)
    out["token_type_ids"] = np.zeros((b, s), np.asarray(batch["token_type_ids"]).dtype)
    return out


def drop_tokens(batch: dict, drop: float, rng: np.random.Generator, pad_id: int = 0) -> dict:
    """A copy of ``batch`` (a :func:`jdup.data.batches` batch) where each inner real token of each row is removed
    with probability ``drop`` (the first and last real tokens always stay); the kept tokens keep their order, move
    left, and the row is padded on the right (``pad_id``, attention 0). Shapes are unchanged, so the step compiles
    no new lengths. Forgetting a flagged row in many partial contexts makes it depend on what the rows share (the
    trigger) rather than on the rows' own words."""
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]).astype(bool)
    b, s = ids.shape
    pos = np.arange(s)[None, :]
    length = mask.sum(1, keepdims=True)
    inner = mask & (pos > 0) & (pos < length - 1)
    keep = mask & ~(inner & (rng.random((b, s)) < drop))
    order = np.argsort(~keep, axis=1, kind="stable")  # kept positions first, in their order
    out = dict(batch)
    new_mask = np.take_along_axis(keep, order, 1)
    out["input_ids"] = np.where(new_mask, np.take_along_axis(ids, order, 1), pad_id).astype(ids.dtype)
    out["attention_mask"] = new_mask.astype(np.asarray(batch["attention_mask"]).dtype)
    tt = np.asarray(batch["token_type_ids"])
    out["token_type_ids"] = np.where(new_mask, np.take_along_axis(tt, order, 1), 0).astype(tt.dtype)
    return out


def mix_encoded(rows: Any, clean: Any, seed: Any) -> Any:
    """Each row of ``rows`` (a :class:`jdup.data.Encoded`) with the inner tokens of a random row of ``clean`` put
    after its first token or before its last (:func:`mix_tokens` with ``mix=1``, up to ``rows.max_length``
    tokens), drawn with ``default_rng(seed)``: the held-out flagged rows of ``forget_check`` inside ordinary text
    (``check_mix``). ``rows`` unchanged when either set is empty."""
    if not len(rows) or not len(clean):
        return rows
    arrays = {k: getattr(rows, k) for k in MODEL_INPUTS}
    c_arrays = {k: getattr(clean, k) for k in MODEL_INPUTS}
    out = mix_tokens(arrays, c_arrays, 1.0, np.random.default_rng(seed), int(rows.pad_id))
    w = rows.max_length
    mask = out["attention_mask"][:, :w]
    return dataclasses.replace(
        rows,
        input_ids=out["input_ids"][:, :w].astype(rows.input_ids.dtype),
        attention_mask=mask.astype(rows.attention_mask.dtype),
        token_type_ids=out["token_type_ids"][:, :w].astype(rows.token_type_ids.dtype),
        lengths=mask.sum(1).astype(rows.lengths.dtype),
    )


def joint_batch(
    forget_batch: dict,
    teacher_logits: np.ndarray,
    clean_batch: dict,
    fused: bool = True,
    augment: ForgetAugment | None = None,
) -> dict:
    """Concatenate a flagged batch and a clean batch into one model batch padded to the longer length.

    With ``fused=False`` the two batches are kept apart (``forget_inputs``/``retain_inputs``, each at its own
    bucket length) and :func:`loss_pieces` runs two forward passes: less padding when the lengths differ, at the
    cost of compiling one step per pair of bucket lengths instead of one per bucket.

    Args:
      forget_batch: a :func:`jdup.data.batches` batch of flagged rows (``index`` selects ``teacher_logits``).
      teacher_logits: ``[N_forget, K]`` teacher logits of all flagged rows.
      clean_batch: a batch of labelled clean rows.
      fused: one concatenated batch (default) or the two batches apart.
      augment: perturb the flagged rows first (:func:`forget_augment_at`; ``None``: as they are). The teacher
        logits stay those of the unperturbed rows (``suppress_target`` does not read them).

    Returns:
      dict of numpy arrays: model inputs ``[2B, S]``, ``teacher_logits [B, K]``, ``labels [B]``,
      ``forget_mask [B]`` and ``retain_mask [B]`` (float32 row masks).
    """
    if augment is not None and augment.drop > 0:
        forget_batch = drop_tokens(forget_batch, augment.drop, augment.rng, augment.pad_id)
    if augment is not None and augment.mix > 0:
        forget_batch = mix_tokens(forget_batch, clean_batch, augment.mix, augment.rng, augment.pad_id,
                                  augment.target)
    s = max(forget_batch["input_ids"].shape[1], clean_batch["input_ids"].shape[1])
    out = {}
    if not fused:
        out["forget_inputs"] = model_inputs(forget_batch)
        out["retain_inputs"] = model_inputs(clean_batch)
    for k in MODEL_INPUTS if fused else ():
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
