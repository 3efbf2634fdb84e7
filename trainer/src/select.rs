//! Which generator a run exports, and which score the daemon uses by default:
//! an exponential moving average of NetG's weights (`--ema-decay`), the epoch
//! (`--select`: by AUROC on the validation split `DIR/val/`, or by reconstruction
//! error on held-out good images; never on test/), the learning-rate schedule
//! (`--lr-schedule`), and `--score auto`.
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
pub const BENCH_EVIDENCE: &str = "quality benchmark (benches/README.md, weight-averaged generator after the last epoch, 7 data sets x \
     3 seeds): mahalanobis has the highest mean image AUROC (0.766; latent 0.717, recon 0.651, map_max 0.651) and the best \
     worst data set (0.581; latent 0.546, recon 0.086 and map_max 0.279 on MNIST digit 1); give DIR/val/<defect> images to \
     choose the score and the epoch per data set";

/// How the exported generator is chosen among the epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Select {
    /// `val-auroc` when `DIR/val/` holds defect images, else `last`.
    Auto,
    /// The last epoch's generator.
    Last,
    /// The epoch with the lowest mean reconstruction error on the held-out good images.
    ValRecon,
    /// The epoch whose generator's chosen score (`--score auto`'s rule) has the
    /// highest AUROC on the validation split `DIR/val/` (never test/); exported only
    /// when it beats the last epoch by more than one standard error.
    ValAuroc,
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
    /// Which epoch's generator to export; never chosen on test/. `auto` by default:
    /// with validation defects (`DIR/val/<defect>`) `val-auroc`, which raised the
    /// quality benchmark's MNIST digit 1 from 0.67 to 0.94 and hurt no data set;
    /// without them `last` (`val-recon` made no measurable difference).
    #[arg(long, value_enum, default_value_t = Select::Auto)]
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

    /// These flags with `auto` resolved against the data; `val-auroc` needs defect
    /// images in `DIR/val/`.
    pub fn resolve(&self, val: Option<&ValSet>, root: &Path) -> anyhow::Result<SelectArgs> {
        let mut out = self.clone();
        if out.select == Select::Auto {
            out.select = if val.is_some() { Select::ValAuroc } else { Select::Last };
        }
        if out.select == Select::ValAuroc && val.is_none() {
            anyhow::bail!(
                "--select val-auroc needs validation images with defects: {}/val/good and {}/val/<defect type>/ (none found)",
                root.display(),
                root.display()
            );
        }
        Ok(out)
    }
}

/// The learning rate of epoch `epoch` (0-based) of `epochs`.
pub fn lr_at(schedule: LrSchedule, base: f64, epoch: u32, epochs: u32) -> f64 {
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Cosine => {
            base * 0.5 * (1.0 + (std::f64::consts::PI * f64::from(epoch) / f64::from(epochs.max(1))).cos())
        }
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

/// One epoch's figure for `--select val-auroc`: the validation AUROC of the score
/// that `--score auto`'s rule picks for that epoch's generator.
#[derive(Debug, Clone, Copy)]
struct ValPick {
    epoch: u32,
    kind: ScoreKind,
    auroc: f64,
    se: f64,
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
    /// `val-auroc`: the exported epoch's validation AUROC (of `val_score`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_auroc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_score: Option<ScoreKind>,
    /// `val-auroc`: why this epoch (best against last, with the standard error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Follows a run epoch by epoch: EMA, per-epoch validation figures, selection.
pub struct Tracker {
    args: SelectArgs,
    kept: Option<Kept>,
    last_epoch: u32,
    last_val: Option<f64>,
    /// `val-auroc`: the best epoch so far and the last one.
    best_pick: Option<ValPick>,
    last_pick: Option<ValPick>,
    /// `val-auroc` ranks epochs by this score when the run fixes one
    /// (`--default-score recon`...); by `--score auto`'s pick otherwise.
    fixed_score: Option<ScoreKind>,
}

impl Tracker {
    /// Installs the EMA on `model` when asked for (keeping one restored from a checkpoint).
    pub fn new(args: &SelectArgs, fixed_score: Option<ScoreKind>, model: &mut Model) -> Tracker {
        if args.ema_decay == 0.0 {
            model.ema = None;
        } else if model.ema.is_none() {
            model.ema = Some(Ema::new(&model.g, args.ema_decay));
        }
        Tracker {
            args: args.clone(),
            kept: None,
            last_epoch: 0,
            last_val: None,
            best_pick: None,
            last_pick: None,
            fixed_score,
        }
    }

    /// The generator that is evaluated and exported: the average when there is one.
    pub fn candidate(model: &Model) -> &NetG {
        model.ema.as_ref().map_or(&model.g, |e| &e.g)
    }

    /// Whether this epoch's generators need their feature statistics for selection
    /// (`val-auroc` scores `mahalanobis` on the validation split).
    pub fn needs_feature_stats(&self) -> bool {
        self.args.select == Select::ValAuroc
    }

    /// After epoch `epoch` (1-based): records the held-out reconstruction error of the
    /// raw and averaged generators, the averaged one's test AUROC and (`val-auroc`)
    /// its validation AUROCs into `rec`, and keeps the candidate if it is the best so far.
    #[allow(clippy::too_many_arguments)]
    pub fn after_epoch(
        &mut self,
        model: &Model,
        epoch: u32,
        x_hold: &Tensor,
        val_set: Option<&ValSet>,
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
        match (self.args.select, val_set) {
            (Select::ValRecon, _) => {
                if let Some(v) = val {
                    if self.kept.as_ref().is_none_or(|k| v < k.val) {
                        self.keep(Tracker::candidate(model), epoch, v);
                    }
                }
            }
            (Select::ValAuroc, Some(vs)) => {
                let g = Tracker::candidate(model);
                let hold = score_all(g, x_hold, kernel, 64, device);
                let v = val_aurocs(g, &hold, vs, kernel, device);
                for (kind, a) in &v.aurocs {
                    rec.val.insert(format!("auroc_{}", kind.as_str()), *a);
                }
                let kind = self.fixed_score.unwrap_or_else(|| auto_rule(&v).0);
                let auroc = v.aurocs.get(&kind).copied().unwrap_or(f64::NAN);
                let pick = ValPick { epoch, kind, auroc, se: auroc_se(auroc, v.n_def, v.n_good) };
                self.last_pick = Some(pick);
                // NaN (a score undefined on this split) never becomes the best.
                if auroc.is_finite() && self.best_pick.is_none_or(|b| auroc > b.auroc) {
                    self.best_pick = Some(pick);
                    self.keep(g, epoch, auroc);
                }
            }
            _ => {}
        }
    }

    /// Keeps a copy of `g` as the selected generator.
    fn keep(&mut self, g: &NetG, epoch: u32, val: f64) {
        match &mut self.kept {
            Some(k) => {
                tch::no_grad(|| k.g.vs.copy(&g.vs)).expect("same architecture");
                k.g.feature_stats = g.feature_stats.clone();
                k.epoch = epoch;
                k.val = val;
            }
            None => self.kept = Some(Kept { epoch, val, g: copy_net(g) }),
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
            val_auroc: None,
            val_score: None,
            reason: None,
        };
        if self.args.select == Select::ValAuroc {
            let last = || (Tracker::candidate(model), summary(self.last_epoch, self.last_val));
            let (Some(best), Some(last_pick), Some(k)) = (self.best_pick, self.last_pick, &self.kept) else {
                return last();
            };
            let (use_best, reason) = val_auroc_rule(best, last_pick);
            let (g, mut s) = if use_best { (&k.g, summary(best.epoch, None)) } else { last() };
            let p = if use_best { best } else { last_pick };
            s.val_auroc = Some(p.auroc);
            s.val_score = Some(p.kind);
            s.reason = Some(reason);
            return (g, s);
        }
        match &self.kept {
            Some(k) => (&k.g, summary(k.epoch, Some(k.val))),
            None => (Tracker::candidate(model), summary(self.last_epoch, self.last_val)),
        }
    }
}

/// `--select val-auroc`'s rule: the last epoch, unless the best epoch's validation
/// AUROC leads it by more than one standard error of the last one's (the same
/// guard as `--score auto`: among 30 epochs the best is partly noise). Returns
/// whether to take the best epoch, and why.
fn val_auroc_rule(best: ValPick, last: ValPick) -> (bool, String) {
    let lead = best.auroc - last.auroc;
    let fig = |p: ValPick| format!("epoch {} {} {:.4}", p.epoch, p.kind.as_str(), p.auroc);
    if best.epoch != last.epoch && (lead > last.se || !last.auroc.is_finite()) {
        (
            true,
            format!(
                "val-auroc: {} beats the last, {}, by {lead:.4} > one standard error {:.4}",
                fig(best),
                fig(last),
                last.se
            ),
        )
    } else if best.epoch == last.epoch {
        (false, format!("val-auroc: the last epoch is the best ({})", fig(last)))
    } else {
        (
            false,
            format!(
                "val-auroc: the last, {}; the best, {}, leads by {lead:.4}, within one standard error {:.4}",
                fig(last),
                fig(best),
                last.se
            ),
        )
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
/// other kinds beat it by more than one standard error of the *difference* (DeLong's
/// paired estimate, `ValAurocs::diff_se`); then, among those, the one with the
/// highest lower bound, AUROC − that error: the most certain gain, not the largest
/// figure (gravel seed 1: map_max 0.716 ± 0.041 over recon 0.707 ± 0.027 cost 0.054
/// on test).
/// A validation split is small (the quality benchmark's has 25 defects of a kind):
/// with ten per kind, a plain arg-max followed noise away from the better score.
/// The scores are measured on the same images, so their AUROCs are correlated
/// (recon and map_max strongly): the unpaired error of one AUROC over- or
/// under-states the error of a lead, and let gravel's seeds flip between recon and
/// map_max on leads of 0.01 (benches/README.md).
pub fn auto_rule(v: &ValAurocs) -> (ScoreKind, String) {
    let aurocs = &v.aurocs;
    let base = incumbent(|k| aurocs.contains_key(&k));
    let mut ranked: Vec<(ScoreKind, f64)> =
        aurocs.iter().filter(|(_, a)| a.is_finite()).map(|(&k, &a)| (k, a)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| (b.0 == base).cmp(&(a.0 == base))));
    let listed: Vec<String> = ranked.iter().map(|(k, a)| format!("{} {a:.4}", k.as_str())).collect();
    let on = format!(
        "on {} good and {} defective validation images (val/ and the held-out slice; never test/)",
        v.n_good, v.n_def
    );
    let Some(&base_a) = aurocs.get(&base).filter(|a| a.is_finite()) else {
        return (base, format!("auto: validation AUROC undefined; {BENCH_EVIDENCE}"));
    };
    let se = |k: ScoreKind| v.diff_se.get(&k).copied().filter(|s| s.is_finite()).unwrap_or(f64::INFINITY);
    let winner = ranked
        .iter()
        .filter(|&&(k, a)| k != base && a - base_a > se(k))
        .max_by(|x, y| (x.1 - se(x.0)).total_cmp(&(y.1 - se(y.0))));
    if let Some(&(best, best_a)) = winner {
        let why = format!(
            "beats the default {} by {:.4} > one paired standard error {:.4}",
            base.as_str(),
            best_a - base_a,
            se(best)
        );
        return (best, format!("auto: {} (validation AUROC {}; {why}) {on}", best.as_str(), listed.join(", ")));
    }
    let why = match ranked.first() {
        Some(&(best, best_a)) if best != base => {
            format!(
                "{} leads by {:.4}, within one paired standard error {:.4}",
                best.as_str(),
                best_a - base_a,
                se(best)
            )
        }
        _ => "the benchmark default leads".to_string(),
    };
    (base, format!("auto: {} (validation AUROC {}; {why}) {on}", base.as_str(), listed.join(", ")))
}

/// DeLong, DeLong & Clarke-Pearson's (1988) standard error of AUROC(a) − AUROC(b)
/// for two scores of the same images (`*_normal`, `*_defect` in the same image
/// order), from the placement values of each defect among the normals and of each
/// normal among the defects. Infinite with fewer than 2 images on either side.
pub fn delong_diff_se(a_normal: &[f64], a_defect: &[f64], b_normal: &[f64], b_defect: &[f64]) -> f64 {
    let (m, n) = (a_defect.len(), a_normal.len());
    if m < 2 || n < 2 || b_defect.len() != m || b_normal.len() != n {
        return f64::INFINITY;
    }
    let psi = |d: f64, g: f64| {
        if d > g {
            1.0
        } else if d == g {
            0.5
        } else {
            0.0
        }
    };
    // Placement values: v10[i] of defect i, v01[j] of normal j, each a − b.
    let mut v10 = vec![0.0; m];
    let mut v01 = vec![0.0; n];
    for i in 0..m {
        for j in 0..n {
            let d = psi(a_defect[i], a_normal[j]) - psi(b_defect[i], b_normal[j]);
            v10[i] += d;
            v01[j] += d;
        }
    }
    let var = |v: &mut [f64], count: usize| {
        v.iter_mut().for_each(|x| *x /= count as f64);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64
    };
    (var(&mut v10, n) / m as f64 + var(&mut v01, m) / n as f64).sqrt()
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
    auto_rule(&val_aurocs(g, hold, val, kernel, device))
}

/// Validation AUROC per score kind, and the counts behind them.
pub struct ValAurocs {
    pub aurocs: BTreeMap<ScoreKind, f64>,
    /// Standard error of AUROC(kind) − AUROC(incumbent) ([`delong_diff_se`]).
    pub diff_se: BTreeMap<ScoreKind, f64>,
    pub n_def: usize,
    pub n_good: usize,
}

/// AUROC of every score of `g` on the validation split: its defects against its
/// good images plus the held-out good slice (scored already: `hold`).
pub fn val_aurocs(g: &NetG, hold: &Scores, val: &ValSet, kernel: u32, device: Device) -> ValAurocs {
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
    let base = incumbent(|k| evals.contains_key(&k));
    let diff_se = match evals.get(&base) {
        Some(b) => {
            evals.iter().map(|(&k, e)| (k, delong_diff_se(&e.normal, &e.defect, &b.normal, &b.defect))).collect()
        }
        None => BTreeMap::new(),
    };
    let n_def = val.items.iter().filter(|i| i.defect.is_some()).count();
    ValAurocs { aurocs, diff_se, n_def, n_good: items.len() - n_def }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{run_epoch, Hyper};

    #[test]
    fn auto_leaves_the_default_only_for_a_lead_beyond_one_paired_standard_error() {
        // A 0.9 on 10 defective and 740 good images: 0.066 by the formula worked by hand.
        let se = auroc_se(0.9, 10, 740);
        assert!((se - 0.066).abs() < 0.002, "{se}");
        assert!(auroc_se(0.9, 100, 740) < se / 2.0 && auroc_se(0.9, 0, 10).is_infinite());
        let (a, b) = if BENCH_DEFAULT_SCORE == ScoreKind::Recon {
            (ScoreKind::MapMax, ScoreKind::Latent)
        } else {
            (ScoreKind::Recon, ScoreKind::MapMax)
        };
        let with_base = |base: f64, kinds: &[(ScoreKind, f64, f64)]| ValAurocs {
            aurocs: kinds.iter().map(|&(k, au, _)| (k, au)).chain([(BENCH_DEFAULT_SCORE, base)]).collect(),
            diff_se: kinds.iter().map(|&(k, _, se)| (k, se)).chain([(BENCH_DEFAULT_SCORE, 0.0)]).collect(),
            n_def: 100,
            n_good: 100,
        };
        let v = |kinds: &[(ScoreKind, f64, f64)]| with_base(0.70, kinds);
        let (k, why) = auto_rule(&v(&[(a, 0.73, 0.05)]));
        assert_eq!(k, BENCH_DEFAULT_SCORE, "{why}");
        assert!(why.contains("within one paired standard error 0.0500"), "{why}");
        let (k, why) = auto_rule(&v(&[(a, 0.76, 0.05)]));
        assert_eq!(k, a, "{why}");
        assert!(
            why.starts_with(&format!("auto: {} (validation AUROC", a.as_str())) && why.contains("never test/"),
            "{why}"
        );
        // The higher AUROC with a noisy lead loses to a smaller lead that is significant
        // (gravel: map_max +0.046 ± 0.045 against recon +0.040 ± 0.028).
        let (k, why) = auto_rule(&v(&[(a, 0.740, 0.028), (b, 0.746, 0.050)]));
        assert_eq!(k, a, "{why}");
        // Both significant: the higher lower bound, AUROC − error (gravel seed 1:
        // recon 0.7065 ± 0.027 over map_max 0.7161 ± 0.041).
        assert_eq!(auto_rule(&v(&[(a, 0.740, 0.028), (b, 0.760, 0.030)])).0, b);
        assert_eq!(auto_rule(&with_base(0.658, &[(a, 0.7065, 0.027), (b, 0.7161, 0.041)])).0, a);
        // An undefined error never switches.
        assert_eq!(auto_rule(&v(&[(a, 0.99, f64::NAN)])).0, BENCH_DEFAULT_SCORE);
    }

    #[test]
    fn delong_paired_error_matches_a_worked_example() {
        // Worked with numpy (placement values, sample covariances): A 0.8333, B 0.9167.
        let (an, ad) = ([0.1, 0.4, 0.35, 0.8], [0.9, 0.5, 0.7]);
        let (bn, bd) = ([0.2, 0.1, 0.6, 0.3], [0.4, 0.8, 0.65]);
        let se = delong_diff_se(&an, &ad, &bn, &bd);
        assert!((se - 0.267_879_187_805_36).abs() < 1e-12, "{se}");
        // A score against itself: no error; swapping the two: the same error.
        assert_eq!(delong_diff_se(&an, &ad, &an, &ad), 0.0);
        assert!((delong_diff_se(&bn, &bd, &an, &ad) - se).abs() < 1e-15);
        assert!(delong_diff_se(&an, &ad[..1], &bn, &bd[..1]).is_infinite());
    }

    #[test]
    fn auto_without_validation_defects_falls_back_to_the_benchmark_default() {
        let g = crate::net::seeded(1, || NetG::new(&tiny(), Device::Cpu));
        let mut hold = Scores {
            latent: vec![0.1, 0.2],
            recon: vec![0.3, 0.4],
            map_max: vec![0.5, 0.6],
            mahalanobis: vec![0.7, 0.8],
        };
        let (kind, evidence) = choose_score(&g, &hold, None, 3, Device::Cpu);
        assert_eq!(kind, BENCH_DEFAULT_SCORE);
        assert!(
            evidence.starts_with("auto: no validation defects") && evidence.contains("benches/README.md"),
            "{evidence}"
        );
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
            let _t = Tracker::new(&args, None, &mut m);
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
    fn val_auroc_rule_keeps_the_last_epoch_unless_beaten_beyond_one_standard_error() {
        let pick = |epoch, auroc| ValPick { epoch, kind: ScoreKind::Latent, auroc, se: auroc_se(auroc, 100, 800) };
        let last = pick(30, 0.70);
        assert!(last.se > 0.02 && last.se < 0.04, "{}", last.se);
        let (take, why) = val_auroc_rule(pick(1, 0.95), last);
        assert!(take && why.contains("epoch 1 latent 0.9500 beats the last, epoch 30"), "{why}");
        let (take, why) = val_auroc_rule(pick(12, 0.71), last);
        assert!(!take && why.contains("within one standard error"), "{why}");
        let (take, why) = val_auroc_rule(last, last);
        assert!(!take && why.contains("the last epoch is the best"), "{why}");
    }

    #[test]
    fn val_auroc_selection_exports_the_epoch_it_reports() {
        let x = crate::net::seeded(9, || Tensor::rand([24, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0);
        let hold = x.narrow(0, 0, 4);
        // Validation: 6 good images like the training ones, 6 "defects" with a bright square.
        let good = crate::net::seeded(5, || Tensor::rand([6, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0);
        let bad = good.copy();
        let _ = bad.narrow(2, 4, 6).narrow(3, 4, 6).fill_(1.0);
        let items = (0..12)
            .map(|i| TestItem { path: PathBuf::from(format!("v{i}")), defect: (i >= 6).then(|| "square".to_string()) })
            .collect();
        let val = ValSet { items, x: Tensor::cat(&[good, bad], 0) };
        let mut m = Model::new(&tiny(), Hyper::default(), 3, Device::Cpu);
        let args = SelectArgs { ema_decay: 0.9, select: Select::ValAuroc, lr_schedule: LrSchedule::Constant };
        let mut t = Tracker::new(&args, None, &mut m);
        // A run that fixes its score ranks the epochs by that score.
        let mut fixed = Tracker::new(&args, Some(ScoreKind::Recon), &mut m);
        assert!(t.needs_feature_stats());
        let mut recs = Vec::new();
        for e in 0..4 {
            let mut rec = run_epoch(&mut m, &x, 8, 3, e, Device::Cpu, |_, _| {});
            let ema = m.ema.as_mut().unwrap();
            ema.g.feature_stats = Some(crate::score::FeatureStats::fit(&ema.g, &x, 64, Device::Cpu).unwrap());
            t.after_epoch(&m, e + 1, &hold, Some(&val), None, 3, Device::Cpu, &mut rec);
            fixed.after_epoch(&m, e + 1, &hold, Some(&val), None, 3, Device::Cpu, &mut rec);
            for kind in ScoreKind::ALL {
                assert!(rec.val.contains_key(&format!("auroc_{}", kind.as_str())), "{:?}", rec.val);
            }
            recs.push(rec);
        }
        let (g, s) = t.chosen(&m);
        let (kind, auroc) = (s.val_score.unwrap(), s.val_auroc.unwrap());
        let reason = s.reason.clone().unwrap();
        // The summary's figure is the recorded one of the exported epoch ...
        assert_eq!(recs[s.epoch as usize - 1].val[&format!("auroc_{}", kind.as_str())], auroc, "{reason}");
        // ... and the exported generator reproduces it.
        let again = val_aurocs(g, &score_all(g, &hold, 3, 64, Device::Cpu), &val, 3, Device::Cpu);
        assert!((again.aurocs[&kind] - auroc).abs() < 1e-12, "{reason}");
        if s.epoch != 4 {
            assert!(reason.contains("beats the last"), "{reason}");
        }
        let (_, f) = fixed.chosen(&m);
        assert_eq!(f.val_score, Some(ScoreKind::Recon));
        assert_eq!(recs[f.epoch as usize - 1].val["auroc_recon"], f.val_auroc.unwrap());
    }

    #[test]
    fn val_recon_selection_keeps_the_best_epoch() {
        let x = crate::net::seeded(9, || Tensor::rand([16, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0);
        let hold = x.narrow(0, 0, 4);
        let mut m = Model::new(&tiny(), Hyper::default(), 3, Device::Cpu);
        let args = SelectArgs { ema_decay: 0.0, select: Select::ValRecon, lr_schedule: LrSchedule::Constant };
        let mut t = Tracker::new(&args, None, &mut m);
        let mut vals = Vec::new();
        for e in 0..4 {
            let mut rec = run_epoch(&mut m, &x, 8, 3, e, Device::Cpu, |_, _| {});
            t.after_epoch(&m, e + 1, &hold, None, None, 3, Device::Cpu, &mut rec);
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
