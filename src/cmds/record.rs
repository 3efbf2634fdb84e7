//! `ganomalyd record --config FILE --camera NAME --out DIR (--count N | --duration S)`:
//! good frames of a configured camera (any source kind, through its compiled
//! plan's factory), cut to its ROI, written as full-resolution PNGs into
//! `DIR/train/good/` for `ganomaly-train train --data DIR`. Near-duplicates are
//! skipped ([`crate::recording::Selector`]); a progress bar shows kept frames.
//!
//! Do not run it against a camera the daemon holds open (a V4L2 device has one
//! reader): use the running daemon's `record` command instead, which taps its
//! frames (docs/mqtt.md#record).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::capture::{CaptureError, FrameData};
use crate::config;
use crate::recording::{prepare_dir, thumbnail, write_png, Decision, RecordOptions, Selector, DEFAULT_MIN_CHANGE};

/// `ganomalyd record`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: PathBuf,
    /// The camera (its `[cameras.NAME]` table) to record from.
    #[arg(long)]
    pub camera: String,
    /// Dataset folder: frames go into OUT/train/good/.
    #[arg(long)]
    pub out: PathBuf,
    /// Stop after this many kept frames.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Least seconds between two kept frames.
    #[arg(long, default_value_t = 0.0)]
    pub min_interval: f64,
    /// Least mean grey-level difference (0-255) of a 32×32 thumbnail of the ROI to the
    /// last kept frame's: below it a frame is a near-duplicate and skipped.
    #[arg(long, default_value_t = DEFAULT_MIN_CHANGE)]
    pub min_change: f64,
    /// Add to a folder that already holds images.
    #[arg(long)]
    pub append: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Reconnects tried after a lost source before the recording gives up.
const RECONNECTS: u32 = 5;

pub fn run(a: &Args) -> anyhow::Result<ExitCode> {
    let settings = config::load(&a.config)?;
    let Some(plan) = settings.cameras.iter().find(|c| c.name == a.camera) else {
        let names: Vec<&str> = settings.cameras.iter().map(|c| c.name.as_str()).collect();
        bail!("--camera {}: no such camera in {} (cameras: {})", a.camera, a.config.display(), names.join(", "));
    };
    let opts = RecordOptions {
        dir: a.out.clone(),
        count: a.count,
        duration_s: a.duration,
        min_interval_s: a.min_interval,
        min_change: a.min_change,
        append: a.append,
    };
    opts.check()?;
    let first = prepare_dir(&opts)?;
    let good = opts.good_dir();
    let mut source = (plan.source.factory())();
    source.open().with_context(|| format!("camera {}", plan.name))?;
    let pace = (!source.self_paced() && plan.fps > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.fps));
    let mut sel = Selector::new(&opts);
    let bar = progress_bar(&sel, &opts, a.quiet);
    let started = Instant::now();
    let (mut seen, mut broken, mut reconnects) = (0u64, 0u64, 0u32);
    let mut frame = FrameData::default();
    let mut ended = false;
    let mut next_at = Instant::now();
    while !sel.finished(started.elapsed()) {
        if let Some(p) = pace {
            let now = Instant::now();
            if next_at > now {
                std::thread::sleep(next_at - now);
            }
            next_at = next_at.max(now) + p;
        }
        match source.next_frame(&mut frame) {
            Ok(()) => {}
            Err(CaptureError::BrokenFrame { reason, .. }) => {
                broken += 1;
                tracing::debug!(%reason, "broken frame skipped");
                continue;
            }
            Err(CaptureError::Ended(_)) => {
                ended = true;
                break;
            }
            Err(e @ (CaptureError::Disconnected { .. } | CaptureError::Open { .. })) => {
                reconnects += 1;
                if reconnects > RECONNECTS {
                    return Err(anyhow::Error::new(e)
                        .context(format!("camera {}: gave up after {RECONNECTS} reconnects", plan.name)));
                }
                tracing::warn!(error = %e, attempt = reconnects, "camera lost: reopening");
                source.close();
                std::thread::sleep(Duration::from_secs(1));
                if let Err(e) = source.open() {
                    tracing::warn!(error = %e, "reopen failed");
                }
                continue;
            }
        }
        seen += 1;
        let thumb = match thumbnail(&frame, plan.roi) {
            Ok(t) => t,
            Err(e) => {
                broken += 1;
                tracing::debug!(error = %e, "frame skipped");
                continue;
            }
        };
        match sel.offer(started.elapsed(), &thumb) {
            Decision::Keep => {
                let n = first + sel.kept() as usize - 1;
                write_png(&good, &plan.name, n, &frame, plan.roi)?;
                bar_tick(&bar, &sel, started, opts.count.is_some());
            }
            Decision::Done => break,
            Decision::TooSoon | Decision::Duplicate(_) => {
                if opts.count.is_none() {
                    bar_tick(&bar, &sel, started, false);
                }
            }
        }
    }
    source.close();
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "recorded {} image(s) of camera {} into {} in {secs:.1} s: {seen} frames seen, {} near-duplicates skipped, {broken} broken{}",
        sel.kept(),
        plan.name,
        good.display(),
        sel.duplicates(),
        if ended { "; the source ended before the count was reached" } else { "" }
    );
    if sel.kept() == 0 {
        bail!("no frame was recorded from camera {}", plan.name);
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(sel: &Selector, o: &RecordOptions, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let (len, unit) = match (sel.target(), o.duration_s) {
        (Some(c), _) => (c, "images"),
        (None, Some(d)) => (d.ceil() as u64, "s"),
        (None, None) => (0, ""),
    };
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {unit} {{msg}} [{{elapsed_precise}}]"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn bar_tick(bar: &indicatif::ProgressBar, sel: &Selector, started: Instant, by_count: bool) {
    if by_count {
        bar.set_position(sel.kept());
    } else {
        bar.set_position(started.elapsed().as_secs());
    }
    bar.set_message(format!("kept {}, {} duplicates skipped", sel.kept(), sel.duplicates()));
}
