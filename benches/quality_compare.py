#!/usr/bin/env python3
"""Side-by-side table of the quality benchmark's default score over several runs
of benches/quality.sh (round 2, item 3 of issue 19: augmentation, longer training,
stricter epoch selection).

    quality_compare.py LABEL=DIR[+FALLBACK] ... [--rule2se LABEL] [--md OUT.md]

Each LABEL=DIR is one variant (recipe `final`). A data set missing from DIR is
taken from FALLBACK (e.g. MNIST, which --augment never touches, from the baseline
run: the same binary and seeds). Cells: image AUROC of the exported model's
default score (`--score auto`'s choice on val/), per seed, mean and spread
(max - min); also the mean over the 7 data sets, the worst, and the largest
spread on the texture sets.

--history LABEL (a `--patch-maps auto` run) adds what the default patch maps
would have exported from the same training (from the per-epoch history), with
the 1 SE and the 2 SE guard.

--rule2se LABEL adds a variant computed offline from LABEL's runs: `--select
val-auroc` with a stricter guard, the best epoch only when it leads the last by
more than two standard errors (report.json's selection reason gives the lead and
the error; the last epoch's test AUROC of the score chosen there is in the
history). Rules are decided on validation figures only; test/ is only reported.
"""
import glob
import json
import os
import re
import statistics
import sys

DATASETS = ("synth-brushed_metal", "synth-woven_fabric", "tex-brick", "tex-grass", "tex-gravel", "mnist-0", "mnist-1")


def reports(d):
    """{dataset: {seed: report}} of recipe `final` in output folder d."""
    out = {}
    for p in glob.glob(os.path.join(d, "final", "*", "seed*", "report", "report.json")):
        parts = p.split(os.sep)
        out.setdefault(parts[-4], {})[int(parts[-3][4:])] = json.load(open(p))
    for p in glob.glob(os.path.join(d, "final", "mnist", "digit*-seed*", "report", "report.json")):
        dg, s = p.split(os.sep)[-3][len("digit"):].split("-seed")
        out.setdefault(f"mnist-{dg}", {})[int(s)] = json.load(open(p))
    return out


REASON = re.compile(r"epoch (\d+) (\w+) ([0-9.]+) beats the last, epoch (\d+) (\w+) ([0-9.]+), by ([0-9.]+) > one standard error ([0-9.]+)")


def default_figure(r, k_se=1.0):
    """(test AUROC of the default score, label) of one run; with k_se > 1 the
    val-auroc guard is re-applied at k_se standard errors (offline)."""
    le = r["last_epoch"]
    kind = le["default_score"]
    epoch = r["selection"]["epoch"]
    m = REASON.search(r["selection"].get("reason") or "")
    if k_se > 1.0 and m and float(m.group(7)) <= k_se * float(m.group(8)):
        last_epoch, last_kind = int(m.group(4)), m.group(5)
        h = [h for h in r["history"] if h["epoch"] == last_epoch][0]
        return h["auroc_ema"][last_kind], f"{last_kind} (last)"
    label = kind if epoch == r["epochs"] else f"{kind}@{epoch}"
    return le["scores"][kind]["auroc"], label


def history_figure(r, k_se=1.0):
    """The same from the per-epoch history: the test AUROC, at the epoch `--select`
    took, of the score `auto` picked there during training (with the default patch
    maps). For a `--patch-maps auto` run this is what the default maps would have
    exported: training and selection do not depend on the flag."""
    sel = r["selection"]
    epoch, kind = sel["epoch"], sel.get("val_score") or r["last_epoch"]["default_score"]
    m = REASON.search(sel.get("reason") or "")
    if k_se > 1.0 and m and float(m.group(7)) <= k_se * float(m.group(8)):
        epoch, kind = int(m.group(4)), m.group(5)
    h = [h for h in r["history"] if h["epoch"] == epoch][0]
    label = f"{kind} (last)" if epoch == r["epochs"] else f"{kind}@{epoch}"
    return h["auroc_ema"][kind], label


def variant(runs, k_se=1.0, fig=default_figure):
    """{dataset: [(seed, auroc, label)]}."""
    return {ds: [(s, *fig(r, k_se)) for s, r in sorted(seeds.items())] for ds, seeds in runs.items()}


def main(argv):
    md_out, rule2se, history, specs = None, [], [], []
    it = iter(argv)
    for a in it:
        if a == "--md":
            md_out = next(it)
        elif a == "--rule2se":
            rule2se.append(next(it))
        elif a == "--history":
            history.append(next(it))
        else:
            specs.append(a)
    variants = {}
    raw = {}
    for spec in specs:
        label, dirs = spec.split("=", 1)
        runs = {}
        for d in reversed(dirs.split("+")):
            runs.update(reports(d))
        raw[label] = runs
        variants[label] = variant(runs)
    for label in history:
        variants[f"{label}: default maps (from history)"] = variant(raw[label], 1.0, history_figure)
        variants[f"{label}: default maps, select guard 2 SE"] = variant(raw[label], 2.0, history_figure)
    for label in rule2se:
        variants[f"{label}, select guard 2 SE"] = variant(raw[label], 2.0)
    lines = ["| variant | " + " | ".join(DATASETS) + " | mean (worst) | max spread tex-* |",
             "| --- " * (len(DATASETS) + 3) + "|"]
    detail = []
    for label, v in variants.items():
        cells, means, spreads = [], [], []
        for ds in DATASETS:
            rows = v.get(ds)
            if not rows:
                cells.append("–")
                continue
            a = [x[1] for x in rows]
            mean, spread = statistics.mean(a), max(a) - min(a)
            means.append((mean, ds))
            if ds.startswith("tex-"):
                spreads.append(spread)
            cells.append(f"{mean:.3f} ({spread:.3f})")
            detail.append(f"| {label} | {ds} | " + " | ".join(f"{x[1]:.3f} {x[2]}" for x in rows) + f" | {mean:.3f} ({spread:.3f}) |")
        summ = "–"
        if len(means) == len(DATASETS):
            worst = min(means)
            summ = f"{statistics.mean(m for m, _ in means):.3f} ({worst[0]:.3f} {worst[1]})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {summ} | {max(spreads) if spreads else float('nan'):.3f} |")
    text = "\n".join(lines) + "\n\nPer seed (AUROC, the score and epoch `auto` exported):\n\n| variant | data set | seed 0 | seed 1 | seed 2 | mean (spread) |\n| --- | --- | --- | --- | --- | --- |\n" + "\n".join(detail) + "\n"
    print(text)
    if md_out:
        open(md_out, "w").write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
