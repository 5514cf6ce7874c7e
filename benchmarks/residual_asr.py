"""Where the ASR left after `jdup unlearn` comes from, and the `target_tilt` rule replayed (TUNING victims only:
reads test-poison).

    .venv/bin/python benchmarks/residual_asr.py RUN DATA VICTIM_MODEL [TOL ...]

RUN is a `jdup unlearn` output. Prints the purified model's error on clean non-target test rows next to its ASR,
the share of (clean, triggered) test pairs that only the trigger sends to the target (test-poison row i is the
triggered copy of the i-th non-target test-clean row), ASR per BadNets trigger word, and, when RUN used
`target_tilt`, the rule replayed with each tolerance TOL on the same held-out dev-clean rows (the logits before the
tilt are the exported model's plus the shift; the tilt does not change training), with test CACC / ASR at the shift
it picks.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(argv: list[str]) -> int:
    from jdup import data as D
    from jdup import models
    from jdup.metrics import trigger_success_rate
    from jdup.predict import predict
    from jdup.unlearn.tilt import choose_tilt, tilted_predictions

    run, ddir, vdir, *tols = argv
    m = json.load(open(f"{run}/metrics.json"))
    cfg = json.load(open(f"{run}/manifest.json"))["config"]
    target, tilt = m["defender_target"], m.get("target_tilt")
    shift = tilt["shift"] if tilt else 0.0
    model, tok = models.from_pretrained(f"{run}/model"), models.load_tokenizer(f"{run}/model")
    sp = {n: D.read_split(ddir, n, num_labels=model.config.num_labels) for n in ("test-poison", "test-clean", "dev-clean")}
    enc = {n: D.encode(tok, ds, cfg.get("max_length", 128)) for n, ds in sp.items()}
    lg = {n: predict(model, e, 64) for n, e in enc.items()}
    tc, tp = sp["test-clean"], sp["test-poison"]
    pc, pp = lg["test-clean"].argmax(-1), lg["test-poison"].argmax(-1)
    print(f"ASR {np.mean(pp == target):.3f}  CACC {np.mean(pc == tc.labels):.3f}  "
          f"clean non-target rows -> target {np.mean(pc[tc.labels != target] == target):.3f}")
    non_target = np.flatnonzero(tc.labels != target)
    if len(non_target) == len(tp):
        trig = trigger_success_rate(pc[non_target], pp, target)
        print(f"pairs whose clean copy is not sent to the target, sent there once triggered (trigger ASR): {trig:.3f}")
    words = [t.split() for t in tp.texts]
    for w in ("cf", "mn", "bb", "tq"):
        idx = [i for i, ws in enumerate(words) if w in ws]
        if idx:
            print(f"  trigger {w}: {len(idx)} rows, ASR {np.mean(pp[idx] == target):.3f}")
    if not tilt:
        return 0
    for z in lg.values():
        z[:, target] += shift  # the logits before the tilt
    victim = models.from_pretrained(vdir)
    lab = sp["dev-clean"].labels
    n = int(round(cfg["clean_holdout_frac"] * len(lab)))
    idx = np.sort(np.random.default_rng([cfg["seed"], 11]).permutation(len(lab))[:n])  # as prepare_sets draws it
    base = float((predict(victim, enc["dev-clean"].subset(idx), 64).argmax(-1) == lab[idx]).mean())
    for tol in [cfg.get("tilt_tol", 0.0), *map(float, tols)]:
        c = choose_tilt(lg["dev-clean"][idx], lab[idx], target, base, tol)
        cacc = np.mean(tilted_predictions(lg["test-clean"], target, c.shift) == tc.labels)
        asr = np.mean(tilted_predictions(lg["test-poison"], target, c.shift) == target)
        print(f"tilt_tol {tol}: shift {c.shift} (held-out base {base:.3f}) -> test CACC {cacc:.3f}, ASR {asr:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
