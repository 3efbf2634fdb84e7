#!/usr/bin/env python3
"""Model-file cost of the score statistics and ONNX Runtime ms/frame per requested output
(issue 19). Usage: .venv/bin/python benches/score_cost.py MODEL.onnx [...]; needs onnx and
onnxruntime (in the venv). 1 intra-op thread, batch 1 and 8, best and median of 5 x 0.4 s."""
import sys, time, json
import numpy as np, onnx, onnxruntime as ort
for path in sys.argv[1:]:
    m = onnx.load(path)
    groups = {}
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) * (4 if t.data_type == 1 else 8)
        g = "patch" if t.name.startswith("score.patch") else "mahalanobis" if t.name.startswith("score.feature") else "fusion" if t.name.startswith("score.fusion") else "netg"
        groups[g] = groups.get(g, 0) + n
    meta = {p.key: p.value for p in m.metadata_props}
    spec = [s for s in json.loads(meta["ganomaly.scores"]) if s["kind"] == "patch"][0]["patch"]
    print(path, {k: f"{v/2**20:.2f} MiB" for k, v in groups.items()}, "patch maps", spec["maps"], "grid", spec["grid"], "d", len(spec["channels"]))
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape]
    for batch in (1, 8):
        x = np.random.default_rng(0).uniform(-1, 1, [batch] + shape[1:]).astype(np.float32)
        for outs in (["score"], ["score_mahalanobis"], ["score_patch"], ["score_patch", "patch_map"], ["score_fused"], None):
            for _ in range(5): s.run(outs, {"image": x})
            best = []
            for rep in range(5):
                t0 = time.perf_counter(); n = 0
                while time.perf_counter() - t0 < 0.4:
                    s.run(outs, {"image": x}); n += 1
                best.append((time.perf_counter() - t0) / n / batch * 1e3)
            print(f"  batch {batch} outputs {outs or 'all'}: {min(best):.3f} ms/frame (best of 5; median {sorted(best)[2]:.3f})")
