//! Per-epoch checkpoints and resume: every tensor worth saving (weights, running
//! statistics, Adam moments, the weight average) in `last.safetensors`, where
//! training stands in `state.json`.

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};

use ganomaly_core::arch::ArchSpec;
use ganomaly_core::patch::PatchSpec;
use ganomaly_core::tiles::Tiling;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::model::{Ema, EpochRecord, Hyper, Model};

/// Problems with a checkpoint; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path} is unreadable: {source}")]
    Unreadable { path: PathBuf, source: Box<dyn Error + Send + Sync> },
    #[error("checkpoint does not fit this model: {0}")]
    Content(String),
    #[error("writing checkpoint {path}: {source}")]
    Write { path: PathBuf, source: Box<dyn Error + Send + Sync> },
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
    /// What the finished `train` exported, so that `export` of this checkpoint
    /// writes the same model (absent while training, and in checkpoints from
    /// before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported: Option<Exported>,
}

/// The choices a finished `train` made after its last epoch (with
/// `--no-export`, those it would have exported with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    /// The epoch whose generator it exported (`--select`); the checkpoint's
    /// tensors are always the last epoch's.
    pub epoch: u32,
    /// The `patch` score's maps, chosen on val/ by `--patch-maps auto` (or given).
    pub patch: PatchSpec,
    /// `--tile`: the tiles it trained and calibrated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<Tiling>,
}

pub const CKPT_TENSORS: &str = "last.safetensors";
pub const CKPT_STATE: &str = "state.json";

/// Writes `dir/last.safetensors` and `dir/state.json` (each via a temporary file and
/// a rename, so a crash mid-write leaves the previous checkpoint whole).
pub fn save_checkpoint(dir: &Path, model: &Model, state: &CheckpointState) -> Result<(), CheckpointError> {
    let werr =
        |path: &Path, source: Box<dyn Error + Send + Sync>| CheckpointError::Write { path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(|e| werr(dir, e.into()))?;
    let tensors = model.named_state();
    let tmp = dir.join("last.safetensors.tmp");
    Tensor::write_safetensors(&tensors, &tmp).map_err(|e| werr(&tmp, e.into()))?;
    std::fs::rename(&tmp, dir.join(CKPT_TENSORS)).map_err(|e| werr(&tmp, e.into()))?;
    let tmp = dir.join("state.json.tmp");
    let json = serde_json::to_vec_pretty(state).map_err(|e| werr(&tmp, e.into()))?;
    std::fs::write(&tmp, json).map_err(|e| werr(&tmp, e.into()))?;
    std::fs::rename(&tmp, dir.join(CKPT_STATE)).map_err(|e| werr(&tmp, e.into()))?;
    Ok(())
}

/// Rewrites `dir/state.json` alone (via a temporary file and a rename): what a
/// finished `train` chose, next to the last epoch's tensors.
pub fn save_state(dir: &Path, state: &CheckpointState) -> Result<(), CheckpointError> {
    let tmp = dir.join("state.json.tmp");
    let werr = |source: Box<dyn Error + Send + Sync>| CheckpointError::Write { path: tmp.clone(), source };
    std::fs::create_dir_all(dir).map_err(|e| werr(e.into()))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| werr(e.into()))?;
    std::fs::write(&tmp, json).map_err(|e| werr(e.into()))?;
    std::fs::rename(&tmp, dir.join(CKPT_STATE)).map_err(|e| werr(e.into()))?;
    Ok(())
}

/// Reads a checkpoint's state (JSON) only.
pub fn read_checkpoint_state(dir: &Path) -> Result<CheckpointState, CheckpointError> {
    let path = dir.join(CKPT_STATE);
    let bytes =
        std::fs::read(&path).map_err(|e| CheckpointError::Unreadable { path: path.clone(), source: e.into() })?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Unreadable { path, source: e.into() })
}

/// Rebuilds the model of a checkpoint on `device`.
pub fn load_checkpoint(dir: &Path, device: Device) -> Result<(Model, CheckpointState), CheckpointError> {
    let state = read_checkpoint_state(dir)?;
    state.arch.validate().map_err(|e| CheckpointError::Unreadable {
        path: dir.join(CKPT_STATE),
        source: format!("bad architecture: {}", e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")).into(),
    })?;
    let path = dir.join(CKPT_TENSORS);
    let tensors = Tensor::read_safetensors(&path)
        .map_err(|e| CheckpointError::Unreadable { path: path.clone(), source: e.into() })?;
    let mut model = Model::new(&state.arch, state.hyper, state.seed, device);
    if state.ema_decay > 0.0 {
        let mut ema = Ema::new(&model.g, state.ema_decay);
        ema.updates = state.ema_updates;
        model.ema = Some(ema);
    }
    model.load_state(tensors)?;
    model.opt_g.step = state.opt_g_step;
    model.opt_d.step = state.opt_d_step;
    model.d_reinits = state.d_reinits;
    Ok((model, state))
}

impl Model {
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
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{data, tiny};
    use crate::model::run_epoch;

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
            exported: None,
        };
        save_checkpoint(dir.path(), &a, &state).unwrap();
        let (mut b, st) = load_checkpoint(dir.path(), Device::Cpu).unwrap();
        assert_eq!(st.epoch, 1);
        run_epoch(&mut a, &x, 8, 1, 1, Device::Cpu, |_, _| {});
        run_epoch(&mut b, &x, 8, 1, 1, Device::Cpu, |_, _| {});
        assert_eq!(a.g.to_weights().unwrap(), b.g.to_weights().unwrap());

        // A finished train's choices survive a reread; a state without them
        // (written before the field existed) still reads.
        let mut chosen = st.clone();
        chosen.exported = Some(Exported {
            epoch: 1,
            patch: tiny().patch_spec(&[1], 8, 0).unwrap(),
            tiling: Some(Tiling::abutting(8)),
        });
        save_state(dir.path(), &chosen).unwrap();
        assert_eq!(read_checkpoint_state(dir.path()).unwrap().exported, chosen.exported);
        let json = std::fs::read_to_string(dir.path().join(CKPT_STATE)).unwrap();
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("exported");
        std::fs::write(dir.path().join(CKPT_STATE), old.to_string()).unwrap();
        assert_eq!(read_checkpoint_state(dir.path()).unwrap().exported, None);

        std::fs::write(dir.path().join(CKPT_TENSORS), b"garbage").unwrap();
        let err = load_checkpoint(dir.path(), Device::Cpu).err().unwrap();
        assert!(err.to_string().contains("last.safetensors") && err.to_string().contains("unreadable"), "{err}");
    }
}
