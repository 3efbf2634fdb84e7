#!/usr/bin/env python3
"""Tables and plots of the quality benchmark (benches/quality.sh).

    quality_report.py OUTDIR

Reads every OUTDIR/<recipe>/<dataset>/seed<s>/report/report.json and
OUTDIR/<recipe>/mnist/digit<d>-seed<s>/report/report.json written by
`ganomaly-train train`, and writes OUTDIR/quality.md, OUTDIR/quality.json and,
when matplotlib is importable, OUTDIR/quality_*.png.

Variants of one run (from its per-epoch history):
  raw/last  the last epoch's generator: the paper's reference training
  ema/last  the weight average after the last epoch
  raw/sel   the epoch with the lowest reconstruction error on held-out good images
  ema/sel   the same criterion on the weight average
No variant is ever chosen by test AUROC.
"""
import glob
import json
import os
import statistics
import sys

KINDS = ("latent", "recon", "map_max")
VARIANTS = ("raw/last", "ema/last", "raw/sel", "ema/sel")


def variant_figures(report):
    """{variant: ({kind: auroc}, {kind: {defect: auroc}}, epoch)} of one run."""
    hist = report["history"]
    out = {}
    for v in VARIANTS:
        src, how = v.split("/")
        auroc_key = "auroc" if src == "raw" else "auroc_ema"
        val_key = "recon" if src == "raw" else "recon_ema"
        rows = [h for h in hist if h.get(auroc_key)]
        if not rows:
            continue
        if how == "last":
            h = rows[-1]
        else:
            scored = [h for h in rows if val_key in h.get("val", {})]
            if not scored:
                continue
            h = min(scored, key=lambda h: h["val"][val_key])
        per_defect = h.get("per_defect", {}).get(src, {})
        out[v] = ({k: h[auroc_key][k] for k in KINDS}, per_defect, h["epoch"])
    return out


def collect(out):
    """rows[(recipe, dataset)][seed] = variant figures; dataset names carry the defect type."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "seed*", "report", "report.json"))):
        parts = path.split(os.sep)
        recipe, ds, seed = parts[-5], parts[-4], int(parts[-3][len("seed"):])
        figs = variant_figures(json.load(open(path)))
        # The pooled AUROC over all defect types, then one row per defect type.
        rows.setdefault((recipe, ds), {})[seed] = {v: f[0] for v, f in figs.items()}
        for v, (_, per_defect, _) in figs.items():
            for kind, by_defect in per_defect.items():
                for defect, a in by_defect.items():
                    rows.setdefault((recipe, f"{ds}/{defect}"), {}).setdefault(seed, {}).setdefault(v, {})[kind] = a
    for path in sorted(glob.glob(os.path.join(out, "*", "mnist", "digit*-seed*", "report", "report.json"))):
        parts = path.split(os.sep)
        recipe = parts[-5]
        d, s = parts[-3][len("digit"):].split("-seed")
        figs = variant_figures(json.load(open(path)))
        rows.setdefault((recipe, f"mnist-{d}"), {})[int(s)] = {v: f[0] for v, f in figs.items()}
    return rows


def stats(values):
    if not values:
        return None
    return {"mean": statistics.mean(values), "spread": max(values) - min(values), "min": min(values),
            "values": values}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "target/quality"
    settings = {}
    if os.path.exists(os.path.join(out, "settings.json")):
        settings = json.load(open(os.path.join(out, "settings.json")))
    rows = collect(out)
    recipes = sorted({r for r, _ in rows}, key=lambda r: (r != "reference", r))
    datasets = sorted({d for _, d in rows}, key=lambda d: (d.split("-")[0] != "synth", d.split("-")[0] != "tex", d))
    summary = {}
    for (recipe, ds), seeds in rows.items():
        for v in VARIANTS:
            for k in KINDS:
                vals = [seeds[s][v][k] for s in sorted(seeds) if v in seeds[s] and k in seeds[s][v]]
                st = stats(vals)
                if st:
                    st["seeds"] = sorted(s for s in seeds if v in seeds[s])
                    summary.setdefault(recipe, {}).setdefault(v, {}).setdefault(ds, {})[k] = st

    # Which (recipe, variant, kind) generalises best: mean over pooled data sets of the
    # mean AUROC; also its worst data set. Pooled rows only (no per-defect rows), so
    # that a data set with four defect types does not count five times.
    pooled = [d for d in datasets if "/" not in d]
    ranking = []
    for recipe in recipes:
        for v in VARIANTS:
            for k in KINDS:
                ms = [summary[recipe][v][d][k]["mean"] for d in pooled if d in summary.get(recipe, {}).get(v, {})]
                if len(ms) == len(pooled) and ms:
                    sp = [summary[recipe][v][d][k]["spread"] for d in pooled if d.startswith("tex-")]
                    ranking.append({"recipe": recipe, "variant": v, "score": k, "mean_auroc": statistics.mean(ms),
                                    "worst": min(ms), "max_tex_spread": max(sp) if sp else None})
    ranking.sort(key=lambda r: -r["mean_auroc"])

    lines = ["# Quality benchmark: image AUROC per data set × score", ""]
    if settings:
        lines.append("Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".")
        lines.append("")
    lines.append("Cells: mean over seeds, and (spread = max − min). `latent` is the paper's score.")
    lines.append("")
    for recipe in recipes:
        for v in VARIANTS:
            if v not in summary.get(recipe, {}):
                continue
            lines.append(f"## recipe `{recipe}`, variant `{v}`")
            lines.append("")
            lines.append("| data set | seeds | " + " | ".join(KINDS) + " |")
            lines.append("| --- | --- | " + " | ".join("---" for _ in KINDS) + " |")
            for d in datasets:
                cell = summary[recipe][v].get(d)
                if not cell:
                    continue
                seeds = cell[KINDS[0]]["seeds"]
                lines.append(f"| {d} | {','.join(map(str, seeds))} | " + " | ".join(
                    f"{cell[k]['mean']:.3f} ({cell[k]['spread']:.3f})" for k in KINDS) + " |")
            lines.append("")
    lines.append("## Ranking (mean over pooled data sets of the mean AUROC)")
    lines.append("")
    lines.append("| recipe | variant | score | mean AUROC | worst data set | max spread on textures |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for r in ranking:
        sp = "" if r["max_tex_spread"] is None else f"{r['max_tex_spread']:.3f}"
        lines.append(f"| {r['recipe']} | {r['variant']} | {r['score']} | {r['mean_auroc']:.3f} | {r['worst']:.3f} | {sp} |")
    lines.append("")
    text = "\n".join(lines)
    open(os.path.join(out, "quality.md"), "w").write(text + "\n")
    per_seed = {f"{r}|{d}": {str(s): v for s, v in seeds.items()} for (r, d), seeds in rows.items()}
    json.dump({"settings": settings, "summary": summary, "ranking": ranking, "per_seed": per_seed},
              open(os.path.join(out, "quality.json"), "w"), indent=1)
    print(text)
    plots(out, summary, recipes, pooled)


def plots(out, summary, recipes, pooled):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)")
        return
    for recipe in recipes:
        for v in ("raw/last", "ema/sel"):
            cells = summary.get(recipe, {}).get(v)
            if not cells:
                continue
            fig, ax = plt.subplots(figsize=(1.2 * len(pooled) + 2, 4))
            w = 0.27
            for i, k in enumerate(KINDS):
                xs = [j + (i - 1) * w for j in range(len(pooled))]
                means = [cells[d][k]["mean"] if d in cells else 0 for d in pooled]
                errs = [[cells[d][k]["mean"] - cells[d][k]["min"] if d in cells else 0 for d in pooled],
                        [cells[d][k]["spread"] - (cells[d][k]["mean"] - cells[d][k]["min"]) if d in cells else 0
                         for d in pooled]]
                ax.bar(xs, means, w, yerr=errs, label=k, capsize=2)
            ax.axhline(0.5, color="gray", lw=0.8, ls="--")
            ax.set_xticks(range(len(pooled)), pooled, rotation=30, ha="right")
            ax.set_ylim(0, 1)
            ax.set_ylabel("image AUROC")
            ax.set_title(f"{recipe}, {v} (bars: min..max over seeds)")
            ax.legend(loc="lower right")
            fig.tight_layout()
            fig.savefig(os.path.join(out, f"quality_{recipe}_{v.replace('/', '_')}.png"), dpi=100)
            plt.close(fig)


if __name__ == "__main__":
    main()
