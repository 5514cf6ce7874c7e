"""The unlearning student: the victim plus LoRA adapters and a trainable head copy, split for ``jax.grad``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from jdup import lora as lora_lib


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


def build_student(model: nnx.Module, cfg: Any, key: jax.Array | None = None) -> Student:
    """Add LoRA to ``model`` (the teacher is left untouched) and split it into trainable and frozen state.

    Args:
      model: the backdoored classifier.
      cfg: an :class:`~jdup.unlearn.UnlearnSettings` (reads ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
        ``lora_targets``, ``train_head``, ``seed``).
      key: ``jax.random.key`` for the LoRA ``A`` init; default ``jax.random.key(cfg.seed)``.
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
