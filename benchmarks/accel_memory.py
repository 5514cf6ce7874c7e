"""Memory per device of bert-base and a Llama-3.2-3B-shaped classifier on a device mesh, without any device memory.

Everything is abstract: the model comes from ``nnx.eval_shape`` (no weights are made), its state is given the
layout :func:`jdup.mesh.put_model` would give it, and XLA compiles the forward pass and a full fine-tuning step
(AdamW, float32 weights and moments) for that layout; ``compiled.memory_analysis()`` then says what one device
needs: its part of the arguments (weights, optimizer state, batch), of the outputs and XLA's temporary buffers.
Run it on simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/accel_memory.py --meshes 1,8,2x4 > mem.jsonl

One JSON line per (model, mesh, fsdp, program). CPU figures are what XLA's CPU compiler plans; a GPU/TPU compiler
fuses differently, so its temporaries differ somewhat, but the argument bytes (weights, optimizer state) are the
same on every backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


def _model_cfg(name: str):
    from jdup import models as M

    if name == "bert-base":
        return M.EncoderConfig.bert_base()
    if name == "llama-3.2-3b":
        return M.DecoderConfig.preset("llama-3.2-3b")
    if name == "tiny":
        return M.EncoderConfig.tiny("bert")
    raise SystemExit(f"unknown model {name!r}")


def measure(name: str, spec: str, fsdp: bool, programs: list[str], batch: int, length: int, remat: bool) -> list:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jdup import mesh as jmesh
    from jdup.models import registry, sharding

    cfg = _model_cfg(name)
    if remat and hasattr(cfg, "remat"):
        cfg = dataclasses.replace(cfg, remat=True)
    arch = registry.get(cfg.arch)
    mesh = jmesh.make_mesh(spec)
    abstract = nnx.eval_shape(lambda: arch.build(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    p_sh = sharding.state_shardings(params, mesh, fsdp=fsdp)
    r_sh = jax.tree.map(lambda _: jmesh.replicated(mesh), rest)
    params_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, p_sh)
    rest_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), rest, r_sh)
    rows = jmesh.row_sharding(mesh, 2)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=jmesh.row_sharding(mesh, 1))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    base = {
        "bench": "accel_memory", "model": name, "mesh": jmesh.mesh_record(mesh), "fsdp": fsdp, "batch": batch,
        "length": length, "remat": remat, "params": n_params, "param_bytes_total": n_params * 4,
        "param_bytes_per_device": sharding.per_device_bytes(params, mesh, fsdp=fsdp),
        "backend": jax.default_backend(),
    }  # fmt: skip

    def logits(p, r, ids):
        m = nnx.merge(graphdef, p, r)
        return m(ids, jnp.ones_like(ids), jnp.zeros_like(ids), deterministic=True).logits

    tx = optax.adamw(1e-5)

    def train_step(p, r, opt, ids, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(logits(p, r, ids), y).mean()

        val, g = jax.value_and_grad(loss)(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, val

    out = []
    for prog in programs:
        t0 = time.perf_counter()
        if prog == "forward":
            fn = jax.jit(logits, out_shardings=NamedSharding(mesh, PartitionSpec()))
            lowered = fn.lower(params_abs, rest_abs, ids)
        else:
            opt_abs = jax.eval_shape(tx.init, params_abs)
            # moments laid out like their parameters (what an eager tx.init on placed parameters gives)
            opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, p_sh,
                                           transform_non_params=lambda _: jmesh.replicated(mesh))  # fmt: skip
            opt_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs, opt_sh)
            fn = jax.jit(train_step, donate_argnums=(0, 2),
                         out_shardings=(p_sh, opt_sh, jmesh.replicated(mesh)))  # fmt: skip
            lowered = fn.lower(params_abs, rest_abs, opt_abs, ids, labels)
        compiled = lowered.compile()
        ma = compiled.memory_analysis()
        arg, outb, tmp, alias = (int(getattr(ma, k, 0) or 0) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"))
        peak = arg + outb - alias + tmp  # donated buffers are reused for the outputs
        out.append(base | {
            "program": prog, "argument_bytes": arg, "output_bytes": outb, "alias_bytes": alias, "temp_bytes": tmp,
            "peak_bytes_per_device": peak, "peak_gib_per_device": round(peak / GIB, 3),
            "compile_s": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert-base,llama-3.2-3b")
    ap.add_argument("--meshes", default="1,auto,2x4")
    ap.add_argument("--fsdp", default="false,true", help="comma-separated: false (replicated over data), true")
    ap.add_argument("--programs", default="forward,train")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--remat", action="store_true", help="rematerialise each decoder layer in the backward pass")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        for spec in args.meshes.split(","):
            for fsdp in (f.strip().lower() == "true" for f in args.fsdp.split(",")):
                if fsdp and spec == "1":
                    continue
                for row in measure(name, spec, fsdp, args.programs.split(","), args.batch, args.length,
                                   args.remat):  # fmt: skip
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
