"""Where a call's time goes: jdup.runtime's compile clock and process age, and the phases the stages record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from jdup import runtime
    runtime.setup(cache_dir=sys.argv[1], min_compile_time_s=0.0)
    time.sleep(0.3)
    age = runtime.process_seconds()
    before = runtime.compile_totals()
    import jax, jax.numpy as jnp
    jax.jit(lambda x: jnp.tanh(x @ x.T + 1.0).sum(axis=0))(jnp.ones((16, 16))).block_until_ready()
    print(json.dumps({"age": age, "delta": runtime.compile_since(before)}))
    """
)


def _child(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JDUP_COMPILATION_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cache)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compile_clock_tells_a_compilation_from_a_cache_load(tmp_path):
    first, second = _child(tmp_path / "xla"), _child(tmp_path / "xla")
    assert first["age"] >= 0.3  # the sleep before it counts: the age is the process's, not the module's
    a, b = first["delta"], second["delta"]
    assert a["cache_misses"] >= 1 and a["cache_hits"] == 0 and a["cache_load_s"] == 0.0
    assert b["cache_hits"] >= 1 and b["cache_misses"] == 0 and b["cache_load_s"] > 0.0
    for d in (a, b):
        assert d["programs"] >= 1 and d["trace_s"] > 0.0 and d["compile_s"] > 0.0


def test_detect_stage_records_its_phases(tiny_model_dir, synthetic_dup, tmp_path):
    from jdup.stages import detect as detect_stage

    cfg = detect_stage.DetectConfig(model=str(tiny_model_dir), data=str(synthetic_dup), out=str(tmp_path / "det"),
                                    score_set="test-detect", batch_size=16, max_length=32, buckets=(16, 32),
                                    progress=False, plots=False)
    rec = detect_stage.run_detect(cfg).record
    on_disk = json.loads((tmp_path / "det" / "detection.json").read_text())
    for r in (rec, on_disk):
        assert r["seconds_startup"] is None or r["seconds_startup"] >= 0.0
        assert 0.0 <= r["seconds_write"] <= r["seconds"]
        c = r["seconds_compile"]
        assert set(c) >= {"trace_s", "lower_s", "compile_s", "cache_load_s", "programs", "cache_hits"}
        assert min(c.values()) >= 0.0
        assert c["trace_s"] + c["lower_s"] + c["compile_s"] <= r["timings"]["total"] + 1e-6
