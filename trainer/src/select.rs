//! Which generator a run exports, and which score the daemon uses by default:
//! an exponential moving average of NetG's weights (`--ema-decay`), the epoch
//! chosen on held-out *good* images only (`--select`, never on test defects), the
//! learning-rate schedule (`--lr-schedule`), and `--score auto`.
//!
//! Each of these is kept or left at its reference default according to the
//! quality benchmark (`benches/quality.sh`, figures in `benches/README.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use ganomaly_core::metadata::ScoreKind;
use ganomaly_core::preprocess::Preprocessor;
use serde::Serialize;
use tch::{Device, Tensor};

use crate::data::{self, DataError, TestItem};
use crate::evaluate::{evaluate, KindEval};
use crate::export::ScoreChoice;
use crate::net::NetG;
use crate::score::{score_all, Scores};
use crate::train::{EpochRecord, Model};

/// The score `--score auto` picks when there are no defect images to choose with,
/// and the incumbent that validation must beat otherwise: the one that
/// generalised best across the quality benchmark's data sets. No score wins
/// everywhere there, but the Mahalanobis distance of the encoder features has the
/// highest mean and the best worst case; the pixel scores fall far below chance
/// on MNIST's digit 1 (an anomaly with less ink is reconstructed *better*).
pub const BENCH_DEFAULT_SCORE: ScoreKind = ScoreKind::Mahalanobis;

/// Where [`BENCH_DEFAULT_SCORE`] comes from, written into the model's provenance.
pub const BENCH_EVIDENCE: &str = "quality benchmark (benches/README.md, weight-averaged generator, 7 data sets x 3 seeds): \
     mahalanobis has the highest mean image AUROC (0.765; latent 0.718, recon 0.651, map_max 0.649) and the best worst \
     data set (0.574; latent 0.544, recon 0.085 and map_max 0.275 on MNIST digit 1); give DIR/val/<defect> images to \
     choose per data set";

/// How the exported generator is chosen among the epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Select {
    /// The last epoch's generator.
    Last,
    /// The epoch with the lowest mean reconstruction error on the held-out good images.
    ValRecon,
}

/// Learning rate over the epochs (both optimisers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `--lr` throughout (the reference).
    Constant,
    /// Half-cosine from `--lr` at the first epoch towards 0 after the last.
    Cosine,
}

/// The `train` flags of this module.
#[derive(Debug, Clone, Args)]
pub struct SelectArgs {
    /// Decay of the exponential moving average of NetG's weights (0: none, the
    /// paper). The average, not the raw weights, is then evaluated, selected and
    /// exported. On by default: the quality benchmark's mean AUROC rose on every score.
    #[arg(long, default_value_t = 0.99)]
    pub ema_decay: f64,
    /// Which epoch's generator to export (chosen on held-out good images only).
    /// `last` by default: `val-recon` made no measurable difference in the benchmark.
    #[arg(long, value_enum, default_value_t = Select::Last)]
    pub select: Select,
    /// `constant` (the paper) by default: cosine helped the pixel scores and hurt
    /// the latent one in the benchmark, a trade, not a gain.
    #[arg(long, value_enum, default_value_t = LrSchedule::Constant)]
    pub lr_schedule: LrSchedule,
}

impl SelectArgs {
    pub fn validate(&self, holdout: f64) -> anyhow::Result<()> {
        if !(0.0..1.0).contains(&self.ema_decay) {
            anyhow::bail!("--ema-decay must be in [0, 1), got {}", self.ema_decay);
        }
        if self.select == Select::ValRecon && holdout <= 0.0 {
            anyhow::bail!("--select val-recon needs held-out good images (--holdout > 0)");
        }
        Ok(())
    }
}

/// The learning rate of epoch `epoch` (0-based) of `epochs`.
pub fn lr_at(schedule: LrSchedule, base: f64, epoch: u32, epochs: u32) -> f64 {
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * f64::from(epoch) / f64::from(epochs.max(1))).cos()),
    }
}

/// Sets both optimisers' learning rate for `epoch`; returns it.
pub fn set_lr(model: &mut Model, schedule: LrSchedule, base: f64, epoch: u32, epochs: u32) -> f64 {
    let lr = lr_at(schedule, base, epoch, epochs);
    model.opt_g.config.lr = lr;
    model.opt_d.config.lr = lr;
    lr
}

/// A NetG with `g`'s architecture and a copy of its tensors (running statistics included).
pub fn copy_net(g: &NetG) -> NetG {
    let mut c = NetG::new(&g.arch, g.vs.device());
    tch::no_grad(|| c.vs.copy(&g.vs)).expect("same architecture, same variables");
    c.feature_stats = g.feature_stats.clone();
    c
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
        let avg = copy_net(g);
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

/// Mean reconstruction error (`score_recon`) of `g` over `x`: the selection criterion.
pub fn val_recon(g: &NetG, x: &Tensor, device: Device) -> Option<f64> {
    if x.size()[0] == 0 {
        return None;
    }
    let s = score_all(g, x, 1, 64, device);
    Some(s.recon.iter().sum::<f64>() / s.recon.len() as f64)
}

/// The generator kept by `--select`.
struct Kept {
    epoch: u32,
    val: f64,
    g: NetG,
}

/// What the report says about the choice of generator.
#[derive(Debug, Clone, Serialize)]
pub struct SelectionSummary {
    pub select: Select,
    pub ema_decay: f64,
    pub lr_schedule: LrSchedule,
    /// The epoch (1-based) whose generator was exported.
    pub epoch: u32,
    /// Its mean reconstruction error on the held-out good images.
    pub val_recon: Option<f64>,
}

/// Follows a run epoch by epoch: EMA, per-epoch validation figures, selection.
pub struct Tracker {
    args: SelectArgs,
    kept: Option<Kept>,
    last_epoch: u32,
    last_val: Option<f64>,
}

impl Tracker {
    /// Installs the EMA on `model` when asked for (keeping one restored from a checkpoint).
    pub fn new(args: &SelectArgs, model: &mut Model) -> Tracker {
        if args.ema_decay == 0.0 {
            model.ema = None;
        } else if model.ema.is_none() {
            model.ema = Some(Ema::new(&model.g, args.ema_decay));
        }
        Tracker { args: args.clone(), kept: None, last_epoch: 0, last_val: None }
    }

    /// The generator that is evaluated and exported: the average when there is one.
    pub fn candidate(model: &Model) -> &NetG {
        model.ema.as_ref().map_or(&model.g, |e| &e.g)
    }

    /// After epoch `epoch` (1-based): records the held-out reconstruction error of the
    /// raw and averaged generators and the averaged one's test AUROC into `rec`, and
    /// keeps the candidate if it is the best so far.
    #[allow(clippy::too_many_arguments)]
    pub fn after_epoch(
        &mut self,
        model: &Model,
        epoch: u32,
        x_hold: &Tensor,
        test: Option<(&[TestItem], &Tensor)>,
        kernel: u32,
        device: Device,
        rec: &mut EpochRecord,
    ) {
        if let Some(v) = val_recon(&model.g, x_hold, device) {
            rec.val.insert("recon".into(), v);
        }
        let per_defect = |g: &NetG, items: &[TestItem], xt: &Tensor| {
            let evals = evaluate(items, &score_all(g, xt, kernel, 64, device), &BTreeMap::new());
            let by_kind = evals.iter().map(|(k, e)| (k.as_str().to_string(), e.per_defect.clone())).collect();
            (evals, by_kind)
        };
        if let Some((items, xt)) = test {
            rec.per_defect.insert("raw".into(), per_defect(&model.g, items, xt).1);
        }
        if let Some(ema) = &model.ema {
            if let Some(v) = val_recon(&ema.g, x_hold, device) {
                rec.val.insert("recon_ema".into(), v);
            }
            if let Some((items, xt)) = test {
                let (evals, by_kind) = per_defect(&ema.g, items, xt);
                for (kind, e) in evals {
                    rec.auroc_ema.insert(kind.as_str().to_string(), e.auroc);
                }
                rec.per_defect.insert("ema".into(), by_kind);
            }
        }
        let val = rec.val.get(if model.ema.is_some() { "recon_ema" } else { "recon" }).copied();
        self.last_epoch = epoch;
        self.last_val = val;
        if self.args.select == Select::ValRecon {
            if let Some(v) = val {
                let better = self.kept.as_ref().is_none_or(|k| v < k.val);
                if better {
                    let g = Tracker::candidate(model);
                    match &mut self.kept {
                        Some(k) => {
                            tch::no_grad(|| k.g.vs.copy(&g.vs)).expect("same architecture");
                            k.epoch = epoch;
                            k.val = v;
                        }
                        None => self.kept = Some(Kept { epoch, val: v, g: copy_net(g) }),
                    }
                }
            }
        }
    }

    /// The generator to export, and the summary for the report.
    pub fn chosen<'a>(&'a self, model: &'a Model) -> (&'a NetG, SelectionSummary) {
        let summary = |epoch, val_recon| SelectionSummary {
            select: self.args.select,
            ema_decay: self.args.ema_decay,
            lr_schedule: self.args.lr_schedule,
            epoch,
            val_recon,
        };
        match &self.kept {
            Some(k) => (&k.g, summary(k.epoch, Some(k.val))),
            None => (Tracker::candidate(model), summary(self.last_epoch, self.last_val)),
        }
    }
}

/// The optional validation split `DIR/val/good` + `DIR/val/<defect>`: images that
/// `--score auto` chooses the default score with. Never trained on, and never the
/// test images.
pub struct ValSet {
    pub items: Vec<TestItem>,
    pub x: Tensor,
}

impl ValSet {
    /// Loads `root/val` if it holds any defect images; `None` otherwise.
    pub fn load(root: &Path, pre: &mut Preprocessor) -> Result<Option<ValSet>, DataError> {
        let dir = root.join("val");
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut kinds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| DataError::Io { path: dir.clone(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        kinds.sort();
        let mut items = Vec::new();
        for k in kinds {
            let name = k.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let defect = (name != "good").then_some(name);
            for path in data::list_images(&k)? {
                items.push(TestItem { path, defect: defect.clone() });
            }
        }
        if !items.iter().any(|i| i.defect.is_some()) {
            return Ok(None);
        }
        let paths: Vec<PathBuf> = items.iter().map(|i| i.path.clone()).collect();
        let x = data::load(&paths, pre)?;
        Ok(Some(ValSet { items, x }))
    }
}

/// The CLI value that names `kind`.
pub fn as_choice(kind: ScoreKind) -> ScoreChoice {
    match kind {
        ScoreKind::Latent => ScoreChoice::Latent,
        ScoreKind::Recon => ScoreChoice::Recon,
        ScoreKind::MapMax => ScoreChoice::MapMax,
        ScoreKind::Mahalanobis => ScoreChoice::Mahalanobis,
    }
}

/// Hanley & McNeil's (1982) standard error of an AUROC `a` measured on `n_pos`
/// defective and `n_neg` good images.
pub fn auroc_se(a: f64, n_pos: usize, n_neg: usize) -> f64 {
    if n_pos == 0 || n_neg == 0 || !a.is_finite() {
        return f64::INFINITY;
    }
    let (p, n) = (n_pos as f64, n_neg as f64);
    let q1 = a / (2.0 - a);
    let q2 = 2.0 * a * a / (1.0 + a);
    ((a * (1.0 - a) + (p - 1.0) * (q1 - a * a) + (n - 1.0) * (q2 - a * a)) / (p * n)).max(0.0).sqrt()
}

/// The `--score auto` rule on validation AUROCs: the benchmark's default, unless
/// another kind beats it by more than one standard error of the default's AUROC.
/// A validation split is small (the quality benchmark's has 25 defects of a kind):
/// with ten per kind, a plain arg-max followed noise away from the better score.
pub fn auto_rule(aurocs: &BTreeMap<ScoreKind, f64>, n_def: usize, n_good: usize) -> (ScoreKind, String) {
    let base = incumbent(|k| aurocs.contains_key(&k));
    let mut ranked: Vec<(ScoreKind, f64)> = aurocs.iter().filter(|(_, a)| a.is_finite()).map(|(&k, &a)| (k, a)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| (b.0 == base).cmp(&(a.0 == base))));
    let listed: Vec<String> = ranked.iter().map(|(k, a)| format!("{} {a:.4}", k.as_str())).collect();
    let (Some(&(best, best_a)), Some(&base_a)) = (ranked.first(), aurocs.get(&base).filter(|a| a.is_finite())) else {
        return (base, format!("auto: validation AUROC undefined; {BENCH_EVIDENCE}"));
    };
    let se = auroc_se(base_a, n_def, n_good);
    let lead = best_a - base_a;
    let on = format!("on {n_good} good and {n_def} defective validation images (val/ and the held-out slice; never test/)");
    if best != base && lead > se {
        let why = format!("beats the default {} by {lead:.4} > one standard error {se:.4}", base.as_str());
        (best, format!("auto: {} (validation AUROC {}; {why}) {on}", best.as_str(), listed.join(", ")))
    } else {
        let why = if best == base {
            "the benchmark default leads".to_string()
        } else {
            format!("{} leads by {lead:.4}, within one standard error {se:.4}", best.as_str())
        };
        (base, format!("auto: {} (validation AUROC {}; {why}) {on}", base.as_str(), listed.join(", ")))
    }
}

/// [`BENCH_DEFAULT_SCORE`] when the generator has it (`mahalanobis` needs feature
/// statistics), else the paper's latent score, which every generator has.
fn incumbent(has: impl Fn(ScoreKind) -> bool) -> ScoreKind {
    if has(BENCH_DEFAULT_SCORE) {
        BENCH_DEFAULT_SCORE
    } else {
        ScoreKind::Latent
    }
}

/// Resolves `--score auto`. With a validation split: [`auto_rule`] on validation
/// AUROCs (normals: the held-out good slice plus `val/good`). Without:
/// [`BENCH_DEFAULT_SCORE`]. Returns the kind and the evidence for the provenance.
pub fn choose_score(g: &NetG, hold: &Scores, val: Option<&ValSet>, kernel: u32, device: Device) -> (ScoreKind, String) {
    let Some(val) = val else {
        let kind = incumbent(|k| hold.has(k));
        return (kind, format!("auto: no validation defects (DIR/val/<defect>); {BENCH_EVIDENCE}"));
    };
    let vs = score_all(g, &val.x, kernel, 64, device);
    let mut items: Vec<TestItem> =
        (0..hold.len()).map(|i| TestItem { path: PathBuf::from(format!("holdout/{i}")), defect: None }).collect();
    items.extend(val.items.iter().cloned());
    let cat = |a: &[f64], b: &[f64]| a.iter().chain(b).copied().collect::<Vec<f64>>();
    let all = Scores {
        latent: cat(&hold.latent, &vs.latent),
        recon: cat(&hold.recon, &vs.recon),
        map_max: cat(&hold.map_max, &vs.map_max),
        mahalanobis: cat(&hold.mahalanobis, &vs.mahalanobis),
    };
    let evals: BTreeMap<ScoreKind, KindEval> = evaluate(&items, &all, &BTreeMap::new());
    let aurocs: BTreeMap<ScoreKind, f64> = evals.iter().map(|(&k, e)| (k, e.auroc)).collect();
    let n_def = val.items.iter().filter(|i| i.defect.is_some()).count();
    auto_rule(&aurocs, n_def, items.len() - n_def)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{run_epoch, Hyper};

    #[test]
    fn auto_leaves_the_default_only_for_a_lead_beyond_one_standard_error() {
        // A 0.9 on 10 defective and 740 good images: 0.066 by the formula worked by hand.
        let se = auroc_se(0.9, 10, 740);
        assert!((se - 0.066).abs() < 0.002, "{se}");
        assert!(auroc_se(0.9, 100, 740) < se / 2.0 && auroc_se(0.9, 0, 10).is_infinite());
        let other = if BENCH_DEFAULT_SCORE == ScoreKind::Recon { ScoreKind::MapMax } else { ScoreKind::Recon };
        let with = |lead: f64| BTreeMap::from([(BENCH_DEFAULT_SCORE, 0.80), (other, 0.80 + lead)]);
        let (k, why) = auto_rule(&with(0.03), 20, 50);
        assert_eq!(k, BENCH_DEFAULT_SCORE, "{why}");
        assert!(why.contains("within one standard error"), "{why}");
        let (k, why) = auto_rule(&with(0.15), 20, 50);
        assert_eq!(k, other, "{why}");
        assert!(why.starts_with(&format!("auto: {} (validation AUROC", other.as_str())) && why.contains("never test/"), "{why}");
        // Many validation images make a small lead significant.
        assert_eq!(auto_rule(&with(0.03), 2000, 5000).0, other);
    }

    #[test]
    fn auto_without_validation_defects_falls_back_to_the_benchmark_default() {
        let g = crate::net::seeded(1, || NetG::new(&tiny(), Device::Cpu));
        let mut hold = Scores { latent: vec![0.1, 0.2], recon: vec![0.3, 0.4], map_max: vec![0.5, 0.6], mahalanobis: vec![0.7, 0.8] };
        let (kind, evidence) = choose_score(&g, &hold, None, 3, Device::Cpu);
        assert_eq!(kind, BENCH_DEFAULT_SCORE);
        assert!(evidence.starts_with("auto: no validation defects") && evidence.contains("benches/README.md"), "{evidence}");
        assert_eq!(as_choice(kind), ScoreChoice::Mahalanobis);
        // A generator without feature statistics has no mahalanobis score: the paper's.
        hold.mahalanobis.clear();
        assert_eq!(choose_score(&g, &hold, None, 3, Device::Cpu).0, ScoreKind::Latent);
    }
    use ganomaly_core::arch::ArchSpec;
    use tch::Kind;

    fn tiny() -> ArchSpec {
        ArchSpec { isize: 16, nc: 1, nz: 8, ngf: 8, ndf: 8, extralayers: 0, ..Default::default() }
    }

    #[test]
    fn cosine_schedule_starts_at_lr_and_falls() {
        assert_eq!(lr_at(LrSchedule::Constant, 2e-4, 7, 10), 2e-4);
        assert_eq!(lr_at(LrSchedule::Cosine, 2e-4, 0, 10), 2e-4);
        let l: Vec<f64> = (0..10).map(|e| lr_at(LrSchedule::Cosine, 1.0, e, 10)).collect();
        assert!(l.windows(2).all(|w| w[1] < w[0]), "{l:?}");
        assert!((l[5] - 0.5).abs() < 1e-12 && l[9] > 0.0 && l[9] < 0.03);
    }

    #[test]
    fn ema_averages_and_leaves_training_untouched() {
        let x = crate::net::seeded(9, || Tensor::rand([16, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0);
        let run = |decay: f64| {
            let mut m = Model::new(&tiny(), Hyper::default(), 2, Device::Cpu);
            let args = SelectArgs { ema_decay: decay, select: Select::Last, lr_schedule: LrSchedule::Constant };
            let _t = Tracker::new(&args, &mut m);
            for e in 0..3 {
                run_epoch(&mut m, &x, 8, 2, e, Device::Cpu, |_, _| {});
            }
            m
        };
        let plain = run(0.0);
        let with = run(0.9);
        // The raw weights follow the same trajectory with or without the average.
        assert_eq!(plain.g.to_weights().unwrap(), with.g.to_weights().unwrap());
        let ema = with.ema.as_ref().unwrap();
        assert_eq!(ema.updates, 6);
        // The average differs from the raw weights but stays close to them.
        let (a, r) = (ema.g.to_weights().unwrap(), with.g.to_weights().unwrap());
        let name = "decoder.0.weight";
        let (av, rv) = (&a.get(name).unwrap().data, &r.get(name).unwrap().data);
        let diff = av.iter().zip(rv.iter()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff > 0.0 && diff < 0.1, "max |ema − raw| = {diff}");
    }

    #[test]
    fn val_recon_selection_keeps_the_best_epoch() {
        let x = crate::net::seeded(9, || Tensor::rand([16, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0);
        let hold = x.narrow(0, 0, 4);
        let mut m = Model::new(&tiny(), Hyper::default(), 3, Device::Cpu);
        let args = SelectArgs { ema_decay: 0.0, select: Select::ValRecon, lr_schedule: LrSchedule::Constant };
        let mut t = Tracker::new(&args, &mut m);
        let mut vals = Vec::new();
        for e in 0..4 {
            let mut rec = run_epoch(&mut m, &x, 8, 3, e, Device::Cpu, |_, _| {});
            t.after_epoch(&m, e + 1, &hold, None, 3, Device::Cpu, &mut rec);
            vals.push(rec.val["recon"]);
        }
        let (best_epoch, best_val) =
            vals.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map(|(i, &v)| (i as u32 + 1, v)).unwrap();
        let (g, s) = t.chosen(&m);
        assert_eq!((s.epoch, s.val_recon), (best_epoch, Some(best_val)));
        // The kept generator really is that epoch's: its error is the recorded one.
        assert!((val_recon(g, &hold, Device::Cpu).unwrap() - best_val).abs() < 1e-9);
    }
}
