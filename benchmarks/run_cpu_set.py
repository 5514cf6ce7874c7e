"""The CPU benchmark set (what ``make bench`` runs): forward, detection, detection memory, one unlearning epoch.

All JSON lines go to ``benchmarks/results/cpu.jsonl`` (overwritten per run); ``benchmarks/report.py`` then writes
``cpu.md`` (the README table) and ``cpu.png`` (per-stage bar chart). The victim is built once and cached under
``benchmarks/.cache/``.

    python benchmarks/run_cpu_set.py                 # everything, defaults
    python benchmarks/run_cpu_set.py --quick         # 1 repetition each, 400-row subsets (a smoke run)
    python benchmarks/run_cpu_set.py --only forward,detect,parity,memory --keep-others   # refresh those only
    python benchmarks/run_cpu_set.py --only cli --keep-others    # user-level rows: fresh-process CLI calls

``--only cli`` (not in the default set: it takes about 10 minutes on 2 cores) adds the user-level records of
``bench_cli.py``: two fresh ``jdup detect`` processes (empty, then warm compilation cache) vs two reference
processes and jdup's warm in-process time; ``jdup unlearn`` (first and repeat) vs the reference end to end.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

#: --only part -> the ``bench`` name of the record it writes
BENCH_OF = {
    "forward": ("forward",),
    "detect": ("detect",),
    "parity": ("detect_faithful",),
    "memory": ("detect_memory",),
    "unlearn": ("unlearn_epoch",),
    "cli": ("cli_detect", "cli_unlearn"),
}


def main(argv=None) -> None:
    C.setup_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: cached MiniLM BadNets victim)")
    ap.add_argument("--out", default=str(C.RESULTS / "cpu.jsonl"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--official-dir", default=None,
                    help="--only cli: a checkout of the official DUP code (ManHu2025/DUP), timed beside jdup and the reference "
                    "(bench_cli.py --official-dir; its --official-*-cmd options through --cli-args)")
    ap.add_argument("--cli-args", default="", help="--only cli: more bench_cli.py arguments (one shell-quoted string)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per benchmark")
    ap.add_argument("--only", default="forward,detect,parity,memory,unlearn", help="comma-separated subset")
    ap.add_argument(
        "--memory-impl", default="jdup", choices=["jdup", "torch", "both"], help="who --memory measures"
    )
    ap.add_argument(
        "--keep-others",
        action="store_true",
        help="keep the records of the benchmarks not in --only that OUT already holds (default: start OUT afresh)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    unknown = only - set(BENCH_OF)
    if unknown:
        ap.error(f"unknown --only part(s) {sorted(unknown)}; known: {sorted(BENCH_OF)}")
    kept = []
    if args.keep_others and out.exists():
        ran = {b for p in only if p in BENCH_OF for b in BENCH_OF[p]}
        for line in out.read_text().splitlines():
            if line.strip().startswith("{") and json.loads(line).get("bench") not in ran:
                kept.append(line)
    out.write_text("".join(ln + "\n" for ln in kept))
    model = str(C.resolve_model(args.model))
    common = ["--model", model, "--out", str(out)]
    quick_reps = ["--reps", "1" if args.quick else str(args.reps)]
    from benchmarks import bench_cli, bench_detect, bench_forward, bench_unlearn, report

    t0 = time.perf_counter()
    if "forward" in only:
        bench_forward.main(common + quick_reps)
    if "detect" in only:
        bench_detect.main(common + quick_reps + (["--limit", "400"] if args.quick else []))
    if "parity" in only:  # jdup faithful mode (float64 fit, SVD spectral) once, for the AUROC parity row
        lim = ["--limit", "400"] if args.quick else []
        bench_detect.main(
            common + ["--impl", "jdup", "--jdup-mode", "faithful", "--reps", "1", "--no-warmup"] + lim
        )
    if "memory" in only:
        # jdup peak RSS with 684 and 4 x 684 = 2736 scored rows (a quarter of test-detect, then 4 copies)
        n = "100" if args.quick else "684"
        bench_detect.main(common + ["--memory", "--impl", args.memory_impl, "--scored-limit", n])
    if "unlearn" in only:
        bench_unlearn.main(common + quick_reps + (["--limit", "128"] if args.quick else []))
    if "cli" in only:
        extra = (["--parts", "detect"] if args.quick else []) + shlex.split(args.cli_args)
        extra += ["--official-dir", args.official_dir] if args.official_dir else []
        bench_cli.main(["--model", model, "--out", str(out)] + extra)
    print(f"# CPU set done in {time.perf_counter() - t0:.0f} s; results in {out}", file=sys.stderr)
    report.main([str(out)])


if __name__ == "__main__":
    main()
