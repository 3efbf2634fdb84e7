//! The command-line interface (a stable interface: scripts and ops tooling call it)
//! and the four commands: `datagen`, `train`, `eval`, `export`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ganomaly_core::arch::ArchSpec;
use ganomaly_core::metadata::{ColorMode, ModelMetadata, Provenance, ScoreKind};
use ganomaly_core::preprocess::Preprocessor;
use ganomaly_core::synth::{self, DatasetSpec, Defect, Texture};
use serde::Serialize;
use tch::{Device, Tensor};

use crate::data::{self, DataFiles};
use crate::evaluate::{evaluate, KindEval};
use crate::export::{self, ExportSettings, ScoreChoice};
use crate::net::NetG;
use crate::report;
use crate::score::{score_all, FeatureStats, Scores};
use crate::select;
use crate::train::{self, CheckpointState, EpochRecord, Hyper, Model};

#[derive(Debug, Parser)]
#[command(name = "ganomaly-train", version, about = "Train, evaluate and export GANomaly models for ganomalyd")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the project's synthetic MVTec-style dataset (train/good, test/good, test/<defect>).
    Datagen(DatagenArgs),
    /// Train on DIR/train/good, evaluate on DIR/test, export MODEL.onnx with its calibration.
    Train(Box<TrainArgs>),
    /// Score DIR/test with an exported model: AUROC, best F1, per-defect AUROC, histograms.
    Eval(EvalArgs),
    /// Export a checkpoint as ONNX with calibration and provenance.
    Export(ExportArgs),
    /// Time training steps on random data (for benches/train_speed.py); prints JSON.
    BenchStep(BenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 32)]
    pub isize: u32,
    #[arg(long, default_value_t = 1)]
    pub nc: u32,
    #[arg(long, default_value_t = 100)]
    pub nz: u32,
    #[arg(long, default_value_t = 64)]
    pub ngf: u32,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DatagenArgs {
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// brushed_metal, woven_fabric, wood_grain or noise.
    #[arg(long, default_value = "brushed_metal")]
    pub texture: String,
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 400)]
    pub train_good: usize,
    #[arg(long, default_value_t = 50)]
    pub test_good: usize,
    #[arg(long, default_value_t = 25)]
    pub test_per_defect: usize,
    /// Comma-separated defect kinds (scratch, crack, stain, hole).
    #[arg(long, value_delimiter = ',', default_value = "scratch,crack,stain,hole")]
    pub defects: Vec<String>,
    /// Defect strength in [0, 1] (1 = obvious).
    #[arg(long, default_value_t = 1.0)]
    pub strength: f32,
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when libtorch sees a GPU, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Threads and device, shared by every command that runs the network.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// libtorch intra-op threads (default: all cores). Fix it for reproducible timings.
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

impl RunArgs {
    /// Sets libtorch's thread counts and picks the device.
    pub fn setup(&self) -> Result<Device> {
        let threads =
            self.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        tch::set_num_threads(threads.max(1) as i32);
        match self.device {
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceChoice::Cuda => bail!("--device cuda: libtorch sees no CUDA device"),
        }
    }
}

/// Calibration and export settings shared by `train` and `export`.
#[derive(Debug, Clone, Args)]
pub struct CalibArgs {
    /// Target false-alarm rate on normal images: each score's threshold is this
    /// upper quantile of the held-out normal scores.
    #[arg(long, default_value_t = 0.01)]
    pub target_far: f64,
    /// Side (odd) of the box filter applied to the anomaly map before `score_map` takes its max.
    #[arg(long, default_value_t = 7)]
    pub map_kernel: u32,
    /// The score the daemon uses unless its config says otherwise. `auto`: chosen on
    /// DIR/val/<defect> when it exists (the benchmark's default, mahalanobis, unless another
    /// score leads it by more than one standard error), else that default.
    #[arg(long, alias = "score", value_enum, default_value_t = ScoreChoice::Auto)]
    pub default_score: ScoreChoice,
}

impl CalibArgs {
    fn settings(&self) -> Result<ExportSettings> {
        if !(self.target_far > 0.0 && self.target_far < 1.0) {
            bail!("--target-far must be in (0, 1), got {}", self.target_far);
        }
        if self.map_kernel % 2 == 0 || self.map_kernel == 0 {
            bail!("--map-kernel must be odd, got {}", self.map_kernel);
        }
        Ok(ExportSettings {
            target_far: self.target_far,
            map_kernel: self.map_kernel,
            default_score: self.default_score,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
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
    pub select: crate::select::SelectArgs,
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
    /// Report folder for plots and report.json (default: MODEL.report next to --out).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Train and checkpoint only; don't write the ONNX model.
    #[arg(long)]
    pub no_export: bool,
    /// No progress bar (logs per epoch instead).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// MVTec-style folder with test/good and test/<defect>.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write plots and report.json into this folder.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Checkpoint folder written by `train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The dataset it was trained on (the held-out slice is re-drawn with the checkpoint's seed).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Datagen(a) => datagen(&a).map(|_| ()),
        Command::Train(a) => train(&a).map(|_| ()),
        Command::Eval(a) => {
            let summary = eval(&a)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print_summary(&summary);
            }
            Ok(())
        }
        Command::Export(a) => export_cmd(&a),
        Command::BenchStep(a) => {
            println!("{}", serde_json::to_string(&bench_step(&a)?)?);
            Ok(())
        }
    }
}

/// `datagen`: core's synthetic dataset writer.
pub fn datagen(a: &DatagenArgs) -> Result<synth::DatasetSummary> {
    let texture = Texture::parse(&a.texture).with_context(|| {
        let names: Vec<&str> = Texture::ALL.iter().map(|t| t.as_str()).collect();
        format!("unknown --texture `{}` (one of {})", a.texture, names.join(", "))
    })?;
    let defects = a
        .defects
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| {
            Defect::parse(d).with_context(|| {
                let names: Vec<&str> = Defect::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown defect `{d}` (one of {})", names.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = DatasetSpec {
        texture,
        size: a.size,
        seed: a.seed,
        train_good: a.train_good,
        test_good: a.test_good,
        test_per_defect: a.test_per_defect,
        defects,
        strength: a.strength,
    };
    let summary = synth::write_mvtec(&a.out, &spec)?;
    eprintln!(
        "wrote {}: {} train/good, {} test/good, {} defective test images",
        a.out.display(),
        summary.train_good,
        summary.test_good,
        summary.test_defective
    );
    Ok(summary)
}

/// Figures of one model on one test set, every score kind; the `--json` object.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSummary {
    pub model: Option<String>,
    pub data: String,
    /// The model's default score; `auroc`, `f1`, `threshold`, `per_defect` are its figures.
    pub default_score: ScoreKind,
    pub auroc: f64,
    /// Best F1 over thresholds on this test set (optimistic).
    pub f1: f64,
    /// The threshold of that best F1.
    pub threshold: f64,
    pub per_defect: BTreeMap<String, f64>,
    /// The model's calibrated threshold for the default score, when it has one.
    pub calibrated_threshold: Option<f64>,
    pub n_good: usize,
    pub n_defect: usize,
    /// The kind with the highest AUROC here.
    pub best_score: ScoreKind,
    pub scores: BTreeMap<ScoreKind, KindEval>,
}

impl EvalSummary {
    fn new(model: Option<&Path>, data: &Path, default: ScoreKind, evals: BTreeMap<ScoreKind, KindEval>) -> EvalSummary {
        let d = &evals[&default];
        let best_score = evals
            .values()
            .filter(|e| e.auroc.is_finite())
            .max_by(|a, b| a.auroc.total_cmp(&b.auroc))
            .map(|e| e.kind)
            .unwrap_or(default);
        EvalSummary {
            model: model.map(|m| m.display().to_string()),
            data: data.display().to_string(),
            default_score: default,
            auroc: d.auroc,
            f1: d.f1,
            threshold: d.threshold,
            per_defect: d.per_defect.clone(),
            calibrated_threshold: d.calibrated.as_ref().map(|c| c.threshold),
            n_good: d.normal.len(),
            n_defect: d.defect.len(),
            best_score,
            scores: evals,
        }
    }
}

fn print_summary(s: &EvalSummary) {
    println!("{} good, {} defective test images; default score `{}`", s.n_good, s.n_defect, s.default_score.as_str());
    let defects: Vec<&String> = s.per_defect.keys().collect();
    print!("{:<11} {:>7} {:>7} {:>10} {:>10} {:>8}", "score", "AUROC", "bestF1", "F1@calib", "FAR@calib", "recall");
    for d in &defects {
        print!(" {:>9}", d);
    }
    println!();
    for (kind, e) in &s.scores {
        let (f1c, far, rec) =
            e.calibrated.as_ref().map_or((f64::NAN, f64::NAN, f64::NAN), |c| (c.f1, c.false_alarm_rate, c.recall));
        print!("{:<11} {:>7.4} {:>7.4} {:>10.4} {:>10.4} {:>8.4}", kind.as_str(), e.auroc, e.f1, f1c, far, rec);
        for d in &defects {
            print!(" {:>9.4}", e.per_defect.get(*d).copied().unwrap_or(f64::NAN));
        }
        println!();
    }
}

/// Calibrated thresholds of a model by kind.
fn thresholds(meta: &ModelMetadata) -> BTreeMap<ScoreKind, f64> {
    meta.scores.iter().map(|s| (s.kind, s.calibration.threshold)).collect()
}

/// Loads `files.test` (if any) through the model's preprocessing.
fn load_test(files: &DataFiles, pre: &mut Preprocessor) -> Result<Option<Tensor>> {
    if files.test.is_empty() {
        return Ok(None);
    }
    let paths: Vec<PathBuf> = files.test.iter().map(|t| t.path.clone()).collect();
    Ok(Some(data::load(&paths, pre)?))
}

/// `eval`: scores test/ with an exported model.
pub fn eval(a: &EvalArgs) -> Result<EvalSummary> {
    let device = a.run.setup()?;
    let bytes = std::fs::read(&a.model).with_context(|| format!("cannot read model {}", a.model.display()))?;
    let (meta, weights) = ganomaly_core::onnx::read_model(&bytes)
        .with_context(|| format!("model {} is not usable", a.model.display()))?;
    let mut g = NetG::new(&meta.arch, device);
    g.load_weights(&weights).with_context(|| format!("weights of {}", a.model.display()))?;
    let files = data::scan(&a.data, false)?;
    if files.defect_types().is_empty() {
        bail!("{} has no test/<defect> folders: AUROC needs defect images", a.data.display());
    }
    let mut pre = Preprocessor::from_meta(&meta.preprocess);
    let x = load_test(&files, &mut pre)?.context("no test images")?;
    let kernel = meta.map_kernel().unwrap_or(7);
    let scores = score_all(&g, &x, kernel, a.batch.max(1) as i64, device);
    let evals = evaluate(&files.test, &scores, &thresholds(&meta));
    let summary = EvalSummary::new(Some(&a.model), &a.data, meta.default_score, evals);
    if let Some(dir) = &a.report {
        report::write_plots(dir, None, Some(&summary.scores))?;
        report::write_json(&dir.join("report.json"), &summary)?;
    }
    Ok(summary)
}

/// The JSON report of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub data: String,
    pub model: Option<String>,
    pub arch: ArchSpec,
    pub hyper: Hyper,
    pub epochs: u32,
    pub batch: usize,
    pub seed: u64,
    pub device: String,
    pub threads: i32,
    pub n_train: usize,
    pub n_holdout: usize,
    pub data_digest: String,
    /// Per-epoch losses, speed and test AUROC.
    pub history: Vec<EpochRecord>,
    /// Figures of the final (last-epoch) model: the honest numbers.
    pub last_epoch: Option<EvalSummary>,
    /// The epoch with the highest test AUROC of the default score. Chosen on the test
    /// set as the paper's reference code does, so optimistic; for comparison only.
    pub best_epoch_optimistic: Option<BestEpoch>,
    /// Calibrated threshold per kind (from the held-out normal images).
    pub thresholds: BTreeMap<ScoreKind, f64>,
    pub default_score: Option<ScoreKind>,
    pub plots: Vec<String>,
    /// Which epoch's generator (raw or weight average) was evaluated and exported.
    pub selection: select::SelectionSummary,
}

#[derive(Debug, Clone, Serialize)]
pub struct BestEpoch {
    pub epoch: u32,
    pub score: ScoreKind,
    pub auroc: f64,
    pub note: &'static str,
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

/// `train`: the whole run, ending with export and report unless told otherwise.
pub fn train(a: &TrainArgs) -> Result<TrainReport> {
    let files = data::scan(&a.data, true)?;
    let nc = a.nc.unwrap_or(files.mode.channels());
    let arch = ArchSpec {
        isize: a.isize,
        nc,
        nz: a.nz,
        ngf: a.ngf,
        ndf: a.ndf,
        extralayers: a.extralayers,
        ..Default::default()
    };
    if let Err(errs) = arch.validate() {
        bail!("invalid architecture: {}", errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "));
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let settings = a.calib.settings()?;
    if a.holdout == 0.0 && !a.no_export {
        bail!("--holdout 0 leaves no normal images to calibrate the exported model on; use --no-export for a run without a model file");
    }
    a.select.validate(a.holdout)?;
    let device = a.run.setup()?;
    let hyper = Hyper { lr: a.lr, beta1: a.beta1, beta2: a.beta2, w_adv: a.w_adv, w_con: a.w_con, w_enc: a.w_enc };

    let (fit, hold) = data::split_holdout(&files.train, a.holdout, a.seed)?;
    let digest = data::digest(&files.root, &files.train)?;
    let color = ColorMode::from_channels(nc).context("nc")?;
    let mut pre = Preprocessor::new(color, a.isize);
    let x_fit = data::load(&fit, &mut pre)?;
    let x_hold = data::load(&hold, &mut pre)?;
    let x_test = load_test(&files, &mut pre)?;
    let has_defects = !files.defect_types().is_empty();
    let val = select::ValSet::load(&files.root, &mut pre)?;
    let select_args = a.select.resolve(val.as_ref(), &files.root)?;
    let batch = if a.batch > fit.len() {
        eprintln!("note: --batch {} exceeds the {} training images; using {}", a.batch, fit.len(), fit.len());
        fit.len()
    } else {
        a.batch
    };

    let ckpt_dir = a.checkpoint_dir.clone().unwrap_or_else(|| sibling(&a.out, ".ckpt"));
    let (mut model, mut state) = if a.resume {
        let (model, state) = train::load_checkpoint(&ckpt_dir, device)?;
        if state.arch != arch {
            bail!("--resume: checkpoint {} holds {:?}, the flags ask for {:?}", ckpt_dir.display(), state.arch, arch);
        }
        if state.data_digest != digest {
            eprintln!("warning: --resume with different training data than the checkpoint's ({})", state.data_digest);
        }
        (model, state)
    } else {
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
            data_digest: digest.clone(),
            history: vec![],
            ema_decay: 0.0,
            ema_updates: 0,
        };
        (model, state)
    };
    let seed = state.seed;
    if a.resume && select_args.ema_decay > 0.0 && model.ema.is_none() {
        eprintln!("note: the checkpoint holds no weight average; --ema-decay starts one from its weights");
    }
    if a.resume && select_args.select == select::Select::ValAuroc && state.epoch > 0 {
        eprintln!("note: --select val-auroc chooses among the epochs trained from here on; the checkpoint keeps no earlier candidates");
    }
    let mut tracker = select::Tracker::new(&select_args, settings.default_score.fixed(), &mut model);
    eprintln!(
        "training {}×{}×{} ngf {} on {} images ({} held out, {} test) on {:?}, {} threads",
        arch.nc,
        arch.isize,
        arch.isize,
        arch.ngf,
        fit.len(),
        hold.len(),
        files.test.len(),
        device,
        tch::get_num_threads()
    );

    for epoch in state.epoch..a.epochs {
        let steps = (fit.len() / batch) as u64;
        let bar =
            if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(steps * batch as u64) };
        bar.set_style(
            indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, a.epochs));
        let t0 = std::time::Instant::now();
        select::set_lr(&mut model, select_args.lr_schedule, hyper.lr, epoch, a.epochs);
        let mut rec = train::run_epoch(&mut model, &x_fit, batch, seed, epoch, device, |l, done| {
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
        let last = epoch + 1 == a.epochs;
        let test = x_test.as_ref().filter(|_| has_defects).map(|xt| (&files.test[..], xt));
        // The `mahalanobis` score of a generator needs its feature statistics (one
        // encoder pass over the training images): both generators when they are
        // scored on test/, only the selection candidate for `val-auroc`.
        let select_stats = tracker.needs_feature_stats() && val.is_some();
        if test.is_some() || (select_stats && model.ema.is_none()) {
            model.g.feature_stats = Some(FeatureStats::fit(&model.g, &x_fit, 256, device)?);
        }
        if let Some(ema) = model.ema.as_mut().filter(|_| test.is_some() || select_stats) {
            ema.g.feature_stats = Some(FeatureStats::fit(&ema.g, &x_fit, 256, device)?);
        }
        if let (Some(xt), true) =
            (&x_test, has_defects && a.eval_every > 0 && ((epoch + 1) % a.eval_every == 0 || last))
        {
            let s = score_all(&model.g, xt, settings.map_kernel, 64, device);
            for (kind, e) in evaluate(&files.test, &s, &BTreeMap::new()) {
                rec.auroc.insert(kind.as_str().to_string(), e.auroc);
            }
        }
        tracker.after_epoch(&model, epoch + 1, &x_hold, val.as_ref(), test, settings.map_kernel, device, &mut rec);
        let aurocs: Vec<String> = rec.auroc.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        eprintln!(
            "epoch {}/{}: err_g {:.4} (adv {:.4} con {:.4} enc {:.4}) err_d {:.4}, {:.1} img/s, {:.1} s{}{}",
            epoch + 1,
            a.epochs,
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
        train::save_checkpoint(&ckpt_dir, &model, &state)?;
    }

    let mut provenance = Provenance {
        data_digest: digest.clone(),
        epochs: state.epoch,
        seed,
        versions: export::versions(),
        created: export::now_rfc3339(),
        score_choice: None,
        notes: format!(
            "ganomaly-train train: {} train/good images ({} held out for calibration), batch {}, lr {}, betas ({}, {}), w_adv {} w_con {} w_enc {}",
            files.train.len(),
            hold.len(),
            batch,
            hyper.lr,
            hyper.beta1,
            hyper.beta2,
            hyper.w_adv,
            hyper.w_con,
            hyper.w_enc
        ),
    };
    let (g_out, selection) = tracker.chosen(&model);
    if let Some(reason) = &selection.reason {
        // The exported epoch and why, in the log and in the model itself.
        eprintln!("exporting epoch {}: {reason}", selection.epoch);
        provenance.notes.push_str(&format!("; exported epoch {}: {reason}", selection.epoch));
    }
    let g_out = &with_feature_stats(g_out, &x_fit, device)?;
    let finished = finish(g_out, &files, &x_hold, x_test.as_ref(), val.as_ref(), &settings, provenance, device)?;
    let mut plots = Vec::new();
    let model_path = match (&finished.meta, a.no_export) {
        (Some(meta), false) => {
            export::write_onnx(&a.out, g_out, meta)?;
            eprintln!("wrote {}", a.out.display());
            Some(a.out.display().to_string())
        }
        _ => None,
    };
    let default = finished.meta.as_ref().map_or(ScoreKind::Latent, |m| m.default_score);
    let last_epoch =
        finished.evals.map(|e| EvalSummary::new(model_path.as_deref().map(Path::new), &a.data, default, e));
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
        n_train: fit.len(),
        n_holdout: hold.len(),
        data_digest: digest,
        history: state.history.clone(),
        last_epoch,
        best_epoch_optimistic,
        thresholds: finished.meta.as_ref().map(thresholds).unwrap_or_default(),
        default_score: Some(default),
        plots,
        selection,
    };
    report::write_json(&report_dir.join("report.json"), &report)?;
    if let Some(s) = &report.last_epoch {
        print_summary(s);
    }
    eprintln!("report in {}", report_dir.display());
    Ok(report)
}

/// A copy of `g` with its feature statistics (the `mahalanobis` score) fitted on the
/// training images `x_fit` (never the held-out slice, which calibrates).
fn with_feature_stats(g: &NetG, x_fit: &Tensor, device: Device) -> Result<NetG> {
    let mut c = select::copy_net(g);
    let stats = FeatureStats::fit(&c, x_fit, 256, device)?;
    eprintln!(
        "feature statistics for the mahalanobis score: {} values from {} images, Ledoit-Wolf shrinkage {:.3}",
        g.arch.feature_dim(),
        x_fit.size()[0],
        stats.shrinkage
    );
    c.feature_stats = Some(stats);
    Ok(c)
}

/// Calibration (held-out normals) and test evaluation of a trained NetG.
struct Finished {
    /// `None` when there are no held-out images to calibrate on.
    meta: Option<ModelMetadata>,
    evals: Option<BTreeMap<ScoreKind, KindEval>>,
}

#[allow(clippy::too_many_arguments)]
fn finish(
    g: &NetG,
    files: &DataFiles,
    x_hold: &Tensor,
    x_test: Option<&Tensor>,
    val: Option<&select::ValSet>,
    settings: &ExportSettings,
    mut provenance: Provenance,
    device: Device,
) -> Result<Finished> {
    let raw_evals = match (x_test, files.defect_types().is_empty()) {
        (Some(xt), false) => {
            Some(evaluate(&files.test, &score_all(g, xt, settings.map_kernel, 64, device), &BTreeMap::new()))
        }
        _ => None,
    };
    let meta = if x_hold.size()[0] > 0 {
        let hold_scores: Scores = score_all(g, x_hold, settings.map_kernel, 64, device);
        let mut settings = settings.clone();
        if settings.default_score == ScoreChoice::Auto {
            let (kind, evidence) = select::choose_score(g, &hold_scores, val, settings.map_kernel, device);
            eprintln!("default score `{}`: {evidence}", kind.as_str());
            settings.default_score = select::as_choice(kind);
            provenance.score_choice = Some(evidence);
        }
        Some(export::build_metadata(g, &hold_scores, raw_evals.as_ref(), &settings, provenance)?)
    } else {
        None
    };
    // Re-evaluate with the calibrated thresholds, so the report says what they do.
    let evals = raw_evals.map(|mut e| {
        let th = meta.as_ref().map(thresholds).unwrap_or_default();
        for (kind, ke) in e.iter_mut() {
            ke.calibrated = th.get(kind).map(|&t| crate::evaluate::AtThreshold::new(&ke.normal, &ke.defect, t));
        }
        e
    });
    Ok(Finished { meta, evals })
}

/// `export`: a checkpoint → ONNX, calibrated on the same held-out slice as training.
pub fn export_cmd(a: &ExportArgs) -> Result<()> {
    let settings = a.calib.settings()?;
    let device = a.run.setup()?;
    let (model, state) = train::load_checkpoint(&a.checkpoint, device)?;
    let files = data::scan(&a.data, true)?;
    let digest = data::digest(&files.root, &files.train)?;
    if digest != state.data_digest {
        eprintln!(
            "warning: {} is not the data the checkpoint was trained on; the held-out slice may overlap training",
            a.data.display()
        );
    }
    let (fit, hold) = data::split_holdout(&files.train, state.holdout, state.seed)?;
    let color = ColorMode::from_channels(state.arch.nc).context("nc")?;
    let mut pre = Preprocessor::new(color, state.arch.isize);
    let x_fit = data::load(&fit, &mut pre)?;
    let x_hold = data::load(&hold, &mut pre)?;
    let x_test = load_test(&files, &mut pre)?;
    let provenance = Provenance {
        data_digest: state.data_digest.clone(),
        epochs: state.epoch,
        seed: state.seed,
        versions: export::versions(),
        created: export::now_rfc3339(),
        score_choice: None,
        notes: format!("ganomaly-train export of {}", a.checkpoint.display()),
    };
    let val = select::ValSet::load(&files.root, &mut pre)?;
    // The weight average when the checkpoint has one: what `train` exports too.
    let g = &with_feature_stats(select::Tracker::candidate(&model), &x_fit, device)?;
    let finished = finish(g, &files, &x_hold, x_test.as_ref(), val.as_ref(), &settings, provenance, device)?;
    let meta = finished
        .meta
        .context("the checkpoint's held-out slice is empty (trained with --holdout 0): nothing to calibrate on")?;
    export::write_onnx(&a.out, g, &meta)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Result of `bench-step`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub images_per_s: f64,
    pub steps: usize,
    pub batch: usize,
    pub threads: i32,
    pub seconds: f64,
}

/// `bench-step`: training steps per second on random data (no data loading).
pub fn bench_step(a: &BenchArgs) -> Result<BenchResult> {
    let device = a.run.setup()?;
    let arch =
        ArchSpec { isize: a.isize, nc: a.nc, nz: a.nz, ngf: a.ngf, ndf: a.ngf, extralayers: 0, ..Default::default() };
    if let Err(errs) = arch.validate() {
        bail!("invalid architecture: {}", errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "));
    }
    let mut model = Model::new(&arch, Hyper::default(), 0, device);
    let n = a.batch as i64;
    let s = i64::from(a.isize);
    let x = crate::net::seeded(1, || Tensor::rand([n, i64::from(a.nc), s, s], (tch::Kind::Float, device)) * 2.0 - 1.0);
    for _ in 0..a.warmup {
        model.step(&x);
    }
    let t0 = std::time::Instant::now();
    for _ in 0..a.steps {
        model.step(&x);
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(BenchResult {
        images_per_s: (a.steps * a.batch) as f64 / seconds,
        steps: a.steps,
        batch: a.batch,
        threads: tch::get_num_threads(),
        seconds,
    })
}
