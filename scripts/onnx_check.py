"""Checks a model written by ganomaly-core with the official ONNX tools.

Usage: onnx_check.py DIR   (DIR holds model.onnx, input.f32, outputs.json and
<name>.f32 for every output, as written by tests/onnx_parity.rs)

1. onnx.checker.check_model(full_check=True): the file is valid ONNX, with
   shape inference over the whole graph.
2. ONNX Runtime's Python API on the same file and input gives the same outputs
   as ort in Rust did (max abs difference printed; fails above 1e-5).
Exit status 0 only if both hold.
"""
import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main() -> int:
    d = pathlib.Path(sys.argv[1])
    model = onnx.load(str(d / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    spec = json.loads((d / "outputs.json").read_text())
    x = np.fromfile(d / "input.f32", dtype="<f4").reshape(spec["input_shape"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"image": x})))
    worst = 0.0
    for name, shape in spec["outputs"].items():
        rust = np.fromfile(d / f"{name}.f32", dtype="<f4").reshape(shape)
        if got[name].shape != rust.shape:
            print(f"{name}: python shape {got[name].shape} != rust {rust.shape}")
            return 1
        diff = float(np.max(np.abs(got[name] - rust)))
        worst = max(worst, diff)
        print(f"{name}: max |python - rust| = {diff:.3g}")
    meta = {p.key: p.value for p in model.metadata_props}
    if "ganomaly.schema_version" not in meta:
        print("metadata_props lacks ganomaly.schema_version")
        return 1
    print(f"checker OK, opset {model.opset_import[0].version}, IR {model.ir_version}, worst diff {worst:.3g}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
