"""The validation table of docs/protocol.md from finished runs: mean ± std over the seeds of each victim group.

Reads what benchmarks/validation_victims.sh, benchmarks/validation_unlearn.sh and the detection commands of
docs/protocol.md wrote under runs/ (git-ignored):

* ``runs/victims/<victim>/metrics.json``: the victim (its training seconds);
* ``runs/vd/<victim>/<recipe>/detection.json``: ``jdup detect`` on test-detect (``default`` or ``dup-official``);
* ``runs/vu/<victim>/<recipe>/metrics.json``: ``jdup unlearn`` (CACC / ASR before and after, and the trigger ASR
  after: the share of paired test rows the trigger alone sends to the target, empty for runs that did not record it;
  a run whose last epoch collapsed, where the collapse guard returned an earlier state, says so in its steps cell).

A victim is named ``<set>-<dataset>-<attack>-s<seed>`` (``val-sst2-badnets-s3``); the group is everything but the
seed. Prints one Markdown row per group and recipe, the per-victim rows under it, and writes the same to
``runs/validation.md`` (``--out``). Only measured runs appear; a group with fewer than 3 seeds says so.

    python benchmarks/validation_table.py [--runs runs] [--prefix val-] [--out runs/validation.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

NAME = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ms(values: list[float], fmt: str = ".3f") -> str:
    """``mean ± std`` (sample std; one value: the value alone)."""
    if not values:
        return ""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def collect(runs: Path, prefix: str) -> dict[str, dict[int, dict]]:
    """``{group: {seed: {"detect": {recipe: record}, "unlearn": {recipe: metrics}}}}`` of the finished runs."""
    out: dict[str, dict[int, dict]] = {}
    names = {p.name for p in (runs / "vu").glob(f"{prefix}*")} | {p.name for p in (runs / "vd").glob(f"{prefix}*")}
    for name in sorted(names):
        m = NAME.match(name)
        if not m:
            continue
        entry = {"detect": {}, "unlearn": {}}
        for p in sorted((runs / "vd" / name).glob("*/detection.json")):
            if (rec := _load(p)) is not None:
                entry["detect"][p.parent.name] = rec
        for p in sorted((runs / "vu" / name).glob("*/metrics.json")):
            if (rec := _load(p)) is not None:
                entry["unlearn"][p.parent.name] = rec
        out.setdefault(m["group"], {})[int(m["seed"])] = entry
    return out


def rows(groups: dict[str, dict[int, dict]], recipes: tuple[str, ...] = ("defaults", "dup-official")) -> list[str]:
    lines = [
        "| victims (seeds) | recipe | detector AUROC, test-detect | ASR before → after | CACC before → after | "
        "CACC change (points) | ASR ≤ 0.05 and drop ≤ 1 pt |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, seeds in groups.items():
        for recipe in recipes:
            det_key = "default" if recipe == "defaults" else recipe
            done = {s: e for s, e in seeds.items() if recipe in e["unlearn"] or det_key in e["detect"]}
            if not done:
                continue
            auroc = [e["detect"][det_key]["auroc"] for e in done.values()
                     if det_key in e["detect"] and e["detect"][det_key].get("auroc") is not None]
            un = [e["unlearn"][recipe] for e in done.values() if recipe in e["unlearn"]]
            asr_b, asr_a = [u["asr_before"] for u in un], [u["asr_after"] for u in un]
            cacc_b, cacc_a = [u["cacc_before"] for u in un], [u["cacc_after"] for u in un]
            change = [100 * (a - b) for a, b in zip(cacc_a, cacc_b, strict=True)]
            ok = sum(a <= 0.05 and c >= -1.0 for a, c in zip(asr_a, change, strict=True))
            n_seeds = sorted(done)
            label = f"{group} ({', '.join(map(str, n_seeds))})" + ("" if len(n_seeds) >= 3 else ": < 3 seeds")
            lines.append(
                f"| {label} | {recipe} | {_ms(auroc, '.4f')} | {_ms(asr_b)} → {_ms(asr_a)} | {_ms(cacc_b)} → "
                f"{_ms(cacc_a)} | {_ms(change, '+.1f')} | {ok} of {len(un)} |"
            )
    return lines


def victim_rows(groups: dict[str, dict[int, dict]]) -> list[str]:
    lines = [
        "| victim | recipe | AUROC | flagged (poisoned) | CACC before → after | ASR before → after | trigger ASR after "
        "| steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, seeds in groups.items():
        for seed, e in sorted(seeds.items()):
            for recipe, u in e["unlearn"].items():
                det = e["detect"].get("default" if recipe == "defaults" else recipe, {})
                auroc, trig = det.get("auroc"), u.get("asr_trigger_after")  # trig: None before it was recorded
                steps = f"{u['steps']}" + (f" (collapsed: step {u['best_step']} kept)" if u.get("collapsed") else "")
                lines.append(
                    f"| {group}-s{seed} | {recipe} | {'' if auroc is None else format(auroc, '.4f')} | "
                    f"{u['n_flagged']} ({u['n_flagged_poison']}) | {u['cacc_before']:.3f} → {u['cacc_after']:.3f} | "
                    f"{u['asr_before']:.3f} → {u['asr_after']:.3f} | {'' if trig is None else format(trig, '.3f')} | "
                    f"{steps} | {u['seconds']:.0f} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs", type=Path)
    ap.add_argument("--prefix", default="val-", help="victim name prefix (val- = the validation set)")
    ap.add_argument("--out", default=None, type=Path, help="Markdown file (default: <runs>/validation.md)")
    ap.add_argument("--recipes", default="defaults,dup-official")
    args = ap.parse_args(argv)
    groups = collect(args.runs, args.prefix)
    text = "\n".join([*rows(groups, tuple(args.recipes.split(","))), "", *victim_rows(groups)]) + "\n"
    out = args.out or args.runs / "validation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
