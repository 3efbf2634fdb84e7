//! `train`: the whole run. Checks the flags, loads the data (the held-out slice
//! split off), starts a model or resumes the checkpoint, runs the epoch loop
//! ([`crate::train::run_epochs`]), then calibrates and exports the selected
//! generator and writes the report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ganomaly_core::arch::ArchSpec;
use ganomaly_core::metadata::{ColorMode, Provenance, ScoreKind};
use ganomaly_core::preprocess::Preprocessor;
use ganomaly_core::tiles::Tiling;
use tch::Device;

use super::flags::{checked_arch, CalibArgs, RunArgs};
use crate::augment::Augment;
use crate::checkpoint::{load_checkpoint, save_state, CheckpointState, Exported};
use crate::data::{self, Splits};
use crate::evaluate::thresholds;
use crate::export::{finish, now_rfc3339, versions, write_onnx};
use crate::feedback;
use crate::model::{Hyper, Model};
use crate::patch_choice;
use crate::report::{self, BestEpoch, EvalSummary, TrainReport};
use crate::select::{Select, SelectArgs, Tracker};
use crate::train::{run_epochs, Plan};

// These doc comments are the CLI's help, which writes placeholders as <defect>;
// rustdoc would read those as HTML tags.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// MVTec-style folder: train/good (required), test/good and test/<defect> (optional).
    #[arg(long)]
    pub data: PathBuf,
    /// Model file to write (ONNX with metadata).
    #[arg(long)]
    pub out: PathBuf,
    /// Input side in pixels (multiple of 16).
    #[arg(long, default_value_t = 32)]
    pub isize: u32,
    /// Channels: 1 (gray) or 3 (RGB). Default: the images' mode.
    #[arg(long)]
    pub nc: Option<u32>,
    /// Latent size.
    #[arg(long, default_value_t = 100)]
    pub nz: u32,
    /// Generator base width.
    #[arg(long, default_value_t = 64)]
    pub ngf: u32,
    /// Discriminator base width.
    #[arg(long, default_value_t = 64)]
    pub ndf: u32,
    #[arg(long, default_value_t = 0)]
    pub extralayers: u32,
    #[arg(long, default_value_t = 15)]
    pub epochs: u32,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.5)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// Weight of the adversarial (feature-matching) loss.
    #[arg(long, default_value_t = 1.0)]
    pub w_adv: f64,
    /// Weight of the L1 reconstruction loss.
    #[arg(long, default_value_t = 50.0)]
    pub w_con: f64,
    /// Weight of the latent (encoder) loss.
    #[arg(long, default_value_t = 1.0)]
    pub w_enc: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of train/good held out (seeded) to calibrate thresholds; never trained on.
    #[arg(long, default_value_t = 0.1)]
    pub holdout: f64,
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Evaluate on test/ every N epochs (0: only at the end). Feeds the AUROC-per-epoch plot.
    #[arg(long, default_value_t = 1)]
    pub eval_every: u32,
    /// Checkpoint folder (default: MODEL.ckpt next to --out). Written every epoch.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint folder's last epoch.
    #[arg(long)]
    pub resume: bool,
    /// Start from this model's generator weights: an ONNX file ganomaly-train exported
    /// (the daemon's current model), or a checkpoint folder. The architecture is the
    /// model's (differing --isize/--nc/--nz/--ngf/--ndf/--extralayers are ignored, with a
    /// warning); NetD starts fresh unless a checkpoint carries one. --epochs counts from 0.
    #[arg(long, conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Operator feedback folder (the daemon's `[feedback] dir`, MVTec layout): its
    /// val/good/ (confirmed false alarms) and val/<defect>/ images join the validation
    /// split that --select and --score auto read, and its val/good/ images also join the
    /// held-out slice the thresholds are calibrated on. Never trained on.
    #[arg(long)]
    pub feedback: Option<PathBuf>,
    /// Report folder for plots and report.json (default: MODEL.report next to --out).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Train and checkpoint only; don't write the ONNX model.
    #[arg(long)]
    pub no_export: bool,
    /// No progress bar (logs per epoch instead).
    #[arg(long)]
    pub quiet: bool,
    /// Random transformations of the training images, drawn per image and epoch from
    /// --seed: `none`, or a comma-separated list of `flip` (= `hflip,vflip`), `hflip`,
    /// `vflip`, `rot90`, `shift:N` (up to N px on each axis, border reflected). For
    /// parts without an orientation (textures); an oriented part turned is a defect.
    /// Only train/good is augmented, never the statistics, calibration, val/ or test/.
    #[arg(long, default_value = "none")]
    pub augment: Augment,
    /// Also measure other `patch` configurations and `fused` recipes on test/ with the
    /// exported generator (report.json `candidates`; measurement only, nothing chosen).
    #[arg(long)]
    pub candidates: bool,
    /// Train on tiles: every image cut into SIZE×SIZE source-pixel tiles every STRIDE
    /// pixels (default STRIDE = SIZE), each resized to --isize; the same grid every
    /// epoch. Test and held-out images score as their hottest tile (as the daemon scores
    /// a tiled camera's frame); the tiling is recorded in the model.
    #[arg(long, value_name = "SIZE[:STRIDE]", value_parser = parse_tile)]
    pub tile: Option<Tiling>,
}

fn parse_tile(s: &str) -> Result<Tiling, String> {
    Tiling::parse(s).map_err(|e| e.to_string())
}

/// Trains, then exports and reports unless told otherwise; returns the report.
pub fn run(a: &Args) -> Result<TrainReport> {
    let files = data::scan(&a.data, true)?;
    let nc = a.nc.unwrap_or(files.mode.channels());
    let flags_arch = ArchSpec {
        isize: a.isize,
        nc,
        nz: a.nz,
        ngf: a.ngf,
        ndf: a.ndf,
        extralayers: a.extralayers,
        ..Default::default()
    };
    let init = a.init.as_deref().map(Init::read).transpose()?;
    let arch = checked_arch(match &init {
        Some(i) => {
            if i.arch != flags_arch {
                tracing::warn!(
                    model = ?i.arch, flags = ?flags_arch,
                    "--init: training the initial model's architecture; the architecture flags are ignored"
                );
            }
            i.arch
        }
        None => flags_arch,
    })?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let settings = a.calib.settings()?;
    if a.holdout == 0.0 && !a.no_export {
        bail!("--holdout 0 leaves no normal images to calibrate the exported model on; use --no-export for a run without a model file");
    }
    a.select.validate(a.holdout)?;
    a.augment.check(arch.isize).context("--augment")?;
    let device = a.run.setup()?;
    let hyper = Hyper { lr: a.lr, beta1: a.beta1, beta2: a.beta2, w_adv: a.w_adv, w_con: a.w_con, w_enc: a.w_enc };

    let color = ColorMode::from_channels(nc).context("nc")?;
    let mut pre = Preprocessor::new(color, a.isize);
    let mut splits = match a.tile {
        None => Splits::load(&files, a.holdout, a.seed, &mut pre)?,
        Some(t) => {
            if a.feedback.is_some() {
                bail!("--tile with --feedback is not supported (feedback images are not tiled)");
            }
            let (w, h) = files.size;
            tracing::info!(
                tile = %t.label(), per_image = ganomaly_core::tiles::count(w, h, t), image = ?files.size,
                "training on tiles"
            );
            Splits::load_tiled(&files, a.holdout, a.seed, &mut pre, t)?
        }
    };
    let feedback = match &a.feedback {
        Some(dir) => Some(feedback::merge(dir, &mut splits, &mut pre)?),
        None => None,
    };
    let digest = data::digest(&files.root, &files.train)?;
    let select_args = a.select.resolve(splits.val.as_ref(), &files.root)?;
    let (n_fit, n_hold) = (splits.n_fit(), splits.n_hold());
    let batch = if a.batch > n_fit {
        tracing::warn!(
            batch = a.batch,
            training_images = n_fit,
            "--batch exceeds the training images; using one batch of them all"
        );
        n_fit
    } else {
        a.batch
    };

    let ckpt_dir = a.checkpoint_dir.clone().unwrap_or_else(|| sibling(&a.out, ".ckpt"));
    let (mut model, mut state) = start(a, &ckpt_dir, arch, hyper, batch, &digest, device)?;
    // A resumed run's earlier choices no longer describe its weights.
    state.exported = None;
    if let Some(i) = init {
        i.apply(&mut model, device)?;
    }
    let seed = state.seed;
    if a.resume && select_args.ema_decay > 0.0 && model.ema.is_none() {
        tracing::info!("the checkpoint holds no weight average; --ema-decay starts one from its weights");
    }
    if a.resume && select_args.select == Select::ValAuroc && state.epoch > 0 {
        tracing::warn!("--select val-auroc chooses among the epochs trained from here on; the checkpoint keeps no earlier candidates");
    }
    let patch_spec = a.calib.patch_spec(&arch)?;
    model.g.patch_spec = patch_spec.clone();
    let mut tracker = Tracker::new(&select_args, settings.default_score.fixed(), &mut model);
    if let Some(ema) = model.ema.as_mut() {
        ema.g.patch_spec = patch_spec;
    }
    tracing::info!(
        nc = arch.nc,
        isize = arch.isize,
        ngf = arch.ngf,
        images = n_fit,
        held_out = n_hold,
        test = files.test.len(),
        device = ?device,
        threads = tch::get_num_threads(),
        "training"
    );
    let plan = Plan {
        epochs: a.epochs,
        batch,
        lr: hyper.lr,
        lr_schedule: select_args.lr_schedule,
        eval_every: a.eval_every,
        map_kernel: settings.map_kernel,
        quiet: a.quiet,
        checkpoint_dir: ckpt_dir,
        augment: a.augment.clone(),
    };
    let epoch_at_start = state.epoch;
    run_epochs(&mut model, &mut state, &mut tracker, &splits, &plan, device)?;

    let mut provenance = Provenance {
        data_digest: digest.clone(),
        epochs: state.epoch,
        seed,
        versions: versions(),
        created: now_rfc3339(),
        score_choice: None,
        notes: format!(
            "ganomaly-train train: {} train/good images ({} held out for calibration), batch {}, lr {}, betas ({}, {}), w_adv {} w_con {} w_enc {}",
            files.train.len(),
            n_hold,
            batch,
            hyper.lr,
            hyper.beta1,
            hyper.beta2,
            hyper.w_adv,
            hyper.w_con,
            hyper.w_enc
        ),
    };
    if !a.augment.is_none() {
        provenance
            .notes
            .push_str(&format!("; augment {} (per image and epoch, seed {seed}; shifts reflect)", a.augment));
    }
    if let Some(p) = &a.init {
        provenance.notes.push_str(&format!("; initialised from {}", p.display()));
    }
    if let Some(f) = &feedback {
        provenance.notes.push_str(&format!("; {}", f.summary()));
    }
    let (g_out, selection) = tracker.chosen(&model);
    if let Some(reason) = &selection.reason {
        // The exported epoch and why, in the log and in the model itself.
        tracing::info!(epoch = selection.epoch, %reason, "exporting the selected epoch");
        provenance.notes.push_str(&format!("; exported epoch {}: {reason}", selection.epoch));
    }
    // `--patch-maps auto`: the exported generator's patch layers, chosen on val/.
    let patch_choice = match (a.calib.patch_auto(), &splits.val) {
        (true, Some(val)) => {
            let c = patch_choice::choose(
                g_out,
                &g_out.patch_spec,
                a.calib.patch_dim,
                a.calib.patch_bank,
                &splits.fit,
                &splits.hold,
                val,
                device,
            )?;
            tracing::info!(choice = %c.summary(), "--patch-maps auto");
            provenance.notes.push_str(&format!("; {}", c.summary()));
            Some(c)
        }
        (true, None) => {
            if a.calib.patch_auto_asked() {
                tracing::warn!(
                    "--patch-maps auto needs validation defects (DIR/val/<defect>); keeping the default maps"
                );
            }
            None
        }
        _ => None,
    };
    let g_out = &match &patch_choice {
        Some(c) => {
            let mut g = g_out.duplicate();
            g.patch_spec = c.spec.clone();
            g.with_feature_stats(&splits.fit, &splits.hold, device)?
        }
        None => g_out.with_feature_stats(&splits.fit, &splits.hold, device)?,
    };
    let mut finished = finish(g_out, &splits, &settings, provenance, device)?;
    if let Some(meta) = finished.meta.as_mut() {
        meta.tiling = splits.tiling;
    }
    let mut plots = Vec::new();
    let model_path = match (&finished.meta, a.no_export) {
        (Some(meta), false) => {
            write_onnx(&a.out, g_out, meta)?;
            tracing::info!(path = %a.out.display(), "wrote the model");
            Some(a.out.display().to_string())
        }
        _ => None,
    };
    // The checkpoint says what train chose, so that `export` of it writes the
    // same model (and warns when --select exported an earlier epoch). Only
    // when its tensors are this run's (an epoch ran, or it resumed), and a
    // failure to write it costs the later export its choice, not this model.
    if state.epoch > 0 && (state.epoch > epoch_at_start || a.resume) {
        // No epoch ran in this invocation (a resume at its epoch count): the checkpoint's own.
        let epoch = if selection.epoch == 0 { state.epoch } else { selection.epoch };
        state.exported = Some(Exported { epoch, patch: g_out.patch_spec.clone(), tiling: splits.tiling });
        if let Err(e) = save_state(&plan.checkpoint_dir, &state) {
            tracing::warn!(error = %e, "the checkpoint does not record the exported choices: export of it writes the default patch maps");
        }
    }
    // Pixel masks and the candidates' scores are per image, not per tile: not measured tiled.
    let untiled_test = splits.test.as_ref().filter(|_| splits.tiling.is_none());
    let localisation =
        untiled_test.and_then(|t| crate::candidates::localisation(g_out, &files.root, t, settings.map_kernel, device));
    if a.candidates && splits.tiling.is_some() {
        tracing::warn!("--candidates is not measured with --tile");
    }
    let candidates = match (untiled_test, a.candidates) {
        (Some(t), true) => {
            crate::candidates::measure(g_out, &files.root, &splits.fit, &splits.hold, t, settings.map_kernel, device)?
        }
        _ => Default::default(),
    };
    let default = finished.meta.as_ref().map_or(ScoreKind::Latent, |m| m.default_score);
    let last_epoch = finished.evals.map(|e| {
        let s = EvalSummary::new(model_path.as_deref().map(Path::new), &a.data, default, e);
        match &finished.meta {
            Some(meta) => s.with_calibrations(meta),
            None => s,
        }
    });
    let best_epoch_optimistic = state
        .history
        .iter()
        .filter_map(|r| r.auroc.get(default.as_str()).map(|&v| (r.epoch, v)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(epoch, auroc)| BestEpoch {
            epoch,
            score: default,
            auroc,
            note: "selected on the test set (as the paper's reference code does): optimistic",
        });
    let report_dir = a.report.clone().unwrap_or_else(|| sibling(&a.out, ".report"));
    for p in report::write_plots(&report_dir, Some(&state.history), last_epoch.as_ref().map(|s| &s.scores))? {
        plots.push(p.display().to_string());
    }
    let report = TrainReport {
        data: a.data.display().to_string(),
        model: model_path,
        arch,
        hyper,
        epochs: state.epoch,
        batch,
        seed,
        device: format!("{device:?}"),
        threads: tch::get_num_threads(),
        n_train: n_fit,
        n_holdout: n_hold,
        data_digest: digest,
        history: state.history.clone(),
        last_epoch,
        best_epoch_optimistic,
        thresholds: finished.meta.as_ref().map(thresholds).unwrap_or_default(),
        calibration_methods: finished.methods,
        init: a.init.as_ref().map(|p| p.display().to_string()),
        augment: a.augment.clone(),
        patch_choice,
        feedback,
        default_score: Some(default),
        plots,
        selection,
        localisation,
        candidates,
    };
    report::write_json(&report_dir.join("report.json"), &report)?;
    if let Some(s) = &report.last_epoch {
        s.print_table();
    }
    tracing::info!(dir = %report_dir.display(), "report written");
    Ok(report)
}

/// A fresh model and state, or (`--resume`) the checkpoint's, refused when it holds
/// another architecture.
fn start(
    a: &Args,
    ckpt_dir: &Path,
    arch: ArchSpec,
    hyper: Hyper,
    batch: usize,
    digest: &str,
    device: Device,
) -> Result<(Model, CheckpointState)> {
    if a.resume {
        let (model, state) = load_checkpoint(ckpt_dir, device)?;
        if state.arch != arch {
            bail!("--resume: checkpoint {} holds {:?}, the flags ask for {:?}", ckpt_dir.display(), state.arch, arch);
        }
        if state.data_digest != digest {
            tracing::warn!(
                checkpoint_data = %state.data_digest,
                "--resume with different training data than the checkpoint's"
            );
        }
        return Ok((model, state));
    }
    let model = Model::new(&arch, hyper, a.seed, device);
    let state = CheckpointState {
        arch,
        hyper,
        seed: a.seed,
        holdout: a.holdout,
        batch: batch as i64,
        epoch: 0,
        opt_g_step: 0,
        opt_d_step: 0,
        d_reinits: 0,
        data_digest: digest.to_string(),
        history: vec![],
        ema_decay: 0.0,
        ema_updates: 0,
        exported: None,
    };
    Ok((model, state))
}

/// Where `--init` starts from: an exported model's generator, or a checkpoint's
/// networks (and optimiser moments), read before anything is trained.
enum InitSource {
    Onnx(ganomaly_core::weights::Weights),
    Checkpoint(Box<Model>),
}

struct Init {
    arch: ArchSpec,
    source: InitSource,
    path: PathBuf,
}

impl Init {
    fn read(path: &Path) -> Result<Init> {
        if path.is_dir() {
            let (model, state) = load_checkpoint(path, Device::Cpu)
                .with_context(|| format!("--init {}: not a usable checkpoint folder", path.display()))?;
            return Ok(Init { arch: state.arch, source: InitSource::Checkpoint(Box::new(model)), path: path.into() });
        }
        let bytes =
            ganomaly_core::onnx::check::read_file(path).with_context(|| format!("--init {}", path.display()))?;
        let (meta, weights) = ganomaly_core::onnx::read_model(&bytes)
            .with_context(|| format!("--init {}: not a model ganomaly-train exported", path.display()))?;
        Ok(Init { arch: meta.arch, source: InitSource::Onnx(weights), path: path.into() })
    }

    /// Overwrites the fresh model's generator (and, from a checkpoint, its
    /// discriminator) with the initial weights.
    fn apply(self, model: &mut Model, device: Device) -> Result<()> {
        let weights = match self.source {
            InitSource::Onnx(w) => w,
            InitSource::Checkpoint(m) => {
                tch::no_grad(|| model.d.vs.copy(&m.d.vs)).context("--init: the checkpoint's discriminator")?;
                m.g.to_weights()?
            }
        };
        model.g.load_weights(&weights).with_context(|| format!("--init {}: generator weights", self.path.display()))?;
        // The weight average starts from the initial weights, not from the fresh ones.
        if let Some(ema) = model.ema.as_mut() {
            ema.g.load_weights(&weights)?;
        }
        tracing::info!(init = %self.path.display(), ?device, "training starts from the initial model's weights");
        Ok(())
    }
}

/// `out` with its extension replaced by `suffix` (`m.onnx` → `m.ckpt`).
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_from_an_onnx_model_overwrites_the_fresh_generator() {
        let arch = ArchSpec { isize: 16, nc: 1, nz: 8, ngf: 8, ndf: 8, extralayers: 0, ..Default::default() };
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.onnx");
        std::fs::write(&path, ganomaly_core::onnx::random_model(&arch, 3).unwrap()).unwrap();
        let init = Init::read(&path).unwrap();
        assert_eq!(init.arch, arch);
        let (_, want) = ganomaly_core::onnx::read_model(&std::fs::read(&path).unwrap()).unwrap();
        let mut model = Model::new(&arch, Hyper::default(), 11, Device::Cpu);
        let name = &arch.generator_params()[0].name;
        let before = model.g.to_weights().unwrap().get(name).unwrap().data.clone();
        assert_ne!(before, want.get(name).unwrap().data, "a fresh model has other weights");
        init.apply(&mut model, Device::Cpu).unwrap();
        let after = model.g.to_weights().unwrap();
        for spec in arch.generator_params() {
            assert_eq!(after.get(&spec.name).unwrap().data, want.get(&spec.name).unwrap().data, "{}", spec.name);
        }
        // Not a model: the error names the file.
        let bad = d.path().join("x.onnx");
        std::fs::write(&bad, b"not onnx").unwrap();
        let err = Init::read(&bad).err().expect("refused").to_string();
        assert!(err.contains("x.onnx"), "{err}");
    }
}
