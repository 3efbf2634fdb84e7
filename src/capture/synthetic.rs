//! Synthetic camera: industrial-looking textures from `ganomaly_core::synth`,
//! with defects injected on a fixed schedule so that a demo (or a bench)
//! shows alarms starting and ending without any hardware.
//!
//! Schedule: in every `defect_every` frames the last `defect_frames` are
//! defective; episodes cycle through the configured defect kinds. Frames are
//! generated once up front (`variations` of each) and cycled, because
//! generating a texture costs more than scoring it.

use std::sync::Arc;

use ganomaly_core::synth::{self, Defect, Texture};
use serde::{Deserialize, Serialize};

use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::{CaptureError, FrameData, FrameSource, PixelFormat, SourceFactory};
use crate::base::check::count_between;

/// Most memory a synthetic camera's generated frames may hold.
const MAX_HELD_BYTES: u64 = 512 << 20;

/// `source = { kind = "synthetic", ... }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// `brushed_metal`, `woven_fabric`, `wood_grain` or `noise`.
    #[serde(default = "default_texture")]
    pub texture: String,
    /// Side of the square frames generated.
    #[serde(default = "default_size")]
    pub size: u32,
    #[serde(default)]
    pub seed: u64,
    /// Distinct frames generated up front and cycled: generating is slower
    /// than the model, so frames are made once.
    #[serde(default = "default_variations")]
    pub variations: u32,
    /// Defects come in episodes: in every `defect_every` frames the last
    /// `defect_frames` are defective (0 = never).
    #[serde(default)]
    pub defect_every: u64,
    #[serde(default)]
    pub defect_frames: u64,
    /// Defect kinds cycled through episode by episode.
    #[serde(default = "default_defects")]
    pub defects: Vec<String>,
    /// Defect strength in (0, 1].
    #[serde(default = "default_strength")]
    pub strength: f32,
}

fn default_texture() -> String {
    Texture::BrushedMetal.as_str().into()
}
fn default_size() -> u32 {
    256
}
fn default_variations() -> u32 {
    8
}
fn default_defects() -> Vec<String> {
    [Defect::Scratch, Defect::Stain, Defect::Crack, Defect::Hole].iter().map(|d| d.as_str().to_string()).collect()
}
fn default_strength() -> f32 {
    0.8
}

/// A checked synthetic source: names compiled into the generator's enums.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticPlan {
    pub texture: Texture,
    pub size: u32,
    pub seed: u64,
    pub variations: u32,
    pub defect_every: u64,
    pub defect_frames: u64,
    pub defects: Vec<Defect>,
    pub strength: f32,
}

impl SyntheticConfig {
    /// Every problem with this table, or the plan.
    pub fn plan(&self, p: &str, problems: &mut Vec<String>) -> Option<SyntheticPlan> {
        let before = problems.len();
        let texture = Texture::parse(&self.texture);
        if texture.is_none() {
            let names: Vec<&str> = Texture::ALL.iter().map(|t| t.as_str()).collect();
            problems.push(format!("{p}.texture: `{}` is not one of {}", self.texture, names.join(", ")));
        }
        let mut defects = Vec::new();
        for d in &self.defects {
            match Defect::parse(d) {
                Some(d) => defects.push(d),
                None => {
                    let names: Vec<&str> = Defect::ALL.iter().map(|d| d.as_str()).collect();
                    problems.push(format!("{p}.defects: `{d}` is not one of {}", names.join(", ")));
                }
            }
        }
        count_between(problems, &format!("{p}.size"), u64::from(self.size), 16, 4096);
        count_between(problems, &format!("{p}.variations"), u64::from(self.variations), 1, 1024);
        if self.defect_frames > self.defect_every {
            problems.push(format!(
                "{p}.defect_frames: must be ≤ defect_every ({} > {})",
                self.defect_frames, self.defect_every
            ));
        }
        if self.defect_every > 0 && (self.defect_frames == 0 || self.defects.is_empty()) {
            problems.push(format!("{p}.defect_frames: must be ≥ 1 (and defects non-empty) when defect_every is set"));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            problems.push(format!("{p}.strength: must be in (0, 1] (got {})", self.strength));
        }
        // Every frame is generated up front and held: bound what that takes
        // (a 4096 px camera with 1024 variations would want 51 GB).
        let held = u64::from(self.variations)
            + if self.defect_every > 0 {
                self.defects.len() as u64 * u64::from(self.variations).min(self.defect_frames.max(1))
            } else {
                0
            };
        let bytes = held.saturating_mul(u64::from(self.size).saturating_pow(2).saturating_mul(3));
        if bytes > MAX_HELD_BYTES {
            problems.push(format!(
                "{p}.variations: {held} frames of {side}x{side} RGB would hold {} MiB; at most {} MiB (lower size, variations or defects)",
                bytes >> 20,
                MAX_HELD_BYTES >> 20,
                side = self.size,
            ));
        }
        let texture = texture?;
        (problems.len() == before).then_some(SyntheticPlan {
            texture,
            size: self.size,
            seed: self.seed,
            variations: self.variations,
            defect_every: self.defect_every,
            defect_frames: self.defect_frames,
            defects,
            strength: self.strength,
        })
    }
}

impl CompileSource for SyntheticConfig {
    fn compile(&self, _cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        self.plan(p, problems).map(|s| Arc::new(s) as Arc<dyn SourcePlan>)
    }
    fn frame_size(&self, _cam: &CameraContext) -> Option<(u32, u32)> {
        Some((self.size, self.size))
    }
}

impl SourcePlan for SyntheticPlan {
    /// Generated on the camera thread: it takes a while for large frames.
    fn factory(&self) -> SourceFactory {
        let plan = self.clone();
        super::on_camera_thread(move || SyntheticCamera::new(&plan))
    }
}

/// Generated frames, cycled.
pub struct SyntheticCamera {
    good: Vec<Vec<u8>>,
    /// Per defect kind, its frames.
    defective: Vec<Vec<Vec<u8>>>,
    size: u32,
    every: u64,
    defect_frames: u64,
    index: u64,
    describe: String,
}

impl SyntheticCamera {
    /// Generates the frames (seconds for large sizes: done on the camera thread).
    pub fn new(cfg: &SyntheticPlan) -> SyntheticCamera {
        let texture = cfg.texture;
        let n = cfg.variations.max(1) as u64;
        // Test-split indices: with the training seed, the camera still never shows
        // the model an image it was trained on (a demo that replays the training
        // set would flatter the model).
        let good =
            (0..n).map(|i| synth::good(texture, cfg.size, cfg.seed, synth::test_index(None, i)).into_raw()).collect();
        let per_defect = n.min(cfg.defect_frames.max(1));
        let defective = if cfg.defect_every == 0 {
            Vec::new()
        } else {
            cfg.defects
                .iter()
                .map(|&d| {
                    (0..per_defect)
                        .map(|i| {
                            synth::defective(
                                texture,
                                d,
                                cfg.strength,
                                cfg.size,
                                cfg.seed,
                                synth::test_index(Some(d), i),
                            )
                            .0
                            .into_raw()
                        })
                        .collect()
                })
                .collect()
        };
        SyntheticCamera {
            good,
            defective,
            size: cfg.size,
            every: cfg.defect_every,
            defect_frames: cfg.defect_frames,
            index: 0,
            describe: format!("synthetic {} {}px seed {}", cfg.texture, cfg.size, cfg.seed),
        }
    }

    /// Whether frame `i` (0-based, counting from the source's start) carries a defect.
    pub fn is_defective(every: u64, defect_frames: u64, i: u64) -> bool {
        every > 0 && i % every >= every - defect_frames.min(every)
    }

    fn frame(&self, i: u64) -> &[u8] {
        if Self::is_defective(self.every, self.defect_frames, i) && !self.defective.is_empty() {
            let episode = i / self.every;
            let kinds = &self.defective[(episode % self.defective.len() as u64) as usize];
            let within = i % self.every - (self.every - self.defect_frames);
            &kinds[(within % kinds.len() as u64) as usize]
        } else {
            &self.good[(i % self.good.len() as u64) as usize]
        }
    }
}

impl FrameSource for SyntheticCamera {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        let i = self.index;
        self.index += 1;
        let size = self.size;
        let src = self.frame(i);
        let dst = out.reshape(size, size, PixelFormat::Rgb8);
        if dst.len() != src.len() {
            return Err(CaptureError::BrokenFrame {
                source_name: self.describe.clone(),
                reason: format!("generated frame has {} bytes, expected {}", src.len(), dst.len()),
            });
        }
        dst.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_puts_defects_at_the_end_of_each_period() {
        let d: Vec<bool> = (0..10).map(|i| SyntheticCamera::is_defective(5, 2, i)).collect();
        assert_eq!(d, [false, false, false, true, true, false, false, false, true, true]);
        assert!(!(0..100).any(|i| SyntheticCamera::is_defective(0, 0, i)));
    }

    #[test]
    fn frames_that_would_not_fit_in_memory_are_refused() {
        let cfg = |size, variations| SyntheticConfig {
            texture: default_texture(),
            size,
            seed: 0,
            variations,
            defect_every: 10,
            defect_frames: 5,
            defects: default_defects(),
            strength: 1.0,
        };
        let mut p = Vec::new();
        assert!(cfg(4096, 1024).plan("s", &mut p).is_none());
        assert!(p.len() == 1 && p[0].starts_with("s.variations:") && p[0].contains("MiB"), "{p:?}");
        // 256 px × (8 good + 4 × 5 defective) frames: 5.5 MB.
        assert!(cfg(256, 8).plan("s", &mut p).is_some());
    }

    #[test]
    fn defect_frames_differ_from_good_frames() {
        let cfg = SyntheticPlan {
            texture: Texture::Noise,
            size: 32,
            seed: 3,
            variations: 2,
            defect_every: 4,
            defect_frames: 1,
            defects: vec![Defect::Hole],
            strength: 1.0,
        };
        let mut cam = SyntheticCamera::new(&cfg);
        let mut frames = Vec::new();
        for _ in 0..4 {
            let mut fd = FrameData::default();
            cam.next_frame(&mut fd).expect("frame");
            assert_eq!(fd.data.len(), 32 * 32 * 3);
            frames.push(fd.data);
        }
        assert_eq!(frames[0], frames[2], "good frames cycle over 2 variations");
        assert_ne!(frames[3], frames[1], "frame 3 is the defect frame");
    }
}
