"""The defender-side stop rule's numerics (jdup.unlearn.stop): pure functions, no model."""

import numpy as np

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
