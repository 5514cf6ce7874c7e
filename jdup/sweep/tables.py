"""The tables of ``jdup report`` (:mod:`jdup.sweep.report`): records of ``results.jsonl`` grouped into settings
with ``mean ± std`` over seeds, the detection and purification tables for the results docs, the run facts, and
their CSV / Markdown text. Pure functions of the records (and of ``invocations.jsonl`` for the run facts).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Metrics summarised (key in the result line -> column label), in table order.
METRICS: tuple[tuple[str, str], ...] = (
    ("cacc_before", "CACC before"),
    ("asr_before", "ASR before"),
    ("cacc_after", "CACC after"),
    ("asr_after", "ASR after"),
    ("ra_before", "RA before"),
    ("ra_after", "RA after"),
    ("auroc", "AUROC"),
    ("frr", "FRR"),
    ("far", "FAR"),
    ("n_flagged", "flagged"),
    ("seconds", "time (s)"),
)

#: Columns of the detection table (one row per attack x detector; test-detect metrics, dev-detect flags).
DETECTION_METRICS: tuple[tuple[str, str], ...] = (
    ("auroc", "AUROC"),
    ("frr", "FRR"),
    ("far", "FAR"),
    ("n_flagged", "flagged (dev)"),
    ("n_flagged_poison", "poison flagged (dev)"),
    ("detect_seconds", "time (s)"),
)

#: Columns of the purification table (one row per attack x unlearning setting).
PURIFICATION_METRICS: tuple[tuple[str, str], ...] = (
    ("cacc_before", "CACC before"),
    ("asr_before", "ASR before"),
    ("ra_before", "RA before"),
    ("cacc_after", "CACC after"),
    ("asr_after", "ASR after"),
    ("ra_after", "RA after"),
    ("asr_trigger_after", "trigger ASR after"),
    ("steps", "steps"),
    ("seconds", "time (s)"),
)

_COUNTS = ("n_flagged", "n_flagged_poison", "steps")

#: Axis keys that describe the threat (data) or the victim, not the defence method.
_DATA_MODEL_PREFIXES = ("data.", "model.", "tags.")


def metric_value(rec: Mapping, key: str) -> float | None:
    """A number of a result line: ``time.<key>`` for a ``*seconds`` key, else ``metrics.<key>`` (``None`` if absent
    or not a number)."""
    v = rec.get("time", {}).get(key) if key.endswith("seconds") else rec.get("metrics", {}).get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _fmt_point(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_fmt_point(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and os.sep in v:
        return os.path.basename(v.rstrip(os.sep)) or v
    return str(v)


def _tag(rec: Mapping, name: str) -> str | None:
    """The cell's ``tags.<name>`` as a string, or ``None`` when it has none (or an empty one)."""
    value = (rec.get("config", {}).get("tags") or {}).get(name)
    return str(value) if value else None


def attack_label(rec: Mapping) -> str:
    """``tags.attack``, else the data folder's name, else the data source."""
    if tag := _tag(rec, "attack"):
        return tag
    d = rec.get("config", {}).get("data", {})
    if d.get("dir"):
        return os.path.basename(str(d["dir"]).rstrip("/")) or str(d["dir"])
    return str(d.get("source", "?"))


def model_label(rec: Mapping) -> str:
    """``tags.model``, else the victim's (or base model's) name."""
    if tag := _tag(rec, "model"):
        return tag
    m = rec.get("config", {}).get("model", {})
    name = str(m.get("victim") or m.get("name") or "?")
    return os.path.basename(name.rstrip("/")) if "/" in name and not name.startswith("builtin:") else name


def method_label(rec: Mapping) -> str:
    """``tags.method``, else the defence settings of a cell: its axis values outside
    ``data.*``/``model.*``/``tags.*`` and ``seed``."""
    if tag := _tag(rec, "method"):
        return tag
    point = rec.get("point", {})
    parts = []
    for k, v in point.items():
        if k == "seed" or k.startswith(_DATA_MODEL_PREFIXES):
            continue
        if isinstance(v, Mapping):
            if all(str(x).startswith(_DATA_MODEL_PREFIXES) or x == "seed" for x in v):
                continue
            v = {x: y for x, y in v.items() if not str(x).startswith(_DATA_MODEL_PREFIXES) and x != "seed"}
        parts.append(f"{k.split('.')[-1]}={_fmt_point(v)}")
    return ", ".join(parts) or "default"


def _setting(rec: Mapping) -> tuple[tuple[str, str], ...]:
    point = rec.get("point", {})
    return tuple((k, _fmt_point(v)) for k, v in point.items() if k != "seed")


def summarize(records: Sequence[Mapping]) -> tuple[list[str], list[dict]]:
    """Groups ok records by setting; returns ``(axis columns, rows)`` with ``mean``/``std``/``n`` per metric."""
    ok = [r for r in records if r.get("status") == "ok"]
    axes: list[str] = []
    for r in ok:
        for k in r.get("point", {}):
            if k != "seed" and k not in axes:
                axes.append(k)
    groups: dict[tuple, list[Mapping]] = {}
    for r in ok:
        groups.setdefault(_setting(r), []).append(r)
    rows = []
    for setting, recs in groups.items():
        row: dict[str, Any] = dict(setting)
        row["attack"] = attack_label(recs[0])
        row["model"] = model_label(recs[0])
        row["method"] = method_label(recs[0])
        row["n_seeds"] = len({json.dumps(r.get("seed")) for r in recs})
        row.update(_mean_std(recs, METRICS))
        rows.append(row)
    return axes, rows


def _mean_std(recs: Sequence[Mapping], metrics: Sequence[tuple[str, str]]) -> dict:
    """``<key>_mean`` / ``<key>_std`` over the records holding a number for ``key``.

    The std is the sample std (n - 1 in the denominator, as in the validation tables and most papers' "± over
    seeds"); one value has std 0.
    """
    out: dict[str, float | None] = {}
    for key, _ in metrics:
        vals = [v for v in (metric_value(r, key) for r in recs) if v is not None and not math.isnan(v)]
        out[f"{key}_mean"] = float(np.mean(vals)) if vals else None
        out[f"{key}_std"] = (float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0) if vals else None
    return out


def detector_label(rec: Mapping) -> str:
    """``tags.detector``, else the cell's ``detect.method``."""
    return _tag(rec, "detector") or str((rec.get("config", {}).get("detect") or {}).get("method") or "dup")


def detection_rows(records: Sequence[Mapping]) -> list[dict]:
    """One row per distinct detector setting (attack x model x detect config, the calibration split aside), in
    record order: mean ± std over the distinct detections (one per calibration split seed,
    ``metrics.detect_split_seed``), however many cells shared each. Detection-only cells (``unlearn.enabled:
    false``) and unlearning cells count alike, so a detector measured by both is one row."""
    groups: dict[str, list[Mapping]] = {}
    for r in records:
        m = r.get("metrics", {})
        if r.get("status") != "ok" or ("auroc" not in m and "n_flagged" not in m):
            continue
        cfg = r.get("config", {})
        det = {k: v for k, v in (cfg.get("detect") or {}).items() if k != "split_seed"}
        key = json.dumps([cfg.get("data"), cfg.get("model"), det], sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    rows = []
    for recs in groups.values():
        distinct: dict[str, Mapping] = {}
        for r in recs:
            split = r.get("metrics", {}).get("detect_split_seed", r.get("seed"))
            distinct.setdefault(json.dumps(split), r)
        labelled = next((r for r in recs if _tag(r, "detector")), recs[0])
        row: dict[str, Any] = {
            "attack": attack_label(recs[0]),
            "model": model_label(recs[0]),
            "detector": detector_label(labelled),
            "n_seeds": len(distinct),
            "_detect": (recs[0].get("config", {}).get("detect") or {}),
        }
        row.update(_mean_std(list(distinct.values()), DETECTION_METRICS))
        rows.append(row)
    _disambiguate(rows)
    return rows


def _disambiguate(rows: list[dict]) -> None:
    """Rows of one attack and model with the same detector label get the detect keys in which they differ."""
    by_label: dict[tuple, list[dict]] = {}
    for r in rows:
        by_label.setdefault((r["attack"], r["model"], r["detector"]), []).append(r)
    for same in by_label.values():
        if len(same) > 1:
            first = same[0]["_detect"]
            every = {k for r in same for k in r["_detect"]}
            keys = sorted(k for k in every if any(r["_detect"].get(k) != first.get(k) for r in same))
            for i, r in enumerate(same):
                diff = ", ".join(f"{k}={_fmt_point(r['_detect'].get(k))}" for k in keys)
                r["detector"] += f" ({diff})" if diff else f" #{i + 1}"
    for r in rows:
        r.pop("_detect", None)


def purification_rows(records: Sequence[Mapping]) -> list[dict]:
    """One row per setting (all axis values but ``seed``) of the cells that unlearned (``cacc_after`` present):
    attack, model, method (``tags.method`` or the defence axis values; ``(k collapsed)`` appended when the
    collapse guard returned an earlier state in k of its cells), mean ± std over seeds."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in records:
        if r.get("status") == "ok" and metric_value(r, "cacc_after") is not None:
            groups.setdefault(_setting(r), []).append(r)
    rows = []
    for recs in groups.values():
        collapsed = sum(bool(r.get("metrics", {}).get("collapsed")) for r in recs)
        row: dict[str, Any] = {
            "attack": attack_label(recs[0]),
            "model": model_label(recs[0]),
            # the collapse guard returned an earlier state in this many cells (jdup.unlearn.guard)
            "method": method_label(recs[0]) + (f" ({collapsed} collapsed)" if collapsed else ""),
            "n_seeds": len({json.dumps(r.get("seed")) for r in recs}),
        }
        row.update(_mean_std(recs, PURIFICATION_METRICS))
        rows.append(row)
    return rows


def _table(rows: Sequence[Mapping], labels: Sequence[str], metrics: Sequence[tuple[str, str]]) -> list[str]:
    """Markdown lines: label columns (``model`` only when rows name more than one), ``seeds``, ``mean ± std``."""
    labels = [c for c in labels if c != "model" or len({r.get("model") for r in rows}) > 1]
    shown = [(k, h) for k, h in metrics if any(r.get(f"{k}_mean") is not None for r in rows)]
    head = list(labels) + ["seeds"] + [h for _, h in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(c, "")) for c in labels] + [str(r["n_seeds"])]
        for k, _ in shown:
            m, sd = r.get(f"{k}_mean"), r.get(f"{k}_std")
            cells.append("–" if m is None else f"{_num(m, k)} ± {_num(sd, k)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def read_invocations(sweep_dir: str) -> list[dict]:
    """The lines of ``<sweep_dir>/invocations.jsonl`` (one per ``jdup sweep`` run that ran cells)."""
    path = os.path.join(sweep_dir, "invocations.jsonl")
    out: list[dict] = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    return out


def run_lines(records: Sequence[Mapping], invocations: Sequence[Mapping], sweep_dir: str) -> list[str]:
    """Markdown bullets: the command(s), the machine(s), the versions, the wall time and the cell counts."""
    lines = []
    commands = list(dict.fromkeys(str(i["command"]) for i in invocations if i.get("command")))
    if commands:
        shown = ", ".join(f"`{c}`" for c in commands)
        lines.append(f"- **Command:** {shown}, then `jdup report {sweep_dir}`")
    machines = []
    for i in invocations:
        m = i.get("machine") or {}
        if not m:
            continue
        cores = m.get("cpus_usable") or m.get("cpu_count")
        desc = f"{m.get('host', '?')}: {m.get('cpu') or 'CPU model not recorded'}, {cores} cores"
        if m.get("memory_gb"):
            desc += f", {m['memory_gb']:g} GB"
        if desc not in machines:
            machines.append(desc)
    if machines:
        loads = [(i.get("machine") or {}).get("load_1min") for i in invocations]
        loads += [i.get("load_1min_end") for i in invocations]
        loads = [float(x) for x in loads if isinstance(x, (int, float))]
        load = f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f}" if loads else ""
        lines.append(f"- **Machine:** {'; '.join(machines)}{load}")
    v = next((r.get("versions") for r in records if r.get("versions")), None) or {}
    if v:
        keys = ("jdup", "jax", "jaxlib", "flax", "optax", "python")
        soft = ", ".join(f"{k} {v[k]}" for k in keys if v.get(k))
        lines.append(
            f"- **Software:** {soft}; backend {v.get('backend', '?')}, {v.get('devices', '?')} device(s)"
        )
    if invocations:
        wall = sum(float(i.get("seconds") or 0.0) for i in invocations)
        dates = sorted(str(i.get(k)) for i in invocations for k in ("started_at", "finished_at") if i.get(k))
        span = f", {dates[0][:16]} to {dates[-1][:16]}" if dates else ""
        lines.append(f"- **Wall time:** {_duration(wall)} over {len(invocations)} invocation(s){span}")
    cell_total = sum(metric_value(r, "seconds") or 0.0 for r in records)
    if records:
        failed = sum(1 for r in records if r.get("status") != "ok")
        lines.append(
            f"- **Cells:** {len(records)} ({failed} failed); sum of the cells' times {_duration(cell_total)}"
        )
    return lines


def results_markdown(records: Sequence[Mapping], sweep_dir: str) -> str:
    """The run facts and the two tables meant for the results docs: detection per attack x detector (test-detect
    AUROC/FRR/FAR, flags on dev-detect) and purification per attack x method (CACC/ASR/RA before and after), each
    ``mean ± std`` over seeds."""
    lines = run_lines(records, read_invocations(sweep_dir), sweep_dir)
    det = detection_rows(records)
    if det:
        lines += ["", "### Detection (AUROC/FRR/FAR on test-detect; flags on dev-detect)", ""]
        lines += _table(det, ("attack", "model", "detector"), DETECTION_METRICS)
    pur = purification_rows(records)
    if pur:
        lines += ["", "### Purification (test-clean CACC, test-poison ASR and RA)", ""]
        lines += _table(pur, ("attack", "model", "method"), PURIFICATION_METRICS)
    return "\n".join(lines) + "\n" if lines else ""


def _num(v: float | None, key: str) -> str:
    if v is None:
        return "–"
    if key.endswith("seconds"):
        return f"{v:.1f}"
    if key in _COUNTS:
        return f"{v:.0f}"
    return f"{v:.3f}"


def to_csv(axes: Sequence[str], rows: Sequence[Mapping]) -> str:
    """CSV text: axis columns, labels, ``n_seeds``, then ``<metric>_mean``/``<metric>_std``."""
    cols = list(axes) + ["attack", "model", "method", "n_seeds"]
    cols += [f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return buf.getvalue()


def to_markdown(
    axes: Sequence[str],
    rows: Sequence[Mapping],
    failures: Sequence[Mapping] = (),
    title: str = "",
    results: str = "",
) -> str:
    """Markdown table with ``mean ± std`` cells, then a list of failed cells (id, point, error). ``results``
    (:func:`results_markdown`) goes first, and the table then comes under "All settings"."""
    shown = [k for k, _ in METRICS if any(r.get(f"{k}_mean") is not None for r in rows)]
    head = list(axes) + ["seeds"] + [dict(METRICS)[k] for k in shown]
    lines = [f"# {title}", ""] if title else []
    if results:
        lines += [results.rstrip("\n"), "", "## All settings", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(a, "")) for a in axes] + [str(r["n_seeds"])]
        for k in shown:
            m, s = r.get(f"{k}_mean"), r.get(f"{k}_std")
            cells.append("–" if m is None else f"{_num(m, k)} ± {_num(s, k)}")
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", f"## Failed cells ({len(failures)})", ""]
        for f in failures:
            err = str(f.get("error", "")).splitlines()[0][:200] if f.get("error") else "?"
            lines.append(f"- `{f['id']}` {json.dumps(f.get('point', {}), default=str)}: {err}")
    return "\n".join(lines) + "\n"
