//! A training run's epoch loop: each epoch sets the learning rate, makes one pass
//! over the training images ([`run_epoch`]), measures what selection and the
//! AUROC-per-epoch plot need, logs the epoch and writes a checkpoint, so that an
//! interrupted run resumes from its last whole epoch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tch::Device;

use crate::checkpoint::{save_checkpoint, CheckpointError, CheckpointState};
use crate::data::Splits;
use crate::evaluate::evaluate;
use crate::model::{run_epoch, Model};
use crate::net::NetError;
use crate::select::{set_lr, LrSchedule, Tracker};

/// Why the epoch loop stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// How the epochs of a run go (the `train` flags, resolved).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Epochs of the whole run; a resumed run starts after the checkpoint's.
    pub epochs: u32,
    pub batch: usize,
    /// The base learning rate that `lr_schedule` scales.
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    /// Test AUROC every this many epochs and after the last (0: never in the loop).
    pub eval_every: u32,
    /// Box-filter side of the `map_max` score.
    pub map_kernel: u32,
    /// No progress bar.
    pub quiet: bool,
    /// Written after every epoch.
    pub checkpoint_dir: PathBuf,
}

/// Trains `model` from epoch `state.epoch` to `plan.epochs` on `splits.fit`,
/// following the run with `tracker`; `state` (history included) and the checkpoint
/// are brought up to date after every epoch.
pub fn run_epochs(
    model: &mut Model,
    state: &mut CheckpointState,
    tracker: &mut Tracker,
    splits: &Splits,
    plan: &Plan,
    device: Device,
) -> Result<(), TrainError> {
    let seed = state.seed;
    for epoch in state.epoch..plan.epochs {
        let bar = progress_bar(plan, epoch, (splits.n_fit() / plan.batch) as u64);
        let t0 = Instant::now();
        set_lr(model, plan.lr_schedule, plan.lr, epoch, plan.epochs);
        let mut rec = run_epoch(model, &splits.fit, plan.batch, seed, epoch, device, |l, done| {
            bar.set_position(done as u64);
            bar.set_message(format!(
                "err_g {:.4} (adv {:.4} con {:.4} enc {:.4}) err_d {:.4} {:.0} img/s",
                l.err_g,
                l.err_g_adv,
                l.err_g_con,
                l.err_g_enc,
                l.err_d,
                done as f64 / t0.elapsed().as_secs_f64().max(1e-9)
            ));
        });
        bar.finish_and_clear();
        let last = epoch + 1 == plan.epochs;
        let test = splits.test.as_ref();
        // The `mahalanobis` and `patch` scores of a generator need their statistics (one
        // encoder pass over the training images), `fused` its standardisation (a pass
        // over the held-out ones): both generators when they are scored on test/, only
        // the selection candidate for `val-auroc`.
        let select_stats = tracker.needs_feature_stats() && splits.val.is_some();
        if test.is_some() || (select_stats && model.ema.is_none()) {
            model.g.fit_score_stats(&splits.fit, &splits.hold, device)?;
        }
        if let Some(ema) = model.ema.as_mut().filter(|_| test.is_some() || select_stats) {
            ema.g.fit_score_stats(&splits.fit, &splits.hold, device)?;
        }
        if let Some(t) = test.filter(|_| plan.eval_every > 0 && ((epoch + 1) % plan.eval_every == 0 || last)) {
            let s = t.scores(&model.g, plan.map_kernel, device);
            for (kind, e) in evaluate(&t.items, &s, &BTreeMap::new()) {
                rec.auroc.insert(kind.as_str().to_string(), e.auroc);
            }
        }
        tracker.after_epoch(model, epoch + 1, splits, plan.map_kernel, device, &mut rec);
        let aurocs: Vec<String> = rec.auroc.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        tracing::info!(
            epoch = epoch + 1,
            epochs = plan.epochs,
            "err_g {:.4} (adv {:.4} con {:.4} enc {:.4}) err_d {:.4}, {:.1} img/s, {:.1} s{}{}",
            rec.losses.err_g,
            rec.losses.err_g_adv,
            rec.losses.err_g_con,
            rec.losses.err_g_enc,
            rec.losses.err_d,
            rec.images_per_s,
            rec.seconds,
            if rec.d_reinits > 0 { format!(", NetD re-initialised {}×", rec.d_reinits) } else { String::new() },
            if aurocs.is_empty() { String::new() } else { format!("; test AUROC {}", aurocs.join(", ")) }
        );
        state.history.push(rec);
        state.epoch = epoch + 1;
        state.opt_g_step = model.opt_g.step;
        state.opt_d_step = model.opt_d.step;
        state.d_reinits = model.d_reinits;
        (state.ema_decay, state.ema_updates) = model.ema.as_ref().map_or((0.0, 0), |e| (e.decay, e.updates));
        save_checkpoint(&plan.checkpoint_dir, model, state)?;
    }
    Ok(())
}

/// The bar of epoch `epoch` (0-based) over its `steps` batches; hidden with `--quiet`.
fn progress_bar(plan: &Plan, epoch: u32, steps: u64) -> ProgressBar {
    let bar = if plan.quiet { ProgressBar::hidden() } else { ProgressBar::new(steps * plan.batch as u64) };
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{}", epoch + 1, plan.epochs));
    bar
}
