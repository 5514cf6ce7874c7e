"""Detection end to end (calibration + scoring): jdup vs the PyTorch reference, same weights and data.

Each implementation runs in its own subprocess: load the model folder and the CSVs, measure its own matmul peak,
warm up (jdup: one full run, which compiles every bucket; torch: one run on a 64-row subset), then ``--reps`` timed
runs of the whole detection call. Reported per implementation: wall time per stage and in total (min / median),
samples/s, peak RSS, AUROC, model FLOP/s and MFU (useful forward FLOPs of C + V + Q over the implementation's own
matmul peak). The parent prints one JSON line with both and the jdup/reference ratios.

    python benchmarks/bench_detect.py                       # MiniLM BadNets victim (built once), SST-2 test-detect
    python benchmarks/bench_detect.py --model DIR --attack addsent --reps 5
    python benchmarks/bench_detect.py --memory              # jdup peak RSS with 1x and 4x the scored rows
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

DEFAULTS = dict(
    attack="badnets",  # ../shared/data/sst-2/1/<attack>
    scored="test-detect",  # split scored (test-detect = test-clean ‖ test-poison)
    reps=3,  # timed repetitions after warm-up
    torch_batch_size=4,  # the reference detection demo's defender batch size
    jdup_batch_size=32,  # jdup's default batch (sorted by length, bucketed)
    alpha=0.9,  # DUP class default (the detection demo used 1.0)
    jdup_mode="default",  # default (float32 fit, Gram spectral) | faithful (float64 fit, SVD spectral)
    jdup_buckets="",  # comma-separated padded lengths for jdup ("" = DetectConfig default)
    jdup_trim=1,  # 1: jdup's last layer computes only [CLS] (default); 0: full last layer (for comparison)
)


# ---------------------------------------------------------------------------------------------------------------
# workers


def _load_rows(args):
    from benchmarks.torch_baseline.data import read_dup_csv

    folder = Path(args.data_dir) / args.attack
    dev = read_dup_csv(folder / "dev-clean.csv")
    scored = read_dup_csv(folder / f"{args.scored}.csv")
    dev = [dev[i] for i in _limit_index(len(dev), args.limit)]
    scored = [scored[i] for i in _limit_index(len(scored), args.scored_limit or args.limit)]
    return dev, scored * args.rows_mult


def _limit_index(n: int, limit: int | None):
    """All rows, or ``limit`` rows spread evenly over the file (test-detect is clean rows first, poison last)."""
    import numpy as np

    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def _flops(folder: Path, texts_c, texts_vq) -> tuple[float, dict]:
    import json

    from transformers import AutoTokenizer

    cfg = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    lengths = [
        len(x) for x in tok(list(texts_c) + list(texts_vq), truncation=True, max_length=512)["input_ids"]
    ]
    f = C.encoder_forward_flops(
        lengths,
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg.get("num_labels", 2),
    )
    return f, {"sequences": len(lengths), "tokens": int(sum(lengths))}


def worker_torch(args) -> dict:
    import numpy as np
    import psutil
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.torch_baseline.data import split_dev
    from benchmarks.torch_baseline.detect import BaselineDetectConfig, detect

    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    dev, scored = _load_rows(args)
    cfg = BaselineDetectConfig(alpha=args.alpha, batch_size=args.torch_batch_size)
    peak = C.matmul_peak("torch", "float32")
    rss_before = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    detect(
        model, tok, dev[:64], scored[:64], cfg
    )  # warm-up: allocator, threads (no compilation in eager torch)
    warm = time.perf_counter() - t0
    runs = []
    for _ in range(args.reps):
        runs.append(detect(model, tok, dev, scored, cfg))
    c_rows, v_rows = split_dev(dev, cfg.split_seed)
    flops, counts = _flops(folder, [r.text for r in c_rows], [r.text for r in v_rows + list(scored)])
    last = runs[-1]
    tim = [r["timings"] for r in runs]
    total = C.summarize([t["total"] for t in tim])
    executed = flops + _flops(folder, [], [r.text for r in v_rows + list(scored)])[0]  # MD re-runs V and Q
    stages = {
        "calibration": C.summarize([t["forward_calib"] for t in tim]),
        "fits": C.summarize([t["fits"] for t in tim]),
        "scoring": C.summarize(
            [t["forward_full"] + t["forward_md"] + t["score_md"] + t["score_ss"] for t in tim]
        ),
        "decide": C.summarize([t["fuse"] for t in tim]),
    }
    detail = {k: C.summarize([t[k] for t in tim]) for k in tim[0] if k not in ("total",)}
    return {
        "impl": "torch",
        "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "rows_scored": len(scored),
        "rows_dev": len(dev),
        "warmup_s": warm,
        "compile_s": 0.0,
        "total": total,
        "stages": stages,
        "stages_detail": detail,
        "samples_per_s": len(scored) / total["median"],
        "auroc": last["auroc"],
        "auroc_md": last["auroc_md"],
        "auroc_ss": last["auroc_ss"],
        "frr": last["frr"],
        "far": last["far"],
        "layers": last["layers"],
        "flops_model": flops,
        "flops_executed": executed,
        "flop_counts": counts,
        "peak": peak,
        "achieved_flops_per_s": flops / total["min"],
        "mfu": flops / total["min"] / peak["flops_per_s"],
        "hfu_executed": executed / total["min"] / peak["flops_per_s"],
        "rss_before_mb": rss_before,
        "peak_rss_mb": C.peak_rss_mb(),
        "scores_head": np.asarray(last["scores"][:5]).tolist(),
    }


def worker_jdup(args) -> dict:
    import jax
    import numpy as np
    import psutil

    from jdup import data as D
    from jdup import detect as J
    from jdup import models

    C.JaxCompileClock.install()
    folder = Path(args.model)
    model = models.from_pretrained(folder)
    tok = models.load_tokenizer(folder)
    dfolder = Path(args.data_dir) / args.attack
    dev = D.read_dup_csv(dfolder / "dev-clean.csv")
    scored = D.read_dup_csv(dfolder / f"{args.scored}.csv")
    dev = dev.subset(_limit_index(len(dev), args.limit))
    scored = scored.subset(_limit_index(len(scored), args.scored_limit or args.limit))
    if args.rows_mult > 1:
        scored = D.TextDataset.concat([scored] * args.rows_mult)
    extra = dict(fit_dtype="float64", ss_method="svd") if args.jdup_mode == "faithful" else {}
    if args.jdup_buckets:
        extra["buckets"] = tuple(int(x) for x in args.jdup_buckets.split(","))
    if not args.jdup_trim:
        from jdup import features as F

        plain = F.model_call_kwargs
        F.model_call_kwargs = lambda arch, pooling, trim=True: plain(arch, pooling, False)
    cfg = J.DetectSettings(
        method="dup",  # the reference implements DUP's own fusion
        alpha=args.alpha, batch_size=args.jdup_batch_size, progress=False, **extra
    )
    peak = C.matmul_peak("jax", "float32")
    rss_before = psutil.Process().memory_info().rss / 2**20
    c0, n0 = C.JaxCompileClock.snapshot()
    t0 = time.perf_counter()
    res = J.detect(model, tok, dev, scored, cfg) if args.warmup else None
    warm = time.perf_counter() - t0
    c1, n1 = C.JaxCompileClock.snapshot()
    runs, walls, compiles = [], [], []
    for _ in range(args.reps):
        ca, _ = C.JaxCompileClock.snapshot()
        t0 = time.perf_counter()
        res = J.detect(model, tok, dev, scored, cfg)
        jax.block_until_ready(res.scores)  # results are host NumPy already; kept for clarity
        walls.append(time.perf_counter() - t0)
        compiles.append(C.JaxCompileClock.snapshot()[0] - ca)
        runs.append(res)
    c_idx, v_idx = J.split_calibration(len(dev), cfg.split_seed, cfg.calib_fraction, cfg.max_dev_samples)
    texts = list(dev.texts)
    s_texts = list(scored.texts)
    flops, counts = _flops(folder, [texts[i] for i in c_idx], [texts[i] for i in v_idx] + s_texts)
    tim = [r.timings for r in runs]
    total = C.summarize(walls)
    steady = C.summarize([w - c for w, c in zip(walls, compiles, strict=True)])
    stages = {
        "calibration": C.summarize([t["tokenize"] + t["calibration_pass"] for t in tim]),
        "fits": C.summarize([t["fit"] for t in tim]),
        "scoring": C.summarize([t["scoring_pass"] for t in tim]),
        "decide": C.summarize([t["decide"] for t in tim]),
    }
    detail = {k: C.summarize([t[k] for t in tim]) for k in tim[0]}
    m = runs[-1].metrics
    best = steady["min"]
    return {
        "impl": "jdup",
        "mode": args.jdup_mode,
        "jax_devices": [str(d) for d in jax.devices()],
        "batch_size": cfg.batch_size,
        "buckets": list(cfg.buckets),
        "rows_scored": len(scored),
        "rows_dev": len(dev),
        "warmup_s": warm,
        "compile_s": c1 - c0,
        "compiles_warmup": n1 - n0,
        "compile_s_per_timed_run": compiles,
        "total": total,
        "total_excl_compile": steady,
        "stages": stages,
        "stages_detail": detail,
        "samples_per_s": len(scored) / total["median"],
        "auroc": m.get("auroc"),
        "auroc_md": m.get("auroc_md"),
        "auroc_ss": m.get("auroc_ss"),
        "frr": m.get("frr"),
        "far": m.get("far"),
        "layers": runs[-1].layers,
        "flops_model": flops,
        "flops_executed": flops,
        "flop_counts": counts,
        "peak": peak,
        "achieved_flops_per_s": flops / best,
        "mfu": flops / best / peak["flops_per_s"],
        "hfu_executed": flops / best / peak["flops_per_s"],
        "rss_before_mb": rss_before,
        "peak_rss_mb": C.peak_rss_mb(),
        "scores_head": np.asarray(runs[-1].scores[:5]).tolist(),
    }


# ---------------------------------------------------------------------------------------------------------------
# parent


def _worker_args(args, impl: str, warmup: bool = True, **over) -> list[str]:
    a = {
        "impl": impl,
        "model": str(args.model),
        "data-dir": str(args.data_dir),
        "attack": args.attack,
        "scored": args.scored,
        "reps": args.reps,
        "torch-batch-size": args.torch_batch_size,
        "jdup-batch-size": args.jdup_batch_size,
        "alpha": args.alpha,
        "jdup-mode": args.jdup_mode,
        "jdup-buckets": args.jdup_buckets,
        "jdup-trim": args.jdup_trim,
        "threads": args.threads,
        "rows-mult": 1,
        "limit": args.limit or 0,
        "scored-limit": args.scored_limit or 0,
    }
    a.update(over)
    out = []
    for k, v in a.items():
        out += [f"--{k}", str(v)]
    if not (warmup and args.warmup):
        out.append("--no-warmup")
    return out


def main(argv=None) -> dict:
    C.setup_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="both", choices=["both", "jdup", "torch"])
    ap.add_argument("--model", default=None, help="HF folder loaded by both (default: cached MiniLM victim)")
    ap.add_argument("--data-dir", default=str(C.DATA))
    ap.add_argument("--attack", default=DEFAULTS["attack"])
    ap.add_argument("--scored", default=DEFAULTS["scored"])
    ap.add_argument("--reps", type=int, default=DEFAULTS["reps"])
    ap.add_argument("--torch-batch-size", type=int, default=DEFAULTS["torch_batch_size"])
    ap.add_argument("--jdup-batch-size", type=int, default=DEFAULTS["jdup_batch_size"])
    ap.add_argument("--alpha", type=float, default=DEFAULTS["alpha"])
    ap.add_argument("--jdup-mode", default=DEFAULTS["jdup_mode"], choices=["default", "faithful"])
    ap.add_argument("--jdup-buckets", default=DEFAULTS["jdup_buckets"], help="e.g. 16,32,48,64,128,256,512")
    ap.add_argument("--jdup-trim", type=int, default=DEFAULTS["jdup_trim"], help="0: full last layer")
    ap.add_argument("--threads", type=int, default=C.num_cores(), help="torch intra-op threads")
    ap.add_argument("--rows-mult", type=int, default=1, help="repeat the scored rows k times")
    ap.add_argument("--limit", type=int, default=0, help="smoke test: first N rows of each CSV")
    ap.add_argument(
        "--scored-limit", type=int, default=0, help="N scored rows spread over the file (before --rows-mult)"
    )
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument(
        "--memory", action="store_true", help="jdup (and torch) peak RSS at 1x and 4x scored rows"
    )
    ap.add_argument("--out", default=str(C.RESULTS / "bench_detect.jsonl"))
    args = ap.parse_args(argv)
    args.limit = args.limit or None
    if args.worker:
        rec = worker_torch(args) if args.impl == "torch" else worker_jdup(args)
        C.worker_print(rec)
        return rec

    args.model = C.resolve_model(args.model)
    record = {
        "bench": "detect_memory"
        if args.memory
        else ("detect_faithful" if args.jdup_mode == "faithful" else "detect"),
        "machine": C.machine_info(),
        "versions": C.versions(),
        "commit": C.git_commit(),
        "model": str(args.model),
        "data": str(Path(args.data_dir) / args.attack / f"{args.scored}.csv"),
        "config": {k: getattr(args, k) for k in DEFAULTS}
        | {
            "threads": args.threads,
            "limit": args.limit,
            "scored_limit": args.scored_limit,
            "impl": args.impl,
        },
    }
    me = Path(__file__).resolve()
    if args.memory:
        mem = {}
        for impl in ("jdup", "torch") if args.impl == "both" else (args.impl,):
            for k in (1, 4):
                r = C.run_worker(me, _worker_args(args, impl, False, **{"rows-mult": k, "reps": 1}))
                mem[f"{impl}_x{k}"] = {
                    "rows_scored": r["rows_scored"],
                    "peak_rss_mb": r["peak_rss_mb"],
                    "rss_before_mb": r["rss_before_mb"],
                    "total_s": r["total"]["min"],
                }
        for impl in ("jdup", "torch"):
            if f"{impl}_x1" in mem:
                mem[f"{impl}_peak_ratio_x4_over_x1"] = (
                    mem[f"{impl}_x4"]["peak_rss_mb"] / mem[f"{impl}_x1"]["peak_rss_mb"]
                )
        record["memory"] = mem
        C.emit(record, args.out)
        return record
    res = {}
    for impl in ("torch", "jdup") if args.impl == "both" else (args.impl,):
        res[impl] = C.run_worker(me, _worker_args(args, impl))
    record.update(res)
    if "torch" in res and "jdup" in res:
        j, t = res["jdup"], res["torch"]
        record["ratio"] = {
            "speedup_total_median": C.ratio(t["total"]["median"], j["total"]["median"]),
            "speedup_total_min": C.ratio(t["total"]["min"], j["total"]["min"]),
            "speedup_excl_compile_min": C.ratio(t["total"]["min"], j["total_excl_compile"]["min"]),
            "jdup_over_torch_time_median": C.ratio(j["total"]["median"], t["total"]["median"]),
            "auroc_diff": abs(j["auroc"] - t["auroc"]) if j["auroc"] is not None else None,
            "mfu_jdup_over_torch": C.ratio(j["mfu"], t["mfu"]),
            "peak_rss_jdup_over_torch": C.ratio(j["peak_rss_mb"], t["peak_rss_mb"]),
        }
        record["normalised"] = C.normalised(
            j["total"]["median"],
            t["total"]["median"],
            j["peak"]["flops_per_s"],
            t["peak"]["flops_per_s"],
            j["flops_model"],
        )
    C.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
