"""One unlearning epoch: jdup (NNX LoRA, one jitted joint step) vs PyTorch + PEFT, same weights and data.

Both sides get the same forget set (all of ``dev-poison``: the oracle flagged set, so detection does not enter
the timing), the same retain set (all of ``dev-clean``), batch 32, λ_asr = λ_acc = 1, LoRA r=32 / α=64 /
dropout 0.1 on query/key/value plus the head, AdamW 5e-4 with a linear schedule, clip 1.0, and one epoch
(``ceil(428 / 32) = 14`` steps on SST-2). Each run is a whole call of the implementation's unlearning function
(teacher logits, LoRA set-up, the steps, merge); stages are timed inside it. jdup's first (warm-up) call
compiles; the timed calls follow it. jdup's batches are length-grouped and paired by length
(``--length-group 8 --pad-multiple 8``, its defaults; ``--length-group 0 --pad-multiple 0`` gives the plain
shuffled order padded to 32/64/128 buckets); the reference batches as the official code (a fixed shuffle,
each batch padded to its longest row, both batches of a step to the longer). Both sides report the padded
tokens their steps processed (``padded_tokens_epoch``). Model FLOPs per step = 2 × the forward FLOPs of the two batches (frozen base:
forward + input-gradient backward), counted on real token lengths.

    python benchmarks/bench_unlearn.py                  # MiniLM BadNets victim, SST-2
    python benchmarks/bench_unlearn.py --epochs 2 --reps 5
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
    attack="badnets",  # ../shared/data/sst-2/1/<attack>
    reps=3,  # timed repetitions after warm-up
    epochs=1,  # epochs per timed run
    batch_size=32,  # rows per forget batch and per clean batch (official BERT value)
    lambda_asr=1.0,  # forget weight (the official demo's 0 switches the forget term off)
    lambda_acc=1.0,  # retain CE weight
    limit=0,  # smoke test: use only the first N rows of dev-poison / dev-clean
    length_group=8,  # jdup: length-grouped batches paired by length (UnlearnConfig.length_group; 0 = plain order)
    pad_multiple=8,  # jdup: pad batches to a multiple of this (UnlearnConfig.pad_multiple; 0 = 32/64/128 buckets)
)


def _rows(args):
    from benchmarks.torch_baseline.data import read_dup_csv

    folder = Path(args.data_dir) / args.attack
    lim = args.limit or None
    return read_dup_csv(folder / "dev-poison.csv", limit=lim), read_dup_csv(
        folder / "dev-clean.csv", limit=lim
    )


def _epoch_flops(folder: Path, forget, retain, batch_size: int, steps: int) -> tuple[float, dict]:
    """Model FLOPs of ``steps`` steps: every forget row once per epoch, clean rows cycled in file order."""
    from transformers import AutoTokenizer

    cfg = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    n_clean = steps * batch_size
    clean = [retain[i % len(retain)].text for i in range(n_clean)]
    per_epoch = (len(forget) + batch_size - 1) // batch_size
    forget_texts = [r.text for r in forget] * max(1, steps // per_epoch)
    lengths = [len(x) for x in tok(forget_texts + clean, truncation=True, max_length=128)["input_ids"]]
    fwd = C.encoder_forward_flops(
        lengths,
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg.get("num_labels", 2),
    )
    return C.lora_train_flops(fwd), {"sequences": len(lengths), "tokens": int(sum(lengths))}


def _throughput(args, steps, train, step_all, losses, flops, counts, padded, peak, rss_before) -> dict:
    """The fields both workers report from their timed runs (``train``: summary of the train-steps time)."""
    return {
        "step_s": C.summarize(step_all),
        "samples_per_s": steps * 2 * args.batch_size / train["median"],
        "losses_last_run": losses,
        "flops_model_epoch": flops,
        "flop_counts": counts,
        "padded_tokens_epoch": padded,
        "peak": peak,
        "achieved_flops_per_s": flops / train["min"],
        "mfu": flops / train["min"] / peak["flops_per_s"],
        "rss_before_mb": rss_before,
        "peak_rss_mb": C.peak_rss_mb(),
    }


def worker_torch(args) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.torch_baseline.unlearn import BaselineUnlearnConfig, unlearn

    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    teacher = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    forget, retain = _rows(args)
    cfg = BaselineUnlearnConfig(
        lambda_asr=args.lambda_asr, lambda_acc=args.lambda_acc, epochs=args.epochs, batch_size=args.batch_size
    )
    peak = C.matmul_peak("torch", "float32")
    rss_before = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    unlearn(
        teacher, tok, forget[:64], retain[:64], BaselineUnlearnConfig(batch_size=args.batch_size, max_steps=1)
    )
    warm = time.perf_counter() - t0
    runs, walls = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = unlearn(teacher, tok, forget, retain, cfg)
        walls.append(time.perf_counter() - t0)
        out.pop("model")
        runs.append(out)
    steps = runs[-1]["steps"]
    flops, counts = _epoch_flops(folder, forget, retain, args.batch_size, steps)
    # each step pads both batches to the longest row of the two: 2B rows x that length
    padded = int(sum(len(s) * max(s) for s in runs[-1]["step_lengths"]))
    tim = [r["timings"] for r in runs]
    train = C.summarize([t["train_steps"] for t in tim])
    step_all = [s for t in tim for s in t["step"]]
    return {
        "impl": "torch+peft",
        "threads": torch.get_num_threads(),
        "steps": steps,
        "steps_per_epoch": runs[-1]["steps_per_epoch"],
        "trainable_params": runs[-1]["trainable_params"],
        "warmup_s": warm,
        "compile_s": 0.0,
        "total": C.summarize(walls),
        "stages": {
            "prepare": C.summarize([t["teacher"] for t in tim]),
            "setup": C.summarize([t["setup"] for t in tim]),
            "train_steps": train,
            "merge": C.summarize([t["merge"] for t in tim]),
        },
        **_throughput(args, steps, train, step_all, runs[-1]["losses"], flops, counts, padded, peak, rss_before),
    }


def worker_jdup(args) -> dict:
    import jax
    import numpy as np
    import psutil
    from flax import nnx

    from jdup import data as D
    from jdup import models, predict
    from jdup import unlearn as U

    C.JaxCompileClock.install()
    folder = Path(args.model)
    model = models.from_pretrained(folder)
    tok = models.load_tokenizer(folder)
    forget_rows, retain_rows = _rows(args)

    def ds(rows):
        return D.TextDataset(
            [r.text for r in rows], [r.label for r in rows], [r.poison for r in rows], "bench"
        )

    max_length = 128  # `jdup unlearn`'s default truncation (UnlearnConfig.max_length)
    cfg = C.jdup_unlearn_settings(
        lambda_asr=args.lambda_asr,
        lambda_acc=args.lambda_acc,
        epochs=args.epochs,
        batch_size=args.batch_size,
        early_stop="none",
        ckpt_every_steps=0,
        progress=False,
        length_group=args.length_group,
        pad_multiple=args.pad_multiple,
    )
    peak = C.matmul_peak("jax", "float32")
    rss_before = psutil.Process().memory_info().rss / 2**20

    class Clock:
        """``on_step`` hook: time stamps before the first step and after every step (metrics are synced)."""

        def __init__(self):
            self.marks = []

        def prepare_student(self, student):
            self.marks = [time.perf_counter()]
            return student.trainable

        def __call__(self, info):
            self.marks.append(time.perf_counter())
            return None

    def one_run():
        t0 = time.perf_counter()
        forget = D.encode(tok, ds(forget_rows), max_length=max_length, config=model.config)
        retain = D.encode(tok, ds(retain_rows), max_length=max_length, config=model.config)
        teacher = predict.predict(model, forget, cfg.eval_batch_size)
        t1 = time.perf_counter()
        clock = Clock()
        res = U.unlearn(model, forget, retain, cfg, teacher_logits=teacher, on_step=clock)
        jax.block_until_ready(jax.tree.leaves(nnx.state(res.merged)))
        t2 = time.perf_counter()
        steps = np.diff(clock.marks)
        return {
            "prepare": t1 - t0,
            "setup": clock.marks[0] - t1,
            "train_steps": clock.marks[-1] - clock.marks[0],
            "merge": t2 - clock.marks[-1],
            "total": t2 - t0,
            "step": steps.tolist(),
            "steps": res.steps,
            "losses": [r["loss"] for r in res.log],
        }

    c0, n0 = C.JaxCompileClock.snapshot()
    t0 = time.perf_counter()
    one_run()  # warm-up: compiles the teacher pass, the train step and the merge
    warm = time.perf_counter() - t0
    c1, n1 = C.JaxCompileClock.snapshot()
    runs, compiles = [], []
    for _ in range(args.reps):
        ca, _ = C.JaxCompileClock.snapshot()
        runs.append(one_run())
        compiles.append(C.JaxCompileClock.snapshot()[0] - ca)
    steps = runs[-1]["steps"]
    flops, counts = _epoch_flops(folder, forget_rows, retain_rows, args.batch_size, steps)
    train = C.summarize([r["train_steps"] for r in runs])
    # padded tokens of the joint batches the steps processed (the same plan U.unlearn follows)
    f_enc = D.encode(tok, ds(forget_rows), max_length=max_length, config=model.config)
    r_enc = D.encode(tok, ds(retain_rows), max_length=max_length, config=model.config)
    plan = D.BatchPlan.from_config(f_enc, r_enc, cfg)
    padded, lengths = 0, []
    for s in range(steps):
        n = U.joint_batch(plan.forget_batch(s), np.zeros((len(f_enc), 2)), plan.clean_batch(s))["input_ids"]
        padded += int(n.size)
        lengths.append(int(n.shape[1]))
    step_all = [s for r in runs for s in r["step"]]
    return {
        "impl": "jdup",
        "jax_devices": [str(d) for d in jax.devices()],
        "steps": steps,
        "warmup_s": warm,
        "compile_s": c1 - c0,
        "compiles_warmup": n1 - n0,
        "step_lengths": sorted(set(lengths)),
        "compile_s_per_timed_run": compiles,
        "total": C.summarize([r["total"] for r in runs]),
        "stages": {
            k: C.summarize([r[k] for r in runs]) for k in ("prepare", "setup", "train_steps", "merge")
        },
        **_throughput(args, steps, train, step_all, runs[-1]["losses"], flops, counts, padded, peak, rss_before),
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
    ap.add_argument("--threads", type=int, default=C.num_cores(), help="torch intra-op threads")
    ap.add_argument("--out", default=str(C.RESULTS / "bench_unlearn.jsonl"))
    args = ap.parse_args(argv)
    if args.worker:
        rec = worker_torch(args) if args.impl == "torch" else worker_jdup(args)
        C.worker_print(rec)
        return rec
    args.model = C.resolve_model(args.model)
    record = {
        "bench": "unlearn_epoch",
        "machine": C.machine_info(),
        "versions": C.versions(),
        "commit": C.git_commit(),
        "model": str(args.model),
        "data": str(Path(args.data_dir) / args.attack),
        "config": {k: getattr(args, k) for k in DEFAULTS} | {"threads": args.threads},
    }
    me = Path(__file__).resolve()
    wargs = ["--model", str(args.model), "--data-dir", args.data_dir, "--threads", str(args.threads)]
    for k in DEFAULTS:
        wargs += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    for impl in ("torch", "jdup") if args.impl == "both" else (args.impl,):
        record[impl] = C.run_worker(me, wargs + ["--impl", impl])
    if "torch" in record and "jdup" in record:
        j, t = record["jdup"], record["torch"]
        record["ratio"] = {
            "speedup_train_steps_median": C.ratio(
                t["stages"]["train_steps"]["median"], j["stages"]["train_steps"]["median"]
            ),
            "speedup_train_steps_min": C.ratio(
                t["stages"]["train_steps"]["min"], j["stages"]["train_steps"]["min"]
            ),
            "speedup_total_median": C.ratio(t["total"]["median"], j["total"]["median"]),
            "speedup_step_median": C.ratio(t["step_s"]["median"], j["step_s"]["median"]),
            "mfu_jdup_over_torch": C.ratio(j["mfu"], t["mfu"]),
            "padded_tokens_torch_over_jdup": C.ratio(t["padded_tokens_epoch"], j["padded_tokens_epoch"]),
        }
        record["normalised"] = C.normalised(
            j["stages"]["train_steps"]["median"],
            t["stages"]["train_steps"]["median"],
            j["peak"]["flops_per_s"],
            t["peak"]["flops_per_s"],
            j["flops_model_epoch"],
        )
    C.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
