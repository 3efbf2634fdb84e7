//! The two networks, their optimisers and the GANomaly training step: G then D
//! each step with the reference's losses, NetD re-initialised when its loss
//! collapses, the weight average updated after the step; one pass over the images
//! is [`run_epoch`].

use std::collections::BTreeMap;
use std::time::Instant;

use ganomaly_core::arch::ArchSpec;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::adam::{Adam, AdamConfig};
use crate::data::SplitMix;
use crate::net::{seeded, NetD, NetG};

/// NetD is re-initialised when its loss falls below this (the reference's rule).
pub const D_REINIT_BELOW: f64 = 1e-5;

/// Loss weights and optimiser settings (reference defaults in the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub w_adv: f64,
    pub w_con: f64,
    pub w_enc: f64,
}

impl Default for Hyper {
    fn default() -> Self {
        Hyper { lr: 2e-4, beta1: 0.5, beta2: 0.999, w_adv: 1.0, w_con: 50.0, w_enc: 1.0 }
    }
}

/// Losses of one step (or their means over an epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Losses {
    pub err_g: f64,
    pub err_g_adv: f64,
    pub err_g_con: f64,
    pub err_g_enc: f64,
    pub err_d: f64,
}

impl Losses {
    fn add(&mut self, o: &Losses) {
        self.err_g += o.err_g;
        self.err_g_adv += o.err_g_adv;
        self.err_g_con += o.err_g_con;
        self.err_g_enc += o.err_g_enc;
        self.err_d += o.err_d;
    }
    fn scale(&mut self, k: f64) {
        for v in [&mut self.err_g, &mut self.err_g_adv, &mut self.err_g_con, &mut self.err_g_enc, &mut self.err_d] {
            *v *= k;
        }
    }
}

/// The two networks and their optimisers.
pub struct Model {
    pub g: NetG,
    pub d: NetD,
    pub opt_g: Adam,
    pub opt_d: Adam,
    pub hyper: Hyper,
    /// NetG's and NetD's trainable tensors in optimiser order (shallow clones of
    /// the VarStores'): what the optimisers update and the checkpoint names.
    pub(crate) g_params: Vec<(String, Tensor)>,
    pub(crate) d_params: Vec<(String, Tensor)>,
    /// How often NetD was re-initialised (a sign of a collapsed discriminator).
    pub d_reinits: u64,
    /// Moving average of NetG's weights, updated after every step (`--ema-decay`).
    pub ema: Option<Ema>,
}

impl Model {
    /// Fresh networks: seeds libtorch, then initialises NetG then NetD as the reference.
    pub fn new(arch: &ArchSpec, hyper: Hyper, seed: u64, device: Device) -> Model {
        let (g, d) = seeded(seed, || (NetG::new(arch, device), NetD::new(arch, device)));
        let cfg = AdamConfig { lr: hyper.lr, beta1: hyper.beta1, beta2: hyper.beta2, eps: 1e-8 };
        let g_params = g.trainable();
        let d_params = d.trainable();
        let opt_g = Adam::new(cfg, &g_params);
        let opt_d = Adam::new(cfg, &d_params);
        Model { g, d, opt_g, opt_d, hyper, g_params, d_params, d_reinits: 0, ema: None }
    }

    /// One optimisation step on batch `x` (on the model's device), as the reference's
    /// `optimize_params`: forward G; D on real and fake; update G with
    /// `w_adv·L2(f(x), f(x̂)) + w_con·L1(x̂, x) + w_enc·L2(z_o, z_i)`; update D with
    /// `0.5·(BCE(D(x), 1) + BCE(D(x̂), 0))`; re-init D if its loss fell below 1e-5.
    ///
    /// The reference runs NetD four times per step (twice in `forward_d`, twice
    /// again for the adversarial loss); in training mode those repeats compute the
    /// same values, so this runs it twice and restricts each backward pass to the
    /// parameters its optimiser updates. G's and D's updates are the reference's.
    pub fn step(&mut self, x: &Tensor) -> Losses {
        let h = self.hyper;
        let out = self.g.forward(x, true);
        let (pred_real, feat_real) = self.d.forward(x, true);
        let (pred_fake, feat_fake) = self.d.forward(&out.fake, true);

        let err_g_adv = feat_real.detach().mse_loss(&feat_fake, Reduction::Mean);
        let err_g_con = out.fake.l1_loss(x, Reduction::Mean);
        let err_g_enc = out.latent_o.mse_loss(&out.latent_i, Reduction::Mean);
        let err_g = &err_g_adv * h.w_adv + &err_g_con * h.w_con + &err_g_enc * h.w_enc;
        let g_vars: Vec<&Tensor> = self.g_params.iter().map(|(_, t)| t).collect();
        // keep_graph: D's loss below back-propagates through D(x̂) again.
        let grads_g = Tensor::run_backward(&[&err_g], &g_vars, true, false);
        self.opt_g.step(&self.g_params, &grads_g);

        let ones = pred_real.ones_like();
        let zeros = pred_fake.zeros_like();
        let err_d = (pred_real.binary_cross_entropy(&ones, None::<&Tensor>, Reduction::Mean)
            + pred_fake.binary_cross_entropy(&zeros, None::<&Tensor>, Reduction::Mean))
            * 0.5;
        // Only D's parameters: the fake's graph into G is not walked (G just changed).
        let d_vars: Vec<&Tensor> = self.d_params.iter().map(|(_, t)| t).collect();
        let grads_d = Tensor::run_backward(&[&err_d], &d_vars, false, false);
        self.opt_d.step(&self.d_params, &grads_d);

        let losses = Losses {
            err_g: err_g.double_value(&[]),
            err_g_adv: err_g_adv.double_value(&[]),
            err_g_con: err_g_con.double_value(&[]),
            err_g_enc: err_g_enc.double_value(&[]),
            err_d: err_d.double_value(&[]),
        };
        if losses.err_d < D_REINIT_BELOW {
            self.d.reinit();
            self.d_reinits += 1;
        }
        if let Some(ema) = &mut self.ema {
            ema.update();
        }
        losses
    }

    /// The generator that is evaluated and exported: the average when there is one.
    pub fn candidate(&self) -> &NetG {
        self.ema.as_ref().map_or(&self.g, |e| &e.g)
    }
}

/// Exponential moving average of every NetG tensor, BatchNorm running statistics
/// included (as timm's `ModelEmaV2`). The decay ramps up as `(1 + n)/(10 + n)` over
/// the first updates, so that a short run is not dominated by the initial weights.
pub struct Ema {
    pub decay: f64,
    pub updates: u64,
    pub g: NetG,
    /// (average, source) pairs, shallow clones of both VarStores' tensors.
    pairs: Vec<(Tensor, Tensor)>,
}

impl Ema {
    pub fn new(g: &NetG, decay: f64) -> Ema {
        let avg = g.duplicate();
        let src = g.vs.variables();
        let pairs = avg
            .vs
            .variables()
            .into_iter()
            .filter_map(|(name, t)| src.get(&name).map(|s| (t, s.shallow_clone())))
            .collect();
        Ema { decay, updates: 0, g: avg, pairs }
    }

    /// One update after an optimiser step.
    pub fn update(&mut self) {
        self.updates += 1;
        let n = self.updates as f64;
        let d = self.decay.min((1.0 + n) / (10.0 + n));
        tch::no_grad(|| {
            for (avg, src) in &mut self.pairs {
                let _ = avg.lerp_(src, 1.0 - d);
            }
        });
    }
}

/// Per-epoch record (losses, speed, and test AUROC per kind when measured).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u32,
    pub losses: Losses,
    pub images_per_s: f64,
    pub seconds: f64,
    pub d_reinits: u64,
    /// Test-set AUROC per score kind after this epoch (`latent`, `recon`, `map_max`).
    #[serde(default)]
    pub auroc: BTreeMap<String, f64>,
    /// Test-set AUROC per score kind of the weight average (`--ema-decay`).
    #[serde(default)]
    pub auroc_ema: BTreeMap<String, f64>,
    /// Mean reconstruction error on the held-out good images (`recon`, and
    /// `recon_ema` for the weight average): what `--select val-recon` minimises.
    #[serde(default)]
    pub val: BTreeMap<String, f64>,
    /// Test-set AUROC per defect type: `raw`/`ema` → score kind → defect type.
    #[serde(default)]
    pub per_defect: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// Learning rate of this epoch.
    #[serde(default)]
    pub lr: f64,
}

/// The batch order of `epoch` (0-based): a seeded shuffle that depends only on
/// (seed, epoch), so a resumed run sees what an uninterrupted one would have.
/// Incomplete last batches are dropped, as the reference's loader does.
pub fn epoch_batches(n: usize, batch: usize, seed: u64, epoch: u32) -> Vec<Vec<i64>> {
    let mut idx: Vec<i64> = (0..n as i64).collect();
    SplitMix::new(seed.wrapping_mul(0x100_0000_01B3).wrapping_add(u64::from(epoch) + 1)).shuffle(&mut idx);
    idx.chunks_exact(batch).map(|c| c.to_vec()).collect()
}

/// Runs one epoch over `x` (CPU tensor `[N, C, S, S]`); `on_step` sees each step's
/// losses and the images done so far (for progress bars).
pub fn run_epoch(
    model: &mut Model,
    x: &Tensor,
    batch: usize,
    seed: u64,
    epoch: u32,
    device: Device,
    mut on_step: impl FnMut(&Losses, usize),
) -> EpochRecord {
    let n = x.size()[0] as usize;
    let batches = epoch_batches(n, batch, seed, epoch);
    let t0 = Instant::now();
    let reinits0 = model.d_reinits;
    let mut sum = Losses::default();
    for (i, b) in batches.iter().enumerate() {
        let idx = Tensor::from_slice(b);
        let xb = x.index_select(0, &idx).to_device(device).to_kind(Kind::Float);
        let l = model.step(&xb);
        sum.add(&l);
        on_step(&l, (i + 1) * batch);
    }
    let seconds = t0.elapsed().as_secs_f64();
    if !batches.is_empty() {
        sum.scale(1.0 / batches.len() as f64);
    }
    EpochRecord {
        epoch: epoch + 1,
        losses: sum,
        images_per_s: (batches.len() * batch) as f64 / seconds.max(1e-9),
        seconds,
        d_reinits: model.d_reinits - reinits0,
        lr: model.opt_g.config.lr,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{data, tiny};

    #[test]
    fn seeded_runs_are_reproducible_and_losses_fall() {
        let x = data(32);
        let run = || {
            let mut m = Model::new(&tiny(), Hyper::default(), 5, Device::Cpu);
            let r0 = run_epoch(&mut m, &x, 8, 5, 0, Device::Cpu, |_, _| {});
            let mut last = r0.clone();
            for e in 1..6 {
                last = run_epoch(&mut m, &x, 8, 5, e, Device::Cpu, |_, _| {});
            }
            (r0, last, m.g.to_weights().unwrap())
        };
        let (a0, a_last, wa) = run();
        let (_, _, wb) = run();
        assert_eq!(wa, wb, "same seed, same CPU: bit-identical weights");
        assert!(a_last.losses.err_g_con < a0.losses.err_g_con, "{a0:?} → {a_last:?}");
        assert!(a0.losses.err_d.is_finite() && a0.images_per_s > 0.0);
    }

    #[test]
    fn batches_drop_last_and_depend_on_epoch() {
        let b0 = epoch_batches(10, 4, 3, 0);
        assert_eq!(b0.len(), 2);
        assert_ne!(b0, epoch_batches(10, 4, 3, 1));
        assert_eq!(b0, epoch_batches(10, 4, 3, 0));
    }
}
