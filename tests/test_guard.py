"""The collapse guard of a run without a stop rule (jdup.unlearn.guard): its checks, and the loop returning the
last sound epoch's state only when the last epoch collapsed."""

import jax
import numpy as np
import pytest

from jdup import data as D
from jdup.unlearn import guard


def test_a_collapse_is_a_large_drop_beyond_noise():
    # two balanced classes, 256 clean rows an epoch: 0.82 -> 0.50 is a collapse (z about 7)
    c = guard.check_epoch(0.82, 0.50, 256, tol=0.1)
    assert c.collapsed and c.z > 6
    assert not guard.check_epoch(0.82, 0.76, 256, tol=0.1).collapsed  # 6 points: under the tolerance
    assert not guard.check_epoch(0.82, 0.90, 256, tol=0.1).collapsed and guard.check_epoch(0.8, 0.9, 9, 0.1).z == 0
    # the same 32-point drop on 20 rows an epoch (batch 4, 5 steps) is within noise: no verdict
    small = guard.check_epoch(0.82, 0.50, 20, tol=0.1)
    assert not small.collapsed and 0 < small.z < guard.Z_MIN
    assert not guard.check_epoch(0.82, 0.50, 256, tol=0.0).collapsed  # 0 = off


def test_review_takes_epoch_means_and_the_first_epoch_as_reference():
    acc = [0.8, 0.9] + [0.85, 0.85] + [0.5, 0.4]  # 3 epochs of 2 steps; a step without the metric is skipped
    log = [{"step": i + 1, "retain_acc": a} for i, a in enumerate(acc)] + [{"step": 7}]
    np.testing.assert_allclose(guard.epoch_accuracies(log, 2), [0.85, 0.85, 0.45])
    checks = guard.review(log, per_epoch=2, batch_size=128, tol=0.1)
    assert [c.collapsed for c in checks] == [False, False, True]
    assert [c.step for c in checks] == [2, 4, 6] and checks[-1].reference == pytest.approx(0.85)
    assert guard.review(log[:3], 2, 128, 0.1)[-1].step == 2  # an incomplete epoch is not judged


# --------------------------------------------------------------------------------------------- in the loop


def _encoded(n, seed, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, 140, size=(n, length)).astype(np.int32)
    labels = (ids[:, 1] >= 120).astype(np.int32)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    return D.Encoded(ids, mask, np.zeros_like(ids), np.full(n, length, np.int32), labels, np.zeros(n, np.int8),
                     (length,), 0)


def _run(accuracies, tol, per_epoch=2, epochs=3):
    """Unlearning on a tiny model with the clean-batch accuracy of each step replaced by ``accuracies`` (the hook
    may overwrite a step's log record); returns the result and the trainable state after every step."""
    from jdup import models
    from jdup import unlearn as U
    from jdup.settings import UnlearnSettings

    cfg = UnlearnSettings(lora_rank=4, lora_alpha=8.0, epochs=epochs, batch_size=8, lr=1e-2, progress=False,
                          warmup_frac=0.0, ckpt_every_steps=0, collapse_guard=tol)
    victim = models.tiny_model("bert", 2, seed=1)
    seen = {}

    def hook(info):
        seen[info.step] = jax.tree.map(np.array, info.student.trainable)
        return {"retain_acc": accuracies[info.step - 1]}

    res = U.unlearn(victim, _encoded(8 * per_epoch, 3), _encoded(64, 4), cfg, target_label=1, on_step=hook)
    return res, seen


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_the_loop_returns_the_last_sound_epoch_when_the_last_one_collapsed(caplog):
    sound = [0.8] * 6
    collapsing = [0.8, 0.8, 0.8, 0.8, 0.4, 0.4]  # epoch 3 far lower, on 2 steps x batch 8 = 16 rows: z 2.3
    plain, seen = _run(sound, tol=0.1)
    assert not plain.collapsed and plain.best_step == 6
    assert _same(plain.student.trainable, seen[6])
    res, _ = _run(collapsing, tol=0.1)
    assert not res.collapsed  # within noise at 16 rows an epoch; with 64 rows an epoch it is not:
    long_sound, seen_l = _run([0.8] * 24, tol=0.1, per_epoch=8)
    with caplog.at_level("WARNING", logger="jdup.unlearn"):
        long_bad, _ = _run([0.8] * 16 + [0.3] * 8, tol=0.1, per_epoch=8)  # 64 rows an epoch: z about 5.7
    assert long_bad.collapsed and long_bad.best_step == 16
    assert _same(long_bad.student.trainable, seen_l[16])  # the state after epoch 2, as the sound run had it
    assert "collapsed" in caplog.text and "epoch 2 (step 16)" in caplog.text
    # a run whose last epoch is sound returns its final state, bit for bit the guard-off run's
    off, _ = _run([0.8] * 16 + [0.3] * 8, tol=0.0, per_epoch=8)
    assert not off.collapsed and _same(off.student.trainable, long_sound.student.trainable)
    dip, _ = _run([0.8] * 8 + [0.3] * 8 + [0.8] * 8, tol=0.1, per_epoch=8)  # a dip in the middle that recovers
    assert not dip.collapsed and _same(dip.student.trainable, long_sound.student.trainable)
    assert _same(long_sound.student.trainable, seen_l[24])


def test_in_a_vmapped_group_each_cell_is_guarded_on_its_own():
    """Two cells run together (the sweep's path): the one whose last epoch collapsed gets its own sound state
    back, the other its final state, each equal to the same run alone."""
    from jdup import models
    from jdup import unlearn as U
    from jdup.settings import UnlearnSettings

    per_epoch, epochs = 8, 3
    accs = {2025: [0.8] * 24, 7: [0.8] * 16 + [0.3] * 8}

    def cell(seed, seen):
        cfg = UnlearnSettings(lora_rank=4, lora_alpha=8.0, epochs=epochs, batch_size=8, lr=1e-2, progress=False,
                              warmup_frac=0.0, ckpt_every_steps=0, seed=seed)

        def hook(info):
            seen[info.step] = jax.tree.map(np.array, info.student.trainable)
            return {"retain_acc": accs[seed][info.step - 1]}

        victim = models.tiny_model("bert", 2, seed=1)
        return U.make_cell(victim, _encoded(8 * per_epoch, 3), _encoded(64, 4), cfg, target_label=1, on_step=hook)

    seen_a, seen_b = {}, {}
    a, b = U.run_cells([cell(2025, seen_a), cell(7, seen_b)])
    assert not a.collapsed and a.best_step == 24 and _same(a.student.trainable, seen_a[24])
    assert b.collapsed and b.best_step == 16 and _same(b.student.trainable, seen_b[16])
    alone = U.run_cells([cell(7, {})])[0]
    assert alone.collapsed and alone.best_step == 16
    for x, y in zip(jax.tree.leaves(b.student.trainable), jax.tree.leaves(alone.student.trainable), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # vmapped vs alone: float rounding only
