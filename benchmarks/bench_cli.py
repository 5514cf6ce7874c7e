"""User-level timings: fresh-process CLI calls of jdup vs fresh-process runs of the PyTorch reference.

What a user pays per call, start-up, imports, model load, tracing, compilation, plots and writing included:

* ``detect``: ``jdup detect --model M --data D --out ... --method dup`` (test-detect scored, plots on) twice in fresh
  processes sharing one compilation-cache folder that starts empty: the first call fills it, the repeat call reads
  it. The reference: ``python -m benchmarks.torch_baseline detect`` twice (there is no cache to warm; the repeat
  shows the OS file cache effect). For the targets, the warm in-process detection time of jdup
  (``bench_detect.py --impl jdup``: one warm-up call, then ``--reps`` timed calls in one process) is measured in
  the same run. Targets (issue 15): repeat call ≤ 1.3× the warm in-process time, first call ≤ 1.6×.
* ``unlearn``: ``jdup unlearn --model M --data D --out ... early_stop=none detect.method=dup forget_loss=kl
  evaluate_before=false`` (built-in detection on dev-detect with DUP's fusion, 5 epochs over the flagged rows,
  batch 32, evaluation of the purified model, export: the official process's work; the official settings without
  an early-stop rule, so both sides take the same number of steps) first with an empty cache, then repeated, then
  one call with jdup's defaults (``--no-unlearn-defaults`` skips it); the
  reference: ``python -m benchmarks.torch_baseline run`` (the same stages in one torch process). Target: jdup ≥ 2×
  faster than the reference end to end.

The official DUP code itself (public: ManHu2025/DUP; never copied here) runs only where the user passes a checkout
(``--official-dir DIR``): ``--official-detect-cmd`` / ``--official-unlearn-cmd`` (defaults: ``python -m
benchmarks.official_dup detect|unlearn --checkout DIR --model {model} --data {data} --out {out}``, which runs the
official ``demo_detection.py`` / ``demo_unlearning.py`` ``main`` on this victim and data on a CPU; see that
module for what it adapts; ``{model}``, ``{data}``, ``{out}`` and ``{python}`` in a command are replaced) run as
fresh shell processes in that folder, timed like the rest, and the rows gain ``official`` figures (the JSON line
the process prints last: AUROC / FRR / FAR / rows flagged, CACC / ASR) and ratios (targets: detect ≥ 5× the
official process on a repeat call and ≥ 4× on the first call, unlearn ≥ 2×; the official unlearning runs with
``--lambda-asr 1``: the demo's own 0 trains cross-entropy only and leaves the backdoor in place).

Every jdup call also reports its phases (``phases``: start-up, load, tokenise, passes, compile/trace/cache load,
write, plots) from the stage's own record (``detection.json`` / ``metrics.json``), so the gap between a CLI call and
the warm in-process time is explained by the same run.

Wall times are measured by this parent around each process (``time.perf_counter``); the child's peak RSS comes from
``os.wait4``. The compilation-cache folder is a fresh temporary one (``JDUP_COMPILATION_CACHE=<dir>``; any
``JAX_COMPILATION_CACHE_DIR`` of the caller is removed from the children's environment) and the number of entries
it holds after each call is recorded, so a CLI that does not turn the cache on shows up as ``cache_entries: 0``.
``--jax-cache-env`` additionally sets JAX's own variables (to measure the cache before the CLI calls
``jdup.runtime.setup()``).

    python benchmarks/bench_cli.py                                 # cached MiniLM BadNets victim, SST-2 BadNets
    python benchmarks/bench_cli.py --parts detect --reps 2
    python benchmarks/bench_cli.py --model DIR --data ../shared/data/sst-2/1/badnets --parts unlearn
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

DEFAULTS = dict(
    attack="badnets",  # ../shared/data/sst-2/1/<attack>
    reps=1,  # repeat calls per side after the first (jdup: warm cache)
    inprocess_reps=2,  # timed in-process jdup detections (after one warm-up call)
    epochs=5,  # unlearning epochs (official: 5)
)
TARGETS = {"detect_repeat_over_warm": 1.3, "detect_first_over_warm": 1.6, "unlearn_speedup": 2.0,
           # the speed targets: against the official DUP process (or, without --official-dir, the PyTorch reference)
           "detect_speedup_repeat": 5.0, "detect_speedup_first": 4.0}
#: default official commands (run with cwd = the checkout): the CPU adapter around the official demos' ``main``
OFFICIAL_CMDS = {
    part: "{python} -m benchmarks.official_dup " + part + " --checkout {checkout} --model {model} --data {data} --out {out}"
    for part in ("detect", "unlearn")
}
# the official unlearning with its forgetting term on (lambda_asr = 1, as the PyTorch reference and jdup's side of
# this benchmark): the demo script ships lambda_asr = 0, which trains cross-entropy only and keeps the backdoor
# (same compute, so the same time, but no purified model to compare)
OFFICIAL_CMDS["unlearn"] += " --lambda-asr 1"


def jdup_command() -> list[str]:
    """The ``jdup`` console script next to this Python, else ``python -m jdup``."""
    exe = Path(sys.executable).with_name("jdup")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jdup"]


def child_env(cache_dir: Path | None, jax_cache_env: bool = False) -> dict[str, str]:
    """The environment of a measured child: offline, quiet, no inherited JAX cache settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))
    }
    env.pop("JDUP_COMPILATION_CACHE_SET_BY_JDUP", None)
    env.update(C.ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if cache_dir is None:
        env["JDUP_COMPILATION_CACHE"] = "0"
    else:
        env["JDUP_COMPILATION_CACHE"] = str(cache_dir)
        if jax_cache_env:
            from jdup import runtime

            env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(runtime.DEFAULT_MIN_COMPILE_TIME_S)
            env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(runtime.DEFAULT_MAX_BYTES)
    return env


def timed_process(cmd: list[str] | str, env: dict[str, str], timeout: float = 3600, cwd: Path | None = None,
                  shell: bool = False) -> dict:
    """Run ``cmd`` to completion; wall seconds, exit code, peak RSS (MiB), last JSON object printed, output tail."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd or C.REPO, text=True, shell=shell)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    res = {
        "cmd": cmd if isinstance(cmd, str) else " ".join(cmd),
        "wall_s": wall,
        "rc": proc.returncode,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }
    parsed = _last_json(stdout)
    if parsed is not None:
        res["output"] = parsed
    if proc.returncode != 0:
        res["stderr_tail"] = stderr[-2000:]
    return res


def _last_json(text: str):
    """The last JSON object in ``text`` (one line, or the CLI's indented block at the end)."""
    lines = text.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def _entries(folder: Path) -> int:
    return len(list(folder.glob("*-cache"))) if folder.is_dir() else 0


def phases_of(out: Path) -> dict | None:
    """The per-phase seconds a jdup call recorded in its output (``detection.json`` or ``metrics.json``)."""
    for name in ("detection.json", "metrics.json"):
        path = out / name
        if path.is_file():
            rec = json.loads(path.read_text())
            if name == "detection.json":
                keys = ("seconds", "seconds_load", "seconds_plots", "seconds_startup", "seconds_write")
                return {**{k: rec.get(k) for k in keys}, "timings": rec.get("timings"),
                        "compile": rec.get("seconds_compile")}
            return rec.get("seconds_phases")
    return None


def _calls(make_cmd, n: int, env: dict, cache: Path | None, work: Path, tag: str, cwd: Path | None = None,
           shell: bool = False) -> list[dict]:
    runs = []
    for i in range(n):
        out = work / f"{tag}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        r = timed_process(make_cmd(out), env, cwd=cwd, shell=shell)
        r["loadavg_after"] = os.getloadavg()[0]
        if cache is not None:
            r["cache_entries"] = _entries(cache)
        if tag.startswith("jdup"):
            r["phases"] = phases_of(out)
            from jdup import runtime

            r["host_malloc"] = runtime.cli_malloc_choice(env)  # what the call asked of glibc's allocator
        runs.append(r)
        print(f"# {tag} call {i + 1}: {r['wall_s']:.1f} s (rc {r['rc']})", file=sys.stderr, flush=True)
    return runs


def bench_detect(args, work: Path) -> dict:
    model, data = str(args.model), str(args.data)
    cache = work / "xla-detect"
    shutil.rmtree(cache, ignore_errors=True)
    env = child_env(cache, args.jax_cache_env)

    def jdup_cmd(out):
        return jdup_command() + [
            "detect",
            "--model",
            model,
            "--data",
            data,
            "--out",
            str(out),
            "--method",
            "dup",  # the reference implements DUP's own fusion (jdup's default `fisher` costs the same)
            "progress=false",
        ]

    def ref_cmd(out):
        return [sys.executable, "-m", "benchmarks.torch_baseline", "detect", "--model", model, "--data", data]

    rec: dict = {"bench": "cli_detect", "model": model, "data": data}
    rec["jdup"] = {"calls": _calls(jdup_cmd, 1 + args.reps, env, cache, work, "jdup-detect")}
    rec["torch"] = {"calls": _calls(ref_cmd, 1 + args.reps, child_env(None), None, work, "ref-detect")}
    _official(args, "detect", 1 + args.reps, work, rec)
    warm = None
    if args.inprocess_reps > 0:
        from benchmarks import bench_detect

        wargs = ["--impl", "jdup", "--model", model, "--data-dir", str(Path(data).parent)]
        wargs += ["--attack", Path(data).name, "--reps", str(args.inprocess_reps)]
        from jdup import runtime

        # the allocator the CLI calls start with (glibc's huge pages where they help), so that the warm figure and
        # the calls compare like for like
        w = C.run_worker(Path(bench_detect.__file__).resolve(), wargs, env=runtime.huge_pages_env())
        rec["jdup"]["inprocess"] = {
            k: w[k] for k in ("total", "warmup_s", "compile_s", "peak", "auroc", "peak_rss_mb", "host_malloc") if k in w
        }
        warm = w["total"]["median"]
    _summarise(rec, warm)
    return rec


def bench_unlearn(args, work: Path) -> dict:
    model, data = str(args.model), str(args.data)
    cache = work / "xla-unlearn"
    shutil.rmtree(cache, ignore_errors=True)
    env = child_env(cache, args.jax_cache_env)
    # the official pipeline: DUP's fusion for the built-in detection (same flagged rows, same steps as the reference)
    # and DUP's forget loss (the reference's), so both sides run the same recipe whatever jdup's defaults are
    # the official process evaluates the purified model only: jdup does the same work (evaluate_before=false); a
    # call with jdup's own defaults (evaluation before and after included) is timed after the repeat calls
    settings = ["early_stop=none", "progress=false", f"epochs={args.epochs}", "detect.method=dup", "forget_loss=kl",
                "evaluate_before=false"]

    def jdup_cmd(out, settings=settings):
        return jdup_command() + ["unlearn", "--model", model, "--data", data, "--out", str(out), *settings]

    def ref_cmd(out):
        return [sys.executable, "-m", "benchmarks.torch_baseline", "run", "--model", model, "--data", data,
                "--out", str(out), "--epochs", str(args.epochs)]  # fmt: skip

    rec: dict = {"bench": "cli_unlearn", "model": model, "data": data, "jdup_settings": settings}
    rec["jdup"] = {"calls": _calls(jdup_cmd, 1 + args.reps, env, cache, work, "jdup-unlearn")}
    if args.unlearn_defaults:
        rec["jdup_defaults"] = {"cmd_settings": ["progress=false"], "calls": _calls(
            lambda out: jdup_cmd(out, ["progress=false"]), 1, env, cache, work, "jdup-unlearn-defaults")}
    rec["torch"] = {"calls": _calls(ref_cmd, 1, child_env(None), None, work, "ref-unlearn")}
    _official(args, "unlearn", 1, work, rec)
    _summarise(rec, None)
    return rec


def _official(args, part: str, n: int, work: Path, rec: dict) -> None:
    """Fresh processes of the official DUP code in ``--official-dir`` (nothing when it is not given)."""
    if not args.official_dir:
        return
    folder = Path(args.official_dir).resolve()
    template = getattr(args, f"official_{part}_cmd") or OFFICIAL_CMDS[part]

    def cmd(out):
        q = {k: shlex.quote(str(v)) for k, v in dict(checkout=folder, python=sys.executable).items()}
        return template.format(model=args.model, data=args.data, out=out, **q)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True)
    rec["official"] = {"dir": str(folder), "commit": commit.stdout.strip() or None, "cmd": template,
                       "calls": _calls(cmd, n, child_env(None), None, work, f"official-{part}", cwd=folder,
                                       shell=True)}


def _summarise(rec: dict, warm_inprocess: float | None) -> None:
    """first / repeat walls, raw and peak-normalised ratios, targets."""
    j, t = rec["jdup"]["calls"], rec["torch"]["calls"]
    jf, tf = j[0]["wall_s"], t[0]["wall_s"]
    jr = min(c["wall_s"] for c in j[1:]) if len(j) > 1 else None
    tr = min(c["wall_s"] for c in t[1:]) if len(t) > 1 else tf
    ok = all(c["rc"] == 0 for c in j + t)
    rec["summary"] = {
        "all_calls_ok": ok,
        "jdup_first_s": jf,
        "jdup_repeat_s": jr,
        "torch_first_s": tf,
        "torch_repeat_s": tr,
        "jdup_cache_entries_after_first": j[0].get("cache_entries"),
    }
    rec["normalised"] = {
        "first": C.normalised_from_peaks(rec, jf, tf),
        "repeat": C.normalised_from_peaks(rec, jr, tr) if jr else None,
    }
    targets = {}
    # the target ratios: against the official process when it ran, else against the PyTorch reference
    o = rec.get("official", {}).get("calls")
    if o:
        of = o[0]["wall_s"]
        orr = min(c["wall_s"] for c in o[1:]) if len(o) > 1 else of
        ok = ok and all(c["rc"] == 0 for c in o)
        rec["summary"].update(all_calls_ok=ok, official_first_s=of, official_repeat_s=orr)
        rec["normalised"]["official_first"] = C.normalised_from_peaks(rec, jf, of)
        rec["normalised"]["official_repeat"] = C.normalised_from_peaks(rec, jr, orr) if jr else None
    base, base_first, base_repeat = ("official", of, orr) if o else ("reference", tf, tr)
    if rec["bench"] == "cli_detect":
        targets["detect_speedup_first"] = {"value": C.ratio(base_first, jf), "against": base,
                                           "target": TARGETS["detect_speedup_first"], "higher_is_better": True}
        if jr:
            targets["detect_speedup_repeat"] = {"value": C.ratio(base_repeat, jr), "against": base,
                                                "target": TARGETS["detect_speedup_repeat"], "higher_is_better": True}
    if warm_inprocess:
        rec["summary"]["jdup_warm_inprocess_s"] = warm_inprocess
        targets["detect_first_over_warm"] = {
            "value": jf / warm_inprocess,
            "target": TARGETS["detect_first_over_warm"],
        }
        if jr:
            targets["detect_repeat_over_warm"] = {
                "value": jr / warm_inprocess,
                "target": TARGETS["detect_repeat_over_warm"],
            }
    if rec["bench"] == "cli_unlearn":
        # first call (empty compilation cache) and repeat call, each against the one run of the base
        targets["unlearn_speedup"] = {
            "value": C.ratio(base_first, jr or jf),
            "against": base,
            "target": TARGETS["unlearn_speedup"],
            "higher_is_better": True,
        }
        targets["unlearn_speedup_first"] = {
            "value": C.ratio(base_first, jf),
            "against": base,
            "target": TARGETS["unlearn_speedup"],
            "higher_is_better": True,
        }
    for v in targets.values():
        if v["value"] is not None:
            v["met"] = v["value"] >= v["target"] if v.get("higher_is_better") else v["value"] <= v["target"]
    rec["targets"] = targets


def main(argv=None) -> list[dict]:
    C.setup_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: cached MiniLM BadNets victim)")
    ap.add_argument("--data", default=None, help="DUP folder (default: ../shared/data/sst-2/1/<attack>)")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--parts", default="detect,unlearn")
    ap.add_argument("--unlearn-defaults", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one `jdup unlearn` call with jdup's defaults (after the repeat calls)")
    ap.add_argument("--jax-cache-env", action="store_true", help="also set JAX_COMPILATION_CACHE_DIR etc.")
    ap.add_argument("--official-dir", default=None,
                    help="a checkout of the official DUP code (ManHu2025/DUP): adds fresh-process rows of the official "
                    "code (by default through benchmarks/official_dup.py)")
    ap.add_argument("--official-detect-cmd", default=None,
                    help=f"shell command run in --official-dir (default {OFFICIAL_CMDS['detect']!r}; "
                    "{model} {data} {out} {python} {checkout} are replaced)")
    ap.add_argument("--official-unlearn-cmd", default=None,
                    help=f"likewise for unlearning (default {OFFICIAL_CMDS['unlearn']!r})")
    ap.add_argument("--workdir", default=None, help="outputs + cache folders (default: a temporary folder)")
    ap.add_argument("--out", default=str(C.RESULTS / "bench_cli.jsonl"))
    args = ap.parse_args(argv)
    args.model = C.resolve_model(args.model)
    args.data = Path(args.data or (C.DATA / args.attack)).resolve()
    parts = [p for p in args.parts.split(",") if p]
    recs = []
    with tempfile.TemporaryDirectory(prefix="jdup-bench-cli-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for part in parts:
            fn = {"detect": bench_detect, "unlearn": bench_unlearn}[part]
            rec = {"machine": C.machine_info(), "versions": C.versions(), "commit": C.git_commit()}
            rec |= fn(args, work)
            rec["config"] = {k: getattr(args, k) for k in DEFAULTS} | {"jax_cache_env": args.jax_cache_env}
            C.emit(rec, args.out)
            recs.append(rec)
    return recs


if __name__ == "__main__":
    main()
