#!/usr/bin/env python3
"""Calibration table of the quality benchmark (issue 13): for every data set, the
target false-alarm rate against the rate measured on test/good and the recall on
test/<defect> at each good-only calibration method's threshold.

    calibration_table.py OUTDIR [--kind default|latent|recon|map_max|mahalanobis]

Reads every report.json under OUTDIR (benches/quality.sh writes them); each run's
`calibration_methods` holds, per score, the threshold of every method computed on
the same held-out good images, and what it does on test/. Cells: mean over seeds
(min-max in brackets). `normal_quantile` is the method before schema 2 ("before").
"""
import glob
import json
import os
import statistics
import sys

METHODS = ("normal_quantile", "conformal", "lognormal_tail")


def main():
    out = sys.argv[1]
    want = sys.argv[sys.argv.index("--kind") + 1] if "--kind" in sys.argv else "default"
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "**", "report.json"), recursive=True)):
        r = json.load(open(path))
        methods = r.get("calibration_methods") or {}
        kind = r.get("default_score") if want == "default" else want
        if kind not in methods:
            continue
        parts = path.split(os.sep)
        ds = parts[-4] if parts[-3].startswith("seed") else parts[-3].split("-seed")[0]
        if "mnist" in parts:
            ds = "mnist-" + parts[-3].split("-")[0].removeprefix("digit")
        cell = rows.setdefault(ds, {})
        for m in methods[kind]:
            t = m.get("test")
            if not t:
                continue
            c = cell.setdefault(m["asked"], {"far": [], "recall": [], "used": [], "target": m["target_far"], "exp": []})
            c["far"].append(t["false_alarm_rate"])
            c["recall"].append(t["recall"])
            c["used"].append(m["method"])
            if m.get("expected_far"):
                c["exp"].append((m["expected_far"]["low"], m["expected_far"]["high"]))
        cell.setdefault("_n", 0)
        cell["_n"] += 1
    fmt = lambda v: f"{statistics.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})" if v else "-"
    print(f"score: {want}; cells: mean over seeds (min–max)\n")
    print("| data set | runs | target | method | FAR on test/good | recall | expected FAR 95 % (mean bounds) | used |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    pooled = {m: {"far": [], "recall": []} for m in METHODS}
    for ds in sorted(rows):
        for m in METHODS:
            c = rows[ds].get(m)
            if not c:
                continue
            exp = "-"
            if c["exp"]:
                exp = f"[{statistics.mean(e[0] for e in c['exp']):.3f}, {statistics.mean(e[1] for e in c['exp']):.3f}]"
            used = ", ".join(sorted(set(c["used"])))
            print(f"| {ds} | {rows[ds]['_n']} | {c['target']} | {m} | {fmt(c['far'])} | {fmt(c['recall'])} | {exp} | {used} |")
            pooled[m]["far"] += c["far"]
            pooled[m]["recall"] += c["recall"]
    print()
    for m in METHODS:
        p = pooled[m]
        if p["far"]:
            print(f"- {m}: mean FAR {statistics.mean(p['far']):.4f}, mean recall {statistics.mean(p['recall']):.4f} over {len(p['far'])} runs")


if __name__ == "__main__":
    main()
