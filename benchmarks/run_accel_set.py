"""The accelerator set: jdup vs the PyTorch reference on one GPU (H100/H200) or one TPU host, in one command.

No network and no data files: random-initialised presets (encoder at bert-base size, decoder at Llama-3.2-3B size)
and synthetic token batches whose lengths follow SST-2's histogram (``accel_common.SST2_LENGTH_HIST``). Two
worker processes run one after the other on the same device, jdup first (``accel_jdup.py``; it also saves the
random bert-base as an HF folder that the torch side loads, so both run the same weights), then the reference
(``accel_torch.py``: transformers + the clean-room DUP reference + PEFT). Rows:

* ``accel_peaks``: square matmul peaks of both frameworks on the device: bf16, fp32 (true fp32), fp32 with TF32
  allowed, and the CPU set's 2048² fp32 figure;
* ``accel_encoder_forward`` / ``accel_decoder_forward`` (bf16 and fp32): ms per batch, real tokens/s, MFU against
  the chip's measured bf16 peak (the larger of the two frameworks' bf16 measurements) and against each
  framework's own peak for that dtype. Precision pinned: JAX ``jax_default_matmul_precision`` = ``highest`` for
  fp32 rows (JAX's GPU default would be TF32; torch's default is true fp32, ``allow_tf32=False``) and
  ``default`` for bf16 rows;
* ``accel_detect``: DUP detection (calibration + scoring) at bert-base size on 2,733 scored rows and 872
  calibration rows, rows/s (jdup batch 32 bucketed; reference batch 4 as the official detection demo);
* ``accel_unlearn_step``: one LoRA unlearning step, 32 flagged + 32 clean rows, bert-base (median over the steps
  after the first);
* ``accel_sweep``: jdup's vmapped sweep step, K = 1, 8, 32 cells per group, time per cell (no reference);
* ``accel_mesh_detect`` / ``accel_mesh_unlearn_step``: detection rows/s and the unlearning step time on a mesh of
  one device (``1``) and of every device (``auto``: rows split over ``data``), with the speed-up; and
  ``accel_mesh_decoder_forward``: a Llama-3.2-3B-shaped bf16 forward on a ``2x4`` mesh (tensor-parallel over
  ``model``, initialised straight into its shards; ``Dx2`` on other even device counts). jdup only, in a third
  worker process that sees every device (a dry run simulates 4 CPU devices).

Each row is one JSON line (machine, device, versions, both sides' peaks, raw ratio and the ratio with the peaks
divided out); a Markdown table is written beside the JSON lines. The whole set is sized for ≤ 10 minutes
including compilation (``--budget-s``: sections that would start after it are skipped and say so).
``--dry-run`` runs everything on the CPU with tiny shapes (tests/test_bench_accel.py).

    python benchmarks/run_accel_set.py                       # on the GPU/TPU host -> benchmarks/results/accel.*
    python benchmarks/run_accel_set.py --dry-run --out /tmp/accel.jsonl
    python benchmarks/run_accel_set.py --only peaks,encoder_forward --impl jdup
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import accel_common as A  # noqa: E402
from benchmarks import common as C  # noqa: E402

SECTIONS = ("peaks", "encoder_forward", "decoder_forward", "detect", "unlearn", "sweep", "mesh")
TORCH_RESERVE_S = 150  # of the budget kept for the reference worker (its sections are short)
MESH_RESERVE_S = 150  # of the budget kept for the multi-device worker (jdup only)
DRY_DEVICES = 4  # simulated CPU devices of the multi-device worker in a dry run


# ---------------------------------------------------------------------------------------------------------------
# workers


def worker_main(args) -> None:
    sizes = A.DRY if args.dry_run else A.FULL
    work, results = Path(args.work), Path(args.results)
    sections = [s for s in args.only.split(",") if s]
    if args.worker == "jdup":
        from benchmarks import accel_jdup as W
    else:
        from benchmarks import accel_torch as W
    W.run(sections, sizes, work, results, args.deadline)


def _worker_env(dry: bool, devices: int | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))
    }
    env.update(C.ENV)
    env["JDUP_COMPILATION_CACHE"] = "0"  # compilation is part of what the set measures
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if dry:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if dry and devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def _run_worker(impl: str, args, work: Path, deadline: float, hard_timeout: float, *, only: str | None = None,
                tag: str | None = None, devices: int | None = None) -> dict:
    results = work / f"{tag or impl}.json"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--only", only or args.only]
    cmd += ["--work", str(work), "--results", str(results), "--deadline", str(deadline)]
    cmd += ["--dry-run"] if args.dry_run else []
    t0 = time.perf_counter()
    status: dict[str, Any] = {}
    try:
        proc = subprocess.run(cmd, env=_worker_env(args.dry_run, devices), cwd=C.REPO,
                              timeout=max(30.0, hard_timeout),
                              capture_output=True, text=True)  # fmt: skip
        status["rc"] = proc.returncode
        if proc.returncode != 0:
            status["stderr_tail"] = proc.stderr[-3000:]
        sys.stderr.write(proc.stdout)
    except subprocess.TimeoutExpired:
        status["rc"] = None
        status["error"] = f"killed after {hard_timeout:.0f} s"
    rec = json.loads(results.read_text()) if results.exists() else {"impl": impl, "sections": {}}
    rec["process"] = status | {"wall_s": time.perf_counter() - t0}
    return rec


# ---------------------------------------------------------------------------------------------------------------
# rows


def _gf(peak: dict | None) -> float | None:
    return C.gflops(peak) if isinstance(peak, dict) else None


def _peaks_block(j: dict, t: dict) -> dict:
    pj = (j.get("sections") or {}).get("peaks") or {}
    pt = (t.get("sections") or {}).get("peaks") or {}
    block: dict[str, Any] = {"dtype": "float32", "n": None}
    for key in ("bfloat16", "float32", "float32_tf32", "float32_2048"):
        block[f"jax_{key}_gflops"] = _gf(pj.get(key))
        block[f"torch_{key}_gflops"] = _gf(pt.get(key))
    # the CPU records' fields: fp32 2048² on both sides
    block["jax_gflops"], block["torch_gflops"] = (
        block["jax_float32_2048_gflops"],
        block["torch_float32_2048_gflops"],
    )
    block["n"] = (pj.get("float32_2048") or pt.get("float32_2048") or {}).get("n")
    block["jax_over_torch"] = C.ratio(block["jax_gflops"], block["torch_gflops"])
    bf = [x for x in (block["jax_bfloat16_gflops"], block["torch_bfloat16_gflops"]) if x]
    block["chip_bf16_gflops"] = max(bf) if bf else None  # the chip's measured bf16 peak (best of both)
    return block


def _side(part: dict | None, key: str = "batch_s") -> float | None:
    if not isinstance(part, dict) or part.get("error") or part.get("skipped"):
        return None
    v = part.get(key)
    return v.get("median") if isinstance(v, dict) else v


def _fps(gflops: float | None) -> float | None:
    return None if gflops is None else gflops * 1e9


def _mfu(flops: float | None, t: float | None, peak_gflops: float | None) -> float | None:
    return C.ratio(C.ratio(flops, t), peak_gflops * 1e9 if peak_gflops else None)


def build_rows(j: dict, t: dict, peaks: dict, sizes: A.Sizes, wanted: set[str] | None = None) -> list[dict]:
    """One record per row of the set (only for the sections in ``wanted``; default all)."""
    wanted = set(SECTIONS) if wanted is None else wanted
    rows = [r for r in _all_rows(j, t, peaks, sizes) if r["bench"].removeprefix("accel_") in wanted
            or (r["bench"] == "accel_unlearn_step" and "unlearn" in wanted)
            or (r["bench"].startswith("accel_mesh_") and "mesh" in wanted)]  # fmt: skip
    return rows


def _all_rows(j: dict, t: dict, peaks: dict, sizes: A.Sizes) -> list[dict]:
    js, ts = j.get("sections") or {}, t.get("sections") or {}
    chip = peaks["chip_bf16_gflops"]
    rows: list[dict] = [{"bench": "accel_peaks"}]
    for name in ("encoder_forward", "decoder_forward"):
        jsec, tsec = js.get(name) or {}, ts.get(name) or {}

        def stat(key, jsec=jsec, tsec=tsec):  # the batch is the same on both sides: either one says it
            return jsec.get(key) if jsec.get(key) is not None else tsec.get(key)

        flops = stat("flops_real")
        for dtype in ("bfloat16", "float32"):
            jr, tr = (jsec.get("rows") or {}).get(dtype), (tsec.get("rows") or {}).get(dtype)
            tj, tt = _side(jr), _side(tr)
            own = "bfloat16" if dtype == "bfloat16" else "float32"
            pj, pt = peaks[f"jax_{own}_gflops"], peaks[f"torch_{own}_gflops"]
            tokens = stat("tokens_real")
            rows.append({
                "bench": f"accel_{name}", "dtype": dtype,
                "model": jsec.get("config") or name.split("_")[0], "batch": stat("batch"),
                "padded_len": stat("padded_len"), "tokens_real": tokens, "tokens_padded": stat("tokens_padded"),
                "flops_real": flops,
                "jdup": {"batch_s": tj, "first_call_s": (jr or {}).get("first_call_s"),
                         "tokens_per_s": C.ratio(tokens, tj), "mfu_chip_bf16": _mfu(flops, tj, chip),
                         "mfu_own_peak": _mfu(flops, tj, pj),
                         "jax_default_matmul_precision": (jr or {}).get("jax_default_matmul_precision"),
                         "error": (jsec.get("error") or jsec.get("skipped"))},
                "torch": {"batch_s": tt, "first_call_s": (tr or {}).get("first_call_s"),
                          "tokens_per_s": C.ratio(tokens, tt), "mfu_chip_bf16": _mfu(flops, tt, chip),
                          "mfu_own_peak": _mfu(flops, tt, pt), "allow_tf32": (tr or {}).get("allow_tf32"),
                          "attn_implementation": tsec.get("attn_implementation"),
                          "error": (tsec.get("error") or tsec.get("skipped"))},
                "normalised": C.normalised(tj, tt, _fps(pj), _fps(pt), flops),
            })  # fmt: skip
    jd, td = js.get("detect") or {}, ts.get("detect") or {}
    tj, tt = _side(jd, "total"), _side(td, "total")
    lengths = jd.get("tokens_real")
    d_flops = _detect_flops(sizes, j)
    rows.append({
        "bench": "accel_detect", "dtype": "float32", "rows_scored": jd.get("rows_scored"),
        "rows_calib": jd.get("rows_calib"), "tokens_real": lengths, "flops_real": d_flops,
        "jdup": {"total_s": tj, "first_call_s": jd.get("first_call_s"), "rows_per_s": C.ratio(jd.get("rows_scored"), tj),
                 "batch_size": jd.get("batch_size"), "auroc": jd.get("auroc"),
                 "mfu_chip_bf16": _mfu(d_flops, tj, chip), "error": jd.get("error") or jd.get("skipped")},
        "torch": {"total_s": tt, "rows_per_s": C.ratio(td.get("rows_scored"), tt), "batch_size": td.get("batch_size"),
                  "auroc": td.get("auroc"), "mfu_chip_bf16": _mfu(d_flops, tt, chip),
                  "error": td.get("error") or td.get("skipped")},
        "normalised": C.normalised(tj, tt, _fps(peaks["jax_float32_gflops"]), _fps(peaks["torch_float32_gflops"]),
                                   d_flops),
    })  # fmt: skip
    ju, tu = js.get("unlearn") or {}, ts.get("unlearn") or {}
    tj, tt = _side(ju, "step_s"), _side(tu, "step_s")
    u_flops = _unlearn_flops(sizes, j, ju)
    rows.append({
        "bench": "accel_unlearn_step", "dtype": "float32", "rows_per_step": ju.get("rows_per_step"),
        "tokens_real_per_step": ju.get("tokens_real_per_step"), "flops_real": u_flops,
        "jdup": {"step_s": tj, "until_first_step_s": ju.get("until_first_step_s"), "steps": ju.get("steps"),
                 "mfu_chip_bf16": _mfu(u_flops, tj, chip), "error": ju.get("error") or ju.get("skipped")},
        "torch": {"step_s": tt, "first_step_s": tu.get("first_step_s"), "steps": tu.get("steps"),
                  "mfu_chip_bf16": _mfu(u_flops, tt, chip), "error": tu.get("error") or tu.get("skipped")},
        "normalised": C.normalised(tj, tt, _fps(peaks["jax_float32_gflops"]), _fps(peaks["torch_float32_gflops"]),
                                   u_flops),
    })  # fmt: skip
    rows += _mesh_rows(js.get("mesh") or {})
    sw = js.get("sweep") or {}
    base = ((sw.get("k") or {}).get("1") or {}).get("per_cell_s")
    for k, v in (sw.get("k") or {}).items():
        rows.append({"bench": "accel_sweep", "k": int(k), "per_cell_s": v["per_cell_s"], "group_s": v["group_s"],
                     "first_group_s": v["first_group_s"], "steps_per_cell": sw.get("steps_per_cell"),
                     "batch_size": sw.get("batch_size"), "speedup_per_cell_vs_k1": C.ratio(base, v["per_cell_s"])})  # fmt: skip
    if not sw.get("k"):
        rows.append({"bench": "accel_sweep", "error": sw.get("error") or sw.get("skipped") or "not run"})
    return rows


def _mesh_rows(m: dict) -> list[dict]:
    """The multi-device rows: detection and the unlearning step per mesh (with the speed-up over mesh ``1``), the
    decoder forward on ``2x4``."""
    if not m or m.get("error") or m.get("skipped"):
        why = m.get("error") or m.get("skipped") or "not run"
        return [{"bench": b, "error": why} for b in ("accel_mesh_detect", "accel_mesh_unlearn_step",
                                                        "accel_mesh_decoder_forward")]  # fmt: skip
    rows = []
    base_d = (m.get("detect") or {}).get("1", {}).get("rows_per_s")
    for spec, r in (m.get("detect") or {}).items():
        rows.append({"bench": "accel_mesh_detect", "spec": spec, "mesh": r.get("mesh"), "devices": m.get("devices"),
                     "rows_scored": r.get("rows_scored"), "rows_calib": r.get("rows_calib"),
                     "total_s": _side(r, "total"), "rows_per_s": r.get("rows_per_s"),
                     "first_call_s": r.get("first_call_s"), "auroc": r.get("auroc"),
                     "speedup_vs_mesh_1": C.ratio(r.get("rows_per_s"), base_d), "error": r.get("error")})  # fmt: skip
    base_u = _side((m.get("unlearn") or {}).get("1"), "step_s")
    for spec, r in (m.get("unlearn") or {}).items():
        t = _side(r, "step_s")
        rows.append({"bench": "accel_mesh_unlearn_step", "spec": spec, "mesh": r.get("mesh"),
                     "devices": m.get("devices"), "rows_per_step": r.get("rows_per_step"), "step_s": t,
                     "steps": r.get("steps"), "until_first_step_s": r.get("until_first_step_s"),
                     "speedup_vs_mesh_1": C.ratio(base_u, t), "error": r.get("error")})  # fmt: skip
    d = m.get("decoder_forward") or {}
    t = _side(d)
    rows.append({"bench": "accel_mesh_decoder_forward", "model": d.get("config"), "mesh": d.get("mesh"),
                 "dtype": d.get("dtype"), "batch": d.get("batch"), "padded_len": d.get("padded_len"),
                 "batch_s": t, "first_call_s": d.get("first_call_s"), "init_s": d.get("init_s"),
                 "tokens_per_s": C.ratio(d.get("tokens_real"), t), "flops_real": d.get("flops_real"),
                 "param_bytes_per_device": d.get("param_bytes_per_device"),
                 "q_proj_shard_shape": d.get("q_proj_shard_shape"),
                 "error": d.get("error") or d.get("skipped")})  # fmt: skip
    return rows


def _encoder_flops_of(lengths: list[int], j: dict) -> float | None:
    """Forward FLOPs of the saved encoder (``<work>/encoder/config.json``) over ``lengths``."""
    try:
        cfg = json.loads((Path(j["_work"]) / "encoder" / "config.json").read_text())
    except (KeyError, OSError, ValueError):
        return None
    e = A.encoder_cfg_dict(cfg)
    return C.encoder_forward_flops(lengths, e["hidden"], e["layers"], e["intermediate"], e["num_labels"])


def _detect_flops(sizes: A.Sizes, j: dict) -> float | None:
    """One forward over every calibration row (C and V) and every scored row, real token lengths."""
    try:
        vocab = json.loads((Path(j["_work"]) / "encoder" / "config.json").read_text())["vocab_size"]
    except (KeyError, OSError, ValueError):
        return None
    rows = A.synthetic_rows(sizes.calib_rows, 21, vocab, sizes.max_length)
    rows += A.synthetic_rows(sizes.scored_rows, 22, vocab, sizes.max_length, poison_frac=0.5)
    return _encoder_flops_of(A.token_lengths(rows), j)


def _unlearn_flops(sizes: A.Sizes, j: dict, ju: dict) -> float | None:
    """2 × the forward FLOPs of the step's flagged + clean rows (frozen base: forward + input-gradient backward)."""
    if not ju.get("lengths"):
        return None
    f = _encoder_flops_of(ju["lengths"], j)
    return None if f is None else C.lora_train_flops(f)


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _ms(x):
    return "—" if x is None else f"{1000 * x:.2f}"


def _x(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f} %"


def _meshx(m: dict | None) -> str:
    return "—" if not m else f"{m.get('data')}x{m.get('model')}"


def markdown(rows: list[dict], header: dict) -> str:
    dev = header.get("device") or {}
    p = header["peaks"]
    lines = [
        f"Device: {dev.get('kind')} ({dev.get('platform')}, {dev.get('count')}×); host {header['machine']['cpu']}, "
        f"{header['machine']['cores']} cores; jax {header['versions'].get('jax')}, torch "
        f"{header['versions'].get('torch')}, transformers {header['versions'].get('transformers')}, peft "
        f"{header['versions'].get('peft')}; commit {header.get('commit')}; set wall time {header['set_wall_s']:.0f} s"
        f"{' (DRY RUN: tiny shapes on CPU)' if header.get('dry_run') else ''}.",
        "",
        f"Measured matmul peaks (GFLOP/s, {p.get('n_peak')}² square): bf16 jax {_x(p['jax_bfloat16_gflops'], 0)} / torch "
        f"{_x(p['torch_bfloat16_gflops'], 0)}; fp32 jax {_x(p['jax_float32_gflops'], 0)} / torch "
        f"{_x(p['torch_float32_gflops'], 0)}; fp32 with TF32 jax {_x(p['jax_float32_tf32_gflops'], 0)} / torch "
        f"{_x(p['torch_float32_tf32_gflops'], 0)}. MFU below is against the chip's bf16 peak "
        f"({_x(p['chip_bf16_gflops'], 0)} GFLOP/s); fp32 rows run true fp32 on both sides "
        "(`jax_default_matmul_precision=highest`, torch `allow_tf32=False`).",
        "",
        "| row | jdup | PyTorch reference | jdup advantage (÷ peaks) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        b, n = r["bench"], r.get("normalised") or {}
        adv = f"{_x(n.get('speedup_raw'))}× ({_x(n.get('mfu_ratio'))}×)" if n.get("speedup_raw") else "—"
        if b in ("accel_encoder_forward", "accel_decoder_forward"):
            j, t = r["jdup"], r["torch"]
            name = f"{'encoder' if 'encoder' in b else 'decoder'} forward {r.get('model')} {r['dtype']}, " \
                   f"{r.get('batch')}×{r.get('padded_len')}: ms/batch, tokens/s, MFU"  # fmt: skip
            lines.append(
                f"| {name} | {_ms(j['batch_s'])}, {_x(j['tokens_per_s'], 0)}, {_pct(j['mfu_chip_bf16'])} | "
                f"{_ms(t['batch_s'])}, {_x(t['tokens_per_s'], 0)}, {_pct(t['mfu_chip_bf16'])} | {adv} |"
            )
        elif b == "accel_detect":
            j, t = r["jdup"], r["torch"]
            lines.append(
                f"| DUP detection, {r.get('rows_scored')} scored + {r.get('rows_calib')} calibration rows: s, rows/s "
                f"(first call incl. compile: {_x(j.get('first_call_s'), 1)} s) | {_x(j['total_s'])}, "
                f"{_x(j['rows_per_s'], 0)} | {_x(t['total_s'])}, {_x(t['rows_per_s'], 0)} | {adv} |"
            )
        elif b == "accel_unlearn_step":
            j, t = r["jdup"], r["torch"]
            lines.append(
                f"| LoRA unlearning step, {r.get('rows_per_step')} rows: ms, MFU | {_ms(j['step_s'])}, "
                f"{_pct(j['mfu_chip_bf16'])} | {_ms(t['step_s'])}, {_pct(t['mfu_chip_bf16'])} | {adv} |"
            )
        elif b == "accel_mesh_detect" and not r.get("error"):
            lines.append(
                f"| DUP detection on mesh {r['spec']} ({_meshx(r.get('mesh'))}): s, rows/s | {_x(r['total_s'])}, "
                f"{_x(r['rows_per_s'], 0)} ({_x(r['speedup_vs_mesh_1'])}× vs mesh 1) | — | |"
            )
        elif b == "accel_mesh_unlearn_step" and not r.get("error"):
            lines.append(
                f"| LoRA unlearning step on mesh {r['spec']} ({_meshx(r.get('mesh'))}), {r.get('rows_per_step')} "
                f"rows: ms | {_ms(r['step_s'])} ({_x(r['speedup_vs_mesh_1'])}× vs mesh 1) | — | |"
            )
        elif b == "accel_mesh_decoder_forward" and not r.get("error"):
            lines.append(
                f"| decoder forward {r.get('model')} bf16 on mesh {_meshx(r.get('mesh'))}, {r.get('batch')}×"
                f"{r.get('padded_len')}: ms/batch, tokens/s | {_ms(r['batch_s'])}, {_x(r['tokens_per_s'], 0)} | — | |"
            )
        elif b == "accel_sweep" and "k" in r:
            lines.append(
                f"| vmapped sweep, K = {r['k']} cells ({r.get('steps_per_cell')} steps each): s per cell | "
                f"{_x(r['per_cell_s'], 3)} ({_x(r['speedup_per_cell_vs_k1'])}× vs K = 1) | — | |"
            )
    errors = [
        f"{r['bench']} {side}: {r[side]['error']}"
        for r in rows
        for side in ("jdup", "torch")
        if isinstance(r.get(side), dict) and r[side].get("error")
    ]
    errors += [f"{r['bench']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["", "Not measured: " + "; ".join(str(e)[:200] for e in errors)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> list[dict]:
    C.setup_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["jdup", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU (the test suite runs this)"
    )
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS)
    )
    ap.add_argument("--impl", default="both", choices=["both", "jdup", "torch"])
    ap.add_argument("--budget-s", type=float, default=600.0, help="sections starting later are skipped")
    ap.add_argument("--out", default=None, help="JSON lines (default: benchmarks/results/accel.jsonl; dry run: "
                    "a temporary folder)")  # fmt: skip
    ap.add_argument("--workdir", default=None, help="models and worker files (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args)
        return []
    unknown = set(args.only.split(",")) - set(SECTIONS) - {""}
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    if args.impl == "torch" and not args.workdir:
        ap.error("--impl torch needs --workdir of an earlier run (the encoder folder the jdup worker saved)")
    t_start, start_wall = time.perf_counter(), time.time()
    sizes = A.DRY if args.dry_run else A.FULL
    with tempfile.TemporaryDirectory(prefix="jdup-accel-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        out = (
            Path(args.out)
            if args.out
            else (work / "accel.jsonl" if args.dry_run else C.RESULTS / "accel.jsonl")
        )
        j: dict = {"sections": {}}
        t: dict = {"sections": {}}
        budget_end = start_wall + args.budget_s
        wanted = [x for x in args.only.split(",") if x]
        single = ",".join(x for x in wanted if x != "mesh")
        if args.impl in ("both", "jdup") and single:
            j_deadline = budget_end - (TORCH_RESERVE_S if args.impl == "both" else 0) - (
                MESH_RESERVE_S if "mesh" in wanted else 0)  # fmt: skip
            j = _run_worker("jdup", args, work, j_deadline, j_deadline - time.time() + 240, only=single)
        if args.impl in ("both", "jdup") and "mesh" in wanted:  # own process: every device, fresh memory
            m_deadline = budget_end - (TORCH_RESERVE_S if args.impl == "both" else 0)
            jm = _run_worker("jdup", args, work, m_deadline, m_deadline - time.time() + 240, only="mesh",
                             tag="jdup_mesh", devices=DRY_DEVICES)  # fmt: skip
            j.setdefault("sections", {})["mesh"] = (jm.get("sections") or {}).get("mesh") or {
                "error": (jm.get("process") or {}).get("error") or "the multi-device worker wrote nothing"}
            j.setdefault("device", jm.get("device"))
            j.setdefault("process", jm.get("process"))
            j["process_mesh"] = jm.get("process")
        j["_work"] = str(work)
        if args.impl in ("both", "torch") and single:
            t = _run_worker("torch", args, work, budget_end - 10, budget_end - time.time() + 180, only=single)
        peaks = _peaks_block(j, t)
        peaks["n_peak"] = (((j.get("sections") or {}).get("peaks") or {}).get("bfloat16") or {}).get("n")
        header = {
            "machine": C.machine_info(),
            "device": j.get("device") or t.get("device"),
            "torch_device": t.get("device"),
            "versions": C.versions(),
            "commit": C.git_commit(),
            "dry_run": args.dry_run,
            "sizes": dataclasses.asdict(sizes),
            "peaks": peaks,
            "processes": {"jdup": j.get("process"), "jdup_mesh": j.get("process_mesh"), "torch": t.get("process")},
            "compile_s_by_section": {k: v.get("compile_s") for k, v in (j.get("sections") or {}).items()},
            "set_wall_s": time.perf_counter() - t_start,
        }
        rows = build_rows(j, t, peaks, sizes, set(args.only.split(",")))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
        for r in rows:
            r.update({k: v for k, v in header.items() if k not in r})
            if r["bench"] == "accel_peaks":
                r["raw"] = {
                    "jdup": (j.get("sections") or {}).get("peaks"),
                    "torch": (t.get("sections") or {}).get("peaks"),
                }
            C.emit(r, out)
        md = markdown(rows, header)
        out.with_suffix(".md").write_text(md)
        print(md, file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
