//! `ganomalyd calibrate --config FILE --camera NAME (--frames N | --duration S)`:
//! while the operator asserts that the line runs good parts, scores a camera's
//! live frames with its model (its own source, the daemon's preprocessing and
//! session code), sets the camera's threshold for `--target-far` with core's
//! `normal_calibration` (the trainer's method) and keeps it in
//! `<commissioning.dir>/calibration.json`, which `run` reads at start (the
//! precedence: `commission`'s module doc). Prints the threshold before and after.
//!
//! For a camera the daemon holds open (a V4L2 device has one reader), send the
//! running daemon the `calibrate` command instead (docs/mqtt.md#commissioning):
//! it applies the result without a restart.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ganomaly_core::calibrate::normal_calibration;
use ganomaly_core::preprocess::{FrameRef, Preprocessor};

use crate::capture::{CaptureError, FrameData};
use crate::commission::{self, CalibrationState, LiveCalibration};
use crate::config;
use crate::infer::{BatchOutput, Model};

/// `ganomalyd calibrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: PathBuf,
    #[arg(long)]
    pub camera: String,
    /// Good-part frames to score.
    #[arg(long)]
    pub frames: Option<u64>,
    /// Seconds of good parts to score.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Target false-alarm rate on good parts.
    #[arg(long, default_value_t = 0.01)]
    pub target_far: f64,
    /// lognormal_tail, conformal or normal_quantile.
    #[arg(long, default_value = "lognormal_tail")]
    pub method: String,
}

pub fn run(a: &Args) -> anyhow::Result<ExitCode> {
    let settings = config::load(&a.config)?;
    let Some(plan) = settings.cameras.iter().find(|c| c.name == a.camera) else {
        bail!("--camera {}: no such camera in {}", a.camera, a.config.display());
    };
    let Some(file) = settings.commissioning.calibration_file() else {
        bail!("[commissioning] dir is not set in {}: nowhere to keep the calibration", a.config.display());
    };
    let mut body = serde_json::Map::new();
    if let Some(f) = a.frames {
        body.insert("frames".into(), f.into());
    }
    if let Some(d) = a.duration {
        body.insert("duration_s".into(), d.into());
    }
    body.insert("target_far".into(), a.target_far.into());
    body.insert("method".into(), a.method.clone().into());
    // The command's checks, so that both ways refuse the same input.
    let (frames, duration, target, method) = commission::calibrate_options(&body)
        .map_err(|e| anyhow::anyhow!("{}", e.replace("duration_s", "--duration")))?;
    let mut model = Model::load(&plan.model, &settings.inference)?;
    let kind = plan.score.kind(model.meta.default_score);
    let state = CalibrationState::load(&file)?;
    let before = commission::effective(Some((&file, &state)), &plan.name, &model.meta, kind)
        .with_context(|| format!("model {} has no `{}` score", plan.model.display(), kind.as_str()))?;
    let mut pre = Preprocessor::from_meta(&model.meta.preprocess);
    let mut tensor = vec![0f32; pre.tensor_len()];
    let mut grid = None;
    let mut out = BatchOutput::default();
    let mut source = (plan.source.factory())();
    source.open().with_context(|| format!("camera {}", plan.name))?;
    let pace = (!source.self_paced() && plan.fps > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.fps));
    let started = Instant::now();
    let mut frame = FrameData::default();
    let mut scores = Vec::new();
    loop {
        let n = scores.len() as u64;
        let enough = frames.is_some_and(|f| n >= f)
            || duration.is_some_and(|d| started.elapsed() >= d && n >= crate::decide::MIN_CALIBRATION_SCORES);
        if enough {
            break;
        }
        let t0 = Instant::now();
        match source.next_frame(&mut frame) {
            Ok(()) => {}
            Err(CaptureError::BrokenFrame { .. }) => continue,
            Err(e) => bail!("camera {}: {e} after {n} scores", plan.name),
        }
        let fr = FrameRef {
            width: frame.width,
            height: frame.height,
            layout: crate::preprocess::layout(frame.format),
            data: &frame.data,
        };
        // A tiled camera's score is its hottest tile's, as the daemon scores it.
        let images = match plan.tiles {
            None => pre.run(&fr, plan.roi, &mut tensor).map(|()| 1).ok(),
            Some(t) => crate::tiles::prepare(&mut pre, &fr, plan.roi, t, &mut grid, &mut tensor).map(|g| g.len()).ok(),
        };
        let Some(images) = images else { continue };
        // In runs of `max_batch`, as the daemon runs a tiled frame.
        model.run_chunked(&tensor, images, settings.inference.max_batch.max(1), &mut out)?;
        let raw = if plan.tiles.is_some() {
            crate::tiles::frame_score(&out, kind, 0, images).map(|(s, _)| s)
        } else {
            out.score(kind, 0)
        };
        if let Some(raw) = raw.map(f64::from).filter(|r| r.is_finite()) {
            scores.push(raw);
        }
        if let Some(p) = pace {
            std::thread::sleep(p.saturating_sub(t0.elapsed()));
        }
    }
    source.close();
    let after = normal_calibration(&scores, target, method);
    if !after.threshold.is_finite() {
        bail!("the {} live scores gave no finite threshold", scores.len());
    }
    let mut state = state;
    state.cameras.insert(
        plan.name.clone(),
        LiveCalibration {
            model_id: commission::model_id(&model.meta),
            model: plan.model.display().to_string(),
            kind,
            calibration: after.clone(),
            ts: crate::events::now_ms(),
            scores: scores.len(),
        },
    );
    state.save(&file)?;
    let far = after.expected_far.as_ref().map_or(String::new(), |f| {
        format!(", expected false-alarm rate {:.4} [{:.4}, {:.4}]", f.estimate, f.low, f.high)
    });
    println!(
        "camera {}: threshold on raw `{}` {} ({}) -> {} ({} from {} live scores{far}); kept in {} (read by `run` at start)",
        plan.name,
        kind.as_str(),
        before.0.threshold,
        before.0.method.as_str(),
        after.threshold,
        after.method.as_str(),
        scores.len(),
        file.display()
    );
    Ok(ExitCode::SUCCESS)
}
