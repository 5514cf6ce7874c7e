"""The shared, cached backdoored MiniLM test victim on the DUP authors' poisoned SST-2 (detection / unlearning tests).

To keep the suite within budget there is ONE victim, trained once per session (fixtures ``victims``,
``badnets_victim``, ``addsent_victim`` in ``tests/conftest.py``): all-MiniLM-L6-v2 + a new head, fine-tuned by
:func:`jdup.stages.train.run_train` on a random subsample of SST-2 whose poisoned rows come from both
``sst-2/1/badnets`` and ``sst-2/1/addsent`` (dirty label, target 1, :data:`VICTIM_SETTINGS`), so it carries both
backdoors. Each attack gets a reduced DUP folder (subsampled dev/test splits, ``test-detect = test-clean ‖
test-poison``; the clean rows are the same in both); the badnets folder also holds the training file. Training
takes ~2-3 CPU-minutes; set ``JDUP_TEST_CACHE=/some/dir`` to keep the victim across sessions (the cache key
includes the settings).

A victim is ``{"model": <HF folder>, "data": <that attack's folder>, "metrics": {"cacc", "asr", ...}}`` (``asr``
measured on that attack's reduced test-poison).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

ATTACKS = ("badnets", "addsent")

#: Fixtures of ``tests/conftest.py`` whose users are end-to-end tests on this victim (longer per-test timeout;
#: left out of the fast lane, ``tests/fast_lane.py``).
HEAVY_FIXTURES = frozenset({"victims", "victim_cache", "badnets_victim", "addsent_victim"})

#: Subsampling and training recipe of the test victim (everything that goes into the cache key).
VICTIM_SETTINGS = dict(
    n_train_clean=960,  # clean rows of dirty/0.2/train-poison.csv
    n_train_poison=120,  # poisoned rows per attack (2 x 120 of 1200 rows = 20 %)
    n_dev_clean=300,  # dev-clean rows (detector calibration: 150 fit + 150 validation)
    n_dev_poison=150,
    n_test_clean=200,
    n_test_poison=150,
    epochs=2,
    lr=1e-4,
    warmup=0.1,
    batch_size=32,
    max_length=48,
    seed=0,
)


def _take(ds, n: int, rng: np.random.Generator, rows=None):
    rows = np.arange(len(ds)) if rows is None else np.asarray(rows)
    if n < len(rows):
        rows = np.sort(rng.choice(rows, n, replace=False))
    return ds.subset(rows)


def make_folders(root: Path, sst2: Path, settings: dict = VICTIM_SETTINGS) -> dict[str, Path]:
    """Writes the reduced per-attack DUP folders (from ``sst2/<attack>``) under ``root``; ``{attack: folder}``."""
    from jdup import data

    folders = {}
    train_parts = []
    for k, attack in enumerate(ATTACKS):
        src, dst = Path(sst2) / attack, root / attack
        rng = np.random.default_rng(settings["seed"])  # same clean dev/test rows for every attack
        for split, key in (
            ("dev-clean", "n_dev_clean"),
            ("dev-poison", "n_dev_poison"),
            ("test-clean", "n_test_clean"),
            ("test-poison", "n_test_poison"),
        ):
            part = _take(data.read_split(src, split), settings[key], rng)
            data.write_dup_csv(part, dst / f"{split}.csv")
            if split == "test-clean":
                clean = part
            if split == "test-poison":
                data.write_dup_csv(data.TextDataset.concat([clean, part]), dst / "test-detect.csv")
        train = data.read_split(src, "train", rate=0.2)
        trng = np.random.default_rng(settings["seed"] + 1 + k)
        if k == 0:
            train_parts.append(
                _take(train, settings["n_train_clean"], trng, np.nonzero(train.poison == 0)[0])
            )
        train_parts.append(_take(train, settings["n_train_poison"], trng, np.nonzero(train.poison == 1)[0]))
        folders[attack] = dst
    mixed = data.TextDataset.concat(train_parts)
    mixed = mixed.subset(np.random.default_rng(settings["seed"]).permutation(len(mixed)))
    data.write_dup_csv(mixed, folders[ATTACKS[0]] / "dirty" / "0.2" / "train-poison.csv")
    return folders


def train_victim(cache_root: Path, sst2: Path, settings: dict = VICTIM_SETTINGS) -> dict[str, dict]:
    """Builds (or reuses from ``cache_root``) the folders and the trained victim; ``{attack: victim dict}``.

    ``sst2`` is the folder holding ``<attack>/`` for every attack of :data:`ATTACKS` (the caller checks it).
    """
    from jdup import atomic, data, models
    from jdup.predict import predict
    from jdup.stages.train import TrainConfig, run_train

    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_root) / f"minilm-badnets+addsent-{key}"
    run_dir = root / "victim"
    model_dir, summary_path = run_dir / "model", root / "summary.json"
    if not (model_dir.is_dir() and summary_path.is_file()):
        folders = make_folders(root, sst2, settings)
        cfg = TrainConfig(
            model="builtin:minilm",
            data=str(folders[ATTACKS[0]]),
            out=str(run_dir),
            rate=0.2,
            num_labels=2,
            target=1,
            epochs=settings["epochs"],
            lr=settings["lr"],
            warmup=settings["warmup"],
            batch_size=settings["batch_size"],
            max_length=settings["max_length"],
            seed=settings["seed"],
            eval_batch_size=64,
            ckpt_every_steps=0,
            eval_every=settings["epochs"],
            progress=False,
        )
        metrics = run_train(cfg)
        summary = {ATTACKS[0]: {k: metrics.get(k) for k in ("cacc", "asr", "dev_acc", "dev_asr", "seconds")}}
        model = models.from_pretrained(str(model_dir))
        tok = models.load_tokenizer(str(model_dir))
        for attack in ATTACKS[1:]:
            enc = data.encode(tok, data.read_split(folders[attack], "test-poison"), settings["max_length"])
            preds = predict(model, enc).argmax(-1)
            summary[attack] = {"cacc": metrics.get("cacc"), "asr": float(np.mean(preds == 1))}
        atomic.write_json(summary_path, summary)
    summary = json.loads(summary_path.read_text())
    return {a: {"model": str(model_dir), "data": str(root / a), "metrics": summary[a]} for a in ATTACKS}
