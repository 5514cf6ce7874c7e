"""How much of the ASR drop after `jdup unlearn` is a shift of the whole boundary away from the target class
(TUNING victims only: reads test-poison).

    .venv/bin/python benchmarks/class_shift.py RUN DATA VICTIM_MODEL

For the victim and for the purified model of RUN (a `jdup unlearn` output), adds a shift ``b`` to the target logit
and picks the ``b`` in [-4, 4] (steps of 0.25; the smallest |b| among ties) with the best accuracy on dev-clean,
which the defender has. Prints, at ``b = 0`` and at that ``b``: dev-clean accuracy, test CACC, ASR, and accuracy on
target-class and other-class test rows, one JSON line per model. A purified model whose ASR climbs back once its
boundary is moved to where dev-clean accuracy is best owed that part of its ASR drop to the shift, not to
forgetting the trigger. Dev-clean is in-sample for the cross-entropy term of unlearning; one scalar fitted on it
is a mild optimism.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from jdup.unlearn.tilt import tilted_predictions

GRID = np.arange(-16, 17) / 4.0  # -4 .. 4 in steps of 0.25


def shifted(logits: np.ndarray, target: int, b: float) -> np.ndarray:
    """Predictions after adding ``b`` to the target logit (``target_tilt``'s predictions with the opposite sign)."""
    return tilted_predictions(logits, target, -b)


def best_shift(logits: np.ndarray, labels: np.ndarray, target: int, grid: np.ndarray = GRID) -> float:
    """The shift of the target logit with the best accuracy on ``(logits, labels)``; the smallest |b| among ties."""
    acc = np.array([np.mean(shifted(logits, target, b) == labels) for b in grid])
    ties = grid[acc == acc.max()]
    return float(ties[np.argmin(np.abs(ties))])


def summary(lg: dict, target: int, b: float) -> dict:
    (zd, yd), (zc, yc), (zp, _) = lg["dev-clean"], lg["test-clean"], lg["test-poison"]
    pc = shifted(zc, target, b)
    return {"shift": b, "dev_acc": round(float(np.mean(shifted(zd, target, b) == yd)), 4),
            "cacc": round(float(np.mean(pc == yc)), 4),
            "asr": round(float(np.mean(shifted(zp, target, b) == target)), 4),
            "target_acc": round(float(np.mean(pc[yc == target] == target)), 4),
            "other_acc": round(float(np.mean(pc[yc != target] == yc[yc != target])), 4)}


def main(argv: list[str]) -> int:
    from jdup import data as D
    from jdup import models
    from jdup.predict import predict

    if len(argv) != 3:
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    run, ddir, vdir = argv
    max_length = json.load(open(f"{run}/manifest.json"))["config"].get("max_length", 128)
    target = json.load(open(f"{run}/metrics.json"))["defender_target"]
    for name, path in (("victim", vdir), ("purified", f"{run}/model")):
        model, tok = models.from_pretrained(path), models.load_tokenizer(path)
        lg = {}
        for split in ("dev-clean", "test-clean", "test-poison"):
            ds = D.read_split(ddir, split, num_labels=model.config.num_labels)
            lg[split] = (np.asarray(predict(model, D.encode(tok, ds, max_length), 64)), ds.labels)
        b = best_shift(*lg["dev-clean"], target)
        print(json.dumps({"model": name, "at_zero": summary(lg, target, 0.0), "at_best": summary(lg, target, b)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
