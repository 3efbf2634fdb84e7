#!/usr/bin/env python3
"""The Python peer of `ganomalyd bench`: the loop a user would write instead.

Per frame: Pillow resize (bilinear, as core's preprocessing) of the decoded
camera frame, numpy normalisation to [-1, 1] and HWC -> CHW; frames stacked
into batches of `--batch`, one onnxruntime run per batch, the score read back.
The frames are the daemon bench's own (`ganomalyd bench --export DIR` writes
them as PNG next to the model), decoded once before timing, as a camera
driver would hand them over; the daemon's bench cycles the same raw pixels.

Prints one JSON line: frames/s and this process's peak RSS (VmHWM), which
includes Python, numpy, Pillow and onnxruntime, as a user's process would.

    .venv/bin/python benches/peer.py --dir target/bench/demo --batch 8 --threads 0 --score mahalanobis
"""

import argparse
import glob
import json
import os
import time

import numpy as np
import onnxruntime as ort
from PIL import Image


def vm(key):
    """A `/proc/self/status` figure in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="what `ganomalyd bench --export DIR` wrote: model.onnx, frame*.png")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT's default, one per core)")
    ap.add_argument("--score", default="mahalanobis", help="score output read: score_<name> (latent: `score`)")
    ap.add_argument("--frames", type=int, default=2000, help="frames timed")
    ap.add_argument("--all-outputs", action="store_true", help="fetch every output, as the daemon does")
    a = ap.parse_args()

    rss_start = vm("VmRSS")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if a.threads > 0:
        opts.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(os.path.join(a.dir, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape  # [N, C, S, S]
    channels, side = int(shape[1]), int(shape[3])
    output = "score" if a.score == "latent" else "score_" + a.score
    fetch = None if a.all_outputs else [output]
    rss_session = vm("VmRSS")

    paths = sorted(glob.glob(os.path.join(a.dir, "frame*.png")))
    if not paths:
        raise SystemExit(f"no frame*.png in {a.dir}")
    frames = []
    for p in paths:
        with Image.open(p) as im:
            frames.append(im.convert("RGB" if channels == 3 else "L"))

    def prep(img):
        x = np.asarray(img.resize((side, side), Image.BILINEAR), dtype=np.float32)
        x = x / 127.5 - 1.0
        return x.transpose(2, 0, 1) if x.ndim == 3 else x[None]

    def batch(k):
        return np.stack([prep(frames[(k + i) % len(frames)]) for i in range(a.batch)])

    def run(k):
        outs = sess.run(fetch, {"image": batch(k)})
        names = [o.name for o in sess.get_outputs()] if fetch is None else fetch
        return outs[names.index(output)]

    for k in range(3):  # warm-up: arena sized, caches warm
        run(k)
    batches = max(1, -(-a.frames // a.batch))
    scores = 0.0
    t = time.perf_counter()
    for k in range(batches):
        scores += float(run(k * a.batch).sum())
    dt = time.perf_counter() - t

    # One frame's preprocessing and one batch-1 run (medians), the latency reference.
    pre, inf = [], []
    one = np.ascontiguousarray(prep(frames[0])[None])
    for i in range(100):
        t0 = time.perf_counter()
        prep(frames[i % len(frames)])
        t1 = time.perf_counter()
        sess.run(fetch, {"image": one})
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        inf.append(t2 - t1)

    print(
        json.dumps(
            {
                "fps": batches * a.batch / dt,
                "frames": batches * a.batch,
                "batch": a.batch,
                "threads": a.threads,
                "score": output,
                "all_outputs": a.all_outputs,
                "score_sum": scores,
                "preprocess_ms": float(np.median(pre) * 1000),
                "infer_b1_ms": float(np.median(inf) * 1000),
                "rss_start_mb": rss_start,
                "rss_session_mb": rss_session,
                "rss_mb": vm("VmRSS"),
                "peak_rss_mb": vm("VmHWM"),
                "onnxruntime": ort.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
