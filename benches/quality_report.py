#!/usr/bin/env python3
"""Tables and plots of the quality benchmark (benches/quality.sh).

    quality_report.py OUTDIR

Reads every OUTDIR/<recipe>/<dataset>/seed<s>/report/report.json and
OUTDIR/<recipe>/mnist/digit<d>-seed<s>/report/report.json written by
`ganomaly-train train`, and writes OUTDIR/quality.md, OUTDIR/quality.json and
bar charts OUTDIR/quality_<recipe>_<variant>.svg (variants raw/last, ema/sel, exported).

Also, from each run's report.json: `localisation` (pixel AUROC of the
reconstruction map and of the patch score's map, where the data set has masks)
and `candidates` (`train --candidates`: other patch configurations and fusion
recipes measured on the same generator).

Variants of one run (from its per-epoch history):
  raw/last  the last epoch's generator: the paper's reference training
  ema/last  the weight average after the last epoch
  raw/sel   the epoch with the lowest reconstruction error on held-out good images
  ema/sel   the same criterion on the weight average
  exported  what the run's flags export (report.json's last_epoch), with an extra
            column `auto`: the AUROC of the score `--score auto` chose (on DIR/val/
            when the data set has one, else the built-in default)
No variant and no score is ever chosen by test AUROC.
"""
import glob
import json
import os
import statistics
import sys

KINDS = ("latent", "recon", "map_max", "mahalanobis", "patch", "fused")
VARIANTS = ("raw/last", "ema/last", "raw/sel", "ema/sel", "exported")


def variant_figures(report):
    """{variant: ({kind: auroc}, {kind: {defect: auroc}}, epoch)} of one run."""
    hist = report["history"]
    out = {}
    for v in VARIANTS[:4]:
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
        out[v] = ({k: h[auroc_key][k] for k in KINDS if k in h[auroc_key]}, per_defect, h["epoch"])
    le = report.get("last_epoch")
    if le:
        chosen = le["default_score"]
        figs = {k: le["scores"][k]["auroc"] for k in KINDS if k in le["scores"]}
        figs["auto"] = figs[chosen]
        per_defect = {k: le["scores"][k]["per_defect"] for k in KINDS if k in le["scores"]}
        per_defect["auto"] = per_defect[chosen]
        epoch = report.get("selection", {}).get("epoch")
        # "latent@1": --select chose epoch 1 instead of the last.
        figs["chosen"] = chosen if epoch in (None, report.get("epochs")) else f"{chosen}@{epoch}"
        out["exported"] = (figs, per_defect, epoch)
    return out


def collect(out):
    """rows[(recipe, dataset)][seed][variant] = {kind: auroc} (and `chosen` for `exported`);
    a data set with several defect types also gets one row per type, `<dataset>/<defect>`."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "seed*", "report", "report.json"))):
        parts = path.split(os.sep)
        recipe, ds, seed = parts[-5], parts[-4], int(parts[-3][len("seed"):])
        figs = variant_figures(json.load(open(path)))
        rows.setdefault((recipe, ds), {})[seed] = {v: f[0] for v, f in figs.items()}
        for v, (f, per_defect, _) in figs.items():
            for kind, by_defect in per_defect.items():
                for defect, a in by_defect.items():
                    cell = rows.setdefault((recipe, f"{ds}/{defect}"), {}).setdefault(seed, {}).setdefault(v, {})
                    cell[kind] = a
                    if "chosen" in f:
                        cell["chosen"] = f["chosen"]
    for path in sorted(glob.glob(os.path.join(out, "*", "mnist", "digit*-seed*", "report", "report.json"))):
        parts = path.split(os.sep)
        recipe = parts[-5]
        d, s = parts[-3][len("digit"):].split("-seed")
        figs = variant_figures(json.load(open(path)))
        rows.setdefault((recipe, f"mnist-{d}"), {})[int(s)] = {v: f[0] for v, f in figs.items()}
    return rows


def collect_extra(out):
    """extra[(recipe, dataset)][seed] = {"localisation": {...}, "candidates": {name: auroc}, "pixel": {name: pixel auroc}}."""
    extra = {}
    paths = [(p, p.split(os.sep)[-4]) for p in glob.glob(os.path.join(out, "*", "*", "seed*", "report", "report.json"))]
    paths += [(p, "mnist-" + p.split(os.sep)[-3][len("digit"):].split("-seed")[0])
              for p in glob.glob(os.path.join(out, "*", "mnist", "digit*-seed*", "report", "report.json"))]
    for path, ds in sorted(paths):
        parts = path.split(os.sep)
        recipe = parts[-5]
        seed = int(parts[-3].split("seed")[-1])
        r = json.load(open(path))
        cell = {"localisation": r.get("localisation"),
                "candidates": {k: v["auroc"] for k, v in r.get("candidates", {}).items()},
                "pixel": {k: v["pixel_auroc"] for k, v in r.get("candidates", {}).items() if v.get("pixel_auroc") is not None}}
        extra.setdefault((recipe, ds), {})[seed] = cell
    return extra


def extra_tables(extra, recipe, datasets):
    """Markdown: pixel localisation per data set, candidates per data set (mean over seeds)."""
    lines = []
    rows = [(d, extra[(recipe, d)]) for d in datasets if (recipe, d) in extra]
    loc = [(d, seeds) for d, seeds in rows if any(c["localisation"] for c in seeds.values())]
    if loc:
        lines += [f"## Pixel localisation (recipe `{recipe}`): pixel AUROC of each map on test/, all images", "",
                  "| data set | anomaly_map (reconstruction) | patch_map | patch − recon |", "| --- | --- | --- | --- |"]
        for d, seeds in loc:
            a = [c["localisation"]["anomaly_map"] for c in seeds.values() if c["localisation"]]
            p = [c["localisation"].get("patch_map") for c in seeds.values() if c["localisation"] and c["localisation"].get("patch_map") is not None]
            fa, fp = stats(a), stats(p)
            cell = lambda f: f"{f['mean']:.3f} ({f['spread']:.3f})" if f else "–"
            diff = f"{fp['mean'] - fa['mean']:+.3f}" if fa and fp else "–"
            lines.append(f"| {d} | {cell(fa)} | {cell(fp)} | {diff} |")
        lines.append("")
    names = sorted({n for _, seeds in rows for c in seeds.values() for n in c["candidates"]})
    if names:
        lines += [f"## Candidates (recipe `{recipe}`, `--candidates`): image AUROC, mean over seeds", "",
                  "| candidate | " + " | ".join(d for d, _ in rows) + " | mean (worst) | max spread on tex-* |",
                  "| --- " * (len(rows) + 3) + "|"]
        for n in names:
            ms, sps, cells = [], [], []
            for d, seeds in rows:
                st = stats([c["candidates"][n] for c in seeds.values() if n in c["candidates"]])
                cells.append(f"{st['mean']:.3f}" if st else "–")
                if st:
                    ms.append(st["mean"])
                    if d.startswith("tex-"):
                        sps.append(st["spread"])
            mw = f"{statistics.mean(ms):.3f} ({min(ms):.3f})" if len(ms) == len(rows) else "–"
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {mw} | {max(sps):.3f} |" if sps else f"| {n} | " + " | ".join(cells) + f" | {mw} | – |")
        lines.append("")
        pnames = sorted({n for _, seeds in rows for c in seeds.values() for n in c["pixel"]})
        prow = [(d, seeds) for d, seeds in rows if any(c["pixel"] for c in seeds.values())]
        if pnames and prow:
            lines += ["Pixel AUROC of the patch candidates' maps:", "",
                      "| candidate | " + " | ".join(d for d, _ in prow) + " | mean |", "| --- " * (len(prow) + 2) + "|"]
            for n in pnames:
                ms = [statistics.mean([c["pixel"][n] for c in seeds.values() if n in c["pixel"]] or [float("nan")]) for _, seeds in prow]
                lines.append(f"| {n} | " + " | ".join(f"{m:.3f}" for m in ms) + f" | {statistics.mean(ms):.3f} |")
            lines.append("")
    return lines


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
            for k in KINDS + ("auto",):
                vals = [seeds[s][v][k] for s in sorted(seeds) if v in seeds[s] and k in seeds[s][v]]
                st = stats(vals)
                if st:
                    st["seeds"] = sorted(s for s in seeds if v in seeds[s])
                    if k == "auto":
                        st["chosen"] = [seeds[s][v].get("chosen") for s in sorted(seeds) if v in seeds[s]]
                    summary.setdefault(recipe, {}).setdefault(v, {}).setdefault(ds, {})[k] = st

    # Which (recipe, variant, kind) generalises best: mean over pooled data sets of the
    # mean AUROC; also its worst data set. Pooled rows only (no per-defect rows), so
    # that a data set with four defect types does not count five times.
    pooled = [d for d in datasets if "/" not in d]
    ranking = []
    for recipe in recipes:
        for v in VARIANTS:
            for k in KINDS + (("auto",) if v == "exported" else ()):
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
    # Headline: the paper's reference (raw weights, last epoch, latent score) against
    # every score of what the `final` recipe exports, and the score `auto` chose.
    if "exported" in summary.get("final", {}):
        # The `final` recipe trains as the paper does (constant lr): its raw weights at
        # the last epoch are the paper's reference model, from the very same runs.
        base = summary.get("reference", summary["final"]).get("raw/last", {})
        fin = summary["final"]["exported"]
        lines.append("## Headline: paper reference vs. the `final` recipe's exported model")
        lines.append("")
        lines.append("| data set | paper: latent, raw, last epoch | " + " | ".join(f"final: {k}" for k in KINDS)
                     + " | **default** (`auto`, chosen per seed) | default − paper |")
        lines.append("| --- " * (len(KINDS) + 4) + "|")
        for d in datasets:
            if d not in fin:
                continue
            b = base.get(d, {}).get("latent")
            bs = f"{b['mean']:.3f} ({b['spread']:.3f})" if b else "–"
            c = fin[d]
            auto = c.get("auto")
            au = f"**{auto['mean']:.3f}** ({auto['spread']:.3f}) {'/'.join(auto['chosen'])}" if auto else "–"
            diff = f"{auto['mean'] - b['mean']:+.3f}" if auto and b else "–"
            cell = lambda k: f"{c[k]['mean']:.3f} ({c[k]['spread']:.3f})" if k in c else "–"
            lines.append(f"| {d} | {bs} | " + " | ".join(cell(k) for k in KINDS) + f" | {au} | {diff} |")
        lines.append("")
    for recipe in recipes:
        for v in VARIANTS:
            if v not in summary.get(recipe, {}):
                continue
            lines.append(f"## recipe `{recipe}`, variant `{v}`")
            lines.append("")
            cols = KINDS + (("auto",) if v == "exported" else ())
            lines.append("| data set | seeds | " + " | ".join(cols) + " |")
            lines.append("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
            for d in datasets:
                cell = summary[recipe][v].get(d)
                if not cell:
                    continue
                seeds = cell[KINDS[0]]["seeds"]
                lines.append(f"| {d} | {','.join(map(str, seeds))} | " + " | ".join(
                    (f"{cell[k]['mean']:.3f} ({cell[k]['spread']:.3f})" + (f" {'/'.join(cell[k]['chosen'])}" if k == "auto" else ""))
                    if k in cell else "–" for k in cols) + " |")
            lines.append("")
    extra = collect_extra(out)
    for recipe in recipes:
        lines += extra_tables(extra, recipe, pooled)
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
    extra_json = {f"{r}|{d}": {str(s): v for s, v in seeds.items()} for (r, d), seeds in extra.items()}
    json.dump({"settings": settings, "summary": summary, "ranking": ranking, "per_seed": per_seed, "extra": extra_json},
              open(os.path.join(out, "quality.json"), "w"), indent=1)
    print(text)
    plots(out, summary, recipes, pooled)


def plots(out, summary, recipes, pooled):
    """One SVG bar chart per recipe and variant (hand-written SVG: no plotting library in the venv)."""
    colors = {"latent": "#d62728", "recon": "#1f77b4", "map_max": "#2ca02c", "mahalanobis": "#9467bd",
              "patch": "#ff7f0e", "fused": "#8c564b", "auto": "#000000"}
    for recipe in recipes:
        for v in ("raw/last", "ema/sel", "exported"):
            cells = summary.get(recipe, {}).get(v)
            if not cells:
                continue
            ds = [d for d in pooled if d in cells]
            bw, gap, h, left, top = 14, 16, 220, 40, 30
            width = left + len(ds) * (len(colors) * bw + gap) + 120
            y = lambda a: top + h * (1 - a)
            el = [f'<text x="{left}" y="18" font-size="13">{recipe}, {v}: image AUROC, mean over seeds '
                  f'(whiskers: min..max)</text>']
            for a in (0, 0.25, 0.5, 0.75, 1.0):
                dash = ' stroke-dasharray="4,3"' if a == 0.5 else ""
                el.append(f'<line x1="{left}" x2="{width - 120}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#bbb"{dash}/>')
                el.append(f'<text x="{left - 30}" y="{y(a) + 4:.1f}" font-size="10">{a:.2f}</text>')
            for j, d in enumerate(ds):
                x0 = left + gap / 2 + j * (len(colors) * bw + gap)
                for i, k in enumerate(colors):
                    c = cells[d].get(k)
                    if not isinstance(c, dict) or "mean" not in c:
                        continue
                    if not c:
                        continue
                    x = x0 + i * bw
                    el.append(f'<rect x="{x:.1f}" y="{y(c["mean"]):.1f}" width="{bw - 2}" height="{h * c["mean"]:.1f}" '
                              f'fill="{colors[k]}"/>')
                    xm = x + (bw - 2) / 2
                    el.append(f'<line x1="{xm:.1f}" x2="{xm:.1f}" y1="{y(c["min"]):.1f}" '
                              f'y2="{y(c["min"] + c["spread"]):.1f}" stroke="black"/>')
                el.append(f'<text x="{x0:.1f}" y="{top + h + 14}" font-size="10">{d}</text>')
            for i, k in enumerate(colors):
                el.append(f'<rect x="{width - 110}" y="{top + 14 * i}" width="10" height="10" fill="{colors[k]}"/>')
                el.append(f'<text x="{width - 95}" y="{top + 9 + 14 * i}" font-size="11">{k}</text>')
            svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + h + 30}" '
                   f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>' + "".join(el) + "</svg>")
            path = os.path.join(out, f"quality_{recipe}_{v.replace('/', '_')}.svg")
            open(path, "w").write(svg)


if __name__ == "__main__":
    main()
