"""Shared pieces of the benchmark scripts: machine info, matmul peaks, FLOP counts, timing, peak RSS, JSON output.

Every measured configuration runs in its own subprocess (``run_worker``) so that its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to it alone; the parent collects the workers' JSON and
prints one JSON line per benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data" / "sst-2" / "1"  # ../shared/data/sst-2/1/<attack>/*.csv

ENV = {  # set before transformers / jax are imported
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    # torch's OpenMP threads spin-wait by default; on a shared, oversubscribed box that makes every parallel
    # region wait for a descheduled sibling (measured 10-17x slower on 2 busy cores). Passive waiting gives the
    # reference its best case; it does not change anything on an idle machine.
    "OMP_WAIT_POLICY": "PASSIVE",
    # OpenBLAS (NumPy / SciPy / sklearn) threads busy-wait too: under load the reference's six 384-d
    # ShrunkCovariance + pinvh fits took 25 s with 2 BLAS threads and < 1 s with one. The matrices are small, so
    # one BLAS thread is the reference's best case (jdup's faithful-mode float64 fit gets the same setting).
    "OPENBLAS_NUM_THREADS": "1",
}


def setup_env() -> None:
    """Offline, quiet Hugging Face; repo root on ``sys.path`` (so ``benchmarks.*`` imports work from scripts); the
    C allocator tuned as the CLI tunes it when ``JDUP_HOST_MALLOC=1`` (``jdup.runtime.tune_host_malloc``, before any
    framework allocates: both sides of an in-process comparison get it)."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from jdup import runtime  # imports no JAX

    runtime.tune_host_malloc(only_if_asked=True)


def num_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# machine, versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter for the timings."""
    out = {"python": platform.python_version()}
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "torch",
        "transformers",
        "peft",
        "scikit-learn",
        "numpy",
        "scipy",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["jdup"] = metadata.version("jdup")
    except metadata.PackageNotFoundError:
        pass
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # pragma: no cover
        return "unknown"


def machine_info() -> dict[str, Any]:
    """Host description recorded with every result (CPU model, cores, memory, load, OS)."""
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # pragma: no cover
        mem_gb = None
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": num_cores(),
        "mem_gb": mem_gb,
        "os": f"{platform.system()} {platform.release()}",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------------------------
# matmul peaks (the MFU denominators)


def _best_rate(fn: Callable[[], Any], flops: float, reps: int, inner: int) -> float:
    fn()  # warm-up (and compile for jax)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return flops / best


def matmul_peak(
    backend: str, dtype: str = "float32", n: int = 2048, reps: int = 5, inner: int = 3, tf32: bool = False
) -> dict:
    """Best observed square-matmul throughput of ``backend`` on this machine (FLOP/s).

    Args:
      backend: ``"numpy"``, ``"torch"`` or ``"jax"`` (default device of each: the GPU when there is one).
      dtype: ``"float32"`` or ``"bfloat16"``.
      n: matrix size (``n × n @ n × n``, ``2n³`` FLOP).
      reps: timed repetitions (the best is kept).
      inner: matmuls per repetition.
      tf32: float32 inputs with TensorFloat-32 allowed (jax ``Precision.DEFAULT``, torch ``allow_tf32``); the
        default measures true float32 (jax ``Precision.HIGHEST``, torch's default ``allow_tf32=False``).

    Returns:
      ``{"backend", "dtype", "n", "flops_per_s", "device", "tf32"}``.
    """
    flops = 2.0 * n**3
    if backend == "numpy":
        import numpy as np

        a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
        b = a.T.copy()
        rate, dev = _best_rate(lambda: a @ b, flops, reps, inner), "cpu"
    elif backend == "torch":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        a = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
        b = a.T.contiguous()

        def f():
            c = a @ b
            if dev == "cuda":
                torch.cuda.synchronize()
            return c

        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        try:
            rate = _best_rate(f, flops, reps, inner)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), getattr(jnp, dtype))
        b = a.T.copy()
        prec = jax.lax.Precision.DEFAULT if tf32 else jax.lax.Precision.HIGHEST
        mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=prec))
        rate = _best_rate(lambda: mm(a, b).block_until_ready(), flops, reps, inner)
        dev = str(jax.devices()[0].platform)
    else:
        raise ValueError(backend)
    return {
        "backend": backend,
        "dtype": dtype,
        "n": n,
        "flops_per_s": rate,
        "device": dev,
        "tf32": bool(tf32),
    }


def gflops(peak: dict | None) -> float | None:
    """GFLOP/s of a :func:`matmul_peak` result (None stays None)."""
    return None if not peak or peak.get("flops_per_s") is None else peak["flops_per_s"] / 1e9


def measure_peak_subprocess(backend: str, dtype: str = "float32", timeout: float = 600) -> dict:
    """:func:`matmul_peak` in a fresh process (for the side whose worker did not run in this benchmark).

    Returns the peak dict, or ``{"backend", "dtype", "flops_per_s": None, "error"}`` if that framework is missing.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak", backend, dtype]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **ENV), cwd=REPO
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1]) | {"measured": "separate process"}
        err = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    except (OSError, subprocess.TimeoutExpired) as e:
        err = [repr(e)]
    return {"backend": backend, "dtype": dtype, "flops_per_s": None, "error": err[0]}


def _find_peak(record: dict, backend: str) -> dict | None:
    """The first ``peak`` dict of ``backend`` in the record's per-implementation parts (``jdup`` / ``torch``)."""
    for side in ("jdup", "torch"):
        part = record.get(side)
        if isinstance(part, dict):
            p = part.get("peak")
            if isinstance(p, dict) and p.get("backend") == backend and p.get("flops_per_s"):
                return p
    return None


def add_peaks(record: dict) -> dict:
    """Put BOTH frameworks' fp32 2048² matmul peaks of this run under ``record["peaks"]``.

    A side whose worker ran in this benchmark contributes its own measurement (taken in that worker, just before
    its timings); the other side is measured now in a fresh process. ``peaks`` = ``{"jax_gflops",
    "torch_gflops", "jax_over_torch", "jax", "torch"}``.
    """
    if "peaks" in record:
        return record
    found = {b: _find_peak(record, b) or measure_peak_subprocess(b) for b in ("jax", "torch")}
    j, t = gflops(found["jax"]), gflops(found["torch"])
    record["peaks"] = {
        "jax_gflops": j,
        "torch_gflops": t,
        "jax_over_torch": ratio(j, t),
        "dtype": "float32",
        "n": 2048,
        "jax": found["jax"],
        "torch": found["torch"],
    }
    return record


def normalised(
    t_jdup: float | None,
    t_ref: float | None,
    peak_jdup: float | None,
    peak_ref: float | None,
    flops: float | None = None,
) -> dict[str, Any]:
    """Raw and machine-normalised comparison of one measured figure (lower time = better).

    Args:
      t_jdup, t_ref: seconds for the same work (same statistic on both sides, e.g. medians).
      peak_jdup, peak_ref: each framework's measured matmul peak on this machine (FLOP/s or GFLOP/s, same unit).
      flops: model FLOPs of the work (optional): adds each side's MFU.

    Returns:
      ``speedup_raw`` = t_ref / t_jdup; ``mfu_ratio`` = (achieved FLOP/s fraction of jdup) / (that of the
      reference) = speedup_raw × peak_ref / peak_jdup: the speed-up with the two frameworks' matmul peaks on this
      machine divided out (> 1: jdup gets more out of its framework's peak); ``peak_ratio`` = peak_jdup / peak_ref;
      ``mfu_jdup`` / ``mfu_reference`` when ``flops`` is given.
    """
    sp = ratio(t_ref, t_jdup)
    out: dict[str, Any] = {
        "speedup_raw": sp,
        "peak_ratio": ratio(peak_jdup, peak_ref),
        "mfu_ratio": None if sp is None or peak_ref is None else ratio(sp * peak_ref, peak_jdup),
    }
    if flops:
        out["mfu_jdup"] = ratio(ratio(flops, t_jdup), peak_jdup)
        out["mfu_reference"] = ratio(ratio(flops, t_ref), peak_ref)
    return out


def normalised_from_peaks(
    record: dict, t_jdup: float | None, t_ref: float | None, flops: float | None = None
):
    """:func:`normalised` with the fp32 peaks of :func:`add_peaks` (FLOP/s)."""
    p = add_peaks(record)["peaks"]
    pj = p["jax_gflops"] * 1e9 if p["jax_gflops"] else None
    pt = p["torch_gflops"] * 1e9 if p["torch_gflops"] else None
    return normalised(t_jdup, t_ref, pj, pt, flops)


# ---------------------------------------------------------------------------------------------------------------
# jdup API helpers


def jdup_unlearn_settings(stage: bool = False, **kw):
    """jdup's in-memory unlearning settings (:class:`jdup.settings.UnlearnSettings`) with the given fields it has
    (others are ignored). ``stage=True``: the ``jdup unlearn`` stage config (:class:`jdup.settings.UnlearnConfig`:
    the settings plus files, detection and ``max_length``)."""
    import dataclasses

    from jdup.settings import UnlearnConfig, UnlearnSettings

    cls = UnlearnConfig if stage else UnlearnSettings
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kw.items() if k in names})


# ---------------------------------------------------------------------------------------------------------------
# FLOP counting


def encoder_forward_flops(
    lengths: Sequence[int], hidden: int, layers: int, intermediate: int, num_labels: int = 2
) -> float:
    """Model FLOPs of a BERT-style encoder forward over sequences of the given real (unpadded) lengths.

    Per layer and token: ``2·(4·d² + 2·d·ff)`` for the projections and the MLP; per layer and sequence:
    ``4·T²·d`` for ``QKᵀ`` and ``AV``. Embedding lookups, norms and softmax are ignored; the pooler and head add
    ``2·(d² + d·K)`` per sequence. Padding is not counted, so both implementations get the same numerator.
    """
    d, ff = hidden, intermediate
    per_tok = 2.0 * (4 * d * d + 2 * d * ff)
    total = 0.0
    for t in lengths:
        total += layers * (t * per_tok + 4.0 * t * t * d) + 2.0 * (d * d + d * num_labels)
    return total


def lora_train_flops(forward_flops: float) -> float:
    """Model FLOPs of a LoRA training step given its forward FLOPs: forward + input-gradient backward (≈ 2×).

    Frozen base weights get no weight gradient, so the backward costs about one forward (the gradient w.r.t.
    activations); LoRA and head weight gradients are tiny and ignored.
    """
    return 2.0 * forward_flops


# ---------------------------------------------------------------------------------------------------------------
# timing, memory


def summarize(times: Sequence[float]) -> dict[str, float]:
    """``min``, ``median``, ``max`` and ``n`` of repeated timings (seconds)."""
    ts = list(times)
    return {"min": min(ts), "median": statistics.median(ts), "max": max(ts), "n": len(ts), "all": ts}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class JaxCompileClock:
    """Sums JAX tracing, lowering and backend-compile durations (``jax.monitoring`` events) while active."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )
    _installed = False
    seconds = 0.0
    count = 0

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        from jax import monitoring

        def listener(event: str, duration: float, **_: Any) -> None:
            if event in cls.EVENTS:
                cls.seconds += duration
                if event == cls.EVENTS[-1]:
                    cls.count += 1

        monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True

    @classmethod
    def snapshot(cls) -> tuple[float, int]:
        return cls.seconds, cls.count


# ---------------------------------------------------------------------------------------------------------------
# workers and output


def run_worker(script: str | Path, args: Sequence[str], timeout: float = 3600,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script --worker args...`` in a fresh process (environment ``env``, default this one's);
    return the JSON of its last ``{...}`` line."""
    cmd = [sys.executable, str(script), "--worker", *args]
    env = dict(os.environ if env is None else env, **ENV)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "")[-3000:]
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    out = json.loads(lines[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def emit(record: dict[str, Any], out: str | Path | None) -> None:
    """Print one JSON line and append it to ``out`` (a ``.jsonl`` file) if given.

    Every line carries the machine, the versions and BOTH frameworks' matmul peaks of this run
    (:func:`add_peaks` fills in whatever the record lacks).
    """
    from jdup import runtime

    record.setdefault("machine", machine_info())
    record.setdefault("versions", versions())
    record.setdefault("host_malloc", runtime.host_malloc_info()["state"])  # None: this process did not tune it
    add_peaks(record)
    line = json.dumps(record, default=_json_default)
    print(line, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")


def _json_default(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def worker_print(record: dict[str, Any]) -> None:
    """The worker's single JSON line on stdout (the parent reads the last ``{...}`` line)."""
    print(json.dumps(record, default=_json_default), flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` or None."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def resolve_model(model: str | None) -> Path:
    """The HF folder to benchmark: ``--model`` if given, else the cached MiniLM BadNets victim (built once)."""
    if model:
        return Path(model).resolve()
    from benchmarks.torch_baseline.victim import make_victim

    return make_victim()


if __name__ == "__main__":  # python benchmarks/common.py --peak jax|torch|numpy [dtype]: one JSON line
    if len(sys.argv) >= 3 and sys.argv[1] == "--peak":
        setup_env()
        print(json.dumps(matmul_peak(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "float32")))
