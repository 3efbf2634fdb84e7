//! The GANomaly training step and epoch loop: G then D each step with the
//! reference's losses, NetD re-initialised when its loss collapses, per-epoch
//! checkpoints and resume.

use std::path::{Path, PathBuf};
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
    g_params: Vec<(String, Tensor)>,
    d_params: Vec<(String, Tensor)>,
    /// How often NetD was re-initialised (a sign of a collapsed discriminator).
    pub d_reinits: u64,
    /// Moving average of NetG's weights, updated after every step (`--ema-decay`).
    pub ema: Option<crate::select::Ema>,
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

    /// Every tensor worth saving: weights, running statistics, Adam moments.
    fn named_state(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (prefix, vs) in [("netg", &self.g.vs), ("netd", &self.d.vs)] {
            for (name, t) in vs.variables() {
                v.push((format!("{prefix}.{name}"), t.detach().to_device(Device::Cpu)));
            }
        }
        for (prefix, opt, params) in [("adam_g", &self.opt_g, &self.g_params), ("adam_d", &self.opt_d, &self.d_params)]
        {
            for (i, (name, _)) in params.iter().enumerate() {
                v.push((format!("{prefix}.m.{name}"), opt.exp_avg[i].to_device(Device::Cpu)));
                v.push((format!("{prefix}.v.{name}"), opt.exp_avg_sq[i].to_device(Device::Cpu)));
            }
        }
        if let Some(ema) = &self.ema {
            for (name, t) in ema.g.vs.variables() {
                v.push((format!("ema.{name}"), t.detach().to_device(Device::Cpu)));
            }
        }
        v
    }

    fn load_state(&mut self, tensors: Vec<(String, Tensor)>) -> Result<(), CheckpointError> {
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let get = |name: &str, like: &Tensor| -> Result<Tensor, CheckpointError> {
            let t = map.get(name).ok_or_else(|| CheckpointError::Content(format!("tensor `{name}` is missing")))?;
            if t.size() != like.size() {
                return Err(CheckpointError::Content(format!(
                    "tensor `{name}` has shape {:?}, the model needs {:?}",
                    t.size(),
                    like.size()
                )));
            }
            Ok(t.shallow_clone())
        };
        tch::no_grad(|| -> Result<(), CheckpointError> {
            for (prefix, vs) in [("netg", &self.g.vs), ("netd", &self.d.vs)] {
                for (name, mut t) in vs.variables() {
                    let src = get(&format!("{prefix}.{name}"), &t)?;
                    t.copy_(&src);
                }
            }
            for (prefix, opt, params) in
                [("adam_g", &mut self.opt_g, &self.g_params), ("adam_d", &mut self.opt_d, &self.d_params)]
            {
                for (i, (name, p)) in params.iter().enumerate() {
                    opt.exp_avg[i].copy_(&get(&format!("{prefix}.m.{name}"), p)?);
                    opt.exp_avg_sq[i].copy_(&get(&format!("{prefix}.v.{name}"), p)?);
                }
            }
            if let Some(ema) = &self.ema {
                for (name, mut t) in ema.g.vs.variables() {
                    let src = get(&format!("ema.{name}"), &t)?;
                    t.copy_(&src);
                }
            }
            Ok(())
        })
    }
}

/// Problems with a checkpoint; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path} is unreadable: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("checkpoint does not fit this model: {0}")]
    Content(String),
    #[error("writing checkpoint {path}: {reason}")]
    Write { path: PathBuf, reason: String },
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
    pub auroc: std::collections::BTreeMap<String, f64>,
    /// Test-set AUROC per score kind of the weight average (`--ema-decay`).
    #[serde(default)]
    pub auroc_ema: std::collections::BTreeMap<String, f64>,
    /// Mean reconstruction error on the held-out good images (`recon`, and
    /// `recon_ema` for the weight average): what `--select val-recon` minimises.
    #[serde(default)]
    pub val: std::collections::BTreeMap<String, f64>,
    /// Test-set AUROC per defect type: `raw`/`ema` → score kind → defect type.
    #[serde(default)]
    pub per_defect:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>>,
    /// Learning rate of this epoch.
    #[serde(default)]
    pub lr: f64,
}

/// The JSON half of a checkpoint: where training stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub arch: ArchSpec,
    pub hyper: Hyper,
    pub seed: u64,
    pub holdout: f64,
    pub batch: i64,
    /// Epochs completed.
    pub epoch: u32,
    pub opt_g_step: i64,
    pub opt_d_step: i64,
    pub d_reinits: u64,
    pub data_digest: String,
    pub history: Vec<EpochRecord>,
    /// Decay of the weight average saved with the weights (0: none saved).
    #[serde(default)]
    pub ema_decay: f64,
    #[serde(default)]
    pub ema_updates: u64,
}

pub const CKPT_TENSORS: &str = "last.safetensors";
pub const CKPT_STATE: &str = "state.json";

/// Writes `dir/last.safetensors` and `dir/state.json` (each via a temporary file and
/// a rename, so a crash mid-write leaves the previous checkpoint whole).
pub fn save_checkpoint(dir: &Path, model: &Model, state: &CheckpointState) -> Result<(), CheckpointError> {
    let werr = |path: &Path, reason: String| CheckpointError::Write { path: path.to_path_buf(), reason };
    std::fs::create_dir_all(dir).map_err(|e| werr(dir, e.to_string()))?;
    let tensors = model.named_state();
    let tmp = dir.join("last.safetensors.tmp");
    Tensor::write_safetensors(&tensors, &tmp).map_err(|e| werr(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, dir.join(CKPT_TENSORS)).map_err(|e| werr(&tmp, e.to_string()))?;
    let tmp = dir.join("state.json.tmp");
    let json = serde_json::to_vec_pretty(state).map_err(|e| werr(&tmp, e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| werr(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, dir.join(CKPT_STATE)).map_err(|e| werr(&tmp, e.to_string()))?;
    Ok(())
}

/// Reads a checkpoint's state (JSON) only.
pub fn read_checkpoint_state(dir: &Path) -> Result<CheckpointState, CheckpointError> {
    let path = dir.join(CKPT_STATE);
    let bytes =
        std::fs::read(&path).map_err(|e| CheckpointError::Unreadable { path: path.clone(), reason: e.to_string() })?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Unreadable { path, reason: e.to_string() })
}

/// Rebuilds the model of a checkpoint on `device`.
pub fn load_checkpoint(dir: &Path, device: Device) -> Result<(Model, CheckpointState), CheckpointError> {
    let state = read_checkpoint_state(dir)?;
    state.arch.validate().map_err(|e| CheckpointError::Unreadable {
        path: dir.join(CKPT_STATE),
        reason: format!("bad architecture: {}", e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")),
    })?;
    let path = dir.join(CKPT_TENSORS);
    let tensors = Tensor::read_safetensors(&path)
        .map_err(|e| CheckpointError::Unreadable { path: path.clone(), reason: e.to_string() })?;
    let mut model = Model::new(&state.arch, state.hyper, state.seed, device);
    if state.ema_decay > 0.0 {
        let mut ema = crate::select::Ema::new(&model.g, state.ema_decay);
        ema.updates = state.ema_updates;
        model.ema = Some(ema);
    }
    model.load_state(tensors)?;
    model.opt_g.step = state.opt_g_step;
    model.opt_d.step = state.opt_d_step;
    model.d_reinits = state.d_reinits;
    Ok((model, state))
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

    fn tiny() -> ArchSpec {
        ArchSpec { isize: 16, nc: 1, nz: 8, ngf: 8, ndf: 8, extralayers: 0, ..Default::default() }
    }

    fn data(n: i64) -> Tensor {
        seeded(99, || Tensor::rand([n, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0)
    }

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
    fn checkpoint_round_trip_resumes_exactly() {
        let x = data(16);
        let dir = tempfile::tempdir().unwrap();
        let mut a = Model::new(&tiny(), Hyper::default(), 1, Device::Cpu);
        run_epoch(&mut a, &x, 8, 1, 0, Device::Cpu, |_, _| {});
        let state = CheckpointState {
            arch: tiny(),
            hyper: Hyper::default(),
            seed: 1,
            holdout: 0.1,
            batch: 8,
            epoch: 1,
            opt_g_step: a.opt_g.step,
            opt_d_step: a.opt_d.step,
            d_reinits: a.d_reinits,
            data_digest: "x".into(),
            history: vec![],
            ema_decay: 0.0,
            ema_updates: 0,
        };
        save_checkpoint(dir.path(), &a, &state).unwrap();
        let (mut b, st) = load_checkpoint(dir.path(), Device::Cpu).unwrap();
        assert_eq!(st.epoch, 1);
        run_epoch(&mut a, &x, 8, 1, 1, Device::Cpu, |_, _| {});
        run_epoch(&mut b, &x, 8, 1, 1, Device::Cpu, |_, _| {});
        assert_eq!(a.g.to_weights().unwrap(), b.g.to_weights().unwrap());

        std::fs::write(dir.path().join(CKPT_TENSORS), b"garbage").unwrap();
        let err = load_checkpoint(dir.path(), Device::Cpu).err().unwrap();
        assert!(err.to_string().contains("last.safetensors") && err.to_string().contains("unreadable"), "{err}");
    }

    #[test]
    fn batches_drop_last_and_depend_on_epoch() {
        let b0 = epoch_batches(10, 4, 3, 0);
        assert_eq!(b0.len(), 2);
        assert_ne!(b0, epoch_batches(10, 4, 3, 1));
        assert_eq!(b0, epoch_batches(10, 4, 3, 0));
    }
}
