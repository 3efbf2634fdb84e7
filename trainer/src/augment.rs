//! `--augment`: random flips, quarter turns and small shifts of the training images,
//! drawn per image and per epoch from the run's seed, for parts whose appearance
//! does not depend on orientation (textures, woven or brushed surfaces). Off by
//! default: an oriented part (a digit, a connector seen from one side) turned
//! upside down is a defect, not a good image.
//!
//! Only the images trained on are augmented; the feature statistics, the
//! held-out calibration slice, `val/` and `test/` see the images as they are.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use tch::Tensor;

use crate::data::SplitMix;

/// Why an `--augment` list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AugmentError {
    #[error("unknown augmentation {0:?} (known: none, flip, hflip, vflip, rot90, shift:N)")]
    Unknown(String),
    #[error("shift:{0}: the shift must be a whole number of pixels ≥ 1")]
    BadShift(String),
    #[error("shift:{shift} needs images wider than {shift} px (isize {isize}): reflection cannot reach further")]
    ShiftTooLarge { shift: u32, isize: u32 },
    #[error("{0} is given twice")]
    Repeated(&'static str),
}

/// One kind of transformation; each image draws its own parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Mirror left–right with probability ½.
    HFlip,
    /// Mirror top–bottom with probability ½.
    VFlip,
    /// Turn by 0, 90, 180 or 270° (equally likely).
    Rot90,
    /// Move by a whole number of pixels in −n..=n on each axis, the border filled
    /// by reflection (not wrap-around: a texture crop has no reason to continue
    /// periodically, and a wrapped seam is an edge the good images never show).
    Shift(u32),
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::HFlip => "hflip",
            Op::VFlip => "vflip",
            Op::Rot90 => "rot90",
            Op::Shift(_) => "shift",
        }
    }
}

/// The list of `--augment`; empty is `none`, the identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Augment {
    ops: Vec<Op>,
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Augment {
        Augment::default()
    }

    pub fn is_none(&self) -> bool {
        self.ops.is_empty()
    }

    /// The largest shift, 0 without one.
    fn shift(&self) -> u32 {
        self.ops.iter().map(|op| if let Op::Shift(n) = op { *n } else { 0 }).max().unwrap_or(0)
    }

    /// Refuses a shift that reflection padding cannot fill for `isize` px images.
    pub fn check(&self, isize: u32) -> Result<(), AugmentError> {
        let shift = self.shift();
        if shift >= isize {
            return Err(AugmentError::ShiftTooLarge { shift, isize });
        }
        Ok(())
    }

    /// `x` (`[N, C, S, S]`, square as the preprocessor makes them) with every image
    /// transformed by its own draw. The draws depend only on `seed`, `epoch` and the
    /// image's index, so a run (or a resumed one) sees the same images each time,
    /// whatever the batch order. `none` returns `x` itself.
    pub fn apply(&self, x: &Tensor, seed: u64, epoch: u32) -> Tensor {
        let n = x.size().first().copied().unwrap_or(0);
        // Nothing to draw for (and `stack` refuses an empty list).
        if self.is_none() || n == 0 {
            return x.shallow_clone();
        }
        let mut rng = SplitMix::new(seed ^ 0x0A06_3E47 ^ u64::from(epoch).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let images: Vec<Tensor> = (0..n)
            .map(|i| {
                // Every image draws the same number of values whatever the list holds,
                // so adding one operation does not reshuffle the others' draws.
                let r = rng.next_u64();
                let (dy, dx) = (rng.next_u64(), rng.next_u64());
                let mut img = x.get(i);
                for op in &self.ops {
                    img = match *op {
                        Op::HFlip if r & 1 == 1 => img.flip([2]),
                        Op::VFlip if r & 2 == 2 => img.flip([1]),
                        Op::Rot90 => match (r >> 2) & 3 {
                            0 => img,
                            k => img.rot90(k as i64, [1, 2]),
                        },
                        Op::Shift(s) if s > 0 => {
                            let span = 2 * u64::from(s) + 1;
                            shift_reflect(&img, s as i64, (dy % span) as i64, (dx % span) as i64)
                        }
                        _ => img,
                    };
                }
                img
            })
            .collect();
        Tensor::stack(&images, 0)
    }
}

/// `img` (`[C, S, S]`) moved by `oy − s`, `ox − s` pixels (offsets in 0..=2s),
/// the uncovered border reflected.
fn shift_reflect(img: &Tensor, s: i64, oy: i64, ox: i64) -> Tensor {
    let side = img.size();
    let (h, w) = (side[1], side[2]);
    img.unsqueeze(0).reflection_pad2d([s, s, s, s]).squeeze_dim(0).narrow(1, oy, h).narrow(2, ox, w)
}

impl FromStr for Augment {
    type Err = AugmentError;

    /// `none`, or a comma-separated list of `flip` (both `hflip` and `vflip`),
    /// `hflip`, `vflip`, `rot90`, `shift:N`.
    fn from_str(s: &str) -> Result<Augment, AugmentError> {
        let mut ops: Vec<Op> = Vec::new();
        let mut push = |op: Op| {
            if ops.iter().any(|o| o.name() == op.name()) {
                return Err(AugmentError::Repeated(op.name()));
            }
            ops.push(op);
            Ok(())
        };
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "none" => {}
                "flip" => {
                    push(Op::HFlip)?;
                    push(Op::VFlip)?;
                }
                "hflip" => push(Op::HFlip)?,
                "vflip" => push(Op::VFlip)?,
                "rot90" => push(Op::Rot90)?,
                other => match other.strip_prefix("shift:") {
                    Some(n) => match n.parse::<u32>() {
                        Ok(v) if v >= 1 => push(Op::Shift(v))?,
                        _ => return Err(AugmentError::BadShift(n.to_string())),
                    },
                    None => return Err(AugmentError::Unknown(other.to_string())),
                },
            }
        }
        Ok(Augment { ops })
    }
}

impl fmt::Display for Augment {
    /// The canonical list (`flip` written as `hflip,vflip`), `none` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ops.is_empty() {
            return f.write_str("none");
        }
        let items: Vec<String> = self
            .ops
            .iter()
            .map(|op| match op {
                Op::Shift(n) => format!("shift:{n}"),
                op => op.name().to_string(),
            })
            .collect();
        f.write_str(&items.join(","))
    }
}

impl Serialize for Augment {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::data;

    fn aug(s: &str) -> Augment {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_list_and_refuses_the_rest() {
        assert!(aug("none").is_none());
        assert!(aug("").is_none());
        assert_eq!(aug("flip,rot90,shift:2").to_string(), "hflip,vflip,rot90,shift:2");
        assert_eq!(aug("vflip").to_string(), "vflip");
        assert_eq!(Augment::none().to_string(), "none");
        assert_eq!("flip,vflip".parse::<Augment>(), Err(AugmentError::Repeated("vflip")));
        assert!(matches!("shift:0".parse::<Augment>(), Err(AugmentError::BadShift(_))));
        assert!(matches!("shift:x".parse::<Augment>(), Err(AugmentError::BadShift(_))));
        assert!(matches!("rotate".parse::<Augment>(), Err(AugmentError::Unknown(_))));
        assert!(aug("shift:15").check(16).is_ok());
        assert!(aug("shift:16").check(16).is_err());
    }

    #[test]
    fn none_is_the_identity() {
        let x = data(8);
        let y = Augment::none().apply(&x, 3, 0);
        assert_eq!(Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(), Vec::<f32>::try_from(x.flatten(0, -1)).unwrap());
    }

    #[test]
    fn an_empty_set_stays_empty() {
        let x = data(8).narrow(0, 0, 0);
        assert_eq!(aug("flip,rot90,shift:2").apply(&x, 3, 0).size(), x.size());
    }

    #[test]
    fn deterministic_per_seed_and_epoch_and_shape_preserving() {
        let x = data(16);
        let a = aug("flip,rot90,shift:2");
        let v = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        let y = a.apply(&x, 5, 2);
        assert_eq!(y.size(), x.size());
        assert_eq!(v(&y), v(&a.apply(&x, 5, 2)), "same seed and epoch, same images");
        assert_ne!(v(&y), v(&a.apply(&x, 6, 2)), "another seed draws other transforms");
        assert_ne!(v(&y), v(&a.apply(&x, 5, 3)), "another epoch draws other transforms");
        assert_ne!(v(&y), v(&x), "something moved");
        // Flips and quarter turns only permute pixels: each image keeps its values.
        let p = aug("flip,rot90").apply(&x, 5, 2);
        for i in 0..16 {
            let sorted = |t: Tensor| v(&t.flatten(0, -1).sort(0, false).0);
            assert_eq!(sorted(p.get(i)), sorted(x.get(i)), "image {i}");
        }
    }

    #[test]
    fn shift_reflects_the_border() {
        // A ramp along the width, shifted right by one: the new first column is the
        // reflection of the old second (reflection excludes the edge pixel itself).
        let img = Tensor::arange(4, (tch::Kind::Float, tch::Device::Cpu)).repeat([1, 4, 1]);
        let moved = shift_reflect(&img, 1, 1, 0);
        let row = Vec::<f32>::try_from(moved.get(0).get(0)).unwrap();
        assert_eq!(row, vec![1.0, 0.0, 1.0, 2.0]);
        assert_eq!(shift_reflect(&img, 1, 1, 1).size(), img.size());
    }
}
