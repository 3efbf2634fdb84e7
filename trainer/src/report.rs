//! The report a person looks at: what `eval` and `train` found ([`EvalSummary`],
//! [`TrainReport`]: the JSON with every figure, and the table on stdout) and the
//! PNG plots (loss curves, AUROC per epoch, score histograms with the threshold,
//! ROC curves).

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};

use ganomaly_core::arch::ArchSpec;
use ganomaly_core::metadata::{Calibration, ModelMetadata, ScoreKind};
use plotters::prelude::*;
use serde::Serialize;

use crate::evaluate::KindEval;
use crate::export::MethodCheck;
use crate::model::{EpochRecord, Hyper};
use crate::select::SelectionSummary;

/// Problems writing a report; each names the file.
#[derive(Debug, thiserror::Error)]
#[error("writing report file {path}: {source}")]
pub struct ReportError {
    pub path: PathBuf,
    pub source: Box<dyn Error + Send + Sync>,
}

type PlotResult = Result<(), Box<dyn Error + Send + Sync>>;

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
    /// The model's calibration of each score (method, target and expected
    /// false-alarm rate), beside what its threshold does here (`scores[k].calibrated`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub calibrations: BTreeMap<ScoreKind, Calibration>,
}

impl EvalSummary {
    pub fn new(
        model: Option<&Path>,
        data: &Path,
        default: ScoreKind,
        evals: BTreeMap<ScoreKind, KindEval>,
    ) -> EvalSummary {
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
            calibrations: BTreeMap::new(),
        }
    }

    /// The same summary with the calibrations of `meta` attached (printed under the table).
    pub fn with_calibrations(mut self, meta: &ModelMetadata) -> EvalSummary {
        self.calibrations = meta.scores.iter().map(|s| (s.kind, s.calibration.clone())).collect();
        self
    }

    /// The table on stdout (`eval` without `--json`, and the end of `train`).
    pub fn print_table(&self) {
        let s = self;
        println!(
            "{} good, {} defective test images; default score `{}`",
            s.n_good,
            s.n_defect,
            s.default_score.as_str()
        );
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
        // What the threshold was meant to do: the rate on good images is the
        // FAR@calib column above, to hold against the target and its interval.
        for (kind, c) in &s.calibrations {
            let target = c.target_false_alarm_rate.map_or("-".to_string(), |t| format!("{t}"));
            let expected = c
                .expected_far
                .as_ref()
                .map_or("-".to_string(), |f| format!("{:.4} [{:.4}, {:.4}]", f.estimate, f.low, f.high));
            println!(
                "calibration {:<11} {:<15} threshold {:<12.6} target FAR {:<6} expected FAR {}",
                kind.as_str(),
                c.method.as_str(),
                c.threshold,
                target,
                expected
            );
        }
    }
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
    /// Every calibration method on the same held-out scores and its test figures
    /// (benches/calibration_table.py reads these).
    pub calibration_methods: BTreeMap<ScoreKind, Vec<MethodCheck>>,
    /// `--init`: the model or checkpoint training started from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// `--augment` (`none` when off).
    pub augment: crate::augment::Augment,
    /// `--patch-maps auto`: the depths chosen on val/ and every candidate's figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_choice: Option<crate::patch_choice::PatchChoice>,
    /// `--feedback`: what the run took from the operator's feedback folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<crate::feedback::FeedbackUse>,
    pub default_score: Option<ScoreKind>,
    pub plots: Vec<String>,
    /// Which epoch's generator (raw or weight average) was evaluated and exported.
    pub selection: SelectionSummary,
    /// Pixel AUROC of each map of the exported generator on test/, where
    /// `DIR/ground_truth/<defect>/<name>_mask.png` exists (`crate::candidates`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub localisation: Option<crate::candidates::Localisation>,
    /// `--candidates`: test figures of other patch configurations and fusion recipes
    /// on the same generator (measurement only; nothing is chosen with them).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub candidates: BTreeMap<String, crate::candidates::Candidate>,
}

/// The epoch with the best test AUROC (`TrainReport::best_epoch_optimistic`).
#[derive(Debug, Clone, Serialize)]
pub struct BestEpoch {
    pub epoch: u32,
    pub score: ScoreKind,
    pub auroc: f64,
    pub note: &'static str,
}

/// A named per-epoch series of the loss plot.
type Series = (&'static str, fn(&EpochRecord) -> f64);

const SIZE: (u32, u32) = (900, 560);
const KIND_COLORS: [RGBColor; ScoreKind::ALL.len()] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

fn kind_color(kind: ScoreKind) -> RGBColor {
    KIND_COLORS[ScoreKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) % KIND_COLORS.len()]
}

fn finite_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

/// Loss curves (one panel per loss, per-epoch means).
pub fn plot_losses(path: &Path, history: &[EpochRecord]) -> PlotResult {
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 3));
    let series: [Series; 5] = [
        ("err_g (total)", |r| r.losses.err_g),
        ("err_g_adv (feature L2)", |r| r.losses.err_g_adv),
        ("err_g_con (L1 recon)", |r| r.losses.err_g_con),
        ("err_g_enc (latent L2)", |r| r.losses.err_g_enc),
        ("err_d (BCE)", |r| r.losses.err_d),
    ];
    let x_max = history.iter().map(|r| r.epoch).max().unwrap_or(1).max(2);
    for (panel, (name, f)) in panels.iter().zip(series) {
        let (lo, hi) = finite_range(history.iter().map(f));
        let mut chart = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(1u32..x_max, lo..hi)?;
        chart.configure_mesh().x_desc("epoch").draw()?;
        chart.draw_series(LineSeries::new(history.iter().map(|r| (r.epoch, f(r))), &BLUE))?;
        chart.draw_series(history.iter().map(|r| Circle::new((r.epoch, f(r)), 3, BLUE.filled())))?;
    }
    root.present()?;
    Ok(())
}

/// Draws the series' legend in the lower right and writes the picture.
fn legend_and_write<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    root: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
) -> PlotResult {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Test AUROC per epoch, one line per score kind.
pub fn plot_auroc(path: &Path, history: &[EpochRecord]) -> PlotResult {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = history.iter().map(|r| r.epoch).max().unwrap_or(1).max(2);
    let mut chart = ChartBuilder::on(&root)
        .caption("test AUROC per epoch", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(1u32..x_max, 0.0f64..1.0)?;
    chart.configure_mesh().x_desc("epoch").y_desc("AUROC").draw()?;
    for kind in ScoreKind::ALL {
        let pts: Vec<(u32, f64)> =
            history.iter().filter_map(|r| r.auroc.get(kind.as_str()).map(|&a| (r.epoch, a))).collect();
        if pts.is_empty() {
            continue;
        }
        let c = kind_color(kind);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(kind.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
    }
    legend_and_write(&mut chart, &root)
}

/// Normal-vs-defect histogram of one score with the calibrated (solid) and
/// best-F1 (dashed grey) thresholds.
pub fn plot_histogram(path: &Path, e: &KindEval) -> PlotResult {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let h = &e.histogram;
    let (x0, x1) = (h.edges[0], h.edges[h.edges.len() - 1]);
    let (x0, x1) = match &e.calibrated {
        Some(c) if c.threshold.is_finite() => (x0.min(c.threshold), x1.max(c.threshold) + (x1 - x0) * 0.02),
        _ => (x0, x1),
    };
    let y_max = h.normal.iter().chain(&h.defect).copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{} score: test/good vs defects (AUROC {:.3})", e.kind.as_str(), e.auroc), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(x0..x1, 0.0..y_max)?;
    chart.configure_mesh().x_desc("raw score").y_desc("images").draw()?;
    let bars = |counts: &[u32], color: RGBColor| {
        counts
            .iter()
            .enumerate()
            .map(move |(i, &c)| {
                Rectangle::new([(h.edges[i], 0.0), (h.edges[i + 1], f64::from(c))], color.mix(0.45).filled())
            })
            .collect::<Vec<_>>()
    };
    let green = RGBColor(44, 160, 44);
    chart
        .draw_series(bars(&h.normal, green))?
        .label("good")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], green.mix(0.45).filled()));
    chart
        .draw_series(bars(&h.defect, RED))?
        .label("defect")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], RED.mix(0.45).filled()));
    if let Some(c) = &e.calibrated {
        chart
            .draw_series(LineSeries::new([(c.threshold, 0.0), (c.threshold, y_max)], BLACK.stroke_width(2)))?
            .label(format!("calibrated threshold {:.4e}", c.threshold))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    }
    if e.threshold.is_finite() {
        let t = e.threshold;
        chart
            .draw_series(DashedLineSeries::new([(t, 0.0), (t, y_max)], 6, 4, RGBColor(120, 120, 120).stroke_width(2)))?
            .label(format!("best-F1 threshold {t:.4e} (optimistic)"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(120, 120, 120).stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// ROC curves of every score kind.
pub fn plot_roc(path: &Path, evals: &BTreeMap<ScoreKind, KindEval>) -> PlotResult {
    let root = BitMapBackend::new(path, (640, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("ROC (defect = positive)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0f64..1.0, 0.0f64..1.0)?;
    chart.configure_mesh().x_desc("false-positive rate").y_desc("true-positive rate").draw()?;
    chart.draw_series(DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], 5, 5, RGBColor(160, 160, 160).into()))?;
    for (kind, e) in evals {
        let c = kind_color(*kind);
        chart
            .draw_series(LineSeries::new(e.roc.clone(), c.stroke_width(2)))?
            .label(format!("{} (AUROC {:.3})", kind.as_str(), e.auroc))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend_and_write(&mut chart, &root)
}

/// Writes every plot that the inputs allow into `dir`; returns the files written.
pub fn write_plots(
    dir: &Path,
    history: Option<&[EpochRecord]>,
    evals: Option<&BTreeMap<ScoreKind, KindEval>>,
) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|e| ReportError { path: dir.to_path_buf(), source: e.into() })?;
    let mut written = Vec::new();
    let mut go = |name: String, f: &dyn Fn(&Path) -> PlotResult| -> Result<(), ReportError> {
        let path = dir.join(name);
        f(&path).map_err(|source| ReportError { path: path.clone(), source })?;
        written.push(path);
        Ok(())
    };
    if let Some(h) = history.filter(|h| !h.is_empty()) {
        go("losses.png".into(), &|p| plot_losses(p, h))?;
        if h.iter().any(|r| !r.auroc.is_empty()) {
            go("auroc_per_epoch.png".into(), &|p| plot_auroc(p, h))?;
        }
    }
    if let Some(evals) = evals.filter(|e| e.values().any(|k| !k.defect.is_empty())) {
        for (kind, e) in evals {
            go(format!("hist_{}.png", kind.as_str()), &|p| plot_histogram(p, e))?;
        }
        go("roc.png".into(), &|p| plot_roc(p, evals))?;
    }
    Ok(written)
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), ReportError> {
    let err = |source: Box<dyn Error + Send + Sync>| ReportError { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.into()))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| err(e.into()))?;
    std::fs::write(path, text).map_err(|e| err(e.into()))
}
