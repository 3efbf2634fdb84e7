#!/usr/bin/env python3
"""Data sets of the quality benchmark (benches/quality.sh): scikit-image's CC0
textures (brick, grass, gravel) cut into patches, with defects pasted in, written
as MVTec-style folders that ganomaly-train reads with its normal loader.

    quality_data.py textures --wheel-dir DIR --out DIR [--patch 32] [--train 400] ...
    quality_data.py split-val --data DIR [--good 30] [--per-defect 10]

Defect masks go to ground_truth/<defect>/<name>_mask.png (MVTec's layout), for
the trainer's pixel-localisation figure.

The 512×512 texture is split by rows: training patches come from the top three
quarters, every test patch (good or defective) from the bottom quarter, so no
test pixel was ever trained on. Defects are painted here with numpy, by a
generator independent of core's `synth` (the synthetic data sets use that one):
the benchmark should not only measure defects of the shape the project's own
generator makes.

Needs numpy only (no Pillow in the venv): PNG is read and written with zlib.
"""
import argparse
import os
import struct
import sys
import zipfile
import zlib

import numpy as np

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "crack", "stain", "hole")


# --- PNG, 8-bit gray, non-interlaced (what skimage ships and what we write) ---

def png_read_gray(data):
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = hdr
    if (depth, ctype, interlace) != (8, 0, 0):
        raise ValueError(f"only 8-bit gray non-interlaced PNG is read here, got depth {depth} type {ctype}")
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, w + 1)
    out = np.zeros((h, w), dtype=np.int32)
    prev = np.zeros(w, dtype=np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        else:  # sub, average, paeth depend on the left neighbour: per pixel
            cur = np.zeros(w, dtype=np.int32)
            for x in range(w):
                a = cur[x - 1] if x else 0
                b, c = prev[x], (prev[x - 1] if x else 0)
                if f == 1:
                    p = a
                elif f == 3:
                    p = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + p) & 255
        out[y] = cur
        prev = cur
    return out.astype(np.uint8)


def png_write_gray(path, img):
    h, w = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag, body):
        c = struct.pack(">I", len(body)) + tag + body
        return c + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# --- defects, painted on a float patch in [0, 255] ---

def _segment_mask(p, x0, y0, x1, y1, width):
    yy, xx = np.mgrid[0:p, 0:p].astype(np.float64)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    d = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
    return np.clip(width / 2 + 0.5 - d, 0, 1)


def paint(patch, kind, rng):
    """Returns the patch with a `kind` defect and the defect's soft mask."""
    p = patch.shape[0]
    img = patch.astype(np.float64)
    mean = img.mean()
    # Darker than the surroundings on a bright texture, brighter on a dark one.
    sign = -1.0 if mean > 110 else 1.0
    if kind == "scratch":
        length = rng.uniform(0.35, 0.6) * p
        ang = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0.3, 0.7, 2) * p
        dx, dy = np.cos(ang) * length / 2, np.sin(ang) * length / 2
        m = _segment_mask(p, cx - dx, cy - dy, cx + dx, cy + dy, rng.uniform(1.2, 2.2))
        img = img + m * sign * rng.uniform(70, 110)
    elif kind == "crack":
        m = np.zeros((p, p))
        x, y = rng.uniform(0.25, 0.75, 2) * p
        ang = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(5, 8))):
            ang += rng.normal(0, 0.6)
            step = rng.uniform(0.06, 0.1) * p
            nx, ny = x + np.cos(ang) * step, y + np.sin(ang) * step
            m = np.maximum(m, _segment_mask(p, x, y, nx, ny, 1.3))
            x, y = nx, ny
        img = img * (1 - m) + m * rng.uniform(0, 30)
    elif kind == "stain":
        r = rng.uniform(0.08, 0.16) * p
        cx, cy = rng.uniform(0.25, 0.75, 2) * p
        yy, xx = np.mgrid[0:p, 0:p]
        m = np.exp(-(((xx - cx) ** 2 + ((yy - cy) * rng.uniform(0.6, 1.4)) ** 2) / (2 * r * r)))
        img = img * (1 - 0.6 * m) + m * 0.6 * (mean + sign * rng.uniform(60, 90))
    elif kind == "hole":
        r = rng.uniform(0.05, 0.09) * p
        cx, cy = rng.uniform(0.25, 0.75, 2) * p
        yy, xx = np.mgrid[0:p, 0:p]
        d = np.hypot(xx - cx, yy - cy)
        m = np.clip(r + 0.5 - d, 0, 1)
        rim = np.clip(1.5 - np.abs(d - r - 1), 0, 1) * (1 - m)
        img = img * (1 - m) + m * rng.uniform(5, 25)
        img = img * (1 - rim) + rim * 235
        m = np.maximum(m, rim)
    else:
        raise ValueError(kind)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), m


def crop(tex, rows, p, rng):
    y = int(rng.integers(rows[0], rows[1] - p + 1))
    x = int(rng.integers(0, tex.shape[1] - p + 1))
    return tex[y:y + p, x:x + p]


def textures(a):
    wheels = sorted(f for f in os.listdir(a.wheel_dir) if f.startswith("scikit_image") and f.endswith(".whl"))
    if not wheels:
        sys.exit(f"no scikit_image*.whl in {a.wheel_dir} (pip download --no-deps scikit-image -d {a.wheel_dir})")
    with zipfile.ZipFile(os.path.join(a.wheel_dir, wheels[-1])) as z:
        for name in a.textures:
            tex = png_read_gray(z.read(f"skimage/data/{name}.png"))
            h = tex.shape[0]
            cut = h * 3 // 4
            rng = np.random.default_rng(a.seed)
            root = os.path.join(a.out, name)
            parts = [("train/good", (0, cut), a.train, None), ("test/good", (cut, h), a.test_good, None)]
            parts += [(f"test/{d}", (cut, h), a.test_per_defect, d) for d in DEFECTS]
            for sub, rows, n, defect in parts:
                os.makedirs(os.path.join(root, sub), exist_ok=True)
                for i in range(n):
                    patch = crop(tex, rows, a.patch, rng)
                    if defect is not None:
                        patch, m = paint(patch, defect, rng)
                        # MVTec-style ground truth (pixel localisation): where the soft
                        # mask is over one half. Writing it draws nothing from rng, so
                        # the images are those of earlier runs.
                        gt = os.path.join(root, "ground_truth", defect)
                        os.makedirs(gt, exist_ok=True)
                        png_write_gray(os.path.join(gt, f"{i:04}_mask.png"),
                                       np.ascontiguousarray(np.where(m > 0.5, 255, 0).astype(np.uint8)))
                    png_write_gray(os.path.join(root, sub, f"{i:04}.png"), np.ascontiguousarray(patch))
            print(f"{root}: {a.train} train/good, {a.test_good} test/good, {a.test_per_defect} × {len(DEFECTS)} defective")


def split_val(a):
    """Moves the first files of DIR/test/good and of each DIR/test/<defect> into DIR/val/:
    the validation split that `ganomaly-train train --score auto` chooses the score with."""
    import shutil
    test = os.path.join(a.data, "test")
    for kind in sorted(os.listdir(test)):
        n = a.good if kind == "good" else a.per_defect
        files = sorted(f for f in os.listdir(os.path.join(test, kind)) if f.endswith(".png"))
        if len(files) <= n:
            sys.exit(f"{test}/{kind} has {len(files)} images: too few to move {n} into val/")
        os.makedirs(os.path.join(a.data, "val", kind), exist_ok=True)
        for f in files[:n]:
            shutil.move(os.path.join(test, kind, f), os.path.join(a.data, "val", kind, f))
    print(f"{a.data}/val: {a.good} good, {a.per_defect} per defect type (moved from test/)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("textures", help="scikit-image textures with pasted defects")
    t.add_argument("--wheel-dir", required=True, help="folder holding the scikit_image wheel")
    t.add_argument("--out", required=True)
    t.add_argument("--textures", nargs="+", default=list(TEXTURES), choices=TEXTURES)
    t.add_argument("--patch", type=int, default=32)
    t.add_argument("--train", type=int, default=400)
    t.add_argument("--test-good", type=int, default=100)
    t.add_argument("--test-per-defect", type=int, default=40)
    t.add_argument("--seed", type=int, default=0, help="data seed (fixed across training seeds)")
    v = sub.add_parser("split-val", help="move part of test/ into val/ (for --score auto)")
    v.add_argument("--data", required=True)
    v.add_argument("--good", type=int, default=30)
    v.add_argument("--per-defect", type=int, default=10)
    a = ap.parse_args()
    if a.cmd == "textures":
        textures(a)
    elif a.cmd == "split-val":
        split_val(a)


if __name__ == "__main__":
    main()
