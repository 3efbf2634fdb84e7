//! Deterministic synthetic inspection data: industrial-looking textures, defects
//! with ground-truth masks, and an MVTec-style dataset writer.
//!
//! It trains the demo model, feeds the daemon's synthetic camera and drives the
//! tests, so two promises matter more than realism:
//! - **Same bytes everywhere.** Randomness comes from `ChaCha8Rng` keyed by an
//!   explicit mix of (seed, texture, index) and from integer hashes; pixels are
//!   computed with IEEE-exact f32 operations only (`+ - * /`, `sqrt`, `floor`).
//!   libm's `sin`/`exp`/`powf` differ in their last bits between platforms, so
//!   the few angles needed go through `sin_poly`, a plain polynomial.
//! - **Fast.** A 256×256 image costs a few milliseconds in release: the
//!   per-pixel work is value noise and arithmetic, no transcendental calls.
//!
//! A seed picks a *product* (fabric colour, wood species, thread pitch); the
//! index picks an *instance* of it (orientation jitter, phase, lighting), so
//! good images of one seed vary like real parts of one product do.
//!
//! Feature sizes are defined on a 256-pixel reference frame and scaled to the
//! requested size, so a 128-pixel image looks like a downscaled 256-pixel one.

use std::f32::consts::{FRAC_PI_2, PI, TAU};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use image::{GrayImage, Luma, RgbImage};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Errors from parsing names and writing datasets.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid dataset spec: {0}")]
    Spec(String),
    #[error("unknown {kind} `{name}` (expected one of: {expected})")]
    UnknownName { kind: &'static str, name: String, expected: String },
    #[error("cannot create directory {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write image {}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

/// A surface to inspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Texture {
    /// Anisotropic fine streaks, as ground or brushed sheet metal.
    BrushedMetal,
    /// Plain weave of two thread colours.
    WovenFabric,
    /// Flat-sawn wood: distorted growth rings and pores.
    WoodGrain,
    /// Isotropic granular speckle, as a sand-blasted or cast surface.
    Noise,
}

impl Texture {
    pub const ALL: [Texture; 4] = [Texture::BrushedMetal, Texture::WovenFabric, Texture::WoodGrain, Texture::Noise];

    /// The name used in configs, CLIs and folder names.
    pub fn as_str(self) -> &'static str {
        match self {
            Texture::BrushedMetal => "brushed_metal",
            Texture::WovenFabric => "woven_fabric",
            Texture::WoodGrain => "wood_grain",
            Texture::Noise => "noise",
        }
    }

    /// The inverse of [`Texture::as_str`].
    pub fn parse(name: &str) -> Option<Texture> {
        Texture::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Mixed into seeds. Never renumber: every recorded dataset would change.
    fn tag(self) -> u64 {
        match self {
            Texture::BrushedMetal => 1,
            Texture::WovenFabric => 2,
            Texture::WoodGrain => 3,
            Texture::Noise => 4,
        }
    }
}

/// A flaw pasted onto a surface, with a ground-truth mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Defect {
    /// Thin bright or dark line, slightly curved, tapered at both ends.
    Scratch,
    /// Dark jagged line growing both ways from an origin, with branches.
    Crack,
    /// Soft-edged irregular blob, darker and tinted (oil, rust) or bleached.
    Stain,
    /// Dark round cavity, lit on one wall, with a raised bright rim.
    Hole,
}

impl Defect {
    pub const ALL: [Defect; 4] = [Defect::Scratch, Defect::Crack, Defect::Stain, Defect::Hole];

    /// The name used in configs, CLIs and MVTec folder names.
    pub fn as_str(self) -> &'static str {
        match self {
            Defect::Scratch => "scratch",
            Defect::Crack => "crack",
            Defect::Stain => "stain",
            Defect::Hole => "hole",
        }
    }

    /// The inverse of [`Defect::as_str`].
    pub fn parse(name: &str) -> Option<Defect> {
        Defect::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Mixed into seeds and test indices. Never renumber.
    fn tag(self) -> u64 {
        match self {
            Defect::Scratch => 1,
            Defect::Crack => 2,
            Defect::Stain => 3,
            Defect::Hole => 4,
        }
    }
}

impl fmt::Display for Texture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn names<T: fmt::Display>(all: &[T]) -> String {
    all.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

impl FromStr for Texture {
    type Err = SynthError;
    fn from_str(name: &str) -> Result<Self, SynthError> {
        Texture::parse(name).ok_or_else(|| SynthError::UnknownName {
            kind: "texture",
            name: name.to_owned(),
            expected: names(&Texture::ALL),
        })
    }
}

impl FromStr for Defect {
    type Err = SynthError;
    fn from_str(name: &str) -> Result<Self, SynthError> {
        Defect::parse(name).ok_or_else(|| SynthError::UnknownName {
            kind: "defect",
            name: name.to_owned(),
            expected: names(&Defect::ALL),
        })
    }
}

/// One generated image; `mask` (255 = defect) is `None` for a good part.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: RgbImage,
    pub mask: Option<GrayImage>,
}

/// A good part, or one with `defect` when given: what a synthetic camera shows.
pub fn sample(texture: Texture, defect: Option<Defect>, strength: f32, size: u32, seed: u64, index: u64) -> Sample {
    match defect {
        None => Sample { image: good(texture, size, seed, index), mask: None },
        Some(defect) => {
            let (image, mask) = defective(texture, defect, strength, size, seed, index);
            Sample { image, mask: Some(mask) }
        }
    }
}

/// A good `size`×`size` image: instance `index` of the product chosen by `seed`.
pub fn good(texture: Texture, size: u32, seed: u64, index: u64) -> RgbImage {
    let mut product = rng_for(&[STREAM_PRODUCT, seed, texture.tag()]);
    let mut instance = rng_for(&[STREAM_INSTANCE, seed, texture.tag(), index]);
    let mut image = RgbImage::new(size, size);
    match texture {
        Texture::BrushedMetal => brushed_metal(&mut image, &mut product, &mut instance),
        Texture::WovenFabric => woven_fabric(&mut image, &mut product, &mut instance),
        Texture::WoodGrain => wood_grain(&mut image, &mut product, &mut instance),
        Texture::Noise => granular(&mut image, &mut product, &mut instance),
    }
    image
}

/// `good(texture, size, seed, index)` with `defect` pasted on, and its mask.
///
/// `strength` in [0, 1] scales contrast only (NaN counts as 0): the geometry,
/// and so the mask, is the same at every strength. 1.0 is plainly visible;
/// around 0.2 a defect is hard to see.
pub fn defective(
    texture: Texture,
    defect: Defect,
    strength: f32,
    size: u32,
    seed: u64,
    index: u64,
) -> (RgbImage, GrayImage) {
    defective_scaled(texture, defect, strength, 1.0, size, seed, index)
}

/// [`defective`] with the defect's geometry (length, radius, width) scaled by
/// `scale` against the image side: 1.0 is [`defective`]; 0.05 on a 512 px image
/// draws the defect a 26 px image would get, a few pixels across (the tiling
/// benchmark's small defects). Placement and draws are the same at every scale.
pub fn defective_scaled(
    texture: Texture,
    defect: Defect,
    strength: f32,
    scale: f32,
    size: u32,
    seed: u64,
    index: u64,
) -> (RgbImage, GrayImage) {
    let mut image = good(texture, size, seed, index);
    let mask = defect_into_scaled(&mut image, defect, strength, scale, mix(&[seed, texture.tag(), index]));
    (image, mask)
}

/// Paints `defect` onto any RGB image (any size, any content) and returns its
/// mask (255 = defect). Placement and shape come from `seed` alone; `strength`
/// as in [`defective`].
pub fn defect_into(image: &mut RgbImage, defect: Defect, strength: f32, seed: u64) -> GrayImage {
    defect_into_scaled(image, defect, strength, 1.0, seed)
}

/// [`defect_into`] with the defect's geometry scaled by `scale` (in (0, 1];
/// anything else counts as 1), as [`defective_scaled`].
pub fn defect_into_scaled(image: &mut RgbImage, defect: Defect, strength: f32, scale: f32, seed: u64) -> GrayImage {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return GrayImage::new(w, h);
    }
    let strength = if strength.is_nan() { 0.0 } else { strength.clamp(0.0, 1.0) };
    let scale = if scale > 0.0 && scale <= 1.0 { scale } else { 1.0 };
    let mut rng = rng_for(&[STREAM_DEFECT, seed, defect.tag()]);
    match defect {
        Defect::Scratch => scratch(image, &mut rng, strength, scale),
        Defect::Crack => crack(image, &mut rng, strength, scale),
        Defect::Stain => stain(image, &mut rng, strength, scale),
        Defect::Hole => hole(image, &mut rng, strength, scale),
    }
}

/// What [`write_mvtec`] writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub texture: Texture,
    /// Side of the square images, in pixels.
    pub size: u32,
    pub seed: u64,
    pub train_good: usize,
    pub test_good: usize,
    /// Images (and masks) per defect kind in `defects`.
    pub test_per_defect: usize,
    pub defects: Vec<Defect>,
    /// As in [`defective`].
    pub strength: f32,
    /// Defect geometry against the image side, in (0, 1]: 1 as before; small
    /// values draw defects a few pixels across ([`defective_scaled`]).
    pub defect_scale: f32,
}

/// Smallest image side: below it a hole or scratch is a handful of pixels and
/// its mask says little.
pub const MIN_SIZE: u32 = 16;
/// Largest image side: a guard against a typo writing gigabytes.
pub const MAX_SIZE: u32 = 4096;

impl DatasetSpec {
    /// Every problem at once, so a CLI user fixes them in one go.
    pub fn validate(&self) -> Result<(), SynthError> {
        let mut problems = Vec::new();
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            problems.push(format!("size must be between {MIN_SIZE} and {MAX_SIZE} (got {})", self.size));
        }
        if !(0.0..=1.0).contains(&self.strength) {
            problems.push(format!("strength must be between 0 and 1 (got {})", self.strength));
        }
        if !(self.defect_scale > 0.0 && self.defect_scale <= 1.0) {
            problems.push(format!("defect scale must be in (0, 1] (got {})", self.defect_scale));
        }
        for (i, d) in self.defects.iter().enumerate() {
            if self.defects[..i].contains(d) {
                problems.push(format!("defect `{d}` is listed twice"));
            }
        }
        let largest = self.train_good.max(self.test_good).max(self.test_per_defect);
        if largest as u64 >= SPLIT_STRIDE {
            problems.push(format!("at most {SPLIT_STRIDE} images per split"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SynthError::Spec(problems.join("; ")))
        }
    }
}

/// Counts of what [`write_mvtec`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub root: PathBuf,
    pub train_good: usize,
    pub test_good: usize,
    /// Defective test images, all kinds together (one mask each).
    pub test_defective: usize,
}

/// Index ranges are this far apart so train and test never share an image,
/// however large either split grows or however the spec changes.
const SPLIT_STRIDE: u64 = 1 << 40;

/// The generator index of test image `i`: good when `defect` is `None`.
/// Training images use indices `0..train_good`, so anything drawn from here
/// (a synthetic camera, say) never shows the model an image it trained on.
pub fn test_index(defect: Option<Defect>, i: u64) -> u64 {
    let split = match defect {
        None => 1,
        Some(d) => 1 + d.tag(),
    };
    split * SPLIT_STRIDE + i
}

/// Writes an MVTec-AD-style tree under `dir`:
/// `train/good/000.png`, `test/good/000.png`, `test/<defect>/000.png` and
/// `ground_truth/<defect>/000_mask.png`. Existing files of the same names are
/// overwritten; nothing else is touched.
pub fn write_mvtec(dir: &Path, spec: &DatasetSpec) -> Result<DatasetSummary, SynthError> {
    spec.validate()?;
    let (tex, size, seed) = (spec.texture, spec.size, spec.seed);

    let train = dir.join("train").join("good");
    create_dir(&train)?;
    for i in 0..spec.train_good {
        save(&good(tex, size, seed, i as u64), &train.join(format!("{i:03}.png")))?;
    }

    let test_good = dir.join("test").join("good");
    create_dir(&test_good)?;
    for i in 0..spec.test_good {
        let index = test_index(None, i as u64);
        save(&good(tex, size, seed, index), &test_good.join(format!("{i:03}.png")))?;
    }

    for &defect in &spec.defects {
        let images = dir.join("test").join(defect.as_str());
        let masks = dir.join("ground_truth").join(defect.as_str());
        create_dir(&images)?;
        create_dir(&masks)?;
        for i in 0..spec.test_per_defect {
            let index = test_index(Some(defect), i as u64);
            let (image, mask) = defective_scaled(tex, defect, spec.strength, spec.defect_scale, size, seed, index);
            save(&image, &images.join(format!("{i:03}.png")))?;
            save(&mask, &masks.join(format!("{i:03}_mask.png")))?;
        }
    }

    Ok(DatasetSummary {
        root: dir.to_path_buf(),
        train_good: spec.train_good,
        test_good: spec.test_good,
        test_defective: spec.test_per_defect * spec.defects.len(),
    })
}

fn create_dir(path: &Path) -> Result<(), SynthError> {
    std::fs::create_dir_all(path).map_err(|source| SynthError::Io { path: path.to_path_buf(), source })
}

fn save<P>(image: &image::ImageBuffer<P, Vec<u8>>, path: &Path) -> Result<(), SynthError>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    image.save(path).map_err(|source| SynthError::Encode { path: path.to_path_buf(), source })
}

// ---------------------------------------------------------------------------
// Randomness: explicit, platform-independent mixing.

const STREAM_PRODUCT: u64 = 0x7072_6f64; // "prod"
const STREAM_INSTANCE: u64 = 0x696e_7374; // "inst"
const STREAM_DEFECT: u64 = 0x6466_6374; // "dfct"

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Order-sensitive mix of several words into one (std's hasher is not stable
/// across Rust versions, so it cannot key recorded datasets).
fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x6A09_E667_F3BC_C908;
    for &p in parts {
        let mut s = h ^ p;
        h = splitmix64(&mut s);
    }
    h
}

fn rng_for(parts: &[u64]) -> ChaCha8Rng {
    let mut state = mix(parts);
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Uniform in [0, 1) from 24 random bits: exactly representable, no rounding.
fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
}

fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * unit(rng)
}

fn chance(rng: &mut ChaCha8Rng, p: f32) -> bool {
    unit(rng) < p
}

fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// A random value in [0, 1) per integer lattice point.
#[inline]
fn lattice(seed: u32, x: i32, y: i32) -> f32 {
    let h = hash32(hash32(x as u32 ^ seed).wrapping_add(y as u32));
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Smooth value noise in [0, 1], one lattice cell per unit of `x` and `y`.
#[inline]
fn vnoise(x: f32, y: f32, seed: u32) -> f32 {
    let (xf, yf) = (x.floor(), y.floor());
    let (xi, yi) = (xf as i32, yf as i32);
    let (tx, ty) = (fade(x - xf), fade(y - yf));
    let a = lattice(seed, xi, yi);
    let b = lattice(seed, xi.wrapping_add(1), yi);
    let c = lattice(seed, xi, yi.wrapping_add(1));
    let d = lattice(seed, xi.wrapping_add(1), yi.wrapping_add(1));
    let top = a + (b - a) * tx;
    let bottom = c + (d - c) * tx;
    top + (bottom - top) * ty
}

#[inline]
fn fade(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

#[inline]
fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    fade(((x - e0) / (e1 - e0)).clamp(0.0, 1.0))
}

#[inline]
fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

/// sin(x) to ~4e-6 in plain arithmetic, identical on every platform: reduce
/// to [-π, π], fold to [-π/2, π/2], then a degree-9 Taylor polynomial.
fn sin_poly(x: f32) -> f32 {
    let k = (x * (1.0 / TAU) + 0.5).floor();
    let mut r = x - k * TAU;
    if r > FRAC_PI_2 {
        r = PI - r;
    } else if r < -FRAC_PI_2 {
        r = -PI - r;
    }
    let r2 = r * r;
    r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362_880.0)))))
}

fn cos_poly(x: f32) -> f32 {
    sin_poly(x + FRAC_PI_2)
}

// ---------------------------------------------------------------------------
// Textures. Colours are linear-ish floats in [0, 1] until the final rounding.

/// Side of the frame on which feature sizes are defined.
const REF: f32 = 256.0;

/// A pixel as seen by a texture: `x`, `y` in reference units, `ix`, `iy` the
/// real pixel (for per-pixel grain, which should not scale).
struct Px {
    x: f32,
    y: f32,
    ix: i32,
    iy: i32,
}

/// Per-instance lighting: overall gain and a linear falloff, as a part placed
/// slightly differently under the same lamp.
struct Lighting {
    gain: f32,
    gx: f32,
    gy: f32,
}

impl Lighting {
    fn random(rng: &mut ChaCha8Rng, gain: f32, gradient: f32) -> Lighting {
        let g = uniform(rng, 1.0 - gain, 1.0 + gain);
        let angle = uniform(rng, 0.0, TAU);
        let amp = uniform(rng, 0.0, gradient) / (REF / 2.0);
        Lighting { gain: g, gx: amp * cos_poly(angle), gy: amp * sin_poly(angle) }
    }

    #[inline]
    fn at(&self, x: f32, y: f32) -> f32 {
        self.gain * (1.0 + self.gx * (x - REF / 2.0) + self.gy * (y - REF / 2.0))
    }
}

/// Rotation about the reference centre.
struct Rot {
    c: f32,
    s: f32,
}

impl Rot {
    fn new(angle: f32) -> Rot {
        Rot { c: cos_poly(angle), s: sin_poly(angle) }
    }

    #[inline]
    fn apply(&self, x: f32, y: f32) -> (f32, f32) {
        let (dx, dy) = (x - REF / 2.0, y - REF / 2.0);
        (dx * self.c + dy * self.s, dy * self.c - dx * self.s)
    }
}

#[inline]
fn to_u8(v: f32) -> u8 {
    (v * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

fn paint(image: &mut RgbImage, light: &Lighting, f: impl Fn(&Px) -> [f32; 3]) {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return;
    }
    let k = REF / w.min(h) as f32;
    for (iy, row) in image.chunks_exact_mut(w as usize * 3).enumerate() {
        let y = (iy as f32 + 0.5) * k;
        for (ix, out) in row.chunks_exact_mut(3).enumerate() {
            let x = (ix as f32 + 0.5) * k;
            let rgb = f(&Px { x, y, ix: ix as i32, iy: iy as i32 });
            let l = light.at(x, y);
            out[0] = to_u8(rgb[0] * l);
            out[1] = to_u8(rgb[1] * l);
            out[2] = to_u8(rgb[2] * l);
        }
    }
}

fn brushed_metal(image: &mut RgbImage, product: &mut ChaCha8Rng, inst: &mut ChaCha8Rng) {
    let base = uniform(product, 0.55, 0.68);
    let tint = [uniform(product, 0.96, 0.99), uniform(product, 0.98, 1.0), uniform(product, 1.0, 1.04)];
    let contrast = uniform(product, 0.32, 0.42);
    let rot = Rot::new(uniform(inst, -0.07, 0.07));
    let level = base + uniform(inst, -0.03, 0.03);
    let light = Lighting::random(inst, 0.04, 0.08);
    let seeds = [inst.next_u32(), inst.next_u32(), inst.next_u32(), inst.next_u32()];
    paint(image, &light, |p| {
        let (u, v) = rot.apply(p.x, p.y);
        // Long along the brushing direction, a pixel or two across it.
        let streak = 0.45 * vnoise(u / 110.0, v / 2.2, seeds[0])
            + 0.35 * vnoise(u / 40.0, v / 1.0, seeds[1])
            + 0.2 * vnoise(u / 14.0, v / 0.6, seeds[2]);
        let grain = lattice(seeds[3], p.ix, p.iy) - 0.5;
        let l = level + contrast * (streak - 0.5) + 0.04 * grain;
        [l * tint[0], l * tint[1], l * tint[2]]
    });
}

fn woven_fabric(image: &mut RgbImage, product: &mut ChaCha8Rng, inst: &mut ChaCha8Rng) {
    const PALETTE: [[f32; 3]; 4] = [
        [0.20, 0.30, 0.52], // denim
        [0.74, 0.66, 0.50], // khaki
        [0.56, 0.56, 0.58], // grey
        [0.32, 0.40, 0.28], // olive
    ];
    let base = PALETTE[(product.next_u32() % PALETTE.len() as u32) as usize];
    let warp_col = base.map(|c| c * uniform(product, 0.92, 1.08));
    let mix_to_light = uniform(product, 0.15, 0.5);
    let weft_col = [0.86, 0.85, 0.80].map(|l| l * mix_to_light);
    let weft_col = [
        warp_col[0] * (1.0 - mix_to_light) + weft_col[0],
        warp_col[1] * (1.0 - mix_to_light) + weft_col[1],
        warp_col[2] * (1.0 - mix_to_light) + weft_col[2],
    ];
    let pitch = uniform(product, 7.0, 10.0) * uniform(inst, 0.98, 1.02);
    let rot = Rot::new(uniform(inst, -0.05, 0.05));
    let (pu, pv) = (uniform(inst, 0.0, 2.0), uniform(inst, 0.0, 2.0));
    let light = Lighting::random(inst, 0.05, 0.08);
    let seeds = [inst.next_u32(), inst.next_u32(), inst.next_u32()];
    paint(image, &light, |p| {
        let (u, v) = rot.apply(p.x, p.y);
        let (tu, tv) = (u / pitch + pu, v / pitch + pv);
        let (cu, cv) = (tu.floor(), tv.floor());
        let (fu, fv) = (tu - cu, tv - cv);
        let (cu, cv) = (cu as i32, cv as i32);
        // Plain weave: warp (running along v) is on top where the cell parity is even.
        let warp_on_top = (cu.wrapping_add(cv) & 1) == 0;
        let (across, along, col, thread, fibre) = if warp_on_top {
            (fu, fv, warp_col, cu, vnoise(u / 0.8, v / 5.0, seeds[0]))
        } else {
            (fv, fu, weft_col, cv, vnoise(v / 0.8, u / 5.0, seeds[1]))
        };
        // Round thread cross-section, bulging where it passes over the other thread.
        let a = 4.0 * across * (1.0 - across);
        let b = 4.0 * along * (1.0 - along);
        let height = a * (2.0 - a) * (0.7 + 0.3 * b);
        let per_thread = lattice(seeds[2], thread, warp_on_top as i32) - 0.5;
        let l = 0.3 + 0.7 * height + 0.10 * per_thread + 0.12 * (fibre - 0.5);
        [col[0] * l, col[1] * l, col[2] * l]
    });
}

fn wood_grain(image: &mut RgbImage, product: &mut ChaCha8Rng, inst: &mut ChaCha8Rng) {
    // Somewhere between oak and walnut; latewood is a darker, redder version.
    let species = unit(product);
    let early = [lerp(0.82, 0.56, species), lerp(0.64, 0.39, species), lerp(0.44, 0.25, species)];
    let late = [early[0] * 0.66, early[1] * 0.56, early[2] * 0.5];
    let period = uniform(product, 10.0, 16.0) * uniform(inst, 0.9, 1.1);
    let rot = Rot::new(uniform(inst, -0.1, 0.1));
    let bow = uniform(inst, 0.0006, 0.002) * if chance(inst, 0.5) { 1.0 } else { -1.0 };
    let u0 = uniform(inst, -120.0, 120.0);
    let phase = unit(inst);
    let light = Lighting::random(inst, 0.05, 0.06);
    let seeds = [inst.next_u32(), inst.next_u32(), inst.next_u32(), inst.next_u32()];
    paint(image, &light, |p| {
        let (u, v) = rot.apply(p.x, p.y);
        let wobble =
            16.0 * (vnoise(u / 150.0, v / 70.0, seeds[0]) - 0.5) + 5.0 * (vnoise(u / 40.0, v / 18.0, seeds[1]) - 0.5);
        // A gently bowed cut through concentric rings.
        let d = v + bow * (u - u0) * (u - u0) + wobble;
        let t = d / period + phase;
        let f = t - t.floor();
        let latewood = smoothstep(0.55, 0.85, f) * (1.0 - smoothstep(0.9, 1.0, f));
        let pores = vnoise(u / 9.0, v / 0.8, seeds[2]);
        let figure = vnoise(u / 60.0, v / 25.0, seeds[3]);
        let m = (0.1 + 0.65 * latewood + 0.25 * (pores - 0.5) + 0.25 * (figure - 0.5)).clamp(0.0, 1.0);
        [lerp(early[0], late[0], m), lerp(early[1], late[1], m), lerp(early[2], late[2], m)]
    });
}

fn granular(image: &mut RgbImage, product: &mut ChaCha8Rng, inst: &mut ChaCha8Rng) {
    let base = uniform(product, 0.45, 0.6);
    let tint = [uniform(product, 0.97, 1.03), 1.0, uniform(product, 0.97, 1.03)];
    let grain = uniform(product, 2.0, 3.0);
    let level = base + uniform(inst, -0.03, 0.03);
    let light = Lighting::random(inst, 0.04, 0.08);
    let seeds = [inst.next_u32(), inst.next_u32(), inst.next_u32(), inst.next_u32(), inst.next_u32()];
    paint(image, &light, |p| {
        let blotch = 0.55 * vnoise(p.x / 34.0, p.y / 34.0, seeds[0]) + 0.45 * vnoise(p.x / 12.0, p.y / 12.0, seeds[1]);
        let grains = vnoise(p.x / grain, p.y / grain, seeds[2]);
        let fine = vnoise(p.x / 1.1, p.y / 1.1, seeds[3]);
        let speck = lattice(seeds[4], p.ix, p.iy);
        let l = level + 0.16 * (blotch - 0.5) + 0.16 * (grains - 0.5) + 0.08 * (fine - 0.5) + 0.07 * (speck - 0.5);
        [l * tint[0], l * tint[1], l * tint[2]]
    });
}

// ---------------------------------------------------------------------------
// Defects. Geometry draws from the rng before and independently of `strength`,
// so a subtle and a strong defect of one seed share the same mask.

/// Anti-aliased coverage of stroked paths (scratches, cracks), built by
/// stamping discs along the path.
struct Coverage {
    w: u32,
    h: u32,
    alpha: Vec<f32>,
}

impl Coverage {
    fn new(w: u32, h: u32) -> Coverage {
        Coverage { w, h, alpha: vec![0.0; w as usize * h as usize] }
    }

    fn stamp(&mut self, cx: f32, cy: f32, r: f32) {
        let reach = r + 1.0;
        let x0 = ((cx - reach).floor() as i64).max(0);
        let y0 = ((cy - reach).floor() as i64).max(0);
        let x1 = ((cx + reach).ceil() as i64).min(self.w as i64 - 1);
        let y1 = ((cy + reach).ceil() as i64).min(self.h as i64 - 1);
        for y in y0..=y1 {
            let dy = y as f32 + 0.5 - cy;
            for x in x0..=x1 {
                let dx = x as f32 + 0.5 - cx;
                let a = (r + 0.5 - (dx * dx + dy * dy).sqrt()).clamp(0.0, 1.0);
                let cell = &mut self.alpha[y as usize * self.w as usize + x as usize];
                if a > *cell {
                    *cell = a;
                }
            }
        }
    }

    /// Applies `f(x, y, alpha, rgb)` wherever the path touches.
    fn apply(&self, image: &mut RgbImage, mut f: impl FnMut(u32, u32, f32, [f32; 3]) -> [f32; 3]) {
        for (i, &a) in self.alpha.iter().enumerate() {
            if a > 0.0 {
                let (x, y) = ((i % self.w as usize) as u32, (i / self.w as usize) as u32);
                blend_pixel(image, x, y, |rgb| f(x, y, a, rgb));
            }
        }
    }

    /// Ground truth: pixels at least partly on the path. 0.3 keeps a one-pixel
    /// line one to two pixels wide in the mask, as annotators draw them.
    fn mask(&self) -> GrayImage {
        let mut mask = GrayImage::new(self.w, self.h);
        for (out, &a) in mask.iter_mut().zip(&self.alpha) {
            *out = if a >= 0.3 { 255 } else { 0 };
        }
        mask
    }
}

fn blend_pixel(image: &mut RgbImage, x: u32, y: u32, f: impl FnOnce([f32; 3]) -> [f32; 3]) {
    let px = image.get_pixel_mut(x, y);
    let rgb = px.0.map(|c| c as f32 * (1.0 / 255.0));
    px.0 = f(rgb).map(to_u8);
}

/// Image side and the scale from reference units to its pixels.
/// Width, height, and the side (× `scale`) and scale against [`REF`] that size a defect.
fn frame(image: &RgbImage, scale: f32) -> (f32, f32, f32, f32) {
    let (w, h) = image.dimensions();
    let side = w.min(h) as f32 * scale;
    (w as f32, h as f32, side, side / REF)
}

fn scratch(image: &mut RgbImage, rng: &mut ChaCha8Rng, strength: f32, scale: f32) -> GrayImage {
    let (w, h, side, sc) = frame(image, scale);
    let len = uniform(rng, 0.25, 0.5) * side;
    let (mx, my) = (uniform(rng, 0.25, 0.75) * w, uniform(rng, 0.25, 0.75) * h);
    let angle = uniform(rng, 0.0, TAU);
    let (dx, dy) = (cos_poly(angle), sin_poly(angle));
    let bend = uniform(rng, -0.3, 0.3) * len;
    let half_width = (uniform(rng, 0.7, 1.4) * sc).max(0.6);
    let sign = if chance(rng, 0.6) { 1.0 } else { -1.0 };
    let wear_seed = rng.next_u32();

    let (p0, p2) = ((mx - dx * len / 2.0, my - dy * len / 2.0), (mx + dx * len / 2.0, my + dy * len / 2.0));
    let p1 = (mx - dy * bend, my + dx * bend);
    let mut cov = Coverage::new(w as u32, h as u32);
    let steps = (len / 0.4).ceil().max(1.0) as u32;
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        let (a, b, c) = ((1.0 - t) * (1.0 - t), 2.0 * (1.0 - t) * t, t * t);
        let x = a * p0.0 + b * p1.0 + c * p2.0;
        let y = a * p0.1 + b * p1.1 + c * p2.1;
        let taper = smoothstep(0.0, 0.12, t) * smoothstep(0.0, 0.12, 1.0 - t);
        cov.stamp(x, y, half_width * (0.35 + 0.65 * taper));
    }
    let wear_scale = 6.0 * sc.max(0.25);
    cov.apply(image, |x, y, a, rgb| {
        // Real scratches catch the light unevenly along their length.
        let k = 0.65 + 0.35 * vnoise(x as f32 / wear_scale, y as f32 / wear_scale, wear_seed);
        let delta = sign * strength * 0.45 * a * k;
        rgb.map(|c| c + delta)
    });
    cov.mask()
}

fn crack(image: &mut RgbImage, rng: &mut ChaCha8Rng, strength: f32, scale: f32) -> GrayImage {
    struct Arm {
        x: f32,
        y: f32,
        heading: f32,
        len: f32,
        width: f32,
        depth: u8,
    }
    let (w, h, side, sc) = frame(image, scale);
    let total = uniform(rng, 0.25, 0.45) * side;
    let (x, y) = (uniform(rng, 0.25, 0.75) * w, uniform(rng, 0.25, 0.75) * h);
    let heading = uniform(rng, 0.0, TAU);
    let width = (uniform(rng, 0.9, 1.6) * sc).max(0.7);
    let step = (1.2 * sc).max(0.6);
    // A crack runs both ways from where it started.
    let mut arms = vec![
        Arm { x, y, heading, len: total / 2.0, width, depth: 0 },
        Arm { x, y, heading: heading + PI, len: total / 2.0, width, depth: 0 },
    ];
    let mut branches = 0;
    let mut cov = Coverage::new(w as u32, h as u32);
    while let Some(arm) = arms.pop() {
        let n = (arm.len / step).ceil().max(1.0) as u32;
        let (mut x, mut y, mut drift) = (arm.x, arm.y, 0.0f32);
        for i in 0..n {
            let t = i as f32 / n as f32;
            let r = arm.width * (1.0 - 0.75 * t);
            cov.stamp(x, y, r);
            // Slow wander plus per-step kinks: jagged, not smooth.
            drift = (drift + (unit(rng) - 0.5) * 0.3).clamp(-0.5, 0.5);
            let dir = arm.heading + drift + (unit(rng) - 0.5) * 1.0;
            if arm.depth < 2 && branches < 5 && t < 0.7 && chance(rng, 0.03) {
                branches += 1;
                let side = if chance(rng, 0.5) { 1.0 } else { -1.0 };
                arms.push(Arm {
                    x,
                    y,
                    heading: dir + side * uniform(rng, 0.5, 1.1),
                    len: arm.len * (1.0 - t) * uniform(rng, 0.3, 0.6),
                    width: r * 0.75,
                    depth: arm.depth + 1,
                });
            }
            x += cos_poly(dir) * step;
            y += sin_poly(dir) * step;
        }
    }
    cov.apply(image, |_, _, a, rgb| rgb.map(|c| c * (1.0 - strength * 0.8 * a)));
    cov.mask()
}

/// Pixel bounds of a disc of radius `r` around (cx, cy), clipped to the image.
fn disc_bounds(image: &RgbImage, cx: f32, cy: f32, r: f32) -> (u32, u32, u32, u32) {
    let (w, h) = image.dimensions();
    let clip = |v: f32, n: u32| (v.max(0.0) as u32).min(n - 1);
    (clip(cx - r, w), clip(cy - r, h), clip(cx + r, w), clip(cy + r, h))
}

fn stain(image: &mut RgbImage, rng: &mut ChaCha8Rng, strength: f32, scale: f32) -> GrayImage {
    let (w, h, side, sc) = frame(image, scale);
    let (cx, cy) = (uniform(rng, 0.2, 0.8) * w, uniform(rng, 0.2, 0.8) * h);
    let r = (uniform(rng, 0.06, 0.14) * side).max(2.0);
    let rot = uniform(rng, 0.0, PI);
    let (ca, sa) = (cos_poly(rot), sin_poly(rot));
    let aspect = uniform(rng, 0.65, 1.0);
    let (wobble_seed, mottle_seed) = (rng.next_u32(), rng.next_u32());
    let ringed = chance(rng, 0.4);
    let dark = chance(rng, 0.7);
    // Oil and rust darken and warm the surface; residue bleaches it.
    let tint = if dark {
        [uniform(rng, 0.36, 0.5), uniform(rng, 0.3, 0.42), uniform(rng, 0.22, 0.34)]
    } else {
        [uniform(rng, 0.3, 0.4), uniform(rng, 0.32, 0.42), uniform(rng, 0.4, 0.5)]
    };

    let mut mask = GrayImage::new(w as u32, h as u32);
    let wobble_scale = r * 0.45;
    let mottle_scale = 3.0 * sc.max(0.25);
    let (x0, y0, x1, y1) = disc_bounds(image, cx, cy, 1.5 * r + 2.0);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let (u, v) = (dx * ca + dy * sa, (dy * ca - dx * sa) / aspect);
            let d = (u * u + v * v).sqrt() / r;
            let wobble = vnoise(x as f32 / wobble_scale, y as f32 / wobble_scale, wobble_seed);
            let d = d * (0.7 + 0.6 * wobble);
            let mut a = 1.0 - smoothstep(0.55, 1.0, d);
            if ringed {
                // Coffee-ring: pigment piles up at the drying edge.
                a = (a * 0.7 + 0.5 * (1.0 - smoothstep(0.0, 0.12, (d - 0.85).abs()))).min(1.0);
            }
            if a <= 0.0 {
                continue;
            }
            if a >= 0.25 {
                mask.put_pixel(x, y, Luma([255]));
            }
            let mottle = 0.8 + 0.4 * (vnoise(x as f32 / mottle_scale, y as f32 / mottle_scale, mottle_seed) - 0.5);
            let k = (a * mottle).min(1.0) * strength;
            blend_pixel(image, x, y, |rgb| {
                let target = if dark {
                    [rgb[0] * tint[0], rgb[1] * tint[1], rgb[2] * tint[2]]
                } else {
                    [1.0 - (1.0 - rgb[0]) * tint[0], 1.0 - (1.0 - rgb[1]) * tint[1], 1.0 - (1.0 - rgb[2]) * tint[2]]
                };
                [lerp(rgb[0], target[0], k), lerp(rgb[1], target[1], k), lerp(rgb[2], target[2], k)]
            });
        }
    }
    mask
}

fn hole(image: &mut RgbImage, rng: &mut ChaCha8Rng, strength: f32, scale: f32) -> GrayImage {
    let (w, h, side, _) = frame(image, scale);
    let (cx, cy) = (uniform(rng, 0.15, 0.85) * w, uniform(rng, 0.15, 0.85) * h);
    let r = (uniform(rng, 0.025, 0.045) * side).max(2.5);
    let light = uniform(rng, 0.0, TAU);
    let (lx, ly) = (cos_poly(light), sin_poly(light));
    let rim = 0.5 * r;

    let mut mask = GrayImage::new(w as u32, h as u32);
    let (x0, y0, x1, y1) = disc_bounds(image, cx, cy, r + rim + 2.0);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let d = (dx * dx + dy * dy).sqrt();
            if d > r + rim {
                continue;
            }
            mask.put_pixel(x, y, Luma([255]));
            let inside = 1.0 - smoothstep(r - 0.6, r + 0.6, d);
            // A cavity, not a black disc: the wall facing the light is lit, the bottom is not.
            let facing = ((dx * lx + dy * ly) / r).clamp(-1.0, 1.0);
            let shade = 0.1 + 0.25 * (0.5 + 0.5 * facing) * (d / r).min(1.0);
            let t = ((d - r) / rim).clamp(0.0, 1.0);
            let burr = 4.0 * t * (1.0 - t) * (0.3 - 0.1 * facing);
            blend_pixel(image, x, y, |rgb| {
                rgb.map(|c| {
                    let raised = lerp(c, c + (1.0 - c) * burr, strength);
                    lerp(raised, c * shade, inside * strength)
                })
            });
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn mask_fraction(mask: &GrayImage) -> f64 {
        mask.iter().filter(|&&v| v == 255).count() as f64 / mask.len() as f64
    }

    /// Mean absolute per-channel difference under (`inside`) or outside the mask.
    fn mean_diff(a: &RgbImage, b: &RgbImage, mask: &GrayImage, inside: bool) -> f64 {
        let (mut sum, mut n) = (0u64, 0u64);
        for ((pa, pb), m) in a.pixels().zip(b.pixels()).zip(mask.pixels()) {
            if (m.0[0] == 255) == inside {
                for c in 0..3 {
                    sum += (pa.0[c] as i32 - pb.0[c] as i32).unsigned_abs() as u64;
                }
                n += 3;
            }
        }
        sum as f64 / n.max(1) as f64
    }

    fn mean_luma(image: &RgbImage) -> f64 {
        image.pixels().map(|p| p.0.iter().map(|&c| c as f64).sum::<f64>() / 3.0).sum::<f64>()
            / (image.width() * image.height()) as f64
    }

    #[test]
    fn sin_poly_tracks_sine_over_many_turns() {
        let mut worst = 0.0f64;
        for i in -2000..=2000 {
            let x = i as f32 * 0.0173;
            worst = worst.max((sin_poly(x) as f64 - (x as f64).sin()).abs());
            worst = worst.max((cos_poly(x) as f64 - (x as f64).cos()).abs());
        }
        assert!(worst < 2e-5, "max error {worst}");
    }

    fn digest_of_fixture() -> String {
        let mut hasher = Sha256::new();
        for texture in Texture::ALL {
            hasher.update(good(texture, 64, 42, 7).as_raw());
            for defect in Defect::ALL {
                let (image, mask) = defective(texture, defect, 1.0, 64, 42, 7);
                hasher.update(image.as_raw());
                hasher.update(mask.as_raw());
            }
        }
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn generation_matches_recorded_bytes() {
        // Recorded once; a change here means every dataset, demo model and
        // fixture generated from a seed has silently changed too.
        assert_eq!(digest_of_fixture(), "d5e80dc116c74945f9c9fad6e1d5f12bd2c27272abe187069b2ec2e0b8fd3b22");
    }

    #[test]
    fn generation_repeats_exactly() {
        for texture in Texture::ALL {
            assert_eq!(good(texture, 48, 3, 11), good(texture, 48, 3, 11));
            for defect in Defect::ALL {
                assert_eq!(defective(texture, defect, 0.7, 48, 3, 11), defective(texture, defect, 0.7, 48, 3, 11));
            }
        }
    }

    #[test]
    fn seed_index_and_texture_all_change_the_image() {
        let base = good(Texture::Noise, 32, 1, 1);
        assert_ne!(base, good(Texture::Noise, 32, 2, 1));
        assert_ne!(base, good(Texture::Noise, 32, 1, 2));
        assert_ne!(base, good(Texture::BrushedMetal, 32, 1, 1));
    }

    #[test]
    fn good_images_vary_between_indices_but_stay_one_class() {
        for texture in Texture::ALL {
            let images: Vec<RgbImage> = (0..6).map(|i| good(texture, 64, 5, i)).collect();
            let all = GrayImage::new(64, 64);
            for pair in images.windows(2) {
                // mean_diff outside an empty mask = over the whole image.
                let d = mean_diff(&pair[0], &pair[1], &all, false);
                assert!(d > 2.0, "{texture}: consecutive instances nearly identical ({d})");
            }
            let lumas: Vec<f64> = images.iter().map(mean_luma).collect();
            let spread =
                lumas.iter().cloned().fold(f64::MIN, f64::max) - lumas.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread < 30.0, "{texture}: brightness spread {spread} is more than one product varies");
            // Not flat: a texture, not a colour.
            let m = lumas[0];
            let var =
                images[0].pixels().map(|p| (p.0.iter().map(|&c| c as f64).sum::<f64>() / 3.0 - m).powi(2)).sum::<f64>()
                    / (64.0 * 64.0);
            assert!(var.sqrt() > 4.0, "{texture}: almost flat (std {})", var.sqrt());
        }
    }

    #[test]
    fn defect_masks_are_binary_and_cover_a_plausible_area() {
        for texture in Texture::ALL {
            for defect in Defect::ALL {
                for index in 0..6 {
                    let (_, mask) = defective(texture, defect, 1.0, 128, 9, index);
                    assert_eq!(mask.dimensions(), (128, 128));
                    assert!(mask.iter().all(|&v| v == 0 || v == 255), "{texture}/{defect}: mask not binary");
                    let f = mask_fraction(&mask);
                    assert!((0.001..=0.15).contains(&f), "{texture}/{defect}/{index}: mask covers {f}");
                }
            }
        }
    }

    #[test]
    fn defects_change_pixels_under_the_mask_and_little_elsewhere() {
        for texture in Texture::ALL {
            for defect in Defect::ALL {
                for index in 0..4 {
                    let clean = good(texture, 128, 9, index);
                    let (image, mask) = defective(texture, defect, 1.0, 128, 9, index);
                    let inside = mean_diff(&clean, &image, &mask, true);
                    let outside = mean_diff(&clean, &image, &mask, false);
                    assert!(inside > 25.0, "{texture}/{defect}/{index}: defect too faint ({inside})");
                    assert!(outside < 1.0, "{texture}/{defect}/{index}: defect leaks outside its mask ({outside})");
                }
            }
        }
    }

    #[test]
    fn strength_scales_contrast_but_not_geometry() {
        for defect in Defect::ALL {
            let clean = good(Texture::BrushedMetal, 96, 4, 2);
            let (strong, strong_mask) = defective(Texture::BrushedMetal, defect, 1.0, 96, 4, 2);
            let (subtle, subtle_mask) = defective(Texture::BrushedMetal, defect, 0.25, 96, 4, 2);
            let (none, _) = defective(Texture::BrushedMetal, defect, 0.0, 96, 4, 2);
            assert_eq!(strong_mask, subtle_mask, "{defect}: strength moved the defect");
            let s = mean_diff(&clean, &strong, &strong_mask, true);
            let t = mean_diff(&clean, &subtle, &strong_mask, true);
            assert!(t > 1.0 && t < 0.5 * s, "{defect}: subtle {t} vs strong {s}");
            assert_eq!(none, clean, "{defect}: strength 0 still painted");
        }
        // Out-of-range strengths are clamped, NaN is none.
        let (over, _) = defective(Texture::Noise, Defect::Hole, 7.0, 48, 1, 1);
        assert_eq!(over, defective(Texture::Noise, Defect::Hole, 1.0, 48, 1, 1).0);
        assert_eq!(defective(Texture::Noise, Defect::Hole, f32::NAN, 48, 1, 1).0, good(Texture::Noise, 48, 1, 1));
    }

    #[test]
    fn a_small_defect_scale_draws_small_defects_in_the_same_place() {
        for defect in Defect::ALL {
            let (_, big) = defective(Texture::BrushedMetal, defect, 1.0, 256, 5, 3);
            assert_eq!(defective_scaled(Texture::BrushedMetal, defect, 1.0, 1.0, 256, 5, 3).1, big);
            let (img, small) = defective_scaled(Texture::BrushedMetal, defect, 1.0, 0.1, 256, 5, 3);
            let (nb, ns) = (mask_fraction(&big), mask_fraction(&small));
            assert!(ns > 0.0 && ns < nb / 4.0, "{defect}: {ns} vs {nb}");
            // Still a visible change under its mask.
            assert!(mean_diff(&good(Texture::BrushedMetal, 256, 5, 3), &img, &small, true) > 5.0, "{defect}");
        }
    }

    #[test]
    fn defect_into_pastes_onto_any_image() {
        for defect in Defect::ALL {
            let mut image = RgbImage::from_pixel(200, 120, image::Rgb([128, 128, 128]));
            let mask = defect_into(&mut image, defect, 1.0, 77);
            assert_eq!(mask.dimensions(), (200, 120));
            assert!(mask_fraction(&mask) > 0.001, "{defect}: empty mask on a non-square image");
            let changed = image.pixels().filter(|p| p.0 != [128, 128, 128]).count();
            assert!(changed > 0, "{defect}: nothing painted");
        }
        let mut empty = RgbImage::new(0, 0);
        assert_eq!(defect_into(&mut empty, Defect::Crack, 1.0, 1).dimensions(), (0, 0));
        assert_eq!(good(Texture::WoodGrain, 0, 1, 1).dimensions(), (0, 0));
    }

    #[test]
    fn names_round_trip_and_match_serde() {
        for t in Texture::ALL {
            assert_eq!(Texture::parse(t.as_str()), Some(t));
            assert_eq!(t.as_str().parse::<Texture>().ok(), Some(t));
            assert_eq!(serde_json::to_string(&t).ok(), Some(format!("\"{t}\"")));
        }
        for d in Defect::ALL {
            assert_eq!(Defect::parse(d.as_str()), Some(d));
            assert_eq!(serde_json::to_string(&d).ok(), Some(format!("\"{d}\"")));
        }
        let err = "rust".parse::<Defect>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("rust") && err.contains("scratch"), "{err}");
        assert_eq!(Texture::parse("BrushedMetal"), None);
    }

    fn spec() -> DatasetSpec {
        DatasetSpec {
            texture: Texture::WovenFabric,
            size: 32,
            seed: 3,
            train_good: 3,
            test_good: 2,
            test_per_defect: 2,
            defects: vec![Defect::Scratch, Defect::Hole],
            strength: 1.0,
            defect_scale: 1.0,
        }
    }

    #[test]
    fn write_mvtec_writes_the_mvtec_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec();
        let summary = write_mvtec(dir.path(), &spec).expect("write");
        assert_eq!(
            summary,
            DatasetSummary { root: dir.path().to_path_buf(), train_good: 3, test_good: 2, test_defective: 4 }
        );

        let mut files = Vec::new();
        let mut pending = vec![dir.path().to_path_buf()];
        while let Some(d) = pending.pop() {
            for entry in std::fs::read_dir(&d).expect("read_dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    files.push(path.strip_prefix(dir.path()).expect("prefix").to_string_lossy().into_owned());
                }
            }
        }
        files.sort();
        let expected = [
            "ground_truth/hole/000_mask.png",
            "ground_truth/hole/001_mask.png",
            "ground_truth/scratch/000_mask.png",
            "ground_truth/scratch/001_mask.png",
            "test/good/000.png",
            "test/good/001.png",
            "test/hole/000.png",
            "test/hole/001.png",
            "test/scratch/000.png",
            "test/scratch/001.png",
            "train/good/000.png",
            "train/good/001.png",
            "train/good/002.png",
        ];
        assert_eq!(files, expected);

        // Files hold exactly what the generator makes, at disjoint indices.
        let read_rgb = |p: &str| image::open(dir.path().join(p)).expect("open").to_rgb8();
        let (image, mask) = defective(spec.texture, Defect::Hole, 1.0, 32, 3, test_index(Some(Defect::Hole), 1));
        assert_eq!(read_rgb("test/hole/001.png"), image);
        let read_mask = image::open(dir.path().join("ground_truth/hole/001_mask.png")).expect("open").to_luma8();
        assert_eq!(read_mask, mask);
        assert_eq!(read_rgb("train/good/002.png"), good(spec.texture, 32, 3, 2));
        let train: Vec<RgbImage> = (0..3).map(|i| read_rgb(&format!("train/good/{i:03}.png"))).collect();
        for i in 0..2 {
            let test = read_rgb(&format!("test/good/{i:03}.png"));
            assert!(!train.contains(&test), "test/good/{i:03}.png is also a training image");
        }
    }

    #[test]
    fn write_mvtec_reports_every_spec_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = DatasetSpec { size: 0, strength: 1.5, defects: vec![Defect::Crack, Defect::Crack], ..spec() };
        let err = write_mvtec(dir.path(), &bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("size") && err.contains("strength") && err.contains("twice"), "{err}");
        assert!(std::fs::read_dir(dir.path()).expect("read_dir").next().is_none(), "wrote files for a bad spec");
    }

    #[test]
    fn write_mvtec_names_the_path_it_cannot_create() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").expect("write");
        let err = write_mvtec(&blocker, &spec()).err();
        match err {
            Some(SynthError::Io { path, .. }) => {
                assert!(path.starts_with(&blocker), "{}", path.display())
            }
            other => panic!("expected an Io error naming the path, got {other:?}"),
        }
    }

    /// `cargo test --release -p ganomaly-core synth::tests::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn speed() {
        for texture in Texture::ALL {
            let start = std::time::Instant::now();
            let n = 50;
            for i in 0..n {
                std::hint::black_box(defective(texture, Defect::ALL[i as usize % 4], 1.0, 256, 1, i));
            }
            println!("{texture}: {:.2} ms per 256×256 defective image", start.elapsed().as_secs_f64() * 1e3 / n as f64);
        }
    }
}
