#!/usr/bin/env python3
"""Offline measurement (issue 19): nearest-neighbour patch scores over encoder1's
maps, against the scores the models export, on the quality benchmark's exported
models (benches/quality.sh with KEEP=1). Nothing here is shipped in a model.

    knn_candidates.py OUTDIR [--recipe final] [--jobs 2] [--pixels]

Per run it opens model.onnx with ONNX Runtime, exposes encoder1's maps (depth 1:
isize/2, 2: isize/4, 3: isize/8) as extra outputs, and scores test/ and val/ with

  knn<depths>   PatchCore's score on GANomaly's own encoder: every position of the
                chosen maps (nearest-upsampled to the finest one's grid,
                concatenated, each channel standardised on train/good) is compared
                with a memory bank of train/good positions; the position's squared
                distance to its nearest bank entry is the map, its maximum the image
                score. Bank: a greedy k-centre coreset of BANK entries (PatchCore's
                selection, on a seeded 32-dimensional random projection), drawn from
                at most POOL randomly chosen training positions.
  knn<d>_rand   the same with a random bank of the same size (shows what the
                coreset selection is worth)
  pix<k>        (--pixels, tex-* only) the same nearest-neighbour score on raw k×k
                pixel windows (stride 1, 16,384 random bank windows): a model-free
                reference for how far *local* novelty can see on a data set

and simulates `--score auto` with the candidates added: per run, the score with the
best val/ AUROC among the exported ones and the candidates (no one-SE guard), its
test/ AUROC reported. Prints a markdown table; writes OUTDIR/knn_candidates.json.
Needs numpy, onnx, onnxruntime and Pillow.
"""
import argparse
import glob
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score_candidates import auroc, load_images, split  # noqa: E402

EXPORTED = ["score", "score_mahalanobis", "score_patch", "score_fused"]
DEPTHS = ([1], [2], [3], [1, 2], [2, 3])
BANK, POOL = 2048, 50_000


def session(path):
    m = onnx.load(path)
    maps = {}
    for n in m.graph.node:
        # encoder1's last activation at each side (the maps core/src/patch.rs reads)
        if n.op_type == "LeakyRelu" and n.output[0].startswith("encoder1."):
            maps[n.output[0]] = None
    names = list(maps)
    for name in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    arch = json.loads({p.key: p.value for p in m.metadata_props}["ganomaly.arch"])
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"]), arch, names


def features(sess, names, x):
    outs = EXPORTED + names
    acc = {k: [] for k in outs}
    for s in range(0, len(x), 128):
        for k, v in zip(outs, sess.run(outs, {"image": x[s:s + 128]})):
            acc[k].append(v)
    r = {k: np.concatenate(v) for k, v in acc.items()}
    # by depth: the last activation at each side
    by_side = {}
    for n in names:
        by_side[r[n].shape[-1]] = r[n]
    r["maps"] = [by_side[s] for s in sorted(by_side, reverse=True)]
    return r


def grid(maps, depths):
    g = maps[depths[0] - 1].shape[-1]
    parts = []
    for d in depths:
        f = maps[d - 1]
        k = g // f.shape[-1]
        parts.append(f.repeat(k, 2).repeat(k, 3) if k > 1 else f)
    f = np.concatenate(parts, 1)
    n, c = f.shape[:2]
    return f.transpose(0, 2, 3, 1).reshape(n, -1, c)  # N, P, C


def nearest(bank, q, chunk=8192):
    """Squared distance of every row of q [N, P, d] to its nearest row of bank [M, d]."""
    n, p, d = q.shape
    flat = q.reshape(-1, d)
    bb = (bank * bank).sum(1)
    out = np.empty(len(flat), np.float32)
    for s in range(0, len(flat), chunk):
        a = flat[s:s + chunk]
        out[s:s + chunk] = np.maximum((a * a).sum(1)[:, None] - 2 * a @ bank.T + bb[None], 0).min(1)
    return out.reshape(n, p)


def coreset(x, m, rng):
    proj = rng.normal(size=(x.shape[1], 32)).astype(np.float32) if x.shape[1] > 32 else np.eye(x.shape[1], dtype=np.float32)
    y = x @ proj
    sel = [int(rng.integers(len(x)))]
    best = ((y - y[sel[0]]) ** 2).sum(1)
    for _ in range(m - 1):
        i = int(best.argmax())
        sel.append(i)
        best = np.minimum(best, ((y - y[i]) ** 2).sum(1))
    return x[sel]


def knn_scores(tr, sets):
    out = {k: [] for k in range(len(sets))}
    names = []
    for depths in DEPTHS:
        if depths[-1] > len(tr["maps"]):
            continue
        rng = np.random.default_rng(0)
        ftr = grid(tr["maps"], depths)
        c = ftr.shape[-1]
        xtr = ftr.reshape(-1, c)
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        xtr = ((xtr - mu) / sd).astype(np.float32)
        pool = xtr if len(xtr) <= POOL else xtr[rng.choice(len(xtr), POOL, replace=False)]
        banks = {"": coreset(pool, min(BANK, len(pool)), rng)}
        if depths in ([1, 2], [2]):
            banks["_rand"] = pool[rng.choice(len(pool), min(BANK, len(pool)), replace=False)]
        for tag, bank in banks.items():
            name = "knn" + "".join(map(str, depths)) + tag
            names.append(name)
            for i, s in enumerate(sets):
                q = ((grid(s["maps"], depths) - mu) / sd).astype(np.float32)
                out[i].append((name, nearest(bank, q).max(1)))
    return names, out


def pixel_scores(train_x, sets_x, k, rng):
    def windows(x):
        w = np.lib.stride_tricks.sliding_window_view(x[:, 0], (k, k), axis=(1, 2))
        return w.reshape(len(x), -1, k * k).astype(np.float32)
    tr = windows(train_x).reshape(-1, k * k)
    bank = tr[rng.choice(len(tr), 16384, replace=False)]
    return [nearest(bank, windows(x)).max(1) for x in sets_x]


def evaluate(job):
    ds, seed, model, data, pixels = job
    sess, arch, names = session(model)
    isize, nc = arch["isize"], arch["nc"]
    tr = features(sess, names, load_images(sorted(glob.glob(os.path.join(data, "train", "good", "*.png"))), isize, nc))
    subs, sets, labels, imgs = [], [], [], []
    for sub in ("test", "val"):
        groups = split(data, sub)
        if not groups:
            continue
        paths = [p for _, ps in groups for p in ps]
        x = load_images(paths, isize, nc)
        subs.append(sub)
        imgs.append(x)
        sets.append(features(sess, names, x))
        labels.append(np.array([lab or "good" for lab, ps in groups for _ in ps]))
    knames, kout = knn_scores(tr, sets)
    res = {}
    for i, sub in enumerate(subs):
        scores = [(k, sets[i][k]) for k in EXPORTED] + kout[i]
        if pixels and ds.startswith("tex-") and nc == 1:
            rng = np.random.default_rng(0)
            for k in (5, 9):
                scores.append((f"pix{k}", pixel_scores(load_images(sorted(glob.glob(os.path.join(data, "train", "good", "*.png"))), isize, nc), [imgs[i]], k, rng)[0]))
        good = labels[i] == "good"
        res[sub] = {}
        for name, s in scores:
            row = {"all": auroc(s[good], s[~good])}
            for d in sorted(set(labels[i]) - {"good"}):
                row[d] = auroc(s[good], s[labels[i] == d])
            res[sub][name] = row
    print(ds, seed, " ".join(f"{k}={v['all']:.3f}" for k, v in res["test"].items()), file=sys.stderr, flush=True)
    return ds, seed, res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--recipe", default="final")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--pixels", action="store_true")
    a = ap.parse_args()
    jobs = []
    for model in sorted(glob.glob(os.path.join(a.out, a.recipe, "*", "seed*", "model.onnx"))):
        ds = model.split(os.sep)[-3]
        jobs.append((ds, int(model.split(os.sep)[-2][4:]), model, os.path.join(a.out, "data", ds), a.pixels))
    for model in sorted(glob.glob(os.path.join(a.out, a.recipe, "mnist", "digit*-seed*", "model.onnx"))):
        d, s = model.split(os.sep)[-2][len("digit"):].split("-seed")
        jobs.append((f"mnist-{d}", int(s), model, os.path.join(os.path.dirname(model), "data"), a.pixels))
    if not jobs:
        sys.exit(f"no model.onnx under {a.out}/{a.recipe} (run benches/quality.sh with KEEP=1)")
    table = {}
    with ProcessPoolExecutor(a.jobs) as pool:
        for ds, seed, res in pool.map(evaluate, jobs):
            table.setdefault(ds, {})[seed] = res
    # simulated auto: best val AUROC among every score, its test AUROC
    for ds, seeds in table.items():
        for seed, res in seeds.items():
            if "val" not in res:
                continue
            for tag, pool_ in (("auto_exported", EXPORTED), ("auto_with_knn", [k for k in res["val"] if not k.startswith("pix")])):
                best = max(pool_, key=lambda k: res["val"][k]["all"])
                res["test"][tag] = dict(res["test"][best], chosen=best)
    json.dump(table, open(os.path.join(a.out, "knn_candidates.json"), "w"), indent=1)
    sets = sorted(table)
    kinds = list(next(iter(next(iter(table.values())).values()))["test"])
    for k in {k for ds in table.values() for r in ds.values() for k in r["test"]} - set(kinds):
        kinds.append(k)
    print("| score | " + " | ".join(sets) + " | mean (worst) |")
    print("|---" * (len(sets) + 2) + "|")
    for k in kinds:
        cells, means = [], []
        for ds in sets:
            v = [r["test"][k]["all"] for r in table[ds].values() if k in r["test"]]
            if v:
                means.append(statistics.mean(v))
                cells.append(f"{statistics.mean(v):.3f} ({max(v) - min(v):.3f})")
            else:
                cells.append("–")
        tail = f"{statistics.mean(means):.3f} ({min(means):.3f})" if len(means) == len(sets) else "–"
        print(f"| {k} | " + " | ".join(cells) + f" | {tail} |")


if __name__ == "__main__":
    main()
