//! The flags that several commands share (threads and device; calibration and
//! export settings) and the checks on them.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use ganomaly_core::arch::ArchSpec;
use ganomaly_core::metadata::CalibrationMethod;
use ganomaly_core::patch::{PatchSpec, PatchStatistic, PATCH_BANK_DEFAULT, PATCH_DIM_DEFAULT};
use serde::Serialize;
use tch::Device;

use crate::export::ExportSettings;
use crate::score_choice::ScoreChoice;

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
// These doc comments are the CLI's help, which writes placeholders as <defect>;
// rustdoc would read those as HTML tags.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Clone, Args)]
pub struct CalibArgs {
    /// Target false-alarm rate on normal images: each score's threshold is set on the
    /// held-out normal scores (`--calibration`) so that about this share of good
    /// images scores at or above it.
    #[arg(long, default_value_t = 0.01)]
    pub target_far: f64,
    /// How the threshold is estimated from the held-out normal scores (see
    /// `ganomaly_core::calibrate`): a log-normal tail fit (falls back to `conformal`
    /// when the fit fails its check), the conformal rank, or the plain sample quantile
    /// (the method before schema 2).
    #[arg(long, value_enum, default_value_t = CalibChoice::LognormalTail)]
    pub calibration: CalibChoice,
    /// Side (odd) of the box filter applied to the anomaly map before `score_map` takes its max.
    #[arg(long, default_value_t = 7)]
    pub map_kernel: u32,
    /// The score the daemon uses unless its config says otherwise. `auto`: chosen on
    /// DIR/val/<defect> when it exists (the benchmark's default, mahalanobis, unless another
    /// score leads it by more than one standard error), else that default.
    #[arg(long, alias = "score", value_enum, default_value_t = ScoreChoice::Auto)]
    pub default_score: ScoreChoice,
    /// Depths of encoder1's feature maps the `patch` score reads, comma-separated,
    /// finest first (1: side isize/2, each next depth halves it). `auto`, train's
    /// default when DIR/val/ has defects: every run of consecutive depths among 1-3 is
    /// fitted and scored on DIR/val/, and 2,3 (the maps at isize/4 and isize/8) is kept
    /// unless one beats it by more than one standard error (benches/README.md: gravel
    /// 0.704 → 0.785, brushed metal 0.916 → 0.965, no set lost). Without val/: 2,3.
    /// `export`: the maps `train` exported with (kept in the checkpoint), else 2,3.
    #[arg(long, value_parser = parse_patch_maps)]
    pub patch_maps: Option<PatchMaps>,
    /// Channels the `patch` score keeps of the concatenated maps (a seeded random
    /// subset); fewer when the per-position statistics would pass 4 MiB.
    #[arg(long, default_value_t = PATCH_DIM_DEFAULT)]
    pub patch_dim: u32,
    /// What the `patch` score fits per position when its maps are given
    /// (`--patch-maps 2,3`): `gaussian`, one Ledoit–Wolf Gaussian per position
    /// (PaDiM); `nearest`, the distance to the nearest of `--patch-bank` training
    /// vectors from any position (PatchCore's score, for textures). `--patch-maps
    /// auto` tries both on val/ (this flag then sets the default the others must
    /// beat by one standard error). `export` keeps the statistic `train` recorded
    /// unless depths or `nearest` are given.
    #[arg(long, value_enum, default_value_t = StatisticChoice::Gaussian)]
    pub patch_statistic: StatisticChoice,
    /// Entries of the nearest-neighbour bank (a greedy coreset of the training
    /// positions; 2,048 × 64 channels is 0.5 MiB). 0: `--patch-maps auto` tries the
    /// Gaussian only.
    #[arg(long, default_value_t = PATCH_BANK_DEFAULT)]
    pub patch_bank: u32,
}

/// `--patch-statistic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatisticChoice {
    Gaussian,
    Nearest,
}

impl CalibArgs {
    /// The `patch` score's configuration for `arch`; refused with the reason.
    /// With `--patch-maps auto` the default depths: `train` chooses among the
    /// candidates after training ([`CalibArgs::patch_auto`]).
    pub fn patch_spec(&self, arch: &ArchSpec) -> Result<PatchSpec> {
        self.patch_spec_over(arch, arch.default_patch())
    }

    /// [`patch_spec`](Self::patch_spec) with `unset` where no `--patch-maps`
    /// depths are given (`export`: the spec `train` recorded in the checkpoint);
    /// `--patch-dim` then redraws its channels.
    /// The statistic is `unset`'s unless depths or `--patch-statistic nearest` are given.
    pub fn patch_spec_over(&self, arch: &ArchSpec, unset: PatchSpec) -> Result<PatchSpec> {
        let recorded = unset.statistic;
        let mut spec = self.patch_maps_over(arch, unset)?;
        if !matches!(self.patch_maps, Some(PatchMaps::Depths(_))) && spec.statistic != recorded {
            // `--patch-dim` redrew the channels of a recorded nearest spec: its statistic stays.
            spec.statistic = recorded;
            arch.check_patch(&spec).map_err(|e| anyhow::anyhow!("--patch-dim: {e}"))?;
        }
        if self.patch_statistic == StatisticChoice::Nearest {
            if self.patch_bank == 0 {
                bail!("--patch-statistic nearest needs --patch-bank of at least 1");
            }
            spec.statistic = PatchStatistic::Nearest { bank: self.patch_bank };
            arch.check_patch(&spec).map_err(|e| anyhow::anyhow!("--patch-bank: {e}"))?;
        }
        Ok(spec)
    }

    fn patch_maps_over(&self, arch: &ArchSpec, unset: PatchSpec) -> Result<PatchSpec> {
        let depths = match &self.patch_maps {
            Some(PatchMaps::Depths(d)) => Some(d.clone()),
            None | Some(PatchMaps::Auto) => None,
        };
        match depths {
            None if self.patch_dim == PATCH_DIM_DEFAULT => Ok(unset),
            maps => {
                let maps = maps.unwrap_or(unset.maps);
                if self.patch_dim == 0 {
                    bail!("--patch-dim must be at least 1");
                }
                arch.patch_spec(&maps, self.patch_dim, 0).map_err(|e| anyhow::anyhow!("--patch-maps/--patch-dim: {e}"))
            }
        }
    }

    /// `train` chooses the patch maps on val/: `--patch-maps auto`, or no `--patch-maps`.
    pub fn patch_auto(&self) -> bool {
        matches!(self.patch_maps, None | Some(PatchMaps::Auto))
    }

    /// `--patch-maps auto` given in so many words (a missing val/ is then worth a warning).
    pub fn patch_auto_asked(&self) -> bool {
        self.patch_maps == Some(PatchMaps::Auto)
    }

    pub fn settings(&self) -> Result<ExportSettings> {
        if !(self.target_far > 0.0 && self.target_far < 1.0) {
            bail!("--target-far must be in (0, 1), got {}", self.target_far);
        }
        if self.map_kernel % 2 == 0 || self.map_kernel == 0 {
            bail!("--map-kernel must be odd, got {}", self.map_kernel);
        }
        Ok(ExportSettings {
            target_far: self.target_far,
            calibration: self.calibration.method(),
            map_kernel: self.map_kernel,
            default_score: self.default_score,
        })
    }
}

/// `--patch-maps`: fixed depths, or `auto` (chosen on the validation split).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchMaps {
    Auto,
    Depths(Vec<u32>),
}

fn parse_patch_maps(s: &str) -> Result<PatchMaps, String> {
    if s.trim() == "auto" {
        return Ok(PatchMaps::Auto);
    }
    s.split(',')
        .map(|d| d.trim().parse::<u32>().map_err(|_| format!("{d:?} is not a depth (a whole number, or `auto`)")))
        .collect::<Result<Vec<u32>, String>>()
        .map(PatchMaps::Depths)
}

/// `--calibration`: the good-only threshold methods of `ganomaly_core::calibrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibChoice {
    LognormalTail,
    Conformal,
    NormalQuantile,
}

impl CalibChoice {
    pub fn method(self) -> CalibrationMethod {
        match self {
            CalibChoice::LognormalTail => CalibrationMethod::LognormalTail,
            CalibChoice::Conformal => CalibrationMethod::Conformal,
            CalibChoice::NormalQuantile => CalibrationMethod::NormalQuantile,
        }
    }
}

/// `arch` if it is valid; refused with every problem at once otherwise.
pub fn checked_arch(arch: ArchSpec) -> Result<ArchSpec> {
    if let Err(errs) = arch.validate() {
        bail!("invalid architecture: {}", errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "));
    }
    Ok(arch)
}
