"""Attention variants inside jdup's encoder forward (jdup only): which formulation XLA:CPU runs fastest.

Each variant replaces ``SelfAttention.__call__`` of :mod:`jdup.models.encoder` for the whole jitted forward of the
benchmark model (default: the offline all-MiniLM-L6-v2) at fixed shapes, all positions real tokens. Reported per
variant and shape: ms per batch (min / median of ``--reps`` × ``--iters`` calls) and the max |logit| difference
from the first variant (``current``: jdup's attention as it is; ``einsum``: the
``[B, T, H, d]`` formulation jdup used before). ``--xla-flags "A;B"`` runs the whole set again in a fresh
process per ``XLA_FLAGS`` setting. Diagnostic variants (``noattn``: no attention at all; ``tanh``: tanh GELU with the current
attention) are not exact; they only show where the time goes.

    python benchmarks/bench_attention.py --shapes 32x64,32x128
    python benchmarks/bench_attention.py --variants einsum,bhtd,dpa --xla-flags=--xla_cpu_use_thunk_runtime=false
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

VARIANTS = ("current", "einsum", "bhtd", "scale_q", "dpa", "qchunk64", "noattn", "tanh")


def _attention(variant: str):
    """A ``SelfAttention.__call__`` replacement for ``variant`` (same signature); ``current`` = jdup's own."""
    import jax
    import jax.numpy as jnp

    from jdup.models import encoder

    if variant in ("current", "tanh"):
        return encoder.SelfAttention.__call__

    def call(self, h, bias, *, deterministic, rngs, queries=None):
        b, s, _ = h.shape
        hq = h if queries is None else queries
        nq = hq.shape[1]
        nh, hd = self.cfg.num_attention_heads, self.cfg.head_dim
        q = self.query(hq).reshape(b, nq, nh, hd)
        k = self.key(h).reshape(b, s, nh, hd)
        v = self.value(h).reshape(b, s, nh, hd)
        if variant == "einsum":  # jdup's attention up to commit a9d6277: [B, T, H, d] operands
            sc = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
            p = jax.nn.softmax(sc + bias, axis=-1).astype(v.dtype)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", p, v)
        elif variant == "bhtd":
            qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
            sc = jnp.einsum("bhqd,bhkd->bhqk", qt * (1.0 / math.sqrt(hd)), kt)
            p = jax.nn.softmax(sc + bias, axis=-1)
            ctx = jnp.einsum("bhqk,bhkd->bhqd", p, vt).transpose(0, 2, 1, 3)
        elif variant == "scale_q":
            sc = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(hd)), k)
            p = jax.nn.softmax(sc + bias, axis=-1)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", p, v)
        elif variant == "dpa":
            ctx = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
        elif variant.startswith("qchunk"):
            c = int(variant[len("qchunk") :])
            if nq % c:
                c = nq
            qc = q.reshape(b, nq // c, c, nh, hd) * (1.0 / math.sqrt(hd))
            sc = jnp.einsum("bnqhd,bkhd->bnhqk", qc, k)
            p = jax.nn.softmax(sc + bias[:, None], axis=-1)
            ctx = jnp.einsum("bnhqk,bkhd->bnqhd", p, v).reshape(b, nq, nh, hd)
        elif variant == "noattn":
            ctx = v[:, :nq] + q
        else:
            raise ValueError(variant)
        return self.dense(ctx.reshape(b, nq, nh * hd))

    return call


def _inputs(tok, texts, batch: int, seq: int):
    import numpy as np

    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if len(stream) >= batch * (seq - 2):
            break
    cls, sep = tok.cls_token_id, tok.sep_token_id
    rows = [[cls] + stream[i * (seq - 2) : (i + 1) * (seq - 2)] + [sep] for i in range(batch)]
    ids = np.asarray(rows, np.int32)
    return ids, np.ones_like(ids), np.zeros_like(ids)


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.torch_baseline.data import read_dup_csv
    from jdup import models
    from jdup.models import encoder

    model = models.from_pretrained(args.model)
    tok = models.load_tokenizer(args.model)
    texts = [r.text for r in read_dup_csv(Path(args.data_dir) / "badnets" / "test-detect.csv")]
    graphdef, state = nnx.split(model)
    orig_call = encoder.SelfAttention.__call__
    orig_act = dict(encoder._ACTIVATIONS)
    out: dict = {}
    for b, s in (tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")):
        ids, mask, tt = (jnp.asarray(x) for x in _inputs(tok, texts, b, s))
        ref = None
        for variant in args.variants.split(","):
            encoder.SelfAttention.__call__ = _attention(variant)
            if variant == "tanh":
                encoder._ACTIVATIONS["gelu"] = encoder._ACTIVATIONS["gelu_new"]
            m = models.from_pretrained(args.model) if variant == "tanh" else None
            gd, st = nnx.split(m) if m is not None else (graphdef, state)

            @jax.jit
            def fwd(st, ids, mask, tt, gd=gd):
                return nnx.merge(gd, st)(ids, mask, tt, last_layer_positions=args.last_layer).logits

            t0 = time.perf_counter()
            logits = jax.block_until_ready(fwd(st, ids, mask, tt))
            first = time.perf_counter() - t0
            encoder.SelfAttention.__call__ = orig_call
            encoder._ACTIVATIONS.update(orig_act)
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    r = fwd(st, ids, mask, tt)
                jax.block_until_ready(r)
                times.append((time.perf_counter() - t0) / args.iters)
            if ref is None:
                ref = np.asarray(logits)
            out.setdefault(f"{b}x{s}", {})[variant] = {
                "ms": {
                    k: v * 1e3 if isinstance(v, float) else v
                    for k, v in C.summarize(times).items()
                    if k != "all"
                },
                "first_call_s": first,
                "max_abs_logit_diff": float(np.abs(np.asarray(logits) - ref).max()),
            }
            print(f"# {b}x{s} {variant}: {out[f'{b}x{s}'][variant]['ms']['median']:.1f} ms", file=sys.stderr)
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "shapes": out}


def main(argv=None) -> dict:
    C.setup_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="builtin:minilm")
    ap.add_argument("--data-dir", default=str(C.DATA))
    ap.add_argument("--shapes", default="32x64,32x128")
    ap.add_argument("--variants", default=",".join(VARIANTS))  # the first one is the reference
    ap.add_argument("--last-layer", default="all", choices=["all", "cls"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--xla-flags", default=None, help="';'-separated XLA_FLAGS settings, each also run in its own process"
    )
    ap.add_argument("--out", default=str(C.RESULTS / "bench_attention.jsonl"))
    args = ap.parse_args(argv)
    if args.worker:
        rec = worker(args)
        C.worker_print(rec)
        return rec
    wargs = ["--model", args.model, "--data-dir", args.data_dir, "--shapes", args.shapes]
    wargs += ["--variants", args.variants, "--reps", str(args.reps), "--iters", str(args.iters)]
    wargs += ["--last-layer", args.last_layer]
    record = {
        "bench": "attention",
        "machine": C.machine_info(),
        "versions": C.versions(),
        "commit": C.git_commit(),
        "model": args.model,
        "runs": [C.run_worker(Path(__file__).resolve(), wargs)],
    }
    old = os.environ.get("XLA_FLAGS")
    for flags in (args.xla_flags or "").split(";"):
        if not flags.strip():
            continue
        os.environ["XLA_FLAGS"] = flags.strip()
        try:
            record["runs"].append(C.run_worker(Path(__file__).resolve(), wargs))
        except RuntimeError as e:
            record["runs"].append({"xla_flags": flags.strip(), "error": str(e)[-500:]})
        finally:
            if old is None:
                os.environ.pop("XLA_FLAGS")
            else:
                os.environ["XLA_FLAGS"] = old
    C.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
