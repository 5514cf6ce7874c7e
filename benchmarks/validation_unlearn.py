"""Unlearning on the protocol's victims (benchmarks/validation_victims.sh), with a trace of every stop-rule evaluation.

    .venv/bin/python benchmarks/validation_unlearn.py --victim runs/victims/NAME --data DIR --out runs/vu/NAME-RULE \
        [--rule none|forget_check|proxy] [--trace-test] [key=value ...]

``key=value`` sets fields of :class:`jdup.unlearn.UnlearnSettings` (e.g. ``epochs=20``) or of
:class:`jdup.unlearn.stop.StopParams` (``ratio``, ``floor``, ``acc_tol``, ``patience``). The detection is the one
``jdup unlearn`` runs by default (``detect.method`` default, calibrated on dev-clean, truncation = ``max_length``,
split seed = ``seed``), cached in ``<victim>/detection-dev``. The held-out flagged and clean rows are drawn as
:func:`jdup.unlearn.prepare_sets` draws them for ``early_stop=proxy``.

``--rule none`` trains every epoch and keeps the final state (monitor only records); ``forget_check`` is
:func:`jdup.unlearn.stop.forget_check_monitor`; ``proxy`` the older proxy rule. ``--trace-test`` also records
accuracy and ASR on seeded 400-row samples of test-clean and test-poison at every evaluation: ground truth, for TUNING victims only (it never
influences the run). Writes ``<out>/result.json`` (settings, flags summary, before/after, trace, wall time).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--victim", required=True, help="jdup train output folder (with model/)")
    ap.add_argument("--data", required=True, help="DUP-layout data folder of the victim")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rule", default="forget_check", choices=("none", "forget_check", "proxy"))
    ap.add_argument("--trace-test", action="store_true", help="record test CACC/ASR at every evaluation (tuning)")
    ap.add_argument("overrides", nargs="*", help="key=value for UnlearnSettings or StopParams")
    args = ap.parse_args(argv)

    from jdup import data as D
    from jdup import models
    from jdup.predict import predict
    from jdup.settings import DetectSettings, UnlearnSettings
    from jdup.stages import detect as detect_stage
    from jdup.stages.common import attack_target
    from jdup.unlearn import prepare_sets, unlearn
    from jdup.unlearn import stop as stop_lib
    from jdup.unlearn.monitors import Evaluation, proxy_monitor

    stop_fields = set(stop_lib.StopParams._fields)
    u_kw, s_kw = {}, {}
    for ov in args.overrides:
        k, v = ov.split("=", 1)
        val = json.loads(v) if v not in ("true", "false") else v == "true"
        (s_kw if k in stop_fields else u_kw)[k] = val
    settings = UnlearnSettings(**{"progress": False, **u_kw, "early_stop": "none" if args.rule == "none" else "proxy"})
    params = stop_lib.StopParams(**s_kw)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    mpath = os.path.join(args.victim, "model")
    victim = models.from_pretrained(mpath)
    tok = models.load_tokenizer(mpath)
    k = victim.config.num_labels
    split = {n: D.read_split(args.data, n, num_labels=k) for n in ("dev-clean", "dev-poison", "test-clean", "test-poison")}
    enc = {n: D.encode(tok, ds, 128, config=victim.config)
           for n, ds in split.items()}
    target = attack_target(args.data, split["test-poison"])

    det_dir = os.path.join(args.victim, "detection-dev")
    det_cfg = DetectSettings(split_seed=settings.seed, max_length=128, progress=False)
    td = time.perf_counter()
    if os.path.isfile(os.path.join(det_dir, "flags.npy")):
        flags = np.load(os.path.join(det_dir, "flags.npy")).astype(bool)
    else:
        flags, _ = detect_stage.detect_dev(victim, mpath, args.data, det_dir, det_cfg)
        flags = np.asarray(flags, bool)
    det_s = time.perf_counter() - td
    n_dc = len(split["dev-clean"])
    is_poison = np.arange(len(flags)) >= n_dc
    dev_detect = D.TextDataset.concat([split["dev-clean"], split["dev-poison"]], "dev-detect")
    enc_detect = D.encode(tok, dev_detect, 128, config=victim.config)
    sets = prepare_sets(settings, victim, enc_detect, flags, enc["dev-clean"], enc["dev-poison"], target)

    def acc_asr(logits_fn, clean=enc["test-clean"], poison=enc["test-poison"]):
        pc = logits_fn(clean).argmax(-1)
        pp = logits_fn(poison).argmax(-1)
        return float((pc == clean.labels).mean()), float((pp == target).mean())

    def sample(e, n=400):  # the trace uses seeded 400-row samples of test-clean / test-poison (cheaper)
        return e.subset(np.sort(np.random.default_rng(0).permutation(len(e))[:n])) if len(e) > n else e

    trace_clean, trace_poison = sample(enc["test-clean"]), sample(enc["test-poison"])

    trace_extra = args.trace_test
    base_acc = None
    if args.rule != "none":
        dc = enc["dev-clean"]
        n_hold = int(round(settings.clean_holdout_frac * len(dc)))
        perm_c = np.random.default_rng([settings.seed, 11]).permutation(len(dc))
        check = dc.subset(np.sort(perm_c[:n_hold])) if 0 < n_hold < len(dc) else dc
        base_acc = float((predict(victim, check, 64).argmax(-1) == check.labels).mean())
        if args.rule == "forget_check":
            inner = stop_lib.forget_check_monitor(sets.holdout, check, sets.target, base_acc, params)
        else:
            inner = proxy_monitor(sets.holdout, check, sets.target, base_acc,
                                  asr_stop=settings.proxy_asr_stop, max_acc_drop=settings.max_cacc_drop)
    else:
        count = [0]

        def inner(logits_fn):  # records only; the decreasing score keeps the final state
            count[0] += 1
            return Evaluation(-float(count[0]), True, False)

    def monitor(logits_fn):
        ev = inner(logits_fn)
        if not trace_extra:
            return ev
        traced = collections.namedtuple("TracedEvaluation", [*ev._fields, "test_cacc400", "test_asr400"])
        return traced(*ev, *acc_asr(logits_fn, trace_clean, trace_poison))

    before = acc_asr(lambda e: predict(victim, e, 64))
    tu = time.perf_counter()
    res = unlearn(victim, sets.forget, sets.retain, settings, teacher_logits=sets.teacher,
                  target_label=sets.target, monitor=monitor)
    un_s = time.perf_counter() - tu
    after = acc_asr(lambda e: predict(res.merged, e, 64))
    out = {
        "victim": args.victim, "data": args.data, "rule": args.rule,
        "settings": {k2: v for k2, v in dataclasses.asdict(settings).items() if k2 != "projection_options"},
        "stop_params": params._asdict(),
        "n_flagged": int(flags.sum()), "n_flagged_poison": int((flags & is_poison).sum()),
        "n_forget_train": len(sets.forget), "n_holdout": len(sets.holdout), "n_retain": len(sets.retain),
        "target": int(target), "defender_target": int(sets.target), "base_acc": base_acc,
        "cacc_before": before[0], "asr_before": before[1], "cacc_after": after[0], "asr_after": after[1],
        "steps": res.steps, "total_steps": res.total_steps, "best_step": res.best_step,
        "stopped_early": res.stopped_early, "trace": res.history,
        "detect_seconds": det_s, "unlearn_seconds": un_s, "seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(json.dumps({k2: v for k2, v in out.items() if k2 not in ("trace", "settings")}, default=float))
    return 0


def simulate(result: dict, params) -> dict:
    """Replay the ``forget_check`` rule with ``params`` on a traced run (``--rule forget_check`` with a patience
    and tolerance that never stop it): the evaluation a run with these parameters would keep, its step, whether it
    would have stopped, and the traced test metrics of that state (tuning victims only)."""
    from jdup.unlearn import stop as stop_lib

    state, best, stop_at = stop_lib.StopState(), None, None
    for rec in result["trace"]:
        v = stop_lib.judge(rec["proxy_asr"], rec["dev_acc"], rec["other_to_target"], result["base_acc"], params)
        if v.ok and v.score < state.best_score:
            best = rec
        state, stop = stop_lib.advance(state, v, params)
        if stop:
            stop_at = rec["step"]
            break
    best = best or result["trace"][0]
    return {"kept_step": best["step"], "stop_step": stop_at, "test_cacc400": best.get("test_cacc400"),
            "test_asr400": best.get("test_asr400"), "proxy": best["proxy_asr"], "dev_acc": best["dev_acc"]}


if __name__ == "__main__":
    sys.exit(main())
