"""The PyTorch-reference side of the accelerator set (run by ``run_accel_set.py`` in its own process).

Same rows, same shapes, same weights for the encoder (the folder the jdup side saved), the same decoder config
(random weights): ``transformers`` models (default attention implementation, ``sdpa``), the clean-room DUP
reference of ``benchmarks/torch_baseline`` for detection and the LoRA unlearning step (PEFT). Float32 is torch's
default true fp32 (``torch.backends.cuda.matmul.allow_tf32 = False``), recorded with every row.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import accel_common as A
from benchmarks import common as C


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _precision() -> dict:
    import torch

    return {
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def section_peaks(ctx: dict) -> dict:
    s: A.Sizes = ctx["sizes"]
    return {
        "bfloat16": C.matmul_peak("torch", "bfloat16", n=s.peak_n),
        "float32": C.matmul_peak("torch", "float32", n=s.peak_n),
        "float32_tf32": C.matmul_peak("torch", "float32", n=s.peak_n, tf32=True),
        "float32_2048": C.matmul_peak("torch", "float32", n=s.peak_n_cpu_ref),
    }


def _time_forward(model, inputs: dict, reps: int, iters: int) -> dict:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model(**inputs)
        _sync()
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                model(**inputs)
            _sync()
            times.append((time.perf_counter() - t0) / iters)
    return {"batch_s": C.summarize(times), "first_call_s": first}


def _forward_rows(ctx: dict, model, batch: dict, keys: tuple[str, ...], flops: float) -> dict:
    import torch

    s: A.Sizes = ctx["sizes"]
    dev = _device()
    inputs = {k: torch.from_numpy(batch[k]).long().to(dev) for k in keys}
    out = {}
    for dtype in ("float32", "bfloat16"):
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        out[dtype] = _time_forward(model, inputs, s.fwd_reps, s.fwd_iters) | _precision()
    return {
        "rows": out,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batch": int(batch["input_ids"].shape[0]),
        "padded_len": int(batch["input_ids"].shape[1]),
        "tokens_real": int(batch["lengths"].sum()),
        "tokens_padded": int(batch["input_ids"].size),
        "flops_real": flops,
    }


def section_encoder_forward(ctx: dict) -> dict:
    from transformers import AutoModelForSequenceClassification

    s: A.Sizes = ctx["sizes"]
    folder = ctx["work"] / "encoder"
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(_device()).eval()
    batch = A.token_batch(s.enc_batch, s.enc_len, model.config.vocab_size, seed=11)
    e = A.encoder_cfg_dict(model.config.to_dict())
    flops = C.encoder_forward_flops(batch["lengths"].tolist(), e["hidden"], e["layers"], e["intermediate"],
                                    e["num_labels"])  # fmt: skip
    return _forward_rows(ctx, model, batch, ("input_ids", "attention_mask", "token_type_ids"), flops)


def section_decoder_forward(ctx: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    s: A.Sizes = ctx["sizes"]
    cfg = AutoConfig.from_pretrained(ctx["work"] / "decoder")
    t0 = time.perf_counter()
    with torch.device(_device()):
        model = AutoModelForSequenceClassification.from_config(cfg).eval()
    _sync()
    init_s = time.perf_counter() - t0
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else A.CLS
    batch = A.token_batch(s.dec_batch, s.dec_len, cfg.vocab_size, seed=12, pad_id=cfg.pad_token_id or 0, bos=bos,
                          eos=None)  # fmt: skip
    flops = A.decoder_forward_flops(batch["lengths"].tolist(), cfg.to_dict())
    out = _forward_rows(ctx, model, batch, ("input_ids", "attention_mask"), flops)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out | {"init_s": init_s}


def _encoder(ctx: dict):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = ctx["work"] / "encoder"
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(_device()).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _rows(rows):
    from benchmarks.torch_baseline.data import Row

    return [Row(t, label, p) for t, label, p in rows]


def section_detect(ctx: dict) -> dict:
    from benchmarks.torch_baseline.detect import BaselineDetectConfig, detect

    s: A.Sizes = ctx["sizes"]
    model, tok = _encoder(ctx)
    vocab = model.config.vocab_size
    calib = _rows(A.synthetic_rows(s.calib_rows, 21, vocab, s.max_length))
    scored = _rows(A.synthetic_rows(s.scored_rows, 22, vocab, s.max_length, poison_frac=0.5))
    cfg = BaselineDetectConfig(batch_size=s.torch_detect_batch, device=_device())
    t0 = time.perf_counter()
    detect(model, tok, calib[:64], scored[:64], cfg)  # warm-up (allocator, kernels)
    first = time.perf_counter() - t0
    times, res = [], None
    for _ in range(s.detect_reps):
        t0 = time.perf_counter()
        res = detect(model, tok, calib, scored, cfg)
        _sync()
        times.append(time.perf_counter() - t0)
    return {
        "total": C.summarize(times),
        "warmup_64_rows_s": first,
        "rows_scored": len(scored),
        "rows_calib": len(calib),
        "auroc": float(res["auroc"]),
        "batch_size": cfg.batch_size,
        "stages": {k: v for k, v in res["timings"].items() if isinstance(v, float)},
    } | _precision()


def section_unlearn(ctx: dict) -> dict:
    from benchmarks.torch_baseline.unlearn import BaselineUnlearnConfig, unlearn

    s: A.Sizes = ctx["sizes"]
    model, tok = _encoder(ctx)
    vocab = model.config.vocab_size
    forget = _rows(A.synthetic_rows(s.unlearn_rows, 31, vocab, s.max_length))
    retain = _rows(A.synthetic_rows(s.unlearn_rows, 32, vocab, s.max_length))
    cfg = BaselineUnlearnConfig(epochs=s.unlearn_steps, batch_size=s.unlearn_rows, device=_device())
    out = unlearn(model, tok, forget, retain, cfg)
    steps = out["timings"]["step"][1:]  # the first step warms up kernels and the allocator
    return {
        "step_s": C.summarize(steps) if steps else None,
        "first_step_s": out["timings"]["step"][0],
        "steps": out["steps"],
        "rows_per_step": 2 * s.unlearn_rows,
        "trainable_params": out["trainable_params"],
    } | _precision()


SECTIONS = {
    "peaks": section_peaks,
    "encoder_forward": section_encoder_forward,
    "decoder_forward": section_decoder_forward,
    "detect": section_detect,
    "unlearn": section_unlearn,
}


def run(sections: list[str], sizes: A.Sizes, work: Path, results: Path, deadline: float) -> dict:
    """Run the torch ``sections`` (those the reference has) in order, writing ``results`` after each."""
    import torch

    dev = _device()
    rec: dict[str, Any] = {
        "impl": "torch",
        "device": {
            "platform": dev,
            "kind": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
            "count": torch.cuda.device_count() if dev == "cuda" else 1,
        },
        "threads": torch.get_num_threads(),
        "sections": {},
    }
    ctx = {"sizes": sizes, "work": work}
    host_only = dev == "cpu" and sizes is not A.DRY  # e.g. a TPU host: torch has no accelerator there
    for name in sections:
        if name not in SECTIONS:
            continue
        if host_only and name != "peaks":
            rec["sections"][name] = {
                "skipped": "torch has no CUDA device on this host (TPU?): no reference rows"
            }
            continue
        if time.time() > deadline:
            rec["sections"][name] = {"skipped": "time budget of the set used up"}
            continue
        t0 = time.perf_counter()
        try:
            got = SECTIONS[name](ctx)
        except Exception as e:
            got = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        got["section_wall_s"] = time.perf_counter() - t0
        rec["sections"][name] = got
        rec["peak_rss_mb"] = C.peak_rss_mb()
        if dev == "cuda":
            rec["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        results.write_text(json.dumps(rec, default=C._json_default))
        print(f"# torch {name}: {got['section_wall_s']:.1f} s", flush=True)
    return rec
