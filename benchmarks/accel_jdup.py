"""The jdup side of the accelerator set (run by ``run_accel_set.py`` in its own process; see that file).

Sections: ``peaks``, ``encoder_forward``, ``decoder_forward``, ``detect``, ``unlearn``, ``sweep``, ``mesh`` (the
multi-device rows; ``run_accel_set.py`` runs it in a process of its own). Each one is
written to the results file as soon as it is done (a crash or a time-out keeps the finished ones); a failing
section records its error and the next one runs. Public jdup APIs only: ``jdup.models`` (configs, registry,
``save_pretrained``), ``jdup.data``, ``jdup.detect.detect``, ``jdup.unlearn.unlearn``,
``jdup.sweep.vmapped.unlearn_group``.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import accel_common as A
from benchmarks import common as C

#: jax_default_matmul_precision pinned per dtype: fp32 rows compute true fp32 ("highest"; JAX's GPU default would
#: be TF32 while torch's default is fp32), bf16 rows take bf16 operands with fp32 accumulation ("default").
PRECISION = {"float32": "highest", "bfloat16": "default"}


def _models():
    from jdup import models as M  # importing jdup.models registers every family

    return M


def _build(arch_name: str, cfg, dtype, seed: int = 0):
    """A random-initialised jdup classifier of ``cfg`` (parameters and compute in ``dtype``)."""
    from flax import nnx

    M = _models()
    return M.registry.get(arch_name).build(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def _cast(arch_name: str, cfg, state, dtype):
    """``(graphdef, state)`` of the same model built for ``dtype`` with ``state``'s values cast to it."""
    import jax
    from flax import nnx

    M = _models()
    abstract = nnx.eval_shape(
        lambda: M.registry.get(arch_name).build(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    gdef, abs_state = nnx.split(abstract)
    return gdef, jax.tree.map(lambda a, s: a.astype(s.dtype), state, abs_state)


def _configs(sizes: A.Sizes):
    M = _models()
    enc = M.EncoderConfig.bert_base() if sizes.encoder == "bert-base" else M.EncoderConfig.tiny("bert")
    dec = M.DecoderConfig.preset(sizes.decoder) if sizes.decoder != "tiny" else M.DecoderConfig.tiny("llama")
    return enc, dec


def _time_forward(fwd, state, inputs, reps: int, iters: int) -> dict:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, *inputs))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fwd(state, *inputs)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return {"batch_s": C.summarize(times), "first_call_s": first}


def _forward_fn(graphdef):
    import jax
    from flax import nnx

    @jax.jit
    def fwd(state, ids, mask, tt):
        return nnx.merge(graphdef, state)(ids, mask, tt, deterministic=True).logits

    return fwd


def section_peaks(ctx: dict) -> dict:
    s: A.Sizes = ctx["sizes"]
    return {
        "bfloat16": C.matmul_peak("jax", "bfloat16", n=s.peak_n),
        "float32": C.matmul_peak("jax", "float32", n=s.peak_n),
        "float32_tf32": C.matmul_peak("jax", "float32", n=s.peak_n, tf32=True),
        "float32_2048": C.matmul_peak("jax", "float32", n=s.peak_n_cpu_ref),
    }


def _forward_rows(ctx, arch_name, cfg, batch: dict, flops: float, model=None) -> dict:
    """bf16 and fp32 forward timings of ``model`` (default: a new random one of ``cfg``, freed afterwards)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    s: A.Sizes = ctx["sizes"]
    out = {}
    inputs = tuple(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    t0 = time.perf_counter()
    model = _build(arch_name, cfg, jnp.float32) if model is None else model
    gdef32, state32 = nnx.split(model)
    jax.block_until_ready(state32)
    init_s = time.perf_counter() - t0
    del model
    for dtype in ("float32", "bfloat16"):
        if dtype == "float32":
            gdef, state = gdef32, state32
        else:
            gdef, state = _cast(arch_name, cfg, state32, jnp.bfloat16)
            del state32  # free the fp32 copy before timing bf16
        with jax.default_matmul_precision(PRECISION[dtype]):
            out[dtype] = _time_forward(_forward_fn(gdef), state, inputs, s.fwd_reps, s.fwd_iters)
        out[dtype]["jax_default_matmul_precision"] = PRECISION[dtype]
        del state
    return {
        "rows": out,
        "init_s": init_s,
        "batch": int(batch["input_ids"].shape[0]),
        "padded_len": int(batch["input_ids"].shape[1]),
        "tokens_real": int(batch["lengths"].sum()),
        "tokens_padded": int(batch["input_ids"].size),
        "flops_real": flops,
    }


def section_encoder_forward(ctx: dict) -> dict:
    s: A.Sizes = ctx["sizes"]
    model, _, _ = _encoder_model(ctx)  # the weights the torch side loads
    enc = model.config
    batch = A.token_batch(s.enc_batch, s.enc_len, enc.vocab_size, seed=11)
    flops = C.encoder_forward_flops(
        batch["lengths"].tolist(),
        enc.hidden_size,
        enc.num_hidden_layers,
        enc.intermediate_size,
        enc.num_labels,
    )
    return _forward_rows(ctx, enc.arch, enc, batch, flops, model) | {"config": s.encoder}


def section_decoder_forward(ctx: dict) -> dict:
    s: A.Sizes = ctx["sizes"]
    _, dec = _configs(s)
    bos = dec.bos_token_id if dec.bos_token_id is not None else A.CLS
    batch = A.token_batch(s.dec_batch, s.dec_len, dec.vocab_size, seed=12, pad_id=dec.pad_token_id or 0, bos=bos,
                          eos=None)  # fmt: skip
    hf = _models().registry.get(dec.arch).config_to_hf(dec)
    flops = A.decoder_forward_flops(batch["lengths"].tolist(), hf)
    dec_dir = ctx["work"] / "decoder"
    dec_dir.mkdir(parents=True, exist_ok=True)
    (dec_dir / "config.json").write_text(json.dumps(hf, indent=1))  # the torch side builds the same shapes
    return _forward_rows(ctx, dec.arch, dec, batch, flops) | {"config": s.decoder}


def _encoder_model(ctx: dict):
    """The random bert-base (or tiny) classifier, saved once as an HF folder (weights + synthetic tokenizer) that
    the torch side and the sweep load; returns ``(model, tokenizer, folder)``."""
    import jax.numpy as jnp

    if "encoder" in ctx:
        return ctx["encoder"]
    s: A.Sizes = ctx["sizes"]
    enc, _ = _configs(s)
    M = _models()
    model = _build(enc.arch, enc, jnp.float32, seed=1)
    tok = A.synthetic_tokenizer(enc.vocab_size, s.max_length)
    folder = ctx["work"] / "encoder"
    M.save_pretrained(model, folder, tok)
    ctx["encoder"] = (M.from_pretrained(folder), tok, folder)  # as a user would load it
    return ctx["encoder"]


def _unlearn_settings(stage: bool = False, **kw):
    return C.jdup_unlearn_settings(stage, **kw)


def _cell_run(cfg, forget, retain, teacher, target: int):
    """A :class:`jdup.sweep.vmapped.CellRun` (``(cfg, UnlearnSets)``; older: the sets' fields inline)."""
    import dataclasses

    from jdup import unlearn as U
    from jdup.sweep import vmapped

    if "sets" in {f.name for f in dataclasses.fields(vmapped.CellRun)}:
        sets = U.UnlearnSets(forget=forget, holdout=forget.subset([]), retain=retain, teacher=teacher,
                             target=target, monitor=None)  # fmt: skip
        return vmapped.CellRun(cfg, sets)
    return vmapped.CellRun(cfg, forget, retain, teacher, target, None)


def _dataset(rows):
    from jdup import data as D

    return D.TextDataset([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], "synthetic")


def section_detect(ctx: dict) -> dict:
    import jax

    from jdup import detect as J

    s: A.Sizes = ctx["sizes"]
    model, tok, _ = _encoder_model(ctx)
    vocab = model.config.vocab_size
    calib = A.synthetic_rows(s.calib_rows, 21, vocab, s.max_length)
    scored = A.synthetic_rows(s.scored_rows, 22, vocab, s.max_length, poison_frac=0.5)
    cfg = J.DetectSettings(method="dup", batch_size=s.jdup_detect_batch, progress=False)
    with jax.default_matmul_precision(PRECISION["float32"]):
        t0 = time.perf_counter()
        res = J.detect(model, tok, _dataset(calib), _dataset(scored), cfg)
        first = time.perf_counter() - t0
        times = []
        for _ in range(s.detect_reps):
            t0 = time.perf_counter()
            res = J.detect(model, tok, _dataset(calib), _dataset(scored), cfg)
            times.append(time.perf_counter() - t0)
    return {
        "total": C.summarize(times),
        "first_call_s": first,
        "rows_scored": len(scored),
        "rows_calib": len(calib),
        "auroc": float(res.metrics.get("auroc", float("nan"))),
        "batch_size": cfg.batch_size,
        "jax_default_matmul_precision": PRECISION["float32"],
        "tokens_real": sum(A.token_lengths(calib)) + sum(A.token_lengths(scored)),
    }


def section_unlearn(ctx: dict) -> dict:
    import jax
    import numpy as np

    from jdup import data as D
    from jdup import unlearn as U

    s: A.Sizes = ctx["sizes"]
    model, tok, _ = _encoder_model(ctx)
    vocab = model.config.vocab_size
    forget = D.encode(tok, _dataset(A.synthetic_rows(s.unlearn_rows, 31, vocab, s.max_length)), s.max_length,
                      config=model.config)  # fmt: skip
    retain = D.encode(tok, _dataset(A.synthetic_rows(s.unlearn_rows, 32, vocab, s.max_length)), s.max_length,
                      config=model.config)  # fmt: skip
    cfg = _unlearn_settings(epochs=s.unlearn_steps, batch_size=s.unlearn_rows, early_stop="none",
                            ckpt_every_steps=0, progress=False, max_length=s.max_length)  # fmt: skip
    marks: list[float] = []
    with jax.default_matmul_precision(PRECISION["float32"]):
        t0 = time.perf_counter()
        res = U.unlearn(model, forget, retain, cfg, on_step=lambda info: marks.append(time.perf_counter()))
    steps = np.diff(marks).tolist()
    return {
        "step_s": C.summarize(steps) if steps else None,
        "until_first_step_s": marks[0] - t0 if marks else None,
        "steps": int(res.steps),
        "rows_per_step": 2 * s.unlearn_rows,
        "tokens_real_per_step": int(forget.lengths.sum() + retain.lengths.sum()),
        "lengths": [int(x) for x in forget.lengths] + [int(x) for x in retain.lengths],
        "jax_default_matmul_precision": PRECISION["float32"],
    }


def section_sweep(ctx: dict) -> dict:
    """K cells that differ in ``seed`` trained together by the sweep's vmapped library step
    (:func:`jdup.sweep.vmapped.unlearn_group`, what ``jdup sweep`` runs per group); K = 1 is the library loop."""
    import jax

    from jdup import data as D
    from jdup import predict as P
    from jdup.sweep import vmapped

    s: A.Sizes = ctx["sizes"]
    model, tok, _ = _encoder_model(ctx)
    vocab = model.config.vocab_size
    forget = D.encode(tok, _dataset(A.synthetic_rows(s.sweep_batch, 41, vocab, s.max_length)), s.max_length,
                      config=model.config)  # fmt: skip
    retain = D.encode(tok, _dataset(A.synthetic_rows(s.sweep_rows, 42, vocab, s.max_length)), s.max_length,
                      config=model.config)  # fmt: skip
    teacher = P.predict(model, forget, 64)
    out: dict[str, Any] = {"steps_per_cell": s.sweep_steps, "batch_size": s.sweep_batch, "k": {}}
    with jax.default_matmul_precision(PRECISION["float32"]):
        for k in s.sweep_ks:
            runs = [
                _cell_run(
                    _unlearn_settings(
                        True,
                        epochs=s.sweep_steps,
                        batch_size=s.sweep_batch,
                        early_stop="none",
                        ckpt_every_steps=0,
                        progress=False,
                        max_length=s.max_length,
                        seed=i,
                    ),
                    forget,
                    retain,
                    teacher,
                    1,
                )  # fmt: skip
                for i in range(k)
            ]
            t0 = time.perf_counter()
            vmapped.unlearn_group(model, runs)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            res, info = vmapped.unlearn_group(model, runs)
            t = time.perf_counter() - t0
            out["k"][str(k)] = {"group_s": t, "per_cell_s": t / k, "first_group_s": first, "steps": res[0].steps,
                                "mesh_sweep": info.mesh_sweep, "padded_k": info.padded_k}  # fmt: skip
    out["devices"] = jax.device_count()
    return out


def _mesh_specs() -> list[str]:
    """``"1"`` and every device on ``data`` (``"auto"``), when there is more than one device."""
    import jax

    return ["1", "auto"] if jax.device_count() > 1 else ["1"]


def _decoder_mesh_spec() -> str | None:
    """``2x4`` on 8 devices; ``D x 2`` on another even count of at least 4; else None (not measured)."""
    import jax

    n = jax.device_count()
    return "2x4" if n == 8 else (f"{n // 2}x2" if n >= 4 and n % 2 == 0 else None)


def section_mesh(ctx: dict) -> dict:
    """The multi-device rows: DUP detection (rows/s) and the LoRA unlearning step at mesh ``1`` and over every
    device (``auto``: rows split over ``data``, the model replicated), and a Llama-3.2-3B-shaped bf16 forward on
    a ``2x4`` mesh (tensor-parallel over ``model``, rows over ``data``; initialised straight into its shards)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jdup import data as D
    from jdup import detect as J
    from jdup import mesh as jmesh
    from jdup import unlearn as U
    from jdup.models import sharding

    s: A.Sizes = ctx["sizes"]
    model, tok, _ = _encoder_model(ctx)
    vocab = model.config.vocab_size
    out: dict[str, Any] = {"devices": jax.device_count(), "processes": jax.process_count(), "detect": {},
                           "unlearn": {}}  # fmt: skip
    calib = _dataset(A.synthetic_rows(s.calib_rows, 21, vocab, s.max_length))
    scored = _dataset(A.synthetic_rows(s.scored_rows, 22, vocab, s.max_length, poison_frac=0.5))
    forget = D.encode(tok, _dataset(A.synthetic_rows(s.unlearn_rows, 31, vocab, s.max_length)), s.max_length,
                      config=model.config)  # fmt: skip
    retain = D.encode(tok, _dataset(A.synthetic_rows(s.unlearn_rows, 32, vocab, s.max_length)), s.max_length,
                      config=model.config)  # fmt: skip
    dcfg = J.DetectSettings(method="dup", batch_size=s.jdup_detect_batch, progress=False)
    ucfg = _unlearn_settings(epochs=s.unlearn_steps, batch_size=s.unlearn_rows, early_stop="none",
                             ckpt_every_steps=0, progress=False, max_length=s.max_length)  # fmt: skip
    with jax.default_matmul_precision(PRECISION["float32"]):
        for spec in _mesh_specs():
            mesh = jmesh.make_mesh(spec)
            m = jmesh.put_model(nnx.clone(model), mesh)
            rec: dict[str, Any] = {"mesh": jmesh.mesh_record(mesh)}
            try:
                t0 = time.perf_counter()
                res = J.detect(m, tok, calib, scored, dcfg, mesh=mesh)
                rec["first_call_s"] = time.perf_counter() - t0
                times = []
                for _ in range(s.detect_reps):
                    t0 = time.perf_counter()
                    res = J.detect(m, tok, calib, scored, dcfg, mesh=mesh)
                    times.append(time.perf_counter() - t0)
                rec.update(total=C.summarize(times), rows_scored=len(scored), rows_calib=len(calib),
                           rows_per_s=len(scored) / float(np.median(times)), batch_size=dcfg.batch_size,
                           auroc=float(res.metrics.get("auroc", float("nan"))))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - recorded, the next row still runs
                rec["error"] = f"{type(e).__name__}: {e}"
            out["detect"][spec] = rec
            urec: dict[str, Any] = {"mesh": jmesh.mesh_record(mesh)}
            try:
                marks: list[float] = []
                t0 = time.perf_counter()
                r = U.unlearn(m, forget, retain, ucfg, mesh=mesh,
                              on_step=lambda info, marks=marks: marks.append(time.perf_counter()))  # fmt: skip
                steps = np.diff(marks).tolist()
                urec.update(step_s=C.summarize(steps) if steps else None, steps=int(r.steps),
                            until_first_step_s=marks[0] - t0 if marks else None, rows_per_step=2 * s.unlearn_rows)  # fmt: skip
            except Exception as e:  # noqa: BLE001
                urec["error"] = f"{type(e).__name__}: {e}"
            out["unlearn"][spec] = urec
            del m
    spec = _decoder_mesh_spec()
    if spec is None:
        out["decoder_forward"] = {"skipped": f"needs an even number of devices >= 4, have {jax.device_count()}"}
        return out
    try:
        _, dec = _configs(s)
        mesh = jmesh.make_mesh(spec)
        arch = _models().registry.get(dec.arch)
        t0 = time.perf_counter()
        m = sharding.init_sharded(lambda: arch.build(dec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                     rngs=nnx.Rngs(0)), mesh, fsdp=False)  # fmt: skip
        gdef, state = nnx.split(m)
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t0
        bos = dec.bos_token_id if dec.bos_token_id is not None else A.CLS
        batch = A.token_batch(s.dec_batch, s.dec_len, dec.vocab_size, seed=12, pad_id=dec.pad_token_id or 0,
                              bos=bos, eos=None)  # fmt: skip
        b, _ = jmesh.pad_rows({k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                              jmesh.data_size(mesh))  # fmt: skip
        inputs = tuple(jmesh.put_rows(b, mesh)[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
        with jax.default_matmul_precision(PRECISION["bfloat16"]):
            t = _time_forward(_forward_fn(gdef), state, inputs, s.fwd_reps, s.fwd_iters)
        hf = _models().registry.get(dec.arch).config_to_hf(dec)
        q = m.model.layers[0].self_attn.q_proj.kernel[...]
        out["decoder_forward"] = t | {
            "config": s.decoder, "mesh": jmesh.mesh_record(mesh), "dtype": "bfloat16", "init_s": init_s,
            "batch": int(batch["input_ids"].shape[0]), "padded_len": int(batch["input_ids"].shape[1]),
            "tokens_real": int(batch["lengths"].sum()),
            "flops_real": A.decoder_forward_flops(batch["lengths"].tolist(), hf),
            "q_proj_shard_shape": list(q.addressable_shards[0].data.shape),
            "param_bytes_per_device": sharding.per_device_bytes(state, mesh, fsdp=False),
        }  # fmt: skip
    except Exception as e:  # noqa: BLE001
        out["decoder_forward"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    return out


SECTIONS = {
    "peaks": section_peaks,
    "encoder_forward": section_encoder_forward,
    "decoder_forward": section_decoder_forward,
    "detect": section_detect,
    "unlearn": section_unlearn,
    "sweep": section_sweep,
    "mesh": section_mesh,
}


def run(sections: list[str], sizes: A.Sizes, work: Path, results: Path, deadline: float) -> dict:
    """Run ``sections`` in order (skipping those that would start after ``deadline``), writing ``results``."""
    import jax

    C.JaxCompileClock.install()
    dev = jax.devices()[0]
    rec: dict[str, Any] = {
        "impl": "jdup",
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
        "jax_default_matmul_precision_default": str(jax.config.jax_default_matmul_precision),
        "sections": {},
    }
    ctx = {"sizes": sizes, "work": work}
    for name in sections:
        if time.time() > deadline:
            rec["sections"][name] = {"skipped": "time budget of the set used up"}
            continue
        c0 = C.JaxCompileClock.snapshot()
        t0 = time.perf_counter()
        try:
            got = SECTIONS[name](ctx)
        except Exception as e:  # keep going: one broken section must not hide the others
            got = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        got["section_wall_s"] = time.perf_counter() - t0
        c1 = C.JaxCompileClock.snapshot()
        got["compile_s"], got["compiles"] = c1[0] - c0[0], c1[1] - c0[1]
        rec["sections"][name] = got
        rec["peak_rss_mb"] = C.peak_rss_mb()
        results.write_text(json.dumps(rec, default=C._json_default))
        print(f"# jdup {name}: {got['section_wall_s']:.1f} s", flush=True)
    return rec
