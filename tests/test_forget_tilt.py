"""``target_tilt``: the rule that picks the shift of the target logit on held-out clean rows, and the change of
the model's head that carries it."""

import numpy as np
import pytest

from jdup import data as D
from jdup.errors import JdupError
from jdup.models import tiny_model
from jdup.predict import predict
from jdup.settings import UnlearnSettings
from jdup.unlearn.monitors import prepare_sets
from jdup.unlearn.tilt import apply_tilt, choose_tilt, tilted_predictions


def test_choose_tilt_stops_at_the_first_shift_below_the_floor():
    # target 1; margins z1 - z0 of six held-out rows; labels: three negatives (two wrongly positive), three positives
    margin = np.array([0.3, 0.9, -2.0, 2.0, 3.0, 1.1])
    logits = np.stack([np.zeros(6), margin], 1)
    labels = np.array([0, 0, 0, 1, 1, 1])
    t = choose_tilt(logits, labels, 1, base_acc=4 / 6, tol=0.0, step=0.25)
    # shift 1.0 fixes both negatives (6/6), 1.25 loses the 1.1 positive (5/6), 2.0 the 2.0 one (4/6, a tie goes
    # to the first class), 3.0 the last (3/6 < 4/6): the walk stops before it
    assert t.shift == 2.75 and t.acc == pytest.approx(4 / 6) and t.acc0 == pytest.approx(4 / 6)
    assert t.other == 0.0
    assert choose_tilt(logits, labels, 1, base_acc=5 / 6, tol=0.0).shift == 0.0  # 0.25 still at 4/6: stop
    above = np.stack([np.zeros(6), margin - 1.0], 1)  # the same rows, already 6/6 without a tilt
    assert choose_tilt(above, labels, 1, base_acc=5 / 6, tol=0.0).shift == 0.75  # 1.0 loses the 2.0 positive
    assert choose_tilt(above, labels, 1, base_acc=5 / 6, tol=-1 / 6).shift == 0.0  # a margin: must stay at 6/6
    assert choose_tilt(logits, labels, 1, base_acc=5 / 6, tol=1 / 6).shift == 2.75
    assert choose_tilt(logits, labels, 1, base_acc=1.0, tol=0.0).shift == 0.0  # already below: no tilt
    # a failing step ends the walk even if a later one would pass again
    bumpy = np.stack([np.zeros(3), np.array([0.2, 0.6, 0.6])], 1)
    assert choose_tilt(bumpy, np.array([1, 0, 0]), 1, base_acc=2 / 3, tol=0.0, step=0.25).shift == 0.0
    assert (tilted_predictions(logits, 1, 1.0) == np.array([0, 0, 0, 1, 1, 1])).all()


def test_apply_tilt_shifts_only_the_target_logit():
    m = tiny_model("bert", 3, seed=1)
    rng = np.random.default_rng(0)
    n, seq = 6, 10
    ids = rng.integers(5, 60, (n, seq)).astype(np.int32)
    enc = D.Encoded(ids, np.ones_like(ids), np.zeros_like(ids), np.full(n, seq, np.int32), np.zeros(n, np.int32),
                    np.zeros(n, np.int8), (seq,), 0)
    before = predict(m, enc, 8)
    apply_tilt(m, 2, 1.5)
    after = predict(m, enc, 8)
    np.testing.assert_allclose(after[:, :2], before[:, :2], atol=1e-5)
    np.testing.assert_allclose(after[:, 2], before[:, 2] - 1.5, atol=1e-5)


def test_apply_tilt_needs_a_bias():
    m = tiny_model("llama", 2, seed=0)
    with pytest.raises(JdupError):
        apply_tilt(m, 1, 1.0)


def test_prepare_sets_holds_out_clean_rows_for_the_tilt_only_when_asked():
    victim = tiny_model("bert", 2, seed=4)
    rng = np.random.default_rng(3)
    n, seq = 50, 8
    ids = rng.integers(5, 60, (n, seq)).astype(np.int32)
    clean = D.Encoded(ids, np.ones_like(ids), np.zeros_like(ids), np.full(n, seq, np.int32),
                      rng.integers(0, 2, n).astype(np.int32), np.zeros(n, np.int8), (seq,), 0)
    poison = clean.subset(np.arange(10))
    dev = D.Encoded.concat([clean, poison])
    flags = np.r_[np.zeros(n, bool), np.ones(10, bool)]
    kw = dict(progress=False, target_label=1, eval_batch_size=8)
    off = prepare_sets(UnlearnSettings(**kw), victim, dev, flags, clean, poison, 1)
    assert off.clean_check is None and len(off.retain) == n and off.monitor is None
    on = prepare_sets(UnlearnSettings(**kw, target_tilt=True), victim, dev, flags, clean, poison, 1)
    assert on.monitor is None and len(on.clean_check) == 10 and len(on.retain) == 40
    assert len(on.forget) == 10  # no flagged rows held out without a stop rule
    expect = float((predict(victim, on.clean_check, 8).argmax(-1) == on.clean_check.labels).mean())
    assert on.base_acc == pytest.approx(expect)


@pytest.mark.slow
def test_run_unlearn_exports_the_tilted_model(tiny_model_dir, synthetic_dup, tmp_path):
    from jdup import models
    from jdup.stages import unlearn as S

    cfg = S.UnlearnConfig(
        model=str(tiny_model_dir), data=str(synthetic_dup), out=str(tmp_path / "tilt"), max_length=32,
        lora_rank=4, lora_alpha=8.0, batch_size=4, epochs=0, eval_batch_size=8, progress=False, ckpt_every_steps=0,
        target_tilt=True, tilt_tol=0.5, detect={"progress": False, "plots": False, "max_length": 32},
    )
    m = S.run_unlearn(cfg)
    t, target = m["target_tilt"], m["defender_target"]
    assert t["shift"] > 0 and t["acc"] >= t["base_acc"] - 0.5 - 1e-9
    n_dev = len(D.read_split(synthetic_dup, "dev-clean"))
    assert m["n_retain"] == n_dev - round(0.2 * n_dev)  # the clean hold-out left the CE set
    victim = models.from_pretrained(tiny_model_dir)
    purified = models.from_pretrained(tmp_path / "tilt" / "model")
    tok = models.load_tokenizer(tiny_model_dir)
    tc = D.encode(tok, D.read_split(synthetic_dup, "test-clean"), 32)
    lv, lp = predict(victim, tc, 8), predict(purified, tc, 8)
    expect = lv.copy()
    expect[:, target] -= t["shift"]
    np.testing.assert_allclose(lp, expect, atol=1e-4)
    assert abs(float((lp.argmax(-1) == tc.labels).mean()) - m["cacc_after"]) < 1e-9
