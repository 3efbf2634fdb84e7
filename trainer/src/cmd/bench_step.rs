//! `bench-step`: training steps per second on random data, no data loading (for
//! `benches/train_speed.py`, which reads the JSON line it prints).

use anyhow::Result;
use ganomaly_core::arch::ArchSpec;
use serde::Serialize;
use tch::Tensor;

use super::flags::{checked_arch, RunArgs};
use crate::model::{Hyper, Model};
use crate::net::seeded;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
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

/// Result of `bench-step`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub images_per_s: f64,
    pub steps: usize,
    pub batch: usize,
    pub threads: i32,
    pub seconds: f64,
    /// CPU seconds of the timed steps (user + system, every thread): on a shared box
    /// `images / cpu_seconds` at one thread measures the step, not the neighbours.
    pub cpu_seconds: f64,
    pub images_per_cpu_s: f64,
}

/// `bench-step`: training steps per second on random data (no data loading).
pub fn run(a: &Args) -> Result<BenchResult> {
    let device = a.run.setup()?;
    let arch =
        ArchSpec { isize: a.isize, nc: a.nc, nz: a.nz, ngf: a.ngf, ndf: a.ngf, extralayers: 0, ..Default::default() };
    let arch = checked_arch(arch)?;
    let mut model = Model::new(&arch, Hyper::default(), 0, device);
    let n = a.batch as i64;
    let s = i64::from(a.isize);
    let x = seeded(1, || Tensor::rand([n, i64::from(a.nc), s, s], (tch::Kind::Float, device)) * 2.0 - 1.0);
    for _ in 0..a.warmup {
        model.step(&x);
    }
    let (t0, cpu0) = (std::time::Instant::now(), cpu_seconds());
    for _ in 0..a.steps {
        model.step(&x);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let images = (a.steps * a.batch) as f64;
    Ok(BenchResult {
        images_per_s: images / seconds,
        cpu_seconds: cpu,
        images_per_cpu_s: images / cpu.max(1e-9),
        steps: a.steps,
        batch: a.batch,
        threads: tch::get_num_threads(),
        seconds,
    })
}

/// Process CPU seconds (user + system) from /proc/self/stat (USER_HZ is 100 on
/// Linux); 0 where there is no /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name's closing parenthesis; utime, stime are 14, 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The command's output on stdout: one JSON line.
pub fn print(result: &BenchResult) -> Result<()> {
    println!("{}", serde_json::to_string(result)?);
    Ok(())
}
