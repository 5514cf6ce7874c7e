"""Command line for the PyTorch reference.

    python -m benchmarks.torch_baseline detect  --model DIR --data ../shared/data/sst-2/1/badnets [--scored test-detect]
    python -m benchmarks.torch_baseline unlearn --model DIR --data ../shared/data/sst-2/1/badnets --out OUT
    python -m benchmarks.torch_baseline run     --model DIR --data ../shared/data/sst-2/1/badnets --out OUT
    python -m benchmarks.torch_baseline victim  [--attack badnets]

``detect`` prints the metrics as one JSON line; ``unlearn`` uses the oracle forget set (all of dev-poison) unless
``--flags`` names a ``.npy`` of 0/1 flags over dev-clean ‖ dev-poison, writes the merged model to ``OUT`` and prints
CACC / ASR on test-clean / test-poison. ``run`` is the official pipeline end to end in one process (what
``jdup unlearn`` does): detection on dev-detect = dev-clean ‖ dev-poison calibrated on dev-clean, unlearning of the
flagged rows with dev-clean as the retain set (5 epochs, no early stop), CACC / ASR before and after, merged model
written to ``OUT``; it prints one JSON line with the metrics and the stage times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_T_START = time.perf_counter()  # module import: the process's Python start-up is not included

for _k, _v in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_k, _v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.torch_baseline", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("detect")
    d.add_argument("--model", required=True)
    d.add_argument("--data", required=True, help="folder with dev-clean.csv and <scored>.csv")
    d.add_argument("--scored", default="test-detect")
    d.add_argument("--alpha", type=float, default=0.9)
    d.add_argument("--batch-size", type=int, default=4)
    u = sub.add_parser("unlearn")
    u.add_argument("--model", required=True)
    u.add_argument("--data", required=True)
    u.add_argument("--out", required=True)
    u.add_argument("--flags", default=None)
    u.add_argument("--epochs", type=int, default=5)
    u.add_argument("--lambda-asr", type=float, default=1.0)
    u.add_argument("--lambda-acc", type=float, default=1.0)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--lambda-asr", type=float, default=1.0)
    r.add_argument("--lambda-acc", type=float, default=1.0)
    r.add_argument(
        "--detect-batch-size", type=int, default=32, help="defender batch (official unlearning: 32)"
    )
    r.add_argument("--device", default="cpu")
    v = sub.add_parser("victim")
    v.add_argument("--attack", default="badnets")
    v.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.cmd == "victim":
        from benchmarks.torch_baseline.victim import make_victim

        print(make_victim(args.out, attack=args.attack))
        return 0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.torch_baseline.data import read_dup_csv

    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    data = Path(args.data)
    dev = read_dup_csv(data / "dev-clean.csv")
    if args.cmd == "detect":
        from benchmarks.torch_baseline.detect import BaselineDetectConfig, detect

        res = detect(model, tok, dev, read_dup_csv(data / f"{args.scored}.csv"),
                     BaselineDetectConfig(alpha=args.alpha, batch_size=args.batch_size))  # fmt: skip
        keys = ("auroc", "auroc_md", "auroc_ss", "frr", "far", "threshold", "layers", "timings")
        print(json.dumps({k: res[k] for k in keys}))
        return 0

    import numpy as np

    from benchmarks.torch_baseline.unlearn import BaselineUnlearnConfig, _accuracy, unlearn

    if args.cmd == "run":
        return _run_end_to_end(args, model, tok, data, dev)

    dev_poison = read_dup_csv(data / "dev-poison.csv")
    if args.flags:
        flags = np.load(args.flags).astype(bool)
        both = dev + dev_poison
        forget = [r for r, f in zip(both, flags, strict=True) if f]
    else:
        forget = dev_poison
    cfg = BaselineUnlearnConfig(epochs=args.epochs, lambda_asr=args.lambda_asr, lambda_acc=args.lambda_acc)
    out = unlearn(model, tok, forget, dev, cfg)
    merged = out["model"]
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    test_clean, test_poison = read_dup_csv(data / "test-clean.csv"), read_dup_csv(data / "test-poison.csv")
    target = int(np.bincount([r.label for r in test_poison]).argmax())
    metrics = {
        "cacc": _accuracy(merged, tok, test_clean, 64),
        "asr": _accuracy(merged, tok, test_poison, 64, target=target),
        "steps": out["steps"],
        "train_seconds": out["timings"]["train_steps"],
    }
    print(json.dumps(metrics))
    return 0


def _run_end_to_end(args, model, tok, data: Path, dev) -> int:
    """Detection on dev-detect, unlearning of the flagged rows, evaluation before/after, export (one process)."""
    import numpy as np

    from benchmarks.torch_baseline.data import read_dup_csv
    from benchmarks.torch_baseline.detect import BaselineDetectConfig, detect
    from benchmarks.torch_baseline.unlearn import BaselineUnlearnConfig, _accuracy, unlearn

    t0 = time.perf_counter()
    model.to(args.device)
    dev_poison = read_dup_csv(data / "dev-poison.csv")
    test_clean, test_poison = read_dup_csv(data / "test-clean.csv"), read_dup_csv(data / "test-poison.csv")
    target = int(np.bincount([r.label for r in test_poison]).argmax())
    times = {"load": t0 - _T_START}
    t = time.perf_counter()
    both = dev + dev_poison
    det = detect(
        model, tok, dev, both, BaselineDetectConfig(batch_size=args.detect_batch_size, device=args.device)
    )
    forget = [r for r, f in zip(both, det["preds"], strict=True) if f]
    times["detect"] = time.perf_counter() - t
    t = time.perf_counter()
    before = {
        "cacc": _accuracy(model, tok, test_clean, 64),
        "asr": _accuracy(model, tok, test_poison, 64, target),
    }
    times["eval_before"] = time.perf_counter() - t
    cfg = BaselineUnlearnConfig(
        epochs=args.epochs, lambda_asr=args.lambda_asr, lambda_acc=args.lambda_acc, device=args.device
    )
    t = time.perf_counter()
    out = unlearn(model, tok, forget, dev, cfg)
    times["unlearn"] = time.perf_counter() - t
    merged = out["model"]
    t = time.perf_counter()
    after = {
        "cacc": _accuracy(merged, tok, test_clean, 64),
        "asr": _accuracy(merged, tok, test_poison, 64, target),
    }
    times["eval_after"] = time.perf_counter() - t
    t = time.perf_counter()
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    times["save"] = time.perf_counter() - t
    times["total_in_process"] = time.perf_counter() - _T_START
    print(json.dumps({
        "n_flagged": len(forget), "n_flagged_poison": int(sum(r.poison for r in forget)),
        "detect_auroc": det["auroc"], "steps": out["steps"], "train_seconds": out["timings"]["train_steps"],
        "cacc_before": before["cacc"], "asr_before": before["asr"],
        "cacc_after": after["cacc"], "asr_after": after["asr"], "times": times,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
