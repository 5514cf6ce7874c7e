"""Encoder forward: jdup's jitted NNX model vs the transformers torch model, same weights, same token ids.

Inputs are fixed shapes ``[batch, seq]`` filled with real SST-2 tokens (texts concatenated and cut to ``seq``, so
every position is a real token and the FLOP count is unambiguous). Each implementation runs in its own
subprocess: its own matmul peak (fp32 on CPU), a warm-up (jdup: compile, reported as ``compile_s``), then
``--reps`` repetitions of ``--iters`` forward calls each (``block_until_ready`` on jdup's logits). Reported per
shape: seconds per batch (min / median), sequences/s, model FLOP/s and MFU against the implementation's own
peak, and peak RSS. The jdup/torch ratio of the per-batch time is the figure of merit.

    python benchmarks/bench_forward.py                      # shapes 32x64 and 32x128
    python benchmarks/bench_forward.py --shapes 8x128,64x64 --hidden-states
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

DEFAULTS = dict(
    shapes="32x64,32x128",  # comma-separated batch x seq shapes
    reps=5,  # timed repetitions (min / median over them)
    iters=5,  # forward calls per repetition
    attack="badnets",  # texts from ../shared/data/sst-2/1/<attack>/test-detect.csv
)


def _inputs(folder: Path, data: Path, batch: int, seq: int):
    """``input_ids``, ``attention_mask`` (all ones) and ``token_type_ids`` (zeros) as int32 NumPy arrays."""
    import numpy as np
    from transformers import AutoTokenizer

    from benchmarks.torch_baseline.data import read_dup_csv

    tok = AutoTokenizer.from_pretrained(folder)
    texts = [r.text for r in read_dup_csv(data)]
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if len(stream) >= batch * (seq - 2):
            break
    cls, sep = tok.cls_token_id, tok.sep_token_id
    rows = [[cls] + stream[i * (seq - 2) : (i + 1) * (seq - 2)] + [sep] for i in range(batch)]
    ids = np.asarray(rows, np.int32)
    return ids, np.ones_like(ids), np.zeros_like(ids)


def _flops(folder: Path, batch: int, seq: int) -> float:
    cfg = json.loads((folder / "config.json").read_text())
    return C.encoder_forward_flops(
        [seq] * batch,
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg.get("num_labels", 2),
    )


def _shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.lower().split("x")) for s in spec.split(",") if s]


def worker_torch(args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    peak = C.matmul_peak("torch", "float32")
    data = Path(args.data_dir) / args.attack / "test-detect.csv"
    out = {}
    for b, s in _shapes(args.shapes):
        ids, mask, tt = (torch.from_numpy(x).long() for x in _inputs(folder, data, b, s))

        def fwd(ids=ids, mask=mask, tt=tt):
            with torch.inference_mode():
                return model(
                    input_ids=ids,
                    attention_mask=mask,
                    token_type_ids=tt,
                    output_hidden_states=args.hidden_states,
                ).logits

        fwd()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fwd()
            times.append((time.perf_counter() - t0) / args.iters)
        out[f"{b}x{s}"] = _figures(times, _flops(folder, b, s), b, peak, 0.0)
    return {
        "impl": "torch",
        "threads": torch.get_num_threads(),
        "attn": getattr(model.config, "_attn_implementation", None),
        "peak": peak,
        "shapes": out,
        "peak_rss_mb": C.peak_rss_mb(),
    }


def worker_jdup(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jdup import models

    C.JaxCompileClock.install()
    folder = Path(args.model)
    model = models.from_pretrained(folder)
    graphdef, state = nnx.split(model)
    hidden = bool(args.hidden_states)

    @jax.jit
    def forward(state, ids, mask, tt):
        m = nnx.merge(graphdef, state)
        out = m(ids, mask, tt, output_hidden_states=hidden, deterministic=True)
        return (out.logits, out.hidden_states) if hidden else out.logits

    peak = C.matmul_peak("jax", "float32")
    data = Path(args.data_dir) / args.attack / "test-detect.csv"
    out = {}
    for b, s in _shapes(args.shapes):
        ids, mask, tt = (jnp.asarray(x) for x in _inputs(folder, data, b, s))
        c0, _ = C.JaxCompileClock.snapshot()
        t0 = time.perf_counter()
        jax.block_until_ready(forward(state, ids, mask, tt))
        first = time.perf_counter() - t0
        compile_s = C.JaxCompileClock.snapshot()[0] - c0
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                r = forward(state, ids, mask, tt)
            jax.block_until_ready(r)
            times.append((time.perf_counter() - t0) / args.iters)
        out[f"{b}x{s}"] = _figures(times, _flops(folder, b, s), b, peak, compile_s) | {"first_call_s": first}
    return {
        "impl": "jdup",
        "jax_devices": [str(d) for d in jax.devices()],
        "peak": peak,
        "shapes": out,
        "peak_rss_mb": C.peak_rss_mb(),
    }


def _figures(times, flops, batch, peak, compile_s) -> dict:
    t = C.summarize(times)
    return {
        "batch_s": t,
        "compile_s": compile_s,
        "seqs_per_s": batch / t["median"],
        "flops_per_batch": flops,
        "achieved_flops_per_s": flops / t["min"],
        "mfu": flops / t["min"] / peak["flops_per_s"],
    }


def main(argv=None) -> dict:
    C.setup_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="both", choices=["both", "jdup", "torch"])
    ap.add_argument("--model", default=None, help="HF folder loaded by both (default: cached MiniLM victim)")
    ap.add_argument("--data-dir", default=str(C.DATA))
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--hidden-states", type=int, default=0, help="1: also return every layer's hidden states")
    ap.add_argument("--threads", type=int, default=C.num_cores(), help="torch intra-op threads")
    ap.add_argument("--out", default=str(C.RESULTS / "bench_forward.jsonl"))
    args = ap.parse_args(argv)
    if args.worker:
        rec = worker_torch(args) if args.impl == "torch" else worker_jdup(args)
        C.worker_print(rec)
        return rec
    args.model = C.resolve_model(args.model)
    record = {
        "bench": "forward",
        "machine": C.machine_info(),
        "versions": C.versions(),
        "commit": C.git_commit(),
        "model": str(args.model),
        "config": {k: getattr(args, k) for k in DEFAULTS}
        | {"threads": args.threads, "hidden_states": args.hidden_states},
    }
    me = Path(__file__).resolve()
    wargs = ["--model", str(args.model), "--data-dir", args.data_dir, "--threads", str(args.threads)]
    wargs += ["--hidden-states", str(args.hidden_states)]
    for k in DEFAULTS:
        wargs += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    for impl in ("torch", "jdup") if args.impl == "both" else (args.impl,):
        record[impl] = C.run_worker(me, wargs + ["--impl", impl])
    if "torch" in record and "jdup" in record:
        record["ratio"] = {
            shape: {
                "jdup_over_torch_time_median": C.ratio(
                    record["jdup"]["shapes"][shape]["batch_s"]["median"],
                    record["torch"]["shapes"][shape]["batch_s"]["median"],
                ),
                "jdup_over_torch_time_min": C.ratio(
                    record["jdup"]["shapes"][shape]["batch_s"]["min"],
                    record["torch"]["shapes"][shape]["batch_s"]["min"],
                ),
                "mfu_jdup": record["jdup"]["shapes"][shape]["mfu"],
                "mfu_torch": record["torch"]["shapes"][shape]["mfu"],
            }
            for shape in record["torch"]["shapes"]
        }
        pj, pt = record["jdup"]["peak"]["flops_per_s"], record["torch"]["peak"]["flops_per_s"]
        record["normalised"] = {
            shape: C.normalised(
                record["jdup"]["shapes"][shape]["batch_s"]["median"],
                record["torch"]["shapes"][shape]["batch_s"]["median"],
                pj,
                pt,
                record["jdup"]["shapes"][shape]["flops_per_batch"],
            )
            for shape in record["torch"]["shapes"]
        }
    C.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
