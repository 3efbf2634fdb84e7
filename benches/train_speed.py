#!/usr/bin/env python3
"""Training speed, side by side: ganomaly-train (Rust, tch) vs PyTorch (Python).

Same network (GANomaly NetG + NetD as the reference code builds them), same batch,
same thread count, random inputs in [-1, 1], no data loading on either side.
Two PyTorch variants are timed:
  reference  the authors' `optimize_params` (NetD run four times per step, G's
             backward also fills NetD's gradients, which are then zeroed);
  lean       the same updates with NetD run twice and each backward restricted
             to the parameters its optimiser updates, which is what the Rust
             trainer does;
  lean_fused (with --lean-fused) lean with torch.optim.Adam(fused=True), the
             kernel the Rust trainer's Adam calls: PyTorch's fastest CPU Adam.
The ratio printed is Rust images/s over each PyTorch variant's.

Usage: benches/train_speed.py [--isize 32 --nc 1 --ngf 64 --batch 64 --threads 2
                               --steps 20 --warmup 3 --bin target/release/ganomaly-train
                               [--bin OTHER ...]]
"""
import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn as nn


def encoder(isize, nz, nc, ndf, extralayers=0):
    main = nn.Sequential()
    main.add_module("initial-conv", nn.Conv2d(nc, ndf, 4, 2, 1, bias=False))
    main.add_module("initial-relu", nn.LeakyReLU(0.2, inplace=True))
    csize, cndf = isize // 2, ndf
    for t in range(extralayers):
        main.add_module(f"extra-{t}-conv", nn.Conv2d(cndf, cndf, 3, 1, 1, bias=False))
        main.add_module(f"extra-{t}-bn", nn.BatchNorm2d(cndf))
        main.add_module(f"extra-{t}-relu", nn.LeakyReLU(0.2, inplace=True))
    while csize > 4:
        main.add_module(f"pyramid-{cndf}-conv", nn.Conv2d(cndf, cndf * 2, 4, 2, 1, bias=False))
        main.add_module(f"pyramid-{cndf * 2}-bn", nn.BatchNorm2d(cndf * 2))
        main.add_module(f"pyramid-{cndf * 2}-relu", nn.LeakyReLU(0.2, inplace=True))
        cndf, csize = cndf * 2, csize // 2
    main.add_module("final-conv", nn.Conv2d(cndf, nz, 4, 1, 0, bias=False))
    return main


def decoder(isize, nz, nc, ngf, extralayers=0):
    cngf, tisize = ngf // 2, 4
    while tisize != isize:
        cngf, tisize = cngf * 2, tisize * 2
    main = nn.Sequential()
    main.add_module("initial-convt", nn.ConvTranspose2d(nz, cngf, 4, 1, 0, bias=False))
    main.add_module("initial-bn", nn.BatchNorm2d(cngf))
    main.add_module("initial-relu", nn.ReLU(True))
    csize = 4
    while csize < isize // 2:
        main.add_module(f"pyramid-{cngf}-convt", nn.ConvTranspose2d(cngf, cngf // 2, 4, 2, 1, bias=False))
        main.add_module(f"pyramid-{cngf // 2}-bn", nn.BatchNorm2d(cngf // 2))
        main.add_module(f"pyramid-{cngf // 2}-relu", nn.ReLU(True))
        cngf, csize = cngf // 2, csize * 2
    for t in range(extralayers):
        main.add_module(f"extra-{t}-conv", nn.Conv2d(cngf, cngf, 3, 1, 1, bias=False))
        main.add_module(f"extra-{t}-bn", nn.BatchNorm2d(cngf))
        main.add_module(f"extra-{t}-relu", nn.ReLU(True))
    main.add_module("final-convt", nn.ConvTranspose2d(cngf, nc, 4, 2, 1, bias=False))
    main.add_module("final-tanh", nn.Tanh())
    return main


class NetG(nn.Module):
    def __init__(self, isize, nz, nc, ngf):
        super().__init__()
        self.encoder1 = encoder(isize, nz, nc, ngf)
        self.decoder = decoder(isize, nz, nc, ngf)
        self.encoder2 = encoder(isize, nz, nc, ngf)

    def forward(self, x):
        latent_i = self.encoder1(x)
        gen = self.decoder(latent_i)
        latent_o = self.encoder2(gen)
        return gen, latent_i, latent_o


class NetD(nn.Module):
    def __init__(self, isize, nc, ndf):
        super().__init__()
        layers = list(encoder(isize, 1, nc, ndf).children())
        self.features = nn.Sequential(*layers[:-1])
        self.classifier = nn.Sequential(layers[-1], nn.Sigmoid())

    def forward(self, x):
        features = self.features(x)
        classifier = self.classifier(features).view(-1, 1).squeeze(1)
        return classifier, features


def weights_init(mod):
    name = mod.__class__.__name__
    if name.find("Conv") != -1:
        mod.weight.data.normal_(0.0, 0.02)
    elif name.find("BatchNorm") != -1:
        mod.weight.data.normal_(1.0, 0.02)
        mod.bias.data.fill_(0)


def l2_loss(input, target):
    return torch.mean(torch.pow((input - target), 2))


class Ganomaly:
    def __init__(self, a, fused=False):
        self.netg = NetG(a.isize, a.nz, a.nc, a.ngf)
        self.netd = NetD(a.isize, a.nc, a.ngf)
        self.netg.apply(weights_init)
        self.netd.apply(weights_init)
        self.l_con = nn.L1Loss()
        self.l_bce = nn.BCELoss()
        # fused=True: one kernel per parameter, as the Rust trainer's Adam (the
        # default on the CPU is the single-tensor path, several kernels per parameter).
        self.optimizer_g = torch.optim.Adam(self.netg.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused)
        self.optimizer_d = torch.optim.Adam(self.netd.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused)
        self.real_label = torch.ones(a.batch)
        self.fake_label = torch.zeros(a.batch)

    def step_reference(self, x):
        """The authors' optimize_params, verbatim in substance."""
        fake, latent_i, latent_o = self.netg(x)
        pred_real, _ = self.netd(x)
        pred_fake, _ = self.netd(fake.detach())
        self.optimizer_g.zero_grad()
        err_g_adv = l2_loss(self.netd(x)[1], self.netd(fake)[1])
        err_g_con = self.l_con(fake, x)
        err_g_enc = l2_loss(latent_o, latent_i)
        err_g = err_g_adv * 1 + err_g_con * 50 + err_g_enc * 1
        err_g.backward(retain_graph=True)
        self.optimizer_g.step()
        self.optimizer_d.zero_grad()
        err_d = (self.l_bce(pred_real, self.real_label) + self.l_bce(pred_fake, self.fake_label)) * 0.5
        err_d.backward()
        self.optimizer_d.step()
        if err_d.item() < 1e-5:
            self.netd.apply(weights_init)

    def step_lean(self, x):
        """The same updates as the Rust trainer computes them."""
        fake, latent_i, latent_o = self.netg(x)
        pred_real, feat_real = self.netd(x)
        pred_fake, feat_fake = self.netd(fake)
        err_g = l2_loss(feat_real.detach(), feat_fake) * 1 + self.l_con(fake, x) * 50 + l2_loss(latent_o, latent_i) * 1
        gparams = list(self.netg.parameters())
        grads = torch.autograd.grad(err_g, gparams, retain_graph=True)
        for p, g in zip(gparams, grads):
            p.grad = g
        self.optimizer_g.step()
        err_d = (self.l_bce(pred_real, self.real_label) + self.l_bce(pred_fake, self.fake_label)) * 0.5
        dparams = list(self.netd.parameters())
        grads = torch.autograd.grad(err_d, dparams)
        for p, g in zip(dparams, grads):
            p.grad = g
        self.optimizer_d.step()
        if err_d.item() < 1e-5:
            self.netd.apply(weights_init)


def time_python(a, variant):
    torch.manual_seed(0)
    m = Ganomaly(a, fused=variant == "lean_fused")
    x = torch.rand(a.batch, a.nc, a.isize, a.isize) * 2 - 1
    step = m.step_reference if variant == "reference" else m.step_lean
    for _ in range(a.warmup):
        step(x)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        step(x)
    dt = time.process_time() - c0 if a.clock == "cpu" else time.perf_counter() - t0
    return a.steps * a.batch / dt


def time_rust(a, bin):
    cmd = [bin, "bench-step", "--isize", str(a.isize), "--nc", str(a.nc), "--nz", str(a.nz), "--ngf", str(a.ngf),
           "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--device", "cpu"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["images_per_cpu_s"] if a.clock == "cpu" else r["images_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isize", type=int, default=32)
    p.add_argument("--nc", type=int, default=1)
    p.add_argument("--nz", type=int, default=100)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side is kept")
    p.add_argument("--bin", action="append",
                   help="the trainer (default target/release/ganomaly-train); given again, each further binary "
                        "is timed in the same rounds too (a before/after comparison in one run)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="images per wall-clock second (default), or per CPU second of the process: with "
                        "--threads 1 on a loaded shared box, the CPU clock measures the step, the wall clock "
                        "mostly the neighbours")
    p.add_argument("--lean-fused", action="store_true", help="also time lean with the fused Adam kernel")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    bins = a.bin or ["target/release/ganomaly-train"]
    torch.set_num_threads(a.threads)
    # The first binary is "rust"; further ones are named by their path.
    names = ["rust"] + [f"rust:{b}" for b in bins[1:]]
    variants = ["reference", "lean"] + (["lean_fused"] if a.lean_fused else [])
    best = {n: 0.0 for n in names} | {f"pytorch_{v}": 0.0 for v in variants}
    # Alternate so that a noisy neighbour on a shared box hurts both sides alike.
    for _ in range(a.rounds):
        for n, b in zip(names, bins):
            best[n] = max(best[n], time_rust(a, b))
        for v in variants:
            best[f"pytorch_{v}"] = max(best[f"pytorch_{v}"], time_python(a, v))
    result = {
        "net": f"{a.nc}x{a.isize}x{a.isize} ngf {a.ngf} nz {a.nz}",
        "batch": a.batch,
        "threads": a.threads,
        "clock": a.clock,
        "torch": torch.__version__,
        "images_per_s": {k: round(v, 1) for k, v in best.items()},
        "ratio_vs_reference": round(best["rust"] / best["pytorch_reference"], 3),
        "ratio_vs_lean": round(best["rust"] / best["pytorch_lean"], 3),
    }
    for n in names[1:]:
        result[f"ratio_vs_lean {n}"] = round(best[n] / best["pytorch_lean"], 3)
    if a.lean_fused:
        result["ratio_vs_lean_fused"] = round(best["rust"] / best["pytorch_lean_fused"], 3)
    if a.json:
        print(json.dumps(result))
    else:
        per = "CPU second" if a.clock == "cpu" else "second"
        print(f"GANomaly training, {result['net']}, batch {a.batch}, {a.threads} threads, CPU, images per {per}")
        for k, v in result["images_per_s"].items():
            print(f"  {k:<18} {v:8.1f} img/s")
        print(f"  ratio rust/pytorch (reference step): {result['ratio_vs_reference']:.3f}")
        print(f"  ratio rust/pytorch (same algorithm): {result['ratio_vs_lean']:.3f}")
        for n in names[1:]:
            print(f"  ratio {n}/pytorch (same algorithm): {result[f'ratio_vs_lean {n}']:.3f}")
        if a.lean_fused:
            print(f"  ratio rust/pytorch (same algorithm, fused Adam on both): {result['ratio_vs_lean_fused']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
