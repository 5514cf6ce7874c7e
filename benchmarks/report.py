"""Turn benchmark JSON lines into the README table (Markdown) and a bar chart of per-stage times.

python benchmarks/report.py benchmarks/results/cpu.jsonl          # writes cpu.md and cpu.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {  # issue 7 / 15 targets (CPU, 2 cores, MiniLM victim, SST-2 test-detect)
    "detect": 5.0,  # jdup >= 5x faster end to end
    "unlearn": 2.0,  # jdup >= 2x faster per epoch
    "forward": 1.2,  # jdup time within 1.2x of torch
    "auroc": 0.005,  # |AUROC difference|
    "cli_detect_repeat": 1.3,  # second `jdup detect` process within 1.3x of the warm in-process time
    "cli_detect_first": 1.6,  # first one (empty compilation cache) within 1.6x
    "cli_unlearn": 2.0,  # `jdup unlearn` >= 2x faster than the reference end to end (fresh processes)
}



def _official(rec: dict) -> str:
    """How a record names the official checkout it timed: its commit, else "checkout" (an archive has none)."""
    commit = rec.get("official", {}).get("commit")
    return f"commit {commit}" if commit else "checkout"

def load(path: str | Path) -> dict[str, dict]:
    """The last record of each kind (``detect``, ``detect_memory``, ``unlearn_epoch``, ``forward``, ``cli_*``)."""
    out: dict[str, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip().startswith("{"):
            rec = json.loads(line)
            out[rec.get("bench", "?")] = rec
    return out


def _f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _mfu_ratio(rec: dict | None) -> str:
    """`` (÷ peaks: X×)``: the speed-up with both frameworks' measured matmul peaks divided out."""
    n = (rec or {}).get("normalised") or {}
    return f" (÷ peaks: {n['mfu_ratio']:.2f}×)" if n.get("mfu_ratio") else ""


def _ok(value: float, target: float, higher: bool) -> str:
    return "✅" if (value >= target if higher else value <= target) else "❌"


def cli_rows(recs: dict[str, dict]) -> list[str]:
    """User-level rows: fresh-process CLI calls (first with an empty compilation cache, then repeated)."""
    rows = []
    d = recs.get("cli_detect")
    if d and "summary" in d:
        s = d["summary"]
        tf, tr = s["torch_first_s"], s["torch_repeat_s"]
        rows.append(
            f"| detection as a user runs it: fresh `jdup detect` process, first call (empty compilation cache), s | "
            f"{_f(s['jdup_first_s'], 1)} | {_f(tf, 1)} | {tf / s['jdup_first_s']:.2f}×"
            f"{_mfu_ratio({'normalised': d['normalised']['first']})} | |"
        )
        if s.get("jdup_repeat_s"):
            rows.append(
                f"| · repeat call (warm compilation cache), s | {_f(s['jdup_repeat_s'], 1)} | {_f(tr, 1)} | "
                f"{tr / s['jdup_repeat_s']:.2f}×{_mfu_ratio({'normalised': d['normalised']['repeat']})} | |"
            )
        for label, key, okey in (("first", "jdup_first_s", "official_first_s"),
                                 ("repeat", "jdup_repeat_s", "official_repeat_s")):
            if s.get(okey) and s.get(key):
                n = d["normalised"].get(f"official_{label}") or {}
                rows.append(
                    f"| · against the official DUP process ({_official(d)}), {label} call, s | "
                    f"{_f(s[key], 1)} | {_f(s[okey], 1)} (official) | {s[okey] / s[key]:.2f}×{_mfu_ratio({'normalised': n})}"
                    f" | ≥ {4 if label == 'first' else 5}× {_ok(s[okey] / s[key], 4 if label == 'first' else 5, True)} |"
                )
        w = s.get("jdup_warm_inprocess_s")
        if w:
            rows.append(f"| · jdup warm, inside one process (same run), s | {_f(w, 1)} | | | |")
            for key, name in (("cli_detect_first", "jdup_first_s"), ("cli_detect_repeat", "jdup_repeat_s")):
                if s.get(name):
                    v = s[name] / w
                    label = "first" if key.endswith("first") else "repeat"
                    rows.append(
                        f"| · jdup {label} call ÷ warm in-process time | ×{v:.2f} | | | ≤ {TARGETS[key]}× "
                        f"{_ok(v, TARGETS[key], False)} |"
                    )
    u = recs.get("cli_unlearn")
    if u and "summary" in u:
        s = u["summary"]
        tf = s["torch_first_s"]
        for label, key in (("first", "jdup_first_s"), ("repeat", "jdup_repeat_s")):
            if s.get("official_first_s") and s.get(key):  # the official process runs once (no cache to warm)
                sp = s["official_first_s"] / s[key]
                rows.append(
                    f"| unlearning against the official DUP process ({_official(u)}; jdup "
                    f"{'without' if 'evaluate_before=false' in u.get('jdup_settings', []) else 'with'} the victim's "
                    f"evaluation, as the official process), {label} call, s | "
                    f"{_f(s[key], 1)} | {_f(s['official_first_s'], 1)} (official) | "
                    f"{sp:.2f}×{_mfu_ratio({'normalised': u['normalised'].get(f'official_{label}') or {}})} | ≥ 2× "
                    f"{_ok(sp, 2.0, True)} |"
                )
        for label, key in (("first call (empty cache)", "jdup_first_s"), ("repeat call", "jdup_repeat_s")):
            if s.get(key):
                sp = tf / s[key]
                norm = u["normalised"]["first" if key == "jdup_first_s" else "repeat"]
                rows.append(
                    f"| unlearning as a user runs it (`jdup unlearn` = detect + 5 epochs + evaluate + export, fresh "
                    f"process), {label}, s | {_f(s[key], 1)} | {_f(tf, 1)} | {sp:.2f}×{_mfu_ratio({'normalised': norm})}"
                    f" | ≥ {TARGETS['cli_unlearn']:.0f}× {_ok(sp, TARGETS['cli_unlearn'], True)} |"
                )
        dc = (u.get("jdup_defaults") or {}).get("calls") or []
        if dc and dc[0].get("rc") == 0:
            out = dc[0].get("output") or {}
            rows.append(
                f"| `jdup unlearn` with jdup's defaults (evaluation before and after; after the calls above, so the "
                f"forward programs come from the cache and the defaults' own step is compiled), s | "
                f"{_f(dc[0]['wall_s'], 1)} | | CACC {_f(out.get('cacc_after'), 3)}, ASR {_f(out.get('asr_after'), 3)}"
                f" | — |"
            )
    return rows


def table(recs: dict[str, dict]) -> str:
    """Markdown table: figure, jdup, reference, ratio (and the ratio with both matmul peaks divided out), target."""
    rows = [
        "| figure | jdup | PyTorch reference | jdup advantage (÷ peaks: MFU ratio) | target |",
        "|---|---|---|---|---|",
    ]
    d = recs.get("detect")
    if d and "jdup" in d and "torch" in d:
        j, t = d["jdup"], d["torch"]
        sp = t["total"]["median"] / j["total"]["median"]
        rows.append(
            f"| detection end to end, s (median of {j['total']['n']}; {j['rows_scored']} scored rows) | "
            f"{_f(j['total']['median'])} | {_f(t['total']['median'])} | {sp:.2f}×{_mfu_ratio(d)} | ≥ {TARGETS['detect']:.0f}× "
            f"{'✅' if sp >= TARGETS['detect'] else '❌'} |"
        )
        if "total_excl_compile" in j:
            sp2 = t["total"]["min"] / j["total_excl_compile"]["min"]
            rows.append(
                f"| detection, s, min, jdup minus in-run JAX compile time | {_f(j['total_excl_compile']['min'])} | "
                f"{_f(t['total']['min'])} | {sp2:.2f}× | |"
            )
        for st in ("calibration", "fits", "scoring", "decide"):
            a, b = j["stages"][st]["median"], t["stages"][st]["median"]
            rows.append(f"| · stage {st}, s | {_f(a)} | {_f(b)} | {b / a if a else float('inf'):.1f}× | |")
        diff = abs(j["auroc"] - t["auroc"])
        rows.append(
            f"| detection AUROC | {_f(j['auroc'], 4)} | {_f(t['auroc'], 4)} | Δ = {diff:.4f} | ≤ {TARGETS['auroc']} "
            f"{'✅' if diff <= TARGETS['auroc'] else '❌'} |"
        )
        rows.append(
            f"| detection samples/s | {_f(j['samples_per_s'], 1)} | {_f(t['samples_per_s'], 1)} | | |"
        )
        rows.append(
            f"| detection MFU (own fp32 matmul peak) | {_f(100 * j['mfu'], 1)} % | {_f(100 * t['mfu'], 1)} % | | |"
        )
        rows.append(
            f"| detection peak RSS, MiB | {_f(j['peak_rss_mb'], 0)} | {_f(t['peak_rss_mb'], 0)} | | |"
        )
        n_comp = f" ({j['compiles_warmup']} compilations)" if "compiles_warmup" in j else ""
        rows.append(f"| jdup compile time (warm-up run), s{n_comp} | {_f(j['compile_s'])} | — | | |")
        if "warmup_s" in j:
            cold = j["warmup_s"]
            rows.append(
                f"| jdup first (cold) detection incl. compilation, s | {_f(cold)} | {_f(t['total']['median'])} | "
                f"{t['total']['median'] / cold:.2f}× | |"
            )
    pf = recs.get("detect_faithful")
    if pf and "jdup" in pf and d and "torch" in d:
        diff = abs(pf["jdup"]["auroc"] - d["torch"]["auroc"])
        rows.append(
            f"| detection AUROC, jdup faithful mode (float64 fit, SVD spectral) | {_f(pf['jdup']['auroc'], 4)} | "
            f"{_f(d['torch']['auroc'], 4)} | Δ = {diff:.4f} | ≤ {TARGETS['auroc']} {'✅' if diff <= TARGETS['auroc'] else '❌'} |"
        )
    m = recs.get("detect_memory")
    if m:
        mem = m["memory"]
        for impl in ("jdup", "torch"):
            if f"{impl}_x1" in mem:
                a, b = mem[f"{impl}_x1"], mem[f"{impl}_x4"]
                rows.append(
                    f"| {impl} detection peak RSS, MiB: {a['rows_scored']} → {b['rows_scored']} rows | "
                    f"{_f(a['peak_rss_mb'], 0)} → {_f(b['peak_rss_mb'], 0)} | | ×{b['peak_rss_mb'] / a['peak_rss_mb']:.2f} | "
                    f"{'flat' if impl == 'jdup' else ''} |"
                )
    u = recs.get("unlearn_epoch")
    if u and "jdup" in u and "torch" in u:
        j, t = u["jdup"], u["torch"]
        a, b = j["stages"]["train_steps"]["median"], t["stages"]["train_steps"]["median"]
        rows.append(
            f"| unlearning epoch, train steps, s ({j['steps']} steps × 2×{u['config']['batch_size']} rows) | {_f(a)} | "
            f"{_f(b)} | {b / a:.2f}×{_mfu_ratio(u)} | ≥ {TARGETS['unlearn']:.0f}× {'✅' if b / a >= TARGETS['unlearn'] else '❌'} |"
        )
        a2, b2 = j["total"]["median"], t["total"]["median"]
        rows.append(
            f"| unlearning epoch incl. teacher logits, LoRA set-up, merge, s | {_f(a2)} | {_f(b2)} | {b2 / a2:.2f}× | |"
        )
        rows.append(f"| unlearning MFU | {_f(100 * j['mfu'], 1)} % | {_f(100 * t['mfu'], 1)} % | | |")
    f = recs.get("forward")
    if f and "jdup" in f and "torch" in f:
        for shape, r in f["ratio"].items():
            jt = f["jdup"]["shapes"][shape]["batch_s"]["median"] * 1000
            tt = f["torch"]["shapes"][shape]["batch_s"]["median"] * 1000
            ok = r["jdup_over_torch_time_median"] <= TARGETS["forward"]
            rows.append(
                f"| encoder forward {shape}, ms/batch (MFU) | {jt:.1f} ({100 * r['mfu_jdup']:.0f} %) | "
                f"{tt:.1f} ({100 * r['mfu_torch']:.0f} %) | time ×{r['jdup_over_torch_time_median']:.2f}"
                f"{_mfu_ratio({'normalised': (f.get('normalised') or {}).get(shape)})} | "
                f"≤ {TARGETS['forward']}× {'✅' if ok else '❌'} |"
            )
    rows += cli_rows(recs)
    for name, r in recs.items():  # both peaks of every record (they differ between runs on a busy machine)
        p = r.get("peaks") or {}
        if not p and isinstance(r.get("jdup"), dict) and isinstance(r.get("torch"), dict):  # older records
            pj, pt = r["jdup"].get("peak") or {}, r["torch"].get("peak") or {}
            if pj.get("flops_per_s") and pt.get("flops_per_s"):
                j, t = pj["flops_per_s"] / 1e9, pt["flops_per_s"] / 1e9
                p = {"jax_gflops": j, "torch_gflops": t, "jax_over_torch": j / t}
        if p.get("jax_gflops") and p.get("torch_gflops"):
            rows.append(
                f"| measured fp32 2048² matmul peak in the `{name}` run, GFLOP/s | {p['jax_gflops']:.0f} (jax) | "
                f"{p['torch_gflops']:.0f} (torch) | jax/torch {p['jax_over_torch']:.2f} | |"
            )
    return "\n".join(rows)


def machine_line(recs: dict[str, dict]) -> str:
    cpus = [x["machine"]["cpu"] for x in recs.values()]
    main_cpu = max(set(cpus), key=cpus.count)  # records may be merged from runs on different machines
    r = next(x for x in recs.values() if x["machine"]["cpu"] == main_cpu)
    m, v = r["machine"], r["versions"]
    loads = ", ".join(f"{k} {x['machine']['loadavg'][0]:.1f}" for k, x in recs.items())
    line = (
        f"{m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB RAM, shared with other jobs (1-min load average at the "
        f"start of each benchmark: {loads}); "
        f"jax {v.get('jax')}, flax {v.get('flax')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}; commit {r.get('commit')}"
    )
    cpus = {(x["machine"]["cpu"], x.get("commit")) for x in recs.values()}
    if len(cpus) > 1:  # records merged from different runs: say which machine and commit gave each
        per = "; ".join(f"{k}: {x['machine']['cpu']}, commit {x.get('commit')}" for k, x in recs.items())
        line += f". **Records from different runs** ({per})"
    return line


def plot(recs: dict[str, dict], out: str | Path) -> Path:
    """Grouped bars (jdup vs reference) of per-stage median times for detection, unlearning and forward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    d = recs.get("detect")
    if d and "jdup" in d and "torch" in d:
        st = ["calibration", "fits", "scoring", "decide"]
        panels.append(("detection (s)", st, [d["jdup"]["stages"][s]["median"] for s in st],
                       [d["torch"]["stages"][s]["median"] for s in st]))  # fmt: skip
    u = recs.get("unlearn_epoch")
    if u and "jdup" in u and "torch" in u:
        st = ["prepare", "setup", "train_steps", "merge"]
        panels.append(("one unlearning epoch (s)", st, [u["jdup"]["stages"][s]["median"] for s in st],
                       [u["torch"]["stages"][s]["median"] for s in st]))  # fmt: skip
    f = recs.get("forward")
    if f and "jdup" in f and "torch" in f:
        sh = list(f["torch"]["shapes"])
        panels.append(("encoder forward (ms / batch)", sh,
                       [1000 * f["jdup"]["shapes"][s]["batch_s"]["median"] for s in sh],
                       [1000 * f["torch"]["shapes"][s]["batch_s"]["median"] for s in sh]))  # fmt: skip
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.8))
    axes = [axes] if len(panels) <= 1 else list(axes)
    for ax, (title, names, jv, tv) in zip(axes, panels, strict=False):
        x = range(len(names))
        w = 0.38
        ax.bar([i - w / 2 for i in x], jv, w, label="jdup (JAX)", color="#1f77b4")
        ax.bar([i + w / 2 for i in x], tv, w, label="PyTorch reference", color="#ff7f0e")
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    if panels:
        axes[0].legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0] if argv else Path(__file__).resolve().parent / "results" / "cpu.jsonl")
    recs = load(src)
    md = f"Machine: {machine_line(recs)}\n\n{table(recs)}\n"
    src.with_suffix(".md").write_text(md)
    plot(recs, src.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
