#!/usr/bin/env python3
"""Offline comparison of candidate image scores on the quality benchmark's
exported models (benches/quality.sh with KEEP=1).

    score_candidates.py OUTDIR [--recipe final]

For every run it opens model.onnx with ONNX Runtime, exposes the encoder's
latent codes z_i (of the image) and z_o (of the reconstruction) as extra graph
outputs, fits statistics on the run's train/good images, and reports image
AUROC on test/ (and on val/, which is what a selection rule may look at) of:

  latent      mean((z_i - z_o)^2), the paper's score (check against report.json)
  recon       mean |x - x^|
  map_max     max of the box-smoothed |x - x^| map
  lat_diag    mean((z_i - z_o)^2 / var_train(z_i - z_o)): per-dimension standardized
  mahal_d     Mahalanobis distance of z_i - z_o (Ledoit-Wolf shrunk covariance)
  mahal_z     Mahalanobis distance of z_i from the training codes
  sum_*       sums of scores standardized by their train mean/std

Needs numpy, onnx, onnxruntime and Pillow (for the synthetic RGB PNGs).
"""
import argparse
import glob
import json
import os
import statistics
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image


def auroc(normal, defect):
    normal, defect = np.asarray(normal), np.asarray(defect)
    allv = np.concatenate([normal, defect])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r = ranks[len(normal):].sum()
    n1 = len(defect)
    return (r - n1 * (n1 + 1) / 2) / (n1 * len(normal))


def load_images(paths, isize, nc):
    out = np.zeros((len(paths), nc, isize, isize), np.float32)
    for k, p in enumerate(paths):
        im = Image.open(p).convert("L" if nc == 1 else "RGB")
        if im.size != (isize, isize):
            im = im.resize((isize, isize), Image.BILINEAR)
        a = np.asarray(im, np.float32) / 127.5 - 1.0
        out[k] = a[None] if nc == 1 else a.transpose(2, 0, 1)
    return out


def with_latents(path):
    m = onnx.load(path)
    g = m.graph
    score_node = next(n for n in g.node if n.output[0] == "score")
    mul = next(n for n in g.node if n.output[0] == score_node.input[0])
    sub = next(n for n in g.node if n.output[0] == mul.input[0])
    zi, zo = sub.input
    for name in (zi, zo):
        g.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    meta = {p.key: p.value for p in m.metadata_props}
    arch = json.loads(meta["ganomaly.arch"])
    return m.SerializeToString(), arch, zi, zo


def run(sess, x, zi, zo, batch=128):
    outs = {k: [] for k in ("score", "score_recon", "score_map", zi, zo)}
    for s in range(0, len(x), batch):
        r = sess.run(list(outs), {"image": x[s:s + batch]})
        for k, v in zip(outs, r):
            outs[k].append(v.reshape(len(v), -1) if v.ndim > 1 else v)
    o = {k: np.concatenate(v) for k, v in outs.items()}
    return {"latent": o["score"], "recon": o["score_recon"], "map_max": o["score_map"], "zi": o[zi], "zo": o[zo]}


def ledoit_wolf(x):
    x = x - x.mean(0)
    n, p = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / p
    delta = ((s - mu * np.eye(p)) ** 2).sum() / p
    # Σ_k ‖x_k x_kᵀ − S‖²_F = Σ_k ‖x_k‖⁴ − n‖S‖²_F (as trainer/src/score.rs): no per-image p×p matrices
    beta = max(((x * x).sum(1) ** 2).sum() - n * (s * s).sum(), 0.0) / (n * n * p)
    shrink = min(beta, delta) / delta if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * np.eye(p), shrink


def candidates(train, sets):
    """Adds the candidate scores to every dict in `sets` (fitted on `train`)."""
    d_tr = train["zi"] - train["zo"]
    var = d_tr.var(0) + 1e-12
    cov_d, _ = ledoit_wolf(d_tr)
    prec_d = np.linalg.inv(cov_d)
    mu_z = train["zi"].mean(0)
    cov_z, _ = ledoit_wolf(train["zi"])
    prec_z = np.linalg.inv(cov_z)
    cat_tr = np.concatenate([train["zi"], train["zo"]], 1)
    mu_c = cat_tr.mean(0)
    prec_c = np.linalg.inv(ledoit_wolf(cat_tr)[0])
    mu_o = train["zo"].mean(0)
    prec_o = np.linalg.inv(ledoit_wolf(train["zo"])[0])
    for s in [train] + sets:
        d = s["zi"] - s["zo"]
        s["lat_diag"] = (d * d / var).mean(1)
        s["mahal_d"] = np.einsum("ni,ij,nj->n", d, prec_d, d)
        zc = s["zi"] - mu_z
        s["mahal_z"] = np.einsum("ni,ij,nj->n", zc, prec_z, zc)
        c = np.concatenate([s["zi"], s["zo"]], 1) - mu_c
        s["mahal_cat"] = np.einsum("ni,ij,nj->n", c, prec_c, c)
        o = s["zo"] - mu_o
        s["mahal_zo"] = np.einsum("ni,ij,nj->n", o, prec_o, o)
    base = ["latent", "recon", "map_max", "lat_diag", "mahal_d", "mahal_z", "mahal_cat", "mahal_zo"]
    stats = {k: (train[k].mean(), train[k].std() + 1e-12) for k in base}
    combos = {"sum_lat_map": ("latent", "map_max"), "sum_lat_recon": ("latent", "recon"),
              "sum_diag_map": ("lat_diag", "map_max"), "sum_mahd_map": ("mahal_d", "map_max"),
              "sum_lat_mahz": ("latent", "mahal_z"), "sum_mahz_map": ("mahal_z", "map_max")}
    for s in [train] + sets:
        for name, parts in combos.items():
            s[name] = sum((s[k] - stats[k][0]) / stats[k][1] for k in parts)
    return base + list(combos)


def split(data_dir, sub):
    """[(label, [paths])] of DIR/sub/*; label None = good."""
    out = []
    for d in sorted(glob.glob(os.path.join(data_dir, sub, "*"))):
        paths = sorted(glob.glob(os.path.join(d, "*.png")))
        if paths:
            out.append((None if os.path.basename(d) == "good" else os.path.basename(d), paths))
    return out


def evaluate(model, data_dir):
    raw, arch, zi, zo = with_latents(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
    isize, nc = arch["isize"], arch["nc"]
    train_paths = sorted(glob.glob(os.path.join(data_dir, "train", "good", "*.png")))
    train = run(sess, load_images(train_paths, isize, nc), zi, zo)
    parts = {}
    for sub in ("test", "val"):
        groups = split(data_dir, sub)
        if not groups:
            continue
        paths = [p for _, ps in groups for p in ps]
        labels = [lab for lab, ps in groups for _ in ps]
        parts[sub] = (run(sess, load_images(paths, isize, nc), zi, zo), np.array([lab is not None for lab in labels]))
    kinds = candidates(train, [v[0] for v in parts.values()])
    res = {}
    for sub, (s, defect) in parts.items():
        res[sub] = {k: auroc(s[k][~defect], s[k][defect]) for k in kinds}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--recipe", default="final")
    a = ap.parse_args()
    runs = []
    for model in sorted(glob.glob(os.path.join(a.out, a.recipe, "*", "seed*", "model.onnx"))):
        ds = model.split(os.sep)[-3]
        runs.append((ds, int(model.split(os.sep)[-2][4:]), model, os.path.join(a.out, "data", ds)))
    for model in sorted(glob.glob(os.path.join(a.out, a.recipe, "mnist", "digit*-seed*", "model.onnx"))):
        name = model.split(os.sep)[-2]
        d, s = name[len("digit"):].split("-seed")
        runs.append((f"mnist-{d}", int(s), model, os.path.join(os.path.dirname(model), "data")))
    table = {}
    for ds, seed, model, data in runs:
        r = evaluate(model, data)
        table.setdefault(ds, {})[seed] = r
        print(ds, seed, " ".join(f"{k}={v:.3f}" for k, v in r["test"].items()), file=sys.stderr)
    json.dump(table, open(os.path.join(a.out, "score_candidates.json"), "w"), indent=1)
    kinds = list(next(iter(next(iter(table.values())).values()))["test"])
    print("| data set | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    means = {k: [] for k in kinds}
    for ds, seeds in table.items():
        cells = []
        for k in kinds:
            v = [seeds[s]["test"][k] for s in seeds]
            means[k].append(statistics.mean(v))
            cells.append(f"{statistics.mean(v):.3f} ({max(v) - min(v):.3f})")
        print(f"| {ds} | " + " | ".join(cells) + " |")
    print("| mean | " + " | ".join(f"{statistics.mean(v):.3f}" for v in means.values()) + " |")
    print("| worst | " + " | ".join(f"{min(v):.3f}" for v in means.values()) + " |")


if __name__ == "__main__":
    main()
