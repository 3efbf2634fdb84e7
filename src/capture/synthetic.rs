//! Synthetic camera: industrial-looking textures from `ganomaly_core::synth`,
//! with defects injected on a fixed schedule so that a demo (or a bench)
//! shows alarms starting and ending without any hardware.
//!
//! Schedule: in every `defect_every` frames the last `defect_frames` are
//! defective; episodes cycle through the configured defect kinds. Frames are
//! generated once up front (`variations` of each) and cycled, because
//! generating a texture costs more than scoring it.

use ganomaly_core::synth::{self, Defect, Texture};

use super::{CaptureError, FrameData, FrameSource, PixelFormat};
use crate::config::SyntheticSource;

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
    pub fn new(cfg: &SyntheticSource) -> SyntheticCamera {
        let texture = Texture::parse(&cfg.texture).unwrap_or(Texture::BrushedMetal);
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
                .filter_map(|d| Defect::parse(d))
                .map(|d| {
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

    fn open(&mut self) -> Result<(), CaptureError> {
        Ok(())
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
    fn defect_frames_differ_from_good_frames() {
        let cfg = SyntheticSource {
            texture: "noise".into(),
            size: 32,
            seed: 3,
            variations: 2,
            defect_every: 4,
            defect_frames: 1,
            defects: vec!["hole".into()],
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
