#!/usr/bin/env python3
"""`make bench`: one table from one run: the daemon against raw ONNX Runtime and
against the Python peer (`benches/peer.py`), on the same model and frames.

For each model (the demo model, and a 128 px ngf 32 random-weights model from
core's `random_model`: weights do not change speed), batch 8, score
`mahalanobis`, the same ORT thread count on every side:

1. `ganomalyd bench --export DIR`: the model and the four 640x480 frames as PNG;
2. `bench --cameras 1` and `--cameras 4`: raw ORT fps (mean of a run before and
   after), pipeline fps offered 1.1x raw, latency p50/p99 at full load;
3. `bench --cameras 4 --paced 15`: latency at low load, and one batch-1
   inference plus one frame's preprocessing (medians) in the same run; the
   cameras' frames spread over the period (free-running cameras), then
   `--aligned` (all four at the same instants);
4. `bench --cameras 4 --rss-breakdown`: the pipeline alone, as the daemon runs
   it, offered 1.1x raw: RSS at each stage, steady state = the daemon's RSS;
5. `benches/peer.py`: fps, and RSS with Python, numpy, Pillow and onnxruntime.

Prints markdown (the table, then the RSS stages and the latency by stage at
low and full load), and writes
DIR/table.md and DIR/table.json.

    .venv/bin/python benches/table.py --bin target/release/ganomalyd
"""

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = [
    ("demo (64 px, ngf 16)", "demo", ["--model", "models/demo.onnx"]),
    ("128 px, ngf 32 (random weights)", "m128", ["--fixture", "128x32"]),
]


def run_json(cmd):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON from {' '.join(cmd)}:\n{out}")
    return json.loads(lines[-1])


def load():
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/ganomalyd")
    ap.add_argument("--out", default="target/bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads, both sides (0: one per core)")
    ap.add_argument("--score", default="mahalanobis")
    ap.add_argument("--frames", type=int, default=2000, help="frames per throughput measurement")
    ap.add_argument("--low-fps", type=float, default=15.0, help="each camera's rate at low load (4 cameras)")
    ap.add_argument("--low-frames", type=int, default=900, help="frames decided at low load")
    ap.add_argument("--models", default="demo,m128", help="which of: demo, m128")
    a = ap.parse_args()
    if a.low_fps <= 0:
        ap.error("--low-fps must be > 0 (the low-load run is paced)")

    py = sys.executable
    here = os.path.dirname(os.path.abspath(__file__))
    common = ["--batch", str(a.batch), "--threads", str(a.threads), "--score", a.score, "--json"]
    rows = []
    load0, t0 = load(), time.time()
    for label, key, how in MODELS:
        if key not in a.models.split(","):
            continue
        d = os.path.join(a.out, key)
        run_json([a.bin, "bench", *how, "--export", d])
        m = ["--model", os.path.join(d, "model.onnx")]
        one = run_json([a.bin, "bench", *m, *common, "--cameras", "1", "--frames", str(a.frames)])
        four = run_json([a.bin, "bench", *m, *common, "--cameras", "4", "--frames", str(a.frames)])
        low = run_json(
            [a.bin, "bench", *m, *common, "--cameras", "4", "--paced", str(a.low_fps), "--frames", str(a.low_frames)]
        )
        # The same, the four cameras delivering at the same instants.
        aligned = run_json(
            [a.bin, "bench", *m, *common, "--cameras", "4", "--paced", str(a.low_fps), "--aligned"]
            + ["--frames", str(a.low_frames)]
        )
        raw = (one["raw_ort_fps"] + four["raw_ort_fps"]) / 2
        rss = run_json(
            [a.bin, "bench", *m, *common, "--cameras", "4", "--rss-breakdown", "--paced", f"{raw * 1.1 / 4:.1f}"]
            + ["--frames", str(a.frames)]
        )
        peer = run_json(
            [py, os.path.join(here, "peer.py"), "--dir", d, "--batch", str(a.batch), "--threads", str(a.threads)]
            + ["--score", a.score, "--frames", str(a.frames)]
        )
        rows.append(dict(label=label, one=one, four=four, low=low, aligned=aligned, rss=rss, peer=peer))

    hdr = [
        "model",
        "raw ORT fps (1 / 4 cam runs)",
        "pipeline fps 1 / 4 cams",
        "pipeline ÷ raw 1 / 4",
        "Python peer fps",
        "daemon (1 cam) ÷ peer",
        "daemon RSS MiB (steady / peak)",
        "peer RSS MiB (steady / peak)",
        "daemon ÷ peer RSS",
        f"latency p50 / p99 ms, 4 × {a.low_fps:g} fps (spread / aligned)",
        "latency p50 / p99 ms, full load (4 cams)",
        "batch-1 inference + preprocessing ms",
        "low-load p99 ÷ that",
    ]
    lines = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for r in rows:
        one, four, low, rss, peer = r["one"], r["four"], r["low"], r["rss"], r["peer"]
        ref = low["infer_b1_ms"] + low["preprocess_ms"]
        cells = [
            r["label"],
            f"{one['raw_ort_fps']:,.0f} / {four['raw_ort_fps']:,.0f}",
            f"{one['pipeline_fps']:,.0f} / {four['pipeline_fps']:,.0f}",
            f"{one['ratio']:.2f} / {four['ratio']:.2f}",
            f"{peer['fps']:,.0f}",
            f"{one['pipeline_fps'] / peer['fps']:.2f}",
            f"{rss['rss_mb']:.0f} / {rss['peak_rss_mb']:.0f}",
            f"{peer['rss_mb']:.0f} / {peer['peak_rss_mb']:.0f}",
            f"{rss['rss_mb'] / peer['rss_mb']:.2f}",
            f"{low['p50_ms']:.1f} / {low['p99_ms']:.1f} ({r['aligned']['p50_ms']:.1f} / {r['aligned']['p99_ms']:.1f})",
            f"{four['p50_ms']:.1f} / {four['p99_ms']:.1f}",
            f"{ref:.2f} ({low['infer_b1_ms']:.2f} + {low['preprocess_ms']:.2f})",
            f"{low['p99_ms'] / ref:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    out = [
        f"Batch {a.batch}, score `{a.score}`, ORT intra-op threads {a.threads or 'default (one per core)'} on both "
        f"sides, 640×480 RGB frames, {os.cpu_count()} cores; load average {load0:.2f} at the start, "
        f"{load():.2f} at the end ({time.time() - t0:.0f} s).",
        "",
        *lines,
        "",
    ]
    for r in rows:
        label, rss, low, four = r["label"], r["rss"], r["low"], r["four"]
        out += [f"RSS by stage, {label} ({rss['cameras']} cameras, {rss['pipeline_fps']:.0f} fps decided):", ""]
        out += ["| stage | VmRSS MiB | Δ | VmHWM MiB |", "| --- | --- | --- | --- |"]
        last = 0.0
        for st in rss["stages"]:
            out.append(f"| {st['stage']} | {st['rss_mb']:.1f} | {st['rss_mb'] - last:+.1f} | {st['peak_rss_mb']:.1f} |")
            last = st["rss_mb"]
        out += [
            "",
            f"Model file {rss['model_file_mb']:.1f} MiB; a frame {rss['frame_mb']:.2f} MiB (up to "
            f"{rss['frames_kept_per_camera']} per camera); a tensor {rss['tensor_mb']:.3f} MiB (up to "
            f"{rss['tensors_kept']}).",
            "",
        ]
        # Where capture -> decision went: a hand-off, the batching wait, or the session run.
        out += [f"Latency by stage, {label} (4 cameras; p50 / p99 ms):", ""]
        out += [f"| stage | {a.low_fps:g} fps each (spread) | full load |", "| --- | --- | --- |"]
        for lo, fu in zip(low["stages"], four["stages"]):
            out.append(f"| {lo['stage']} | {lo['p50_ms']:.2f} / {lo['p99_ms']:.2f} | {fu['p50_ms']:.2f} / {fu['p99_ms']:.2f} |")
        out += [
            "",
            f"At low load the session run after an idle gap takes {low['infer_b1_after_gap_ms']:.2f} ms "
            f"(batch 1, measured alone) against {low['infer_b1_ms']:.2f} ms in a tight loop.",
            "",
        ]
    text = "\n".join(out)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
