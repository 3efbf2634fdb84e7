//! The one preprocessing function: an 8-bit frame (RGB or gray, any size,
//! optional ROI) → the model's `[C, S, S]` f32 tensor in [-1, 1].
//!
//! The trainer and the daemon both call [`Preprocessor::run`], so the pixels a
//! model was trained on and the pixels it scores in production cannot drift
//! apart. Steps, in this order: crop to the ROI, resize to S×S with a bilinear
//! (triangle) filter that anti-aliases when shrinking (as Pillow's BILINEAR),
//! convert colour (RGB → gray by ITU-R BT.601 luma; gray → RGB by replication),
//! then map `v ↦ v / 127.5 − 1` into planar CHW.
//!
//! Resizing is done on 8-bit pixels by `fast_image_resize` (SIMD); colour
//! conversion happens after the resize so it touches S² pixels, not the frame's.

use fast_image_resize::{self as fr, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions};

use crate::metadata::{ColorMode, PreprocessMeta};

/// Errors preprocessing one frame. None of these is fatal to a daemon: the
/// frame is counted as broken and skipped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreprocessError {
    #[error("frame is {width}×{height} {layout:?} and needs {need} bytes, got {got}")]
    ShortFrame { width: u32, height: u32, layout: PixelLayout, need: usize, got: usize },
    #[error("frame has zero width or height")]
    EmptyFrame,
    #[error("ROI {roi:?} does not fit in a {width}×{height} frame")]
    RoiOutside { roi: Roi, width: u32, height: u32 },
    #[error("output buffer holds {got} floats, the model needs {need}")]
    OutputSize { need: usize, got: usize },
    #[error("resize failed: {0}")]
    Resize(String),
}

/// Byte layout of an 8-bit frame. Rows are tightly packed (stride = width × channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLayout {
    Rgb8,
    Gray8,
}

impl PixelLayout {
    pub fn channels(self) -> usize {
        match self {
            PixelLayout::Rgb8 => 3,
            PixelLayout::Gray8 => 1,
        }
    }
    fn fr_type(self) -> PixelType {
        match self {
            PixelLayout::Rgb8 => PixelType::U8x3,
            PixelLayout::Gray8 => PixelType::U8,
        }
    }
}

/// A borrowed 8-bit frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub width: u32,
    pub height: u32,
    pub layout: PixelLayout,
    pub data: &'a [u8],
}

/// Region of interest in frame pixels (top-left corner and size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roi {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Reusable preprocessing state: the resizer and its 8-bit S×S scratch image.
/// Keep one per thread; after the first frame of a given geometry it allocates
/// no frame- or tensor-sized buffers (the resize crate still builds its small
/// filter-coefficient tables per call).
pub struct Preprocessor {
    color: ColorMode,
    size: u32,
    resizer: fr::Resizer,
    /// Resized pixels, in the frame's layout (S×S×1 or S×S×3).
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor").field("color", &self.color).field("size", &self.size).finish()
    }
}

impl Preprocessor {
    pub fn new(color: ColorMode, size: u32) -> Preprocessor {
        Preprocessor { color, size, resizer: fr::Resizer::new(), scratch: Vec::new() }
    }

    pub fn from_meta(meta: &PreprocessMeta) -> Preprocessor {
        Preprocessor::new(meta.color, meta.size)
    }

    pub fn color(&self) -> ColorMode {
        self.color
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Floats in one output tensor: C × S × S.
    pub fn tensor_len(&self) -> usize {
        self.color.channels() as usize * (self.size as usize) * (self.size as usize)
    }

    /// Preprocesses `frame` (cropped to `roi` if given) into `out` (`[C, S, S]`).
    pub fn run(&mut self, frame: &FrameRef<'_>, roi: Option<Roi>, out: &mut [f32]) -> Result<(), PreprocessError> {
        let need_out = self.tensor_len();
        if out.len() != need_out {
            return Err(PreprocessError::OutputSize { need: need_out, got: out.len() });
        }
        if frame.width == 0 || frame.height == 0 {
            return Err(PreprocessError::EmptyFrame);
        }
        let ch = frame.layout.channels();
        let need = frame.width as usize * frame.height as usize * ch;
        if frame.data.len() < need {
            return Err(PreprocessError::ShortFrame {
                width: frame.width,
                height: frame.height,
                layout: frame.layout,
                need,
                got: frame.data.len(),
            });
        }
        let roi = roi.unwrap_or(Roi { x: 0, y: 0, width: frame.width, height: frame.height });
        let fits = roi.width > 0
            && roi.height > 0
            && roi.x.checked_add(roi.width).is_some_and(|r| r <= frame.width)
            && roi.y.checked_add(roi.height).is_some_and(|b| b <= frame.height);
        if !fits {
            return Err(PreprocessError::RoiOutside { roi, width: frame.width, height: frame.height });
        }

        let s = self.size as usize;
        self.scratch.resize(s * s * ch, 0);
        let src = ImageRef::new(frame.width, frame.height, &frame.data[..need], frame.layout.fr_type())
            .map_err(|e| PreprocessError::Resize(e.to_string()))?;
        let same_geometry = roi.x == 0 && roi.y == 0 && roi.width == self.size && roi.height == self.size;
        if same_geometry && frame.width == self.size && frame.height == self.size {
            // Already model-sized: a resize would be an identity copy.
            self.scratch.copy_from_slice(&frame.data[..need]);
        } else {
            let mut dst =
                fr::images::Image::from_slice_u8(self.size, self.size, &mut self.scratch, frame.layout.fr_type())
                    .map_err(|e| PreprocessError::Resize(e.to_string()))?;
            let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(
                roi.x as f64,
                roi.y as f64,
                roi.width as f64,
                roi.height as f64,
            );
            self.resizer.resize(&src, &mut dst, &opts).map_err(|e| PreprocessError::Resize(e.to_string()))?;
        }

        let plane = s * s;
        match (frame.layout, self.color) {
            (PixelLayout::Rgb8, ColorMode::Rgb) => {
                let (r, rest) = out.split_at_mut(plane);
                let (g, b) = rest.split_at_mut(plane);
                for (i, px) in self.scratch.chunks_exact(3).enumerate() {
                    r[i] = to_unit(px[0]);
                    g[i] = to_unit(px[1]);
                    b[i] = to_unit(px[2]);
                }
            }
            (PixelLayout::Gray8, ColorMode::Gray) => {
                for (o, &v) in out.iter_mut().zip(self.scratch.iter()) {
                    *o = to_unit(v);
                }
            }
            (PixelLayout::Rgb8, ColorMode::Gray) => {
                for (o, px) in out.iter_mut().zip(self.scratch.chunks_exact(3)) {
                    *o = to_unit(luma(px[0], px[1], px[2]));
                }
            }
            (PixelLayout::Gray8, ColorMode::Rgb) => {
                for (i, &v) in self.scratch.iter().enumerate() {
                    let u = to_unit(v);
                    out[i] = u;
                    out[plane + i] = u;
                    out[2 * plane + i] = u;
                }
            }
        }
        Ok(())
    }

    /// Convenience for decoded image files: the image as [`image_frame`] gives it.
    pub fn run_image(
        &mut self,
        img: &image::DynamicImage,
        roi: Option<Roi>,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        image_frame(img, |f| self.run(f, roi, out))
    }
}

/// A decoded image file as the 8-bit frame a camera delivers, handed to `f`:
/// RGB8 and Luma8 images are used in place; any other format (16-bit,
/// alpha, ...) is converted to RGB8 first.
pub fn image_frame<T>(img: &image::DynamicImage, f: impl FnOnce(&FrameRef<'_>) -> T) -> T {
    let converted;
    let (layout, width, height, data) = match img {
        image::DynamicImage::ImageRgb8(rgb) => (PixelLayout::Rgb8, rgb.width(), rgb.height(), rgb.as_raw()),
        image::DynamicImage::ImageLuma8(g) => (PixelLayout::Gray8, g.width(), g.height(), g.as_raw()),
        other => {
            converted = other.to_rgb8();
            (PixelLayout::Rgb8, converted.width(), converted.height(), converted.as_raw())
        }
    };
    f(&FrameRef { width, height, layout, data })
}

/// 8-bit value → [-1, 1]: 0 ↦ −1, 255 ↦ 1 (the decoder's tanh range).
#[inline]
pub fn to_unit(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

/// [-1, 1] → 8-bit, rounding and clamping (for recon images and overlays).
#[inline]
pub fn from_unit(v: f32) -> u8 {
    ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// BT.601 luma in integer arithmetic (weights 77/150/29 of 256), rounding to nearest.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((77 * r as u32 + 150 * g as u32 + 29 * b as u32 + 128) >> 8) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn identity_size_maps_bytes_exactly() {
        // 2×2 RGB frame at model size 2: no resampling, exact mapping into CHW.
        let data = [0u8, 10, 20, 255, 128, 64, 1, 2, 3, 200, 100, 50];
        let frame = FrameRef { width: 2, height: 2, layout: PixelLayout::Rgb8, data: &data };
        let mut p = Preprocessor::new(ColorMode::Rgb, 2);
        let mut out = vec![0.0; 12];
        p.run(&frame, None, &mut out).unwrap();
        // R plane, G plane, B plane.
        let want: Vec<f32> =
            [0u8, 255, 1, 200, 10, 128, 2, 100, 20, 64, 3, 50].iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        assert_eq!(out, want);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[1], 1.0);
    }

    #[test]
    fn downscale_matches_hand_computed_triangle_filter() {
        // 4×1 gray row [0, 100, 200, 40] → 2×1. With the triangle filter scaled by 2,
        // output 0 (centre 1.0 in source coordinates) takes source centres 0.5, 1.5, 2.5
        // with weights 0.75, 0.75, 0.25: (0·.75 + 100·.75 + 200·.25)/1.75 = 71.43 → 71.
        // Output 1 (centre 3.0): centres 1.5, 2.5, 3.5 with .25, .75, .75:
        // (25 + 150 + 30)/1.75 = 117.14 → 117.
        // A 4×2 frame (row repeated) resized to 2×2 keeps rows identical.
        let row = [0u8, 100, 200, 40];
        let data: Vec<u8> = row.iter().chain(row.iter()).copied().collect();
        let frame = FrameRef { width: 4, height: 2, layout: PixelLayout::Gray8, data: &data };
        let mut p = Preprocessor::new(ColorMode::Gray, 2);
        let mut out = vec![0.0; 4];
        p.run(&frame, None, &mut out).unwrap();
        let tol = 1.0 / 127.5 + 1e-6; // one 8-bit step of fixed-point rounding
        assert!(close(out[0], 71.43 / 127.5 - 1.0, tol), "{out:?}");
        assert!(close(out[1], 117.14 / 127.5 - 1.0, tol), "{out:?}");
        assert_eq!(out[0], out[2]);
        assert_eq!(out[1], out[3]);
    }

    #[test]
    fn roi_crops_before_resize() {
        // 4×4 gray: left half 0, right half 255. ROI = right half → all +1.
        let mut data = vec![0u8; 16];
        for y in 0..4 {
            for x in 2..4 {
                data[y * 4 + x] = 255;
            }
        }
        let frame = FrameRef { width: 4, height: 4, layout: PixelLayout::Gray8, data: &data };
        let mut p = Preprocessor::new(ColorMode::Gray, 2);
        let mut out = vec![0.0; 4];
        p.run(&frame, Some(Roi { x: 2, y: 0, width: 2, height: 4 }), &mut out).unwrap();
        assert!(out.iter().all(|&v| v == 1.0), "{out:?}");
        p.run(&frame, Some(Roi { x: 0, y: 0, width: 2, height: 4 }), &mut out).unwrap();
        assert!(out.iter().all(|&v| v == -1.0), "{out:?}");
    }

    #[test]
    fn colour_conversions() {
        // Pure red at model size → BT.601 luma 77/256·255 ≈ 76.7 → 77.
        let data = [255u8, 0, 0];
        let frame = FrameRef { width: 1, height: 1, layout: PixelLayout::Rgb8, data: &data };
        let mut p = Preprocessor::new(ColorMode::Gray, 1);
        let mut out = vec![0.0; 1];
        p.run(&frame, None, &mut out).unwrap();
        assert_eq!(out[0], to_unit(77));
        // Gray → RGB replicates.
        let data = [51u8];
        let frame = FrameRef { width: 1, height: 1, layout: PixelLayout::Gray8, data: &data };
        let mut p = Preprocessor::new(ColorMode::Rgb, 1);
        let mut out = vec![0.0; 3];
        p.run(&frame, None, &mut out).unwrap();
        assert_eq!(out, vec![to_unit(51); 3]);
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut p = Preprocessor::new(ColorMode::Rgb, 4);
        let mut out = vec![0.0; 48];
        let data = [0u8; 10];
        let short = FrameRef { width: 4, height: 4, layout: PixelLayout::Rgb8, data: &data };
        assert!(matches!(p.run(&short, None, &mut out), Err(PreprocessError::ShortFrame { need: 48, got: 10, .. })));
        let empty = FrameRef { width: 0, height: 4, layout: PixelLayout::Rgb8, data: &data };
        assert_eq!(p.run(&empty, None, &mut out), Err(PreprocessError::EmptyFrame));
        let big = vec![0u8; 48];
        let ok = FrameRef { width: 4, height: 4, layout: PixelLayout::Rgb8, data: &big };
        let roi = Roi { x: 3, y: 0, width: 2, height: 2 };
        assert!(matches!(p.run(&ok, Some(roi), &mut out), Err(PreprocessError::RoiOutside { .. })));
        let roi = Roi { x: u32::MAX, y: 0, width: 2, height: 2 };
        assert!(matches!(p.run(&ok, Some(roi), &mut out), Err(PreprocessError::RoiOutside { .. })));
        let mut small = vec![0.0; 3];
        assert_eq!(p.run(&ok, None, &mut small), Err(PreprocessError::OutputSize { need: 48, got: 3 }));
    }

    #[test]
    fn unit_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(from_unit(to_unit(v)), v);
        }
    }
}
