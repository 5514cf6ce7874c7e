"""K seeds vmapped in one jitted step vs the same K cells run one after the other: per-cell time ratio.

Both paths run the exact same cells through ``jdup.sweep.vmapped.unlearn_group`` (LoRA unlearning of the sets
``jdup.unlearn.prepare_sets`` gives each cell): once as one group of K (``jax.jit(jax.vmap(jdup.unlearn.train_step))``
over K adapters and K optimizer states, sharded over the ``sweep`` mesh axis), and once as K groups of 1 (the
library loop ``jdup.unlearn.unlearn`` itself). Each path is warmed up first (compilation reported separately), then
timed over ``--repeats`` runs; one JSON line goes to stdout (and ``--out``).

    python benchmarks/bench_sweep.py                                   # tiny random BERT, synthetic data (CPU)
    python benchmarks/bench_sweep.py --model builtin:minilm --data ../shared/data/sst-2/1/badnets --max-rows 400
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_sweep.py   # 8 simulated devices
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

K = 8  # cells per vmapped group (seeds 0..K-1)
MODEL = "tiny:bert"  # tiny:bert (random, 2 layers) | builtin:minilm | an HF folder
DATA = "synthetic"  # synthetic | a DUP-layout folder (e.g. ../shared/data/sst-2/1/badnets)
EPOCHS = 2  # passes over the flagged rows per cell
BATCH = 16  # rows per flagged / clean batch
REPEATS = 3  # timed runs per path (after one warm-up run)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=K)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--data", default=DATA)
    p.add_argument("--max-rows", type=int, default=0, help="rows per evaluation split (0 = all)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import jax
    import numpy as np

    from jdup import data as D
    from jdup import sweep as S
    from jdup import unlearn as U
    from jdup.stages.unlearn import detect_config
    from jdup.sweep import vmapped as V

    data = (
        {"source": "synthetic", "synthetic_rows": 64, "synthetic_length": 12}
        if args.data == "synthetic"
        else {"source": "dup", "dir": args.data}
    )
    data.update(max_rows=args.max_rows, max_length=args.max_length)
    values = {
        "data": data,
        "model": {"name": args.model},
        "detect": {"frr": 0.2, "batch_size": 32, "split_seed": 1},  # pinned: the K seeds share one detection
        "unlearn": {"epochs": args.epochs, "batch_size": args.batch_size, "early_stop": "none"},
    }
    cells = [S.build_cell({**values, "seed": s}, source="bench") for s in range(args.k)]
    engine = S.Engine(S.SweepConfig(progress=False), out="/tmp/jdup-bench-sweep")
    base = engine.prepare_base(cells[0])
    cfgs = [S.stage_unlearn_config(c, model=base.victim, data=base.data_dir, out="") for c in cells]
    flags = engine.detection(base, detect_config(cfgs[0])).flags
    enc = base.enc
    runs = [
        V.CellRun(
            c,
            U.prepare_sets(
                c, base.model, base.enc_detect, flags, enc["dev-clean"], enc["dev-poison"], base.target
            ),
        )
        for c in cfgs
    ]

    def loss_last(results):
        return [r.log[-1]["loss"] if r.log else float("nan") for r in results]

    def vmapped():
        return loss_last(V.unlearn_group(base.model, runs)[0])

    def sequential():
        return [loss_last(V.unlearn_group(base.model, [r])[0])[0] for r in runs]

    timings = {}
    results = {}
    for name, fn in (("vmapped", vmapped), ("sequential", sequential)):
        t0 = time.perf_counter()
        results[name] = fn()  # warm-up: compiles
        compile_s = time.perf_counter() - t0
        reps = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            reps.append(time.perf_counter() - t0)
        timings[name] = {"first_run_s": compile_s, "median_s": float(np.median(reps)), "runs_s": reps}
    per_cell_vmapped = timings["vmapped"]["median_s"] / args.k
    per_cell_seq = timings["sequential"]["median_s"] / args.k
    diff = max(abs(a - b) for a, b in zip(results["vmapped"], results["sequential"], strict=True))
    import importlib.metadata as md

    line = {
        "bench": "sweep_vmap_vs_sequential",
        "k": args.k,
        "model": args.model,
        "data": args.data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps": D.forget_batches_per_epoch(len(runs[0].sets.forget), args.batch_size) * args.epochs,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "per_cell_s": {"vmapped": per_cell_vmapped, "sequential": per_cell_seq},
        "speedup_per_cell": per_cell_seq / per_cell_vmapped,
        "per_cell_time_ratio_vmapped_over_sequential": per_cell_vmapped / per_cell_seq,
        "max_abs_loss_diff": diff,
        "timings": timings,
        "versions": {k: md.version(k) for k in ("jax", "flax", "optax")}
        | {"python": platform.python_version()},
    }
    print(json.dumps(line))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main(sys.argv[1:])
