"""UPGP table: detection AUROC (DUP, DAN, UPGP, ensemble) and projected unlearning on one SST-2 attack (CPU-sized).

For ``ATTACK`` in {badnets, addsent, stylebkd, synbkd} of ``../shared/data/sst-2/1/<attack>`` this script, using the
public jdup API only:

1. builds a reduced DUP folder (cached): ``--train-rows`` random rows of ``dirty/0.2/train-poison.csv``;
   dev-clean = ``--dev`` non-target + ``--dev`` target rows of dev-clean, dev-poison = the poisoned copies of those
   non-target rows; test-clean = ``--test`` non-target + ``--test`` target rows of test-clean, test-poison = the
   poisoned copies of those non-target rows, in the same order (the row pairing of the DUP layout, so robust
   accuracy is defined); test-detect = test-clean ‖ test-poison;
2. trains a MiniLM victim with :func:`jdup.stages.train.run_train` (cached under ``benchmarks/.cache/upgp_table/``);
3. detection on test-detect, calibrated / perturbation learned on dev-clean, with :func:`jdup.detect.detect`
   (what ``jdup detect --method dup|dan|upgp|ensemble`` runs): DUP, DAN, UPGP zeroth-order sensitivity (first-order
   score off) and the ensemble (mean rank fraction of DUP and UPGP, UPGP learned on DUP's calibration half);
4. unlearning (:func:`jdup.stages.unlearn.run_unlearn`) of the rows DUP flags on dev-detect = dev-clean ‖ dev-poison, with
   projection none / gradient / representation / inflora, all with ``early_stop=none`` (same number of steps);
5. prints one JSON line and a markdown table, and stores them in the cache folder.

``--summary`` prints the combined markdown tables of every attack already run (from the cache).

Usage (2 shared CPU cores: one attack per locked command)::

    flock /tmp/jdup-cpu.lock .venv/bin/python benchmarks/upgp_table.py badnets
    .venv/bin/python benchmarks/upgp_table.py --summary
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst-2" / "1"
CACHE = REPO / "benchmarks" / ".cache" / "upgp_table"
ATTACKS = ("badnets", "addsent", "stylebkd", "synbkd")
PROJECTIONS = ("none", "gradient", "representation", "inflora")
TARGET = 1


def _settings(args) -> dict:
    return dict(
        train_rows=args.train_rows,
        train_epochs=args.train_epochs,
        train_lr=args.train_lr,
        max_length=args.max_length,
        dev=args.dev,
        test=args.test,
        seed=args.seed,
    )


def _paired(clean, poison, n_each: int, rng: np.random.Generator):
    """``n_each`` non-target + ``n_each`` target rows of ``clean`` (file order kept) and the poisoned copies of the
    chosen non-target rows (``poison`` row i is the copy of the i-th non-target row of ``clean``)."""
    non_target = np.flatnonzero(clean.labels != TARGET)
    if len(non_target) != len(poison):
        raise SystemExit(f"{clean.source}: {len(non_target)} non-target rows but {len(poison)} poisoned rows")
    target = np.flatnonzero(clean.labels == TARGET)
    pick_nt = np.sort(rng.choice(len(non_target), n_each, replace=False))
    pick_t = rng.choice(target, n_each, replace=False)
    rows = np.sort(np.concatenate([non_target[pick_nt], pick_t]))
    return clean.subset(rows), poison.subset(pick_nt)


def make_folder(attack: str, root: Path, s: dict) -> Path:
    from jdup import data

    dst = root / "data"
    if (dst / "test-detect.csv").is_file():
        return dst
    src = SST2 / attack
    rng = np.random.default_rng(s["seed"])  # the same clean dev/test rows for every attack
    for kind, n in (("dev", s["dev"]), ("test", s["test"])):
        clean, poison = _paired(
            data.read_split(src, f"{kind}-clean"), data.read_split(src, f"{kind}-poison"), n, rng
        )
        data.write_dup_csv(clean, dst / f"{kind}-clean.csv")
        data.write_dup_csv(poison, dst / f"{kind}-poison.csv")
        if kind == "test":
            data.write_dup_csv(data.TextDataset.concat([clean, poison]), dst / "test-detect.csv")
    train = data.read_split(src, "train", rate=0.2)
    trng = np.random.default_rng(s["seed"] + 1)
    rows = np.sort(trng.choice(len(train), min(s["train_rows"], len(train)), replace=False))
    data.write_dup_csv(train.subset(rows), dst / "dirty" / "0.2" / "train-poison.csv")
    return dst


def train_victim(root: Path, folder: Path, s: dict) -> dict:
    from jdup.stages import train

    metrics_path = root / "victim" / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    cfg = train.TrainConfig(
        model="builtin:minilm",
        data=str(folder),
        out=str(root / "victim"),
        rate=0.2,
        num_labels=2,
        target=TARGET,
        epochs=s["train_epochs"],
        lr=s["train_lr"],
        warmup=0.1,
        batch_size=32,
        max_length=s["max_length"],
        group_by_length=True,
        seed=s["seed"],
        eval_every=s["train_epochs"],
        ckpt_every_steps=0,
        progress=False,
    )
    return train.run_train(cfg)


def detection(root: Path, folder: Path, s: dict, args) -> dict:
    """AUROCs on test-detect through ``jdup.detect.detect`` (the library call behind ``jdup detect --method``)."""
    from jdup import data, detect, models

    path = root / "detection-v2.json"
    if path.is_file():
        return json.loads(path.read_text())
    model_dir = str(root / "victim" / "model")
    victim = models.from_pretrained(model_dir)
    tok = models.load_tokenizer(model_dir)
    calib = data.read_split(folder, "dev-clean", num_labels=2)
    scored = data.read_split(folder, "test-detect", num_labels=2)
    upgp_opts = {"max_steps": args.upgp_steps, "eval_every": 10, "first_order": False, "seed": s["seed"]}
    out: dict = {}
    for method in ("fisher", "dup", "dan", "upgp", "ensemble"):
        t = time.perf_counter()
        cfg = detect.DetectSettings(
            method=method, max_length=s["max_length"], progress=False, upgp=upgp_opts
        )
        res = detect.detect(victim, tok, calib, scored, cfg)
        out[f"auroc_{method}"] = res.metrics["auroc"]
        out[f"frr_{method}"] = res.metrics["frr"]
        out[f"far_{method}"] = res.metrics["far"]
        out[f"seconds_{method}"] = time.perf_counter() - t
        if method == "upgp":
            out["upgp_perturbation_steps"] = [p["steps"] for p in res.upgp.info["perturbations"]]
    out["n_scored"] = int(len(scored))
    out["n_poison"] = int(scored.poison.sum())
    path.write_text(json.dumps(out, indent=2))
    return out


def unlearning(root: Path, folder: Path, s: dict, args) -> dict:
    from jdup import models
    from jdup.stages import detect as detect_stage
    from jdup.stages import unlearn as unlearn_stage

    model_dir = str(root / "victim" / "model")
    det = args.forget_detector
    dev_det = root / f"{det}-dev-detect"
    if not (dev_det / "flags.npy").is_file():
        victim = models.from_pretrained(model_dir)
        upgp_opts = {"max_steps": args.upgp_steps, "eval_every": 10, "first_order": False, "seed": s["seed"]}
        detect_stage.detect_dev(
            victim,
            model_dir,
            str(folder),
            str(dev_det),
            {
                "max_length": s["max_length"],
                "progress": False,
                "plots": False,
                "method": det,
                "upgp": upgp_opts,
            },
        )
    options = {
        "none": {},
        "gradient": {"k": args.k, "basis_batch_size": 16, "refresh": args.refresh, "probe_rows": 32},
        "representation": {"repr_rows": 128, "probe_rows": 32},
        "inflora": {"repr_rows": 128, "forget_rows": 256, "probe_rows": 32},
    }
    out = {}
    for proj in args.projections:
        run = root / f"unlearn-{proj}-e{args.unlearn_epochs}-b{args.unlearn_batch}-{args.forget_loss}"
        if det != "dup":
            run = run.with_name(run.name + f"-{det}")
        mpath = run / "metrics.json"
        if not mpath.is_file():
            cfg = unlearn_stage.UnlearnConfig(
                model=model_dir,
                data=str(folder),
                out=str(run),
                detection=str(dev_det),
                max_length=s["max_length"],
                forget_loss=args.forget_loss,
                lr=args.unlearn_lr,
                epochs=args.unlearn_epochs,
                batch_size=args.unlearn_batch,
                early_stop="none",
                projection=proj,
                projection_options=options[proj],
                ckpt_every_steps=0,
                progress=False,
            )
            unlearn_stage.run_unlearn(cfg)
        m = json.loads(mpath.read_text())
        rec = {
            k: m.get(k)
            for k in (
                "cacc_before",
                "asr_before",
                "ra_before",
                "cacc_after",
                "asr_after",
                "ra_after",
                "steps",
                "n_flagged",
                "n_flagged_poison",
                "unlearn_seconds",
            )
        }
        hist = json.loads((run / "history.json").read_text())["steps"]
        if proj != "none" and hist:
            rec["sens_before_mean"] = float(np.mean([h.get("sens_before", np.nan) for h in hist]))
            rec["sens_after_max"] = float(np.max([h.get("sens_after", np.nan) for h in hist]))
            rec["clean_loss_change_sum"] = float(
                np.nansum([h.get("clean_loss_change", np.nan) for h in hist])
            )
        out[proj] = rec
    return out


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(results: list[dict]) -> str:
    lines = [
        "| attack | victim CACC / ASR | DUP | DAN | UPGP | ensemble (rank) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "label" in r:  # the same victim, unlearning with another detector's flags: detection shown once
            continue
        d, v = r["detection"], r["victim"]
        lines.append(
            f"| {r['attack']} | {_f(v['cacc'])} / {_f(v['asr'])} | {_f(d['auroc_dup'])} | {_f(d['auroc_dan'])} "
            f"| {_f(d['auroc_upgp'])} | {_f(d['auroc_ensemble'])} |"
        )
    lines += [
        "",
        "| attack | flagged (poison) | steps | " + " | ".join(f"{p} CACC / ASR" for p in PROJECTIONS) + " |",
        "|---|---|---|" + "---|" * len(PROJECTIONS),
    ]
    for r in results:
        u = r["unlearn"]
        any_ = next(iter(u.values()), {})
        cells = [
            f"{_f(u[p]['cacc_after'])} / {_f(u[p]['asr_after'])}" if p in u else "–" for p in PROJECTIONS
        ]
        lines.append(
            f"| {r.get('label', r['attack'])} | {any_.get('n_flagged')} ({any_.get('n_flagged_poison')}) | {any_.get('steps')} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "| attack | "
        + " | ".join(f"{p}: sensitivity before → after, Σ clean-loss change" for p in PROJECTIONS[1:])
        + " |",
        "|---|" + "---|" * (len(PROJECTIONS) - 1),
    ]
    for r in results:
        u = r["unlearn"]
        cells = []
        for p in PROJECTIONS[1:]:
            x = u.get(p, {})
            if "sens_before_mean" not in x:
                cells.append("–")
                continue
            cells.append(
                f"{x['sens_before_mean']:.2f} → {x['sens_after_max']:.0e}, {x['clean_loss_change_sum']:+.3f}"
            )
        lines.append(f"| {r.get('label', r['attack'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("attack", nargs="?", choices=ATTACKS)
    p.add_argument("--summary", action="store_true", help="print the combined tables of cached results")
    p.add_argument("--train-rows", type=int, default=1500, help="rows of dirty/0.2/train-poison.csv")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--train-lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument(
        "--dev", type=int, default=150, help="non-target (= target) dev-clean rows; dev-poison = this"
    )
    p.add_argument(
        "--test", type=int, default=150, help="non-target (= target) test-clean rows; test-poison = this"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--upgp-steps", type=int, default=60, help="max steps of each UPGP label-flip perturbation"
    )
    p.add_argument("--unlearn-epochs", type=int, default=6)
    p.add_argument("--unlearn-batch", type=int, default=16)
    p.add_argument("--unlearn-lr", type=float, default=5e-4)
    p.add_argument("--forget-loss", default="suppress_target")
    p.add_argument(
        "--k", type=int, default=16, help="gradient projection: clean mini-batch gradients per basis"
    )
    p.add_argument(
        "--refresh", type=int, default=10, help="gradient projection: basis refresh period (steps)"
    )
    p.add_argument(
        "--forget-detector",
        default="dup",
        choices=("dup", "upgp", "ensemble"),
        help="detector whose flags on dev-detect form the forget set",
    )
    p.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    s = _settings(args)
    key = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    if args.summary:
        results = []
        for attack in ATTACKS:
            files = (CACHE / f"{attack}-{key}").glob("result*.json")
            for f in sorted(files, key=lambda f: (f.name != "result.json", f.name)):
                results.append(json.loads(f.read_text()))
        print(markdown(results))
        return 0
    if not args.attack:
        p.error("name an attack (or --summary)")
    if not (SST2 / args.attack).is_dir():
        raise SystemExit(f"data not found: {SST2 / args.attack}")
    root = CACHE / f"{args.attack}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings = {}
    folder = make_folder(args.attack, root, s)
    t = time.perf_counter()
    vm = train_victim(root, folder, s)
    timings["train"] = time.perf_counter() - t
    victim = {k: vm.get(k) for k in ("cacc", "asr", "dev_acc", "dev_asr", "seconds")}
    if (victim["cacc"] or 0) < 0.7:
        print(
            f"warning: victim CACC {victim['cacc']:.3f} < 0.7 (did not learn the clean task)", file=sys.stderr
        )
    t = time.perf_counter()
    det = detection(root, folder, s, args)
    timings["detection"] = time.perf_counter() - t
    t = time.perf_counter()
    un = unlearning(root, folder, s, args)
    timings["unlearning"] = time.perf_counter() - t
    result = {
        "attack": args.attack,
        "settings": s,
        "unlearn_settings": {
            "epochs": args.unlearn_epochs,
            "batch_size": args.unlearn_batch,
            "lr": args.unlearn_lr,
            "forget_loss": args.forget_loss,
            "k": args.k,
            "refresh": args.refresh,
            "forget_detector": args.forget_detector,
        },
        "victim": victim,
        "detection": det,
        "unlearn": un,
        "seconds_this_run": timings | {"total": time.perf_counter() - t0},
    }
    if args.forget_detector != "dup":
        result["label"] = f"{args.attack} ({args.forget_detector} flags)"
    old = root / ("result.json" if args.forget_detector == "dup" else f"result-{args.forget_detector}.json")
    previous = json.loads(old.read_text()) if old.is_file() else {}
    if previous.get("unlearn_settings") == result["unlearn_settings"]:  # a --projections subset adds to it
        result["unlearn"] = previous.get("unlearn", {}) | un
    old.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(markdown([result]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
