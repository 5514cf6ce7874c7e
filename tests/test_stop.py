"""The defender-side stop rule's numerics (jdup.unlearn.stop): pure functions, no model."""

import numpy as np
import pytest

from jdup.unlearn import stop

P = stop.StopParams(ratio=0.5, floor=0.02, acc_tol=0.01, patience=2)


def test_threshold_follows_other_class_rate_with_a_floor():
    assert stop.forget_threshold(0.10, P) == 0.05
    assert stop.forget_threshold(0.0, P) == 0.02


def test_judge_forgotten_ok_and_score_order():
    v = stop.judge(proxy=0.04, acc=0.85, other=0.10, base_acc=0.855, params=P)
    assert v.forgotten and v.ok and v.score < 0
    w = stop.judge(proxy=0.06, acc=0.85, other=0.10, base_acc=0.855, params=P)
    assert not w.forgotten and w.score == 0.06
    assert v.score < w.score
    # better held-out accuracy ranks first among forgotten states
    assert stop.judge(0.0, 0.86, 0.1, 0.855, P).score < stop.judge(0.0, 0.85, 0.1, 0.855, P).score
    # more than acc_tol below the victim: not acceptable
    assert not stop.judge(0.0, 0.84, 0.1, 0.855, P).ok


def run(evals, base=0.85):
    state, stops = stop.StopState(), []
    for proxy, acc, other in evals:
        state, s = stop.advance(state, stop.judge(proxy, acc, other, base, P), P)
        stops.append(s)
    return state, stops


def test_no_stop_before_forgotten():
    _, stops = run([(0.9, 0.85, 0.1), (0.5, 0.85, 0.1), (0.2, 0.85, 0.1), (0.1, 0.86, 0.1)])
    assert not any(stops)


def test_stop_after_patience_without_improvement():
    _, stops = run([(0.5, 0.85, 0.1), (0.03, 0.85, 0.1), (0.03, 0.849, 0.1), (0.02, 0.848, 0.1)])
    assert stops == [False, False, False, True]


def test_improvement_resets_patience():
    _, stops = run([(0.03, 0.85, 0.1), (0.03, 0.849, 0.1), (0.0, 0.86, 0.1), (0.0, 0.855, 0.1)])
    assert stops == [False, False, False, False]


def test_stop_when_accuracy_falls_after_forgetting():
    _, stops = run([(0.03, 0.85, 0.1), (0.0, 0.83, 0.1)])
    assert stops == [False, True]
    # the same accuracy fall before anything was forgotten does not stop the run
    _, stops = run([(0.5, 0.83, 0.1), (0.4, 0.83, 0.1)])
    assert stops == [False, False]


def test_held_out_rates():
    acc, other = stop.held_out_rates(np.array([1, 1, 0, 0]), np.array([0, 1, 0, 1]), target=1)
    assert acc == 0.5 and other == 0.5
    assert stop.held_out_rates(np.array([1]), np.array([1]), 1) == (1.0, 0.0)


def test_prepare_sets_wires_forget_check():
    """early_stop=forget_check holds out flagged and clean rows and returns the rule's monitor."""
    from jdup import data as D
    from jdup.models import tiny_model
    from jdup.settings import UnlearnSettings
    from jdup.unlearn import prepare_sets

    def enc(n, seed, seq=10):
        rng = np.random.default_rng(seed)
        ids = rng.integers(5, 60, (n, seq)).astype(np.int32)
        ids[:, 0] = 2
        labels = rng.integers(0, 2, n).astype(np.int32)
        lengths = np.full(n, seq, np.int32)
        return D.Encoded(ids, np.ones_like(ids), np.zeros_like(ids), lengths, labels, np.zeros(n, np.int8), (8, seq), 0)

    victim = tiny_model("bert", 2, seed=4)
    dev_clean, dev_poison = enc(20, 1), enc(10, 2)
    dev_detect = enc(30, 3)
    flags = np.zeros(30, bool)
    flags[20:] = True
    cfg = UnlearnSettings(early_stop="forget_check", progress=False, eval_batch_size=8, target_label=1)
    sets = prepare_sets(cfg, victim, dev_detect, flags, dev_clean, dev_poison, eval_target=1)
    assert len(sets.holdout) == 2 and len(sets.forget) == 8  # round(0.2 * 10) held out
    assert len(sets.retain) == 16  # round(0.2 * 20) clean rows held out of the CE set
    ev = sets.monitor(lambda e: np.tile(np.array([[0.0, 1.0]], np.float32), (len(e), 1)))
    assert isinstance(ev, stop.ForgetCheckEvaluation)
    assert ev.proxy_asr == 1.0 and not ev.forgotten  # every held-out flagged row still goes to target 1
    none = prepare_sets(UnlearnSettings(progress=False, eval_batch_size=8), victim, dev_detect, flags, dev_clean,
                        dev_poison, eval_target=1)
    assert none.monitor is None and len(none.holdout) == 0 and len(none.forget) == 10


def test_prepare_sets_takes_the_detection_logits_instead_of_a_second_forward(monkeypatch):
    """Given the victim's logits on dev-detect (the detection pass's), the teacher logits and the held-out clean
    accuracy come from them: no forward pass; they equal a forward pass's; a wrong row count is an error."""
    from jdup import data as D
    from jdup import predict as predict_lib
    from jdup.models import tiny_model
    from jdup.settings import UnlearnSettings
    from jdup.unlearn import monitors, prepare_sets

    def enc(n, seed, seq=10):
        rng = np.random.default_rng(seed)
        ids = rng.integers(5, 60, (n, seq)).astype(np.int32)
        ids[:, 0] = 2
        labels = rng.integers(0, 2, n).astype(np.int32)
        return D.Encoded(ids, np.ones_like(ids), np.zeros_like(ids), np.full(n, seq, np.int32), labels,
                         np.zeros(n, np.int8), (8, seq), 0)

    victim = tiny_model("bert", 2, seed=4)
    dev_clean, dev_poison = enc(20, 1), enc(10, 2)
    dev_detect = D.Encoded.concat([dev_clean, dev_poison])
    flags = np.zeros(30, bool)
    flags[[3, 20, 22, 25, 29]] = True
    cfg = UnlearnSettings(early_stop="forget_check", progress=False, eval_batch_size=8)
    ref = prepare_sets(cfg, victim, dev_detect, flags, dev_clean, dev_poison, eval_target=1)
    unmarked = predict_lib.predict(victim, dev_detect, 8)
    logits = unmarked.copy()
    logits[:, 1] += 0.01 * np.arange(30)  # marked, to see which rows the sets took
    monkeypatch.setattr(monitors.predict_lib, "predict", lambda *a, **k: pytest.fail("a second forward pass"))
    got = prepare_sets(cfg, victim, dev_detect, flags, dev_clean, dev_poison, eval_target=1, victim_logits=logits)
    flagged = np.flatnonzero(flags)
    perm = np.random.default_rng([cfg.seed, 7]).permutation(len(flagged))
    train = flagged[np.sort(perm[int(round(cfg.holdout_frac * len(flagged))):])]
    np.testing.assert_array_equal(got.teacher, logits[train])  # the given rows, marks included
    np.testing.assert_allclose(got.teacher[:, 0], ref.teacher[:, 0], rtol=1e-5, atol=1e-6)  # = a forward's
    check = np.sort(np.random.default_rng([cfg.seed, 11]).permutation(20)[:4])  # the held-out clean rows
    assert got.base_acc == pytest.approx(np.mean(logits[check].argmax(-1) == dev_clean.labels[check]))
    plain = prepare_sets(cfg, victim, dev_detect, flags, dev_clean, dev_poison, eval_target=1,
                         victim_logits=unmarked)
    assert plain.base_acc == pytest.approx(ref.base_acc) and plain.target == ref.target
    with pytest.raises(ValueError, match="victim_logits has 29 rows"):
        prepare_sets(cfg, victim, dev_detect, flags, dev_clean, dev_poison, eval_target=1, victim_logits=logits[:29])
