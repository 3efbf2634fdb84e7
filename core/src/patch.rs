//! The `patch` score's configuration: which of encoder1's feature maps it reads,
//! the grid they are brought to, and the channels it keeps; the parameter names
//! and shapes of its per-position Gaussian.
//!
//! Per position of a G×G grid, the selected maps (average-pooled or bilinearly
//! upsampled to G×G, concatenated along channels) give a vector of C values; a
//! seeded random subset of d of them (PaDiM's projection) is compared with the
//! training images' vectors *at the same position*: mean μₚ `[d]` and whitening
//! matrix Wₚ `[d, d]` (WₚWₚᵀ = Σₚ⁻¹, Ledoit–Wolf shrunk). The per-position
//! squared Mahalanobis distance divided by d is the feature anomaly map (≈ 1 on
//! typical training images); its maximum is the image score.
//!
//! With the statistic [`PatchStatistic::Nearest`] (PatchCore's score on GANomaly's
//! own encoder) the d values are standardised per channel (centre cₖ, scale sₖ:
//! the training positions' mean and 1/std) and compared with a memory bank of M
//! standardised training vectors from *any* position, `[d, M]` (a greedy k-centre
//! coreset, chosen by the trainer): the squared distance to the nearest bank
//! entry, divided by d, is the map. Textures repeat across positions, so the bank
//! holds every position's kind of patch where a per-position Gaussian holds one
//! unimodal model per place (benches/README.md, session 8).

use rand::seq::index::sample;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::arch::{ArchSpec, Op, ParamSpec};

/// Initializer of the per-position means `[P, 1, d]` (P = G²).
pub const PATCH_MEAN: &str = "score.patch_mean";
/// Initializer of the per-position whitening matrices `[P, d, d]`.
pub const PATCH_WHITEN: &str = "score.patch_whiten";
/// Most values in the whitening matrices, P·d²: 2²⁰ f32 = 4 MiB in the model file,
/// as the `mahalanobis` score's matrix at its largest.
pub const PATCH_VALUES_MAX: u64 = 1 << 20;
/// Largest grid side: finer maps are average-pooled down to it (a 64×64 grid of
/// 64-dimensional Gaussians would be 64 MiB).
pub const PATCH_GRID_MAX: u32 = 16;
/// Channels kept by default (the issue's prototype: 64 random channels).
pub const PATCH_DIM_DEFAULT: u32 = 64;
/// Initializer of the nearest-neighbour statistic's per-channel centre `[d]`.
pub const PATCH_CENTER: &str = "score.patch_center";
/// Initializer of its per-channel scale `[d]` (1/std of the training positions).
pub const PATCH_SCALE: &str = "score.patch_scale";
/// Initializer of its memory bank `[d, M]` (standardised, one entry per column).
pub const PATCH_BANK: &str = "score.patch_bank";
/// Bank entries by default (PatchCore's coreset of a few thousand; 2,048 at d 64 is
/// 0.5 MiB and, on a 16×16 grid, 33 M multiply-adds per image).
pub const PATCH_BANK_DEFAULT: u32 = 2048;
/// Most position × bank distances per image, P·M: the search's `[N, P, M]` tensor
/// is 4 MiB per image at this cap (a 16×16 grid and 4,096 entries), so neither a
/// flag nor a hostile model file can make one frame take gigabytes.
pub const PATCH_SEARCH_MAX: u64 = 1 << 20;

/// What the `patch` score fits per grid position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum PatchStatistic {
    /// One Ledoit–Wolf Gaussian per position (PaDiM).
    #[default]
    Gaussian,
    /// The distance to the nearest of `bank` training vectors of any position (PatchCore).
    Nearest { bank: u32 },
}

impl PatchStatistic {
    pub fn is_gaussian(&self) -> bool {
        *self == PatchStatistic::Gaussian
    }

    /// `gaussian` or `nearest` (flags, logs).
    pub fn name(&self) -> &'static str {
        match self {
            PatchStatistic::Gaussian => "gaussian",
            PatchStatistic::Nearest { .. } => "nearest",
        }
    }
}

/// Why a patch configuration does not fit an architecture.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("patch maps {0:?}: each must be a depth between 1 and {1} (encoder1's maps of side isize/2 … 4), listed once, finest first")]
    Maps(Vec<u32>, u32),
    #[error(
        "patch grid {grid}: must be a power of two from 4 up to the finest map's side ({finest}) and at most {max}"
    )]
    Grid { grid: u32, finest: u32, max: u32 },
    #[error("patch channels: {0}")]
    Channels(String),
    #[error("patch statistics would hold {values} values (P·d² with P = {p}, d = {d}); the limit is {max}")]
    TooLarge { values: u64, p: u64, d: u64, max: u64 },
    #[error(
        "patch bank of {bank} entries × {d} channels on {p} positions: must hold 1 to {max} values, and P·M at most {search}"
    )]
    Bank { bank: u64, d: u64, p: u64, max: u64, search: u64 },
}

/// Configuration of the `patch` score, recorded in the model's metadata (its
/// `ganomaly.scores` entry) so that the graph and the trainer read the same maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchSpec {
    /// Depths of encoder1's maps: 1 is the first conv's output (side isize/2), each
    /// next depth halves the side; the deepest is the 4×4 map `mahalanobis` reads.
    pub maps: Vec<u32>,
    /// Side G of the common grid (the finest map's side, at most [`PATCH_GRID_MAX`]).
    pub grid: u32,
    /// Indices (ascending) into the concatenated channels that are kept: d of C.
    pub channels: Vec<u32>,
    /// Seed that drew `channels` (provenance; the indices are what the graph uses).
    pub seed: u64,
    /// The per-position statistic; absent (Gaussian) in models written before it.
    #[serde(default, skip_serializing_if = "PatchStatistic::is_gaussian")]
    pub statistic: PatchStatistic,
}

/// One of encoder1's feature maps: the output of layer `layer` (its last activation
/// at that side), `channels` × `side` × `side`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderMap {
    pub depth: u32,
    pub layer: usize,
    pub channels: u32,
    pub side: u32,
}

impl ArchSpec {
    /// encoder1's maps by depth, finest first: the last activation at each side.
    pub fn encoder1_maps(&self) -> Vec<EncoderMap> {
        let enc = self.encoder1();
        let mut out: Vec<EncoderMap> = Vec::new();
        let (mut side, mut channels) = (self.isize, self.nc);
        for (i, l) in enc.iter().enumerate() {
            match l.op {
                Op::Conv { cout, s, k, p, .. } => {
                    channels = cout;
                    side = (side + 2 * p - k) / s + 1;
                }
                Op::LeakyRelu { .. } => {
                    // The last activation at a side replaces an earlier one (extra layers).
                    match out.last_mut() {
                        Some(m) if m.side == side => {
                            m.layer = i;
                            m.channels = channels;
                        }
                        _ => out.push(EncoderMap { depth: out.len() as u32 + 1, layer: i, channels, side }),
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// A patch configuration over the maps of depths `maps` keeping at most `dim`
    /// channels (fewer when P·d² would pass [`PATCH_VALUES_MAX`]), drawn with `seed`.
    pub fn patch_spec(&self, maps: &[u32], dim: u32, seed: u64) -> Result<PatchSpec, PatchError> {
        let chosen = self.maps_of(maps)?;
        let grid = chosen[0].side.min(PATCH_GRID_MAX);
        let c: u32 = chosen.iter().map(|m| m.channels).sum();
        let p = u64::from(grid) * u64::from(grid);
        let fit = ((PATCH_VALUES_MAX / p) as f64).sqrt().floor() as u32;
        let d = dim.min(c).min(fit).max(1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut channels: Vec<u32> = if d == c {
            (0..c).collect()
        } else {
            sample(&mut rng, c as usize, d as usize).into_iter().map(|i| i as u32).collect()
        };
        channels.sort_unstable();
        let spec = PatchSpec { maps: maps.to_vec(), grid, channels, seed, statistic: PatchStatistic::Gaussian };
        self.check_patch(&spec)?;
        Ok(spec)
    }

    /// The default patch configuration: the maps at isize/4 and isize/8 (the issue's
    /// prototype read the isize/4 map alone; see benches/README.md for the choice),
    /// or the deepest two when the net is shallower, 64 channels, seed 0.
    pub fn default_patch(&self) -> PatchSpec {
        let depths = self.encoder1_maps().len() as u32;
        let maps: Vec<u32> = if depths >= 3 { vec![2, 3] } else { (1..=depths).collect() };
        // Depths from encoder1_maps always form a valid configuration.
        self.patch_spec(&maps, PATCH_DIM_DEFAULT, 0).unwrap_or(PatchSpec {
            maps: vec![depths],
            grid: 4,
            channels: vec![0],
            seed: 0,
            statistic: PatchStatistic::Gaussian,
        })
    }

    fn maps_of(&self, maps: &[u32]) -> Result<Vec<EncoderMap>, PatchError> {
        let all = self.encoder1_maps();
        let n = all.len() as u32;
        let bad = || PatchError::Maps(maps.to_vec(), n);
        if maps.is_empty() || maps.windows(2).any(|w| w[0] >= w[1]) || maps.iter().any(|&d| d == 0 || d > n) {
            return Err(bad());
        }
        Ok(maps.iter().map(|&d| all[d as usize - 1]).collect())
    }

    /// The maps a configuration reads, checked.
    pub fn patch_maps(&self, spec: &PatchSpec) -> Result<Vec<EncoderMap>, PatchError> {
        self.maps_of(&spec.maps)
    }

    /// Every problem of `spec` against this architecture (the first found).
    pub fn check_patch(&self, spec: &PatchSpec) -> Result<(), PatchError> {
        let chosen = self.maps_of(&spec.maps)?;
        let finest = chosen[0].side;
        let g = spec.grid;
        if g < 4 || !g.is_power_of_two() || g > finest.min(PATCH_GRID_MAX) || finest % g != 0 {
            return Err(PatchError::Grid { grid: g, finest, max: PATCH_GRID_MAX });
        }
        let c: u32 = chosen.iter().map(|m| m.channels).sum();
        if spec.channels.is_empty() {
            return Err(PatchError::Channels("none kept".into()));
        }
        if spec.channels.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PatchError::Channels("indices must be ascending and distinct".into()));
        }
        if let Some(&last) = spec.channels.last().filter(|&&l| l >= c) {
            return Err(PatchError::Channels(format!("index {last} is outside the {c} concatenated channels")));
        }
        let (p, d) = (u64::from(g) * u64::from(g), spec.channels.len() as u64);
        match spec.statistic {
            PatchStatistic::Gaussian if p * d * d > PATCH_VALUES_MAX => {
                Err(PatchError::TooLarge { values: p * d * d, p, d, max: PATCH_VALUES_MAX })
            }
            PatchStatistic::Nearest { bank }
                if bank == 0 || u64::from(bank) * d > PATCH_VALUES_MAX || u64::from(bank) * p > PATCH_SEARCH_MAX =>
            {
                Err(PatchError::Bank { bank: u64::from(bank), d, p, max: PATCH_VALUES_MAX, search: PATCH_SEARCH_MAX })
            }
            _ => Ok(()),
        }
    }

    /// The statistics of `spec`: Gaussian, `score.patch_mean` `[P, 1, d]` and
    /// `score.patch_whiten` `[P, d, d]`; nearest, `score.patch_center` `[d]`,
    /// `score.patch_scale` `[d]` and `score.patch_bank` `[d, M]`.
    pub fn patch_params(&self, spec: &PatchSpec) -> Vec<ParamSpec> {
        let p = (spec.grid * spec.grid) as usize;
        let d = spec.channels.len();
        match spec.statistic {
            PatchStatistic::Gaussian => vec![
                ParamSpec { name: PATCH_MEAN.into(), shape: vec![p, 1, d] },
                ParamSpec { name: PATCH_WHITEN.into(), shape: vec![p, d, d] },
            ],
            PatchStatistic::Nearest { bank } => vec![
                ParamSpec { name: PATCH_CENTER.into(), shape: vec![d] },
                ParamSpec { name: PATCH_SCALE.into(), shape: vec![d] },
                ParamSpec { name: PATCH_BANK.into(), shape: vec![d, bank as usize] },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_follow_the_encoder_and_extra_layers_move_the_first() {
        let a = ArchSpec { isize: 32, nc: 3, nz: 8, ngf: 16, ndf: 16, extralayers: 0, ..Default::default() };
        let m = a.encoder1_maps();
        let sides: Vec<_> = m.iter().map(|m| (m.depth, m.side, m.channels)).collect();
        assert_eq!(sides, [(1, 16, 16), (2, 8, 32), (3, 4, 64)]);
        assert_eq!(m[2].layer, a.feature_layer(), "the deepest map is the mahalanobis score's");
        assert_eq!(m[0].layer, 1);
        let e = ArchSpec { extralayers: 2, ..a };
        let m = e.encoder1_maps();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].layer, 1 + 3 * 2, "the last activation at side 16 follows the extra blocks");
        assert!(matches!(e.encoder1()[m[0].layer].op, Op::LeakyRelu { .. }));
    }

    #[test]
    fn spec_is_bounded_seeded_and_checked() {
        let a = ArchSpec { isize: 32, nc: 3, nz: 8, ngf: 16, ndf: 16, extralayers: 0, ..Default::default() };
        let s = a.default_patch();
        assert_eq!((s.maps.clone(), s.grid, s.channels.len()), (vec![2, 3], 8, 64));
        assert!(s.channels.windows(2).all(|w| w[0] < w[1]) && *s.channels.last().unwrap() < 96);
        assert_eq!(a.patch_spec(&[2, 3], 64, 0).unwrap(), s, "same seed, same channels");
        assert_ne!(a.patch_spec(&[2, 3], 64, 1).unwrap().channels, s.channels);
        // Fewer channels than asked for: all of them, in order.
        assert_eq!(a.patch_spec(&[2], 64, 0).unwrap().channels, (0..32).collect::<Vec<_>>());
        // A 16×16 grid at d 64 is exactly the cap; at 128 px ngf 64, depth 1 is pooled to 16.
        let s = a.patch_spec(&[1, 2, 3], 200, 0).unwrap();
        assert_eq!((s.grid, s.channels.len()), (16, 64));
        let big = ArchSpec { isize: 128, ngf: 64, ..a };
        assert_eq!(big.patch_spec(&[1], 64, 0).unwrap().grid, 16);
        assert!(matches!(a.patch_spec(&[3, 2], 64, 0), Err(PatchError::Maps(..))));
        assert!(matches!(a.patch_spec(&[4], 64, 0), Err(PatchError::Maps(..))));
        let mut bad = a.default_patch();
        bad.channels.push(500);
        assert!(a.check_patch(&bad).unwrap_err().to_string().contains("500"));
        let mut bad = a.default_patch();
        bad.grid = 6;
        assert!(matches!(a.check_patch(&bad), Err(PatchError::Grid { .. })));
        let mut bad = a.patch_spec(&[1, 2, 3], 64, 0).unwrap();
        bad.channels = (0..80).collect();
        assert!(matches!(a.check_patch(&bad), Err(PatchError::TooLarge { .. })));
        let p = a.patch_params(&a.default_patch());
        assert_eq!(p[0].shape, [64, 1, 64]);
        assert_eq!(p[1].shape, [64, 64, 64]);
        // The nearest-neighbour statistic: a bank of M columns, bounded by M·d, not P·d².
        let mut near = a.patch_spec(&[1, 2, 3], 64, 0).unwrap();
        near.statistic = PatchStatistic::Nearest { bank: 2048 };
        a.check_patch(&near).unwrap();
        let shapes: Vec<_> = a.patch_params(&near).into_iter().map(|p| (p.name, p.shape)).collect();
        assert_eq!(
            shapes,
            [(PATCH_CENTER.into(), vec![64]), (PATCH_SCALE.into(), vec![64]), (PATCH_BANK.into(), vec![64, 2048])]
        );
        near.statistic = PatchStatistic::Nearest { bank: 0 };
        assert!(matches!(a.check_patch(&near), Err(PatchError::Bank { .. })));
        near.statistic = PatchStatistic::Nearest { bank: 1 << 15 };
        assert!(a.check_patch(&near).unwrap_err().to_string().contains("32768 entries"));
        // One channel keeps the bank small, but not the search: P·M is bounded too.
        let mut thin = a.patch_spec(&[1], 1, 0).unwrap();
        thin.statistic = PatchStatistic::Nearest { bank: 8192 };
        assert!(a.check_patch(&thin).unwrap_err().to_string().contains("P·M"), "16×16 positions × 8,192");
        thin.statistic = PatchStatistic::Nearest { bank: 4096 };
        a.check_patch(&thin).unwrap();
    }

    #[test]
    fn the_statistic_reads_from_older_metadata_and_writes_only_when_nearest() {
        let a = ArchSpec { isize: 32, nc: 3, nz: 8, ngf: 16, ndf: 16, extralayers: 0, ..Default::default() };
        let g = a.default_patch();
        let text = serde_json::to_string(&g).unwrap();
        assert!(!text.contains("statistic"), "{text}");
        assert_eq!(serde_json::from_str::<PatchSpec>(&text).unwrap(), g);
        let n = PatchSpec { statistic: PatchStatistic::Nearest { bank: 512 }, ..g };
        let text = serde_json::to_string(&n).unwrap();
        assert!(text.contains(r#""statistic":{"kind":"nearest","bank":512}"#), "{text}");
        assert_eq!(serde_json::from_str::<PatchSpec>(&text).unwrap(), n);
        let bad = text.replace("nearest", "median");
        assert!(serde_json::from_str::<PatchSpec>(&bad).is_err());
    }
}
