#!/usr/bin/env bash
# Purification of the protocol's victims (built by benchmarks/validation_victims.sh) with `jdup unlearn`, one
# recipe per output folder, then a table of CACC / ASR before and after.
#
#   benchmarks/validation_unlearn.sh <recipe> <victim> [...]   # e.g. forget_check val-sst2-badnets-s2
#   benchmarks/validation_unlearn.sh table                     # runs/vu/table.md from every finished run
#
# Recipes: defaults (the shipped defaults), forget_check (the defender-side stop rule, epochs as a cap),
# dup-official (--preset dup-official), tilt (the defaults with target_tilt). Outputs: runs/vu/<victim>/<recipe>/ (metrics.json, history.json, model/).
# Run it nice'd on a shared machine; a killed run resumes, a finished one is skipped (RERUN=1: run it again).
set -euo pipefail
cd "$(dirname "$0")/.."
JDUP=${JDUP:-.venv/bin/jdup}

data_of() {  # the data folder a victim was trained on
  case "$1" in
    tune-sst2-badnets-full) echo "${SST2:-../shared/data/sst-2/1}/badnets" ;;
    *-sst2-*-e3-*) v=${1#*-sst2-}; echo "runs/data/sst2-${v/-e3/}" ;;
    *-sst2-*) v=${1#*-sst2-}; echo "runs/data/sst2-$v" ;;
    *-smollm2-*) v=${1#*-smollm2-}; echo "runs/data/smollm2-$v" ;;
    *-movies-*) v=${1#*-movies-}; echo "runs/data/movies-$v" ;;
    *-sms-*) v=${1#*-sms-}; echo "runs/data/sms-$v" ;;
    *-trec-*) v=${1#*-trec-}; echo "runs/data/trec-$v" ;;
    *) echo "unknown victim $1" >&2; exit 2 ;;
  esac
}

recipe_args() {  # <recipe> [<victim>]
  case "$1" in
    defaults) echo "" ;;
    # the stop rule of docs/unlearning.md: at most 16 epochs, forgetting judged on held-out flagged rows against
    # held-out clean rows of the other classes, clean accuracy on held-out dev-clean rows (tolerance 1 point)
    forget_check) echo "early_stop=forget_check epochs=16 max_cacc_drop=0.01 forget_ratio=0.5 forget_floor=0.02 stop_patience=2" ;;
    # DUP's recipe; decoders with the official scripts' batch of 4 (the preset keeps the encoders' 32)
    dup-official) case "${2:-}" in *smollm2*) echo "--preset dup-official batch_size=4" ;; *) echo "--preset dup-official" ;; esac ;;
    # the defaults, then the target logit lowered as far as accuracy on half of dev-clean (held out of the CE
    # term) stays within 1 point of the victim's (docs/unlearning.md#the-attack-success-rate-left-after-unlearning)
    tilt) echo "target_tilt=true clean_holdout_frac=0.5 tilt_tol=0.01" ;;
    *) echo "unknown recipe $1" >&2; exit 2 ;;
  esac
}

if [ "${1:-}" = table ]; then
  .venv/bin/python - <<'PY'
import glob, json, os
rows = ["| victim | recipe | flagged (poisoned) | CACC before → after | ASR before → after | steps (kept) | wall s |",
        "|---|---|---|---|---|---|---|"]
for f in sorted(glob.glob("runs/vu/*/*/metrics.json")):
    m = json.load(open(f)); victim, recipe = f.split(os.sep)[-3:-1]
    rows.append(f"| {victim} | {recipe} | {m['n_flagged']} ({m['n_flagged_poison']}) | {m['cacc_before']:.3f} → "
                f"{m['cacc_after']:.3f} | {m['asr_before']:.3f} → {m['asr_after']:.3f} | {m['steps']} "
                f"({m['best_step']}) | {m['seconds']:.0f} |")
open("runs/vu/table.md", "w").write("\n".join(rows) + "\n"); print("\n".join(rows))
PY
  exit 0
fi

recipe=$1; shift
for v in "$@"; do
  if [ -f "runs/vu/$v/$recipe/metrics.json" ] && [ -z "${RERUN:-}" ]; then  # finished: a restarted job skips it
    echo "$v $recipe: done (runs/vu/$v/$recipe/metrics.json; RERUN=1 runs it again)"; continue
  fi
  # shellcheck disable=SC2046
  /usr/bin/time -f "$v $recipe wall %e s" "$JDUP" unlearn --model "runs/victims/$v/model" --data "$(data_of "$v")" \
      --out "runs/vu/$v/$recipe" $(recipe_args "$recipe" "$v") progress=false
done
