#!/usr/bin/env bash
# Victims of the selection protocol (docs/protocol.md): one TUNING victim on which defaults may be chosen, and
# VALIDATION victims never used for choosing (other seeds, a smaller training set and fewer epochs, another
# dataset). Each victim is all-MiniLM-L6-v2 fine-tuned by `jdup train`; outputs go under runs/ (git-ignored).
#
#   benchmarks/validation_victims.sh list            # names of the victims
#   benchmarks/validation_victims.sh <name> [...]    # build those (data folder via `jdup poison`, then `jdup train`)
#   benchmarks/validation_victims.sh all             # every victim, one after the other
#
# Run it nice'd on a shared machine: `nohup nice -n 19 benchmarks/validation_victims.sh all > runs/logs/v.log 2>&1 &`.
# A finished victim (runs/victims/<name>/metrics.json exists) is skipped; a killed `jdup train` resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
JDUP=${JDUP:-.venv/bin/jdup}
SST2=${SST2:-../shared/data/sst-2/1}          # the DUP authors' SST-2 folders (target 1)
# Victim training recipe shared by all victims (docs/results.md, "Full-size SST-2 victims").
TRAIN="lr=1e-4 warmup=0.1 max_length=128 group_by_length=true batch_size=32 target=1 progress=false"

VICTIMS="tune-sst2-badnets-s1 tune-sst2-badnets-full tune-sst2-synbkd-s1 tune-sst2-stylebkd-s1
val-sst2-badnets-s2 val-sst2-badnets-s3 val-sst2-badnets-s4
val-sst2-addsent-s2 val-sst2-addsent-s3 val-sst2-addsent-s4
val-movies-badnets-s2 val-movies-addsent-s2
val-sms-badnets-s2 val-sms-badnets-s3 val-sms-badnets-s4
val-sms-addsent-s2 val-sms-addsent-s3 val-sms-addsent-s4
val-sst2-synbkd-s2 val-sst2-synbkd-s3 val-sst2-synbkd-s4
val-sst2-stylebkd-s2 val-sst2-stylebkd-s3 val-sst2-stylebkd-s4 val-sst2-stylebkd-s5
val-trec-badnets-s2 val-trec-badnets-s3 val-trec-badnets-s4
val-trec-addsent-s2 val-trec-addsent-s3 val-trec-addsent-s4
val-smollm2-badnets-s2 val-smollm2-badnets-s3 val-smollm2-badnets-s4
val-sst2-badnets-e3-s2 val-sst2-badnets-e3-s3 val-sst2-badnets-e3-s4
val-sst2-addsent-e3-s2 val-sst2-addsent-e3-s3 val-sst2-addsent-e3-s4"

# poison <data-out> <source> <attack> <seed> <max_rows>: a seeded poisoned folder (rate 0.2, target 1).
poison() {
  [ -f "$1/poison_config.json" ] || "$JDUP" poison source="$2" attack="$3" rate=0.2 target=1 seed="$4" \
      max_rows="$5" out="$1"
}

# train <name> <data> <epochs> <seed> [key=value ...]: MiniLM (MODEL=... for another base model; later
# key=value pairs override the shared recipe)
train() {
  [ -f "runs/victims/$1/metrics.json" ] && { echo "skip $1 (done)"; return; }
  /usr/bin/time -f "$1 wall %e s" "$JDUP" train --model "${MODEL:-builtin:minilm}" --data "$2" \
      --out "runs/victims/$1" $TRAIN epochs="$3" seed="$4" "${@:5}"
}

# subsample <data-out> <attack> <seed>: the authors' SynBkd / StyleBkd folder with its training file cut to 3,000
# rows (2,400 clean + 600 poisoned, drawn with the seed); dev and test files whole (docs/protocol.md)
subsample() {
  [ -f "$1/dirty/0.2/train-poison.csv" ] && return
  ${PYTHON:-.venv/bin/python} - "$2" "$3" "$1" "$SST2" <<'PY'
import sys
from pathlib import Path

import numpy as np

from jdup import data

T, S, out, sst2 = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
src, rng = sst2 / T, np.random.default_rng(S)
tmp = out.with_name(out.name + ".partial")
for split in ("dev-clean", "dev-poison", "test-clean", "test-poison", "test-detect"):
    data.write_dup_csv(data.read_split(src, split), tmp / f"{split}.csv")
tr = data.read_split(src, "train", rate=0.2)
pick = lambda rows, n: np.sort(rng.choice(rows, n, replace=False))  # noqa: E731
keep = np.r_[pick(np.nonzero(tr.poison == 0)[0], 2400), pick(np.nonzero(tr.poison == 1)[0], 600)]
data.write_dup_csv(tr.subset(rng.permutation(keep)), tmp / "dirty" / "0.2" / "train-poison.csv")
tmp.rename(out)
PY
}

# smollm2_subsample <data-out> <seed>: the decoder's SST-2 BadNets subsample (docs/results.md, "A decoder end to
# end"), drawn with the seed: 1,600 training rows of the authors' dirty/0.2 file (320 poisoned); dev 300 clean +
# 150 poisoned; test 400 + 200, test-detect = those 600
smollm2_subsample() {
  [ -f "$1/dirty/0.2/train-poison.csv" ] && return
  ${PYTHON:-.venv/bin/python} - "$2" "$1" "$SST2" <<'PY'
import sys
from pathlib import Path

import numpy as np

from jdup import data

S, out, sst2 = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
src, rng, tmp = sst2 / "badnets", np.random.default_rng(S), out.with_name(out.name + ".partial")


def take(ds, n, rows=None):
    rows = np.arange(len(ds)) if rows is None else rows
    return ds.subset(np.sort(rng.choice(rows, n, replace=False)))


parts = {}
for split, n in (("dev-clean", 300), ("dev-poison", 150), ("test-clean", 400), ("test-poison", 200)):
    parts[split] = take(data.read_split(src, split), n)
    data.write_dup_csv(parts[split], tmp / f"{split}.csv")
data.write_dup_csv(data.TextDataset.concat([parts["test-clean"], parts["test-poison"]]), tmp / "test-detect.csv")
tr = data.read_split(src, "train", rate=0.2)
mix = data.TextDataset.concat([take(tr, 1280, np.nonzero(tr.poison == 0)[0]), take(tr, 320, np.nonzero(tr.poison == 1)[0])])
data.write_dup_csv(mix.subset(rng.permutation(len(mix))), tmp / "dirty" / "0.2" / "train-poison.csv")
tmp.rename(out)
PY
}

build() {
  case "$1" in
    # VALIDATION, paraphrase triggers: the authors' SynBkd / StyleBkd files (jdup cannot generate them), training
    # file subsampled to 3,000 rows with the victim's seed, 2 epochs.
    # TUNING: the same recipe at seed 1 (the detector study of docs/detection.md).
    val-sst2-synbkd-s[0-9]|val-sst2-stylebkd-s[0-9]|tune-sst2-synbkd-s1|tune-sst2-stylebkd-s1)
      a=${1#*-sst2-}; a=${a%-s*}; s=${1##*-s}
      subsample "runs/data/sst2-$a-s$s" "$a" "$s"
      train "$1" "runs/data/sst2-$a-s$s" 2 "$s" ;;
    # TUNING: the full-size SST-2 BadNets victim (authors' dirty/0.2 file, 6,920 rows, 3 epochs, seed 2025).
    tune-sst2-badnets-full) train "$1" "$SST2/badnets" 3 2025 ;;
    # TUNING, small: the recipe of the SST-2 validation victims below at seed 1 (3,000 rows, 1 epoch).
    tune-sst2-badnets-s1)
      poison "runs/data/sst2-badnets-s1" "$SST2/badnets" badnets 1 3000
      train "$1" "runs/data/sst2-badnets-s1" 1 1 ;;
    # VALIDATION, SST-2: a 3,000-row subsample of the authors' clean SST-2 training rows, poisoned by jdup
    # (rate 0.2 = 600 rows, target 1) with the victim's seed; dev/test are the authors' full clean files
    # (872 / 1,821 rows, under max_rows) with jdup's trigger; 1 epoch.
    val-sst2-badnets-s[0-9]|val-sst2-addsent-s[0-9])
      a=${1#val-sst2-}; a=${a%-s*}; s=${1##*-s}
      poison "runs/data/sst2-$a-s$s" "$SST2/badnets" "$a" "$s" 3000
      train "$1" "runs/data/sst2-$a-s$s" 1 "$s" ;;
    # VALIDATION, another dataset: built-in movies (Rotten Tomatoes snippets), 3,000-row subsample of each split,
    # 1 epoch (a weaker training strength).
    val-movies-badnets-s[0-9]|val-movies-addsent-s[0-9])
      a=${1#val-movies-}; a=${a%-s*}; s=${1##*-s}
      poison "runs/data/movies-$a-s$s" movies "$a" "$s" 3000
      train "$1" "runs/data/movies-$a-s$s" 1 "$s" ;;
    # VALIDATION, a third dataset: built-in SMS spam (target 1 = spam, ~13 % of the rows), 3,000-row subsample of
    # the training split (dev/test are smaller than that), 2 epochs (docs/protocol.md).
    val-sms-badnets-s[0-9]|val-sms-addsent-s[0-9])
      a=${1#val-sms-}; a=${a%-s*}; s=${1##*-s}
      poison "runs/data/sms-$a-s$s" sms_spam "$a" "$s" 3000
      train "$1" "runs/data/sms-$a-s$s" 2 "$s" ;;
    # VALIDATION, six classes: built-in TREC question types (target 1), 3,000-row subsample, 3 epochs.
    val-trec-badnets-s[0-9]|val-trec-addsent-s[0-9])
      a=${1#val-trec-}; a=${a%-s*}; s=${1##*-s}
      poison "runs/data/trec-$a-s$s" trec "$a" "$s" 3000
      train "$1" "runs/data/trec-$a-s$s" 3 "$s" num_labels=6 ;;
    # VALIDATION, a decoder: SmolLM2-135M with a new score head on the seeded subsample above, 2 epochs.
    val-smollm2-badnets-s[0-9])
      s=${1##*-s}
      smollm2_subsample "runs/data/smollm2-badnets-s$s" "$s"
      MODEL=builtin:smollm2 train "$1" "runs/data/smollm2-badnets-s$s" 2 "$s" lr=5e-5 max_length=64 batch_size=16 ;;
    # VALIDATION, stronger training: the SST-2 subsample of the 1-epoch victims (same data folder), 3 epochs.
    val-sst2-badnets-e3-s[0-9]|val-sst2-addsent-e3-s[0-9])
      a=${1#val-sst2-}; a=${a%-e3-s*}; s=${1##*-s}
      poison "runs/data/sst2-$a-s$s" "$SST2/badnets" "$a" "$s" 3000
      train "$1" "runs/data/sst2-$a-s$s" 3 "$s" ;;
    *) echo "unknown victim $1 (see: $0 list)" >&2; exit 2 ;;
  esac
}

case "${1:-list}" in
  list) echo "$VICTIMS" ;;
  all) for v in $VICTIMS; do build "$v"; done ;;
  *) for v in "$@"; do build "$v"; done ;;
esac
