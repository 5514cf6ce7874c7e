"""``target_tilt``: after unlearning, lower the target class's logit by as much as held-out clean accuracy allows.

Once the trigger is forgotten, a triggered row goes to the target about as often as a clean row of another class
does: the attack success rate left is the purified classifier's own error on non-target rows, which unlearning
with a clean cross-entropy term often leaves *lower* than the victim's (its clean accuracy rises). The tilt spends
that gain: it subtracts ``b`` from the target logit (the bias of the head's last linear layer, so the exported
model carries it), with ``b`` the largest step of a grid (0, 0.25, 0.5, ...) at which accuracy on held-out
labelled clean rows (not in the cross-entropy set) stays at least the victim's accuracy on the same rows minus a
tolerance. The walk stops at the first step that fails, so a noisy later step cannot be picked. A defender has
everything it needs: the victim, held-out dev-clean rows with labels and the inferred target.

:func:`choose_tilt` is the pure rule, :func:`apply_tilt` the change of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flax import nnx

from jdup.errors import JdupError


class Tilt(NamedTuple):
    """The chosen tilt.

    Attributes:
      shift: subtracted from the target logit (``>= 0``).
      acc: held-out clean accuracy at ``shift``.
      acc0: held-out clean accuracy before the tilt (the purified model).
      base_acc: the victim's accuracy on the same rows.
      other: fraction of held-out clean rows of the other classes predicted as the target, at ``shift``.
    """

    shift: float
    acc: float
    acc0: float
    base_acc: float
    other: float


def tilted_predictions(logits: np.ndarray, target: int, shift: float) -> np.ndarray:
    """``argmax`` of ``logits`` with ``shift`` subtracted from column ``target``."""
    z = np.array(logits, np.float64, copy=True)
    z[:, target] -= shift
    return z.argmax(-1)


def choose_tilt(
    logits: np.ndarray,
    labels: np.ndarray,
    target: int,
    base_acc: float,
    tol: float,
    *,
    step: float = 0.25,
    max_shift: float = 8.0,
) -> Tilt:
    """The largest ``shift`` in ``step, 2·step, ... <= max_shift`` such that every shift up to it keeps accuracy
    on the held-out clean rows ``>= base_acc - tol`` (0 if even the first step fails or the purified model is
    already below that).

    Args:
      logits: ``[N, K]`` purified-model logits on held-out labelled clean rows.
      labels: ``[N]`` their labels.
      target: the defender's target class.
      base_acc: the victim's accuracy on the same rows.
      tol: how far below ``base_acc`` the accuracy may fall.
    """
    labels = np.asarray(labels)
    non_target = labels != target

    def measure(shift):
        pred = tilted_predictions(logits, target, shift)
        acc = float((pred == labels).mean()) if len(labels) else 1.0
        other = float((pred[non_target] == target).mean()) if non_target.any() else 0.0
        return acc, other

    acc0, other0 = measure(0.0)
    best = Tilt(0.0, acc0, acc0, float(base_acc), other0)
    floor = float(base_acc) - float(tol) - 1e-9
    if not len(labels):
        return best
    for i in range(1, int(np.floor(max_shift / step + 1e-9)) + 1):
        shift = i * step
        acc, other = measure(shift)
        if acc < floor:
            break
        best = Tilt(float(shift), acc, acc0, float(base_acc), other)
    return best


def head_output_layer(model: nnx.Module) -> nnx.Linear:
    """The linear layer that produces the logits (BERT ``classifier``, RoBERTa ``classifier.out_proj``, BART
    ``classification_head.out_proj``, decoders ``score``)."""
    head = getattr(model, getattr(model, "HEAD", ("classifier",))[0], None)
    layer = head if isinstance(head, nnx.Linear) else getattr(head, "out_proj", None)
    if not isinstance(layer, nnx.Linear):
        raise JdupError(f"target_tilt: cannot find the output layer of the {type(model).__name__} head")
    return layer


def apply_tilt(model: nnx.Module, target: int, shift: float) -> None:
    """Subtract ``shift`` from the bias of the target class in the head's output layer (in place). Every logit of
    the model then equals the untilted one minus ``shift`` in column ``target``."""
    if shift == 0:
        return
    layer = head_output_layer(model)
    if getattr(layer, "bias", None) is None:
        raise JdupError(f"target_tilt: the output layer of {type(model).__name__} has no bias to shift")
    b = layer.bias[...]
    layer.bias[...] = b.at[int(target)].add(-float(shift)).astype(b.dtype)
