"""Forget-set augmentation (``forget_drop``): token dropping on flagged batches, its per-step generator, the joint
batch, and a tiny unlearning run that it changes."""

import dataclasses

import numpy as np
import pytest

from jdup import data as D
from jdup import unlearn as U
from jdup.errors import Invalid
from jdup.models import tiny_model
from jdup.settings import UnlearnSettings
from jdup.unlearn.loss import drop_tokens, forget_augment_at, mix_encoded, mix_tokens


def _batch(lengths, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.zeros((b, seq), np.int32)
    mask = np.zeros((b, seq), np.int32)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(5, 1000, k)
        ids[i, 0], ids[i, k - 1] = 101, 102
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": np.zeros(b, np.int32), "valid": np.ones(b, bool), "index": np.arange(b)}


def test_drop_tokens_keeps_ends_order_and_shape():
    b = _batch([16, 9, 3, 2])
    out = drop_tokens(b, 0.5, np.random.default_rng(1), pad_id=0)
    assert out["input_ids"].shape == b["input_ids"].shape
    for i in range(4):
        n_old, n_new = int(b["attention_mask"][i].sum()), int(out["attention_mask"][i].sum())
        old, new = list(b["input_ids"][i, :n_old]), list(out["input_ids"][i, :n_new])
        assert new[0] == 101 and new[-1] == 102  # first and last real tokens stay
        it = iter(old)
        assert all(t in it for t in new)  # a subsequence: order kept, nothing invented
        assert out["attention_mask"][i, :n_new].all() and not out["attention_mask"][i, n_new:].any()
        assert (out["input_ids"][i, n_new:] == 0).all()  # right-padded with pad_id
    assert out["attention_mask"][2].sum() == 3 and out["attention_mask"][3].sum() == 2  # no inner token to drop
    assert out["attention_mask"][0].sum() < 16  # something was dropped from the long row
    assert out["labels"] is b["labels"] and out["index"] is b["index"]


def test_drop_tokens_rate():
    b = _batch([64] * 64, seq=64)
    out = drop_tokens(b, 0.3, np.random.default_rng(0))
    dropped = 1 - (out["attention_mask"].sum() - 2 * 64) / (62 * 64)
    assert 0.27 < dropped < 0.33
    same = drop_tokens(b, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(same["input_ids"], b["input_ids"])


def test_forget_augment_at_is_per_step_and_off_by_default():
    assert forget_augment_at(UnlearnSettings(), 3) is None
    cfg = UnlearnSettings(forget_drop=0.4, seed=5)
    b = _batch([16] * 8)
    a1 = drop_tokens(b, 0.4, forget_augment_at(cfg, 3).rng)
    a2 = drop_tokens(b, 0.4, forget_augment_at(cfg, 3).rng)
    a3 = drop_tokens(b, 0.4, forget_augment_at(cfg, 4).rng)
    np.testing.assert_array_equal(a1["input_ids"], a2["input_ids"])  # a resumed run draws the same tokens
    assert not np.array_equal(a1["input_ids"], a3["input_ids"])
    with pytest.raises(Invalid):
        UnlearnSettings(forget_drop=1.0).validate()


def test_joint_batch_augments_only_the_flagged_rows():
    fb, cb = _batch([16] * 4, seed=1), _batch([12] * 4, seed=2)
    teacher = np.arange(8, dtype=np.float32).reshape(4, 2)
    plain = U.joint_batch(fb, teacher, cb)
    aug = U.joint_batch(fb, teacher, cb, True, forget_augment_at(UnlearnSettings(forget_drop=0.5), 0))
    assert not np.array_equal(aug["input_ids"][:4], plain["input_ids"][:4])
    np.testing.assert_array_equal(aug["input_ids"][4:], plain["input_ids"][4:])
    np.testing.assert_array_equal(aug["attention_mask"][4:], plain["attention_mask"][4:])
    np.testing.assert_array_equal(aug["teacher_logits"], plain["teacher_logits"])
    unfused = U.joint_batch(fb, teacher, cb, False, forget_augment_at(UnlearnSettings(forget_drop=0.5), 0))
    np.testing.assert_array_equal(unfused["forget_inputs"]["input_ids"], aug["input_ids"][:4])


def _encoded(n, seed, seq=12):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, seq + 1, n).astype(np.int32)
    ids = np.zeros((n, seq), np.int32)
    mask = np.zeros((n, seq), np.int32)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(5, 60, k)
        ids[i, 0], ids[i, k - 1] = 2, 3
        mask[i, :k] = 1
    labels = rng.integers(0, 2, n).astype(np.int32)
    return D.Encoded(ids, mask, np.zeros_like(ids), lengths, labels, np.zeros(n, np.int8), (8, seq), 0)


def test_unlearning_with_forget_drop_runs_and_differs():
    victim = tiny_model("bert", 2, seed=4)
    forget, retain = _encoded(12, 1), _encoded(16, 2)
    base = dict(lora_rank=4, lora_alpha=8.0, batch_size=4, epochs=2, eval_batch_size=8, progress=False,
                ckpt_every_steps=0, target_label=1)
    r0 = U.unlearn(victim, forget, retain, UnlearnSettings(**base))
    r1 = U.unlearn(victim, forget, retain, UnlearnSettings(**base, forget_drop=0.5))
    r1b = U.unlearn(victim, forget, retain, dataclasses.replace(UnlearnSettings(**base), forget_drop=0.5))
    f0 = [r["forget"] for r in r0.log]
    f1 = [r["forget"] for r in r1.log]
    assert len(f0) == len(f1) == 6 and np.isfinite(f1).all()
    assert f0[0] != f1[0]  # the first step already sees other rows
    np.testing.assert_allclose(f1, [r["forget"] for r in r1b.log], rtol=1e-6)  # deterministic


def test_mix_tokens_inserts_a_clean_window_and_keeps_the_flagged_tokens():
    fb = _batch([6, 4, 12], seq=12, seed=3)
    cb = _batch([10, 10, 10], seq=16, seed=4)
    cb["valid"] = np.array([True, True, False])
    out = mix_tokens(fb, cb, 1.0, np.random.default_rng(0))
    assert out["input_ids"].shape == (3, 16)  # the joint batch's width, no new length
    clean_inner = {int(t) for j in (0, 1) for t in cb["input_ids"][j, 1:9]}
    for i, n in enumerate([6, 4, 12]):
        m = int(out["attention_mask"][i].sum())
        assert m == min(16, n + 8)  # a clean row's 8 inner tokens, up to the width
        row = [int(t) for t in out["input_ids"][i, :m]]
        own = [int(t) for t in fb["input_ids"][i, :n]]
        assert row[0] == 101 and row[-1] == 102
        added = m - n
        # the flagged row's tokens stay contiguous at one end; the window comes from a valid clean row
        assert row[:n - 1] == own[:-1] or row[added + 1:] == own[1:]
        window = row[n - 1 : m - 1] if row[:n - 1] == own[:-1] else row[1 : added + 1]
        assert set(window) <= clean_inner
    none = mix_tokens(fb, cb, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(none["input_ids"][:, :12], fb["input_ids"])
    assert not none["attention_mask"][:, 12:].any()


def test_forget_mix_alone_turns_augmentation_on():
    aug = forget_augment_at(UnlearnSettings(forget_mix=0.5), 0)
    assert aug is not None and aug.drop == 0 and aug.mix == 0.5
    fb, cb = _batch([8] * 4, seed=1), _batch([16] * 4, seed=2)
    j = U.joint_batch(fb, np.zeros((4, 2), np.float32), cb, True, forget_augment_at(UnlearnSettings(forget_mix=1.0), 0))
    assert j["attention_mask"][:4].sum() > fb["attention_mask"].sum()


def test_mix_encoded_puts_each_row_into_a_clean_row():
    rows, clean = _encoded(6, 1), _encoded(5, 2, seq=12)
    mixed = mix_encoded(rows, clean, [0, 13])
    assert mixed.input_ids.shape == rows.input_ids.shape and len(mixed) == 6
    np.testing.assert_array_equal(mixed.lengths, mixed.attention_mask.sum(1))
    room = rows.lengths < rows.max_length
    assert room.sum() >= 4 and (mixed.lengths[room] > rows.lengths[room]).all()
    assert (mixed.lengths >= rows.lengths).all() and (mixed.lengths <= rows.max_length).all()
    for i in range(6):
        row, own = list(mixed.input_ids[i, : mixed.lengths[i]]), list(rows.input_ids[i, : rows.lengths[i]])
        assert row[0] == 2 and row[-1] == 3
        assert row[: len(own) - 1] == own[:-1] or row[len(row) - len(own) + 1 :] == own[1:]
    np.testing.assert_array_equal(mixed.labels, rows.labels)
    again = mix_encoded(rows, clean, [0, 13])
    np.testing.assert_array_equal(again.input_ids, mixed.input_ids)
    assert mix_encoded(rows, clean.subset([]), 0) is rows


def test_prepare_sets_check_mix_judges_mixed_rows(monkeypatch):
    from jdup.unlearn import monitors

    seen = {}

    def capture(rows, clean, target, base_acc, params):
        seen["rows"], seen["clean"] = rows, clean
        return None

    monkeypatch.setattr(monitors, "forget_check_monitor", capture)
    victim = tiny_model("bert", 2, seed=4)
    dev_clean, dev_poison = _encoded(40, 3), _encoded(20, 4)
    dev_detect = D.Encoded.concat([dev_clean, dev_poison])
    flags = np.r_[np.zeros(40, bool), np.ones(20, bool)]
    kw = dict(early_stop="forget_check", progress=False, target_label=1, eval_batch_size=8)
    plain = monitors.prepare_sets(UnlearnSettings(**kw), victim, dev_detect, flags, dev_clean, dev_poison, 1)
    rows_plain = seen["rows"]
    mixed = monitors.prepare_sets(UnlearnSettings(**kw, check_mix=True), victim, dev_detect, flags, dev_clean,
                                  dev_poison, 1)
    rows_mixed, clean = seen["rows"], seen["clean"]
    np.testing.assert_array_equal(rows_plain.input_ids, plain.holdout.input_ids)  # off: the held-out rows as they are
    assert len(rows_mixed) == len(mixed.holdout) == 4
    assert (rows_mixed.lengths >= mixed.holdout.lengths).all()
    assert (rows_mixed.lengths > mixed.holdout.lengths).any()
    others = {int(t) for i in np.flatnonzero(clean.labels != 1) for t in clean.input_ids[i, 1 : clean.lengths[i] - 1]}
    for i in range(4):
        n = int(mixed.holdout.lengths[i])
        added = [int(t) for t in rows_mixed.input_ids[i, : rows_mixed.lengths[i]]]
        extra = [t for t in added if t not in set(mixed.holdout.input_ids[i, :n].tolist())]
        assert set(extra) <= others  # the added tokens come from held-out clean rows of the other class


def test_mix_tokens_takes_windows_from_other_classes_only():
    fb = _batch([4] * 6, seq=16, seed=5)
    cb = _batch([12, 12, 12], seq=16, seed=6)
    cb["labels"] = np.array([1, 0, 1], np.int32)
    out = mix_tokens(fb, cb, 1.0, np.random.default_rng(2), exclude_label=1)
    allowed = {int(t) for t in cb["input_ids"][1, 1:11]}
    for i in range(6):
        own = {int(t) for t in fb["input_ids"][i, :4]}
        extra = {int(t) for t in out["input_ids"][i, : out["attention_mask"][i].sum()]} - own
        assert extra and extra <= allowed
    cb["labels"] = np.array([1, 1, 1], np.int32)  # no clean row of another class: rows unchanged
    same = mix_tokens(fb, cb, 1.0, np.random.default_rng(2), exclude_label=1)
    np.testing.assert_array_equal(same["attention_mask"].sum(1), fb["attention_mask"].sum(1))
    aug = forget_augment_at(UnlearnSettings(forget_mix=1.0), 0, 0, target=1)
    assert aug.target == 1
