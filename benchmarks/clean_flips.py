"""Where a change of clean accuracy after `jdup unlearn` comes from: test-clean rows the purification fixed and
broke, per class, with an exact McNemar test (reads only test-clean and the two models; no poison information).

    .venv/bin/python benchmarks/clean_flips.py RUN DATA VICTIM_MODEL

RUN is a `jdup unlearn` output (its `model/`, `metrics.json`, `manifest.json`), DATA the data folder, VICTIM_MODEL
the model it purified. Prints one JSON line: CACC before / after, the rows fixed (victim wrong, purified right) and
broken (the reverse), the two-sided exact McNemar p-value of fixed vs broken (the chance of a split at least this
uneven if fixing and breaking were equally likely), per-class accuracy before / after, and where the broken rows
went (true -> predicted counts), and the indices of the fixed and broken rows (to compare two runs).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter

import numpy as np


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: the binomial tail of the smaller count out of fixed + broken at p = 1/2."""
    n, k = fixed + broken, min(fixed, broken)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def main(argv: list[str]) -> int:
    from jdup import data as D
    from jdup import models
    from jdup.predict import predict

    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    run, ddir, vdir = argv
    cfg = json.load(open(f"{run}/manifest.json"))["config"]
    target = json.load(open(f"{run}/metrics.json"))["defender_target"]
    after = models.from_pretrained(f"{run}/model")
    before = models.from_pretrained(vdir)
    tok = models.load_tokenizer(f"{run}/model")
    tc = D.read_split(ddir, "test-clean", num_labels=after.config.num_labels)
    enc = D.encode(tok, tc, cfg.get("max_length", 128))
    pb, pa = predict(before, enc, 64).argmax(-1), predict(after, enc, 64).argmax(-1)
    ok_b, ok_a = pb == tc.labels, pa == tc.labels
    fixed, broken = int(np.sum(~ok_b & ok_a)), int(np.sum(ok_b & ~ok_a))
    classes = sorted(set(tc.labels.tolist()))
    moved = Counter(f"{int(t)}->{int(p)}" for t, p in zip(tc.labels[ok_b & ~ok_a], pa[ok_b & ~ok_a], strict=True))
    out = {
        "run": run,
        "rows": len(tc.labels),
        "target": target,
        "cacc_before": round(float(ok_b.mean()), 4),
        "cacc_after": round(float(ok_a.mean()), 4),
        "fixed": fixed,
        "broken": broken,
        "mcnemar_p": round(mcnemar_exact(fixed, broken), 4),
        "per_class": {int(c): {"rows": int(np.sum(tc.labels == c)),
                               "acc_before": round(float(ok_b[tc.labels == c].mean()), 3),
                               "acc_after": round(float(ok_a[tc.labels == c].mean()), 3)} for c in classes},
        "broken_true_to_pred": dict(moved.most_common()),
        "broken_rows": np.flatnonzero(ok_b & ~ok_a).tolist(),
        "fixed_rows": np.flatnonzero(~ok_b & ok_a).tolist(),
        "sent_to_target_before": int(np.sum(pb == target)),
        "sent_to_target_after": int(np.sum(pa == target)),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
