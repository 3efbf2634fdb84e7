//! Decoding a camera's encoded frames, within its [`FrameLimits`]: the one
//! JPEG decode of the capture path (HTTP-MJPEG parts, V4L2 MJPEG buffers,
//! GStreamer `image/jpeg` samples) and the image files of a replay folder.
//!
//! JPEG goes through zune-jpeg directly (the decoder `image` uses inside):
//! its header is read first and the limits are checked before any pixel
//! buffer exists, and the pixels are decoded straight into the frame's reused
//! buffer. zune-jpeg is pure, safe Rust, fuzzed upstream, and this call path
//! is fuzzed here too (`make fuzz`, target `decode_jpeg`): a corrupt frame is
//! an error, not a panic. That matters because release builds abort on a
//! panic (`panic = "abort"`), where `catch_unwind` contains nothing.

use std::path::Path;

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use super::limits::{FrameLimits, LimitError};
use super::{FrameData, PixelFormat};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("not a JPEG: {0}")]
    Jpeg(#[source] zune_jpeg::errors::DecodeErrors),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot decode {path}: {source}")]
    Image { path: String, source: image::ImageError },
}

/// Decodes one JPEG into `out`, reusing its buffer: gray JPEGs as gray
/// frames, every other colour space as RGB. Refuses a frame over `limits`
/// before decoding it.
pub fn jpeg(data: &[u8], limits: &FrameLimits, out: &mut FrameData) -> Result<(), DecodeError> {
    limits.check_bytes(data.len() as u64)?;
    let options = DecoderOptions::default()
        // Lenient like `image`: cameras write JPEGs with small errors.
        .set_strict_mode(false)
        // zune refuses these itself, at the header, before allocating.
        .set_max_width(limits.max_width as usize)
        .set_max_height(limits.max_height as usize);
    check_sampling(data)?;
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(data), options);
    if let Err(e) = decoder.decode_headers() {
        // Report a frame over the limits as such, not as a broken JPEG.
        if let Some((w, h)) = sof_dimensions(data) {
            limits.check_size(u64::from(w), u64::from(h))?;
        }
        return Err(DecodeError::Jpeg(e));
    }
    let (width, height) = decoder.dimensions().unwrap_or((0, 0));
    limits.check_size(width as u64, height as u64)?;
    let (width, height) = (width as u32, height as u32);
    let (space, format) = match decoder.input_colorspace() {
        Some(ColorSpace::Luma | ColorSpace::LumaA) => (ColorSpace::Luma, PixelFormat::Gray8),
        _ => (ColorSpace::RGB, PixelFormat::Rgb8),
    };
    decoder.set_options(decoder.options().jpeg_set_out_colorspace(space));
    let needed = decoder.output_buffer_size().unwrap_or(0);
    let buf = out.reshape(width, height, format);
    if buf.len() != needed {
        // Only an output of exactly this size is a frame of this geometry.
        return Err(DecodeError::Jpeg(zune_jpeg::errors::DecodeErrors::Format(format!(
            "{width}x{height} JPEG decodes to {needed} bytes, not {}",
            buf.len()
        ))));
    }
    decoder.decode_into(buf).map_err(DecodeError::Jpeg)
}

/// Whether `marker` (the byte after 0xFF) starts a frame header: SOF0..SOF15
/// except DHT (c4), JPG (c8) and DAC (cc).
fn is_sof(marker: u8) -> bool {
    (0xc0..=0xcf).contains(&marker) && !matches!(marker, 0xc4 | 0xc8 | 0xcc)
}

/// Refuses sampling factors no camera writes, in every frame header the data
/// holds (thumbnails and stray markers included: the decoder may use any).
///
/// Found by `make fuzz`: zune-jpeg 0.5.15 panics (an `unwrap` in its IDCT's
/// store, scalar and AVX2 alike) on a header whose chroma is sampled more
/// finely than its luma (e.g. Y 2×2, Cr 4×1), and in a release build a panic
/// aborts the daemon. Camera JPEGs are 4:4:4, 4:2:2, 4:2:0, 4:4:0 or 4:1:1:
/// luma sampled at most 4× in each direction, every other component 1×1 (or
/// all equal), which is all this lets through.
fn check_sampling(data: &[u8]) -> Result<(), DecodeError> {
    let bad = |why: String| {
        DecodeError::Jpeg(zune_jpeg::errors::DecodeErrors::Format(format!("unsupported JPEG frame header: {why}")))
    };
    let mut at = 0usize;
    while let Some(off) = data.get(at..).and_then(|rest| rest.windows(2).position(|w| w[0] == 0xff && is_sof(w[1]))) {
        let i = at + off;
        at = i + 2;
        // FF Cn, length (2), precision, height (2), width (2), count, then
        // (id, h << 4 | v, table) per component.
        let Some(&count) = data.get(i + 9) else { continue };
        let Some(comps) = data.get(i + 10..i + 10 + 3 * usize::from(count)) else { continue };
        let factors = || comps.chunks_exact(3).map(|c| (c[1] >> 4, c[1] & 0x0f));
        let Some((h0, v0)) = factors().next() else { continue };
        let luma_ok = (1..=4).contains(&h0) && (1..=4).contains(&v0);
        if !luma_ok || !factors().skip(1).all(|f| f == (1, 1) || f == (h0, v0)) {
            let all: Vec<(u8, u8)> = factors().collect();
            return Err(bad(format!("sampling factors {all:?} (cameras write 4:4:4, 4:2:2, 4:2:0, 4:4:0 or 4:1:1)")));
        }
    }
    Ok(())
}

/// The width and height a JPEG's first start-of-frame marker claims, read
/// without decoding (for the error message of a frame over the limits).
pub fn sof_dimensions(data: &[u8]) -> Option<(u16, u16)> {
    let mut i = 2usize;
    if data.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    while i + 4 <= data.len() {
        if data[i] != 0xff {
            return None;
        }
        let marker = data[i + 1];
        let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
        if is_sof(marker) {
            let h = u16::from_be_bytes([*data.get(i + 5)?, *data.get(i + 6)?]);
            let w = u16::from_be_bytes([*data.get(i + 7)?, *data.get(i + 8)?]);
            return Some((w, h));
        }
        i = i.checked_add(2 + len)?;
    }
    None
}

/// Decodes an image file of a replay folder into `out` (gray images stay
/// gray), refusing files and images over `limits` before reading them.
pub fn image_file(path: &Path, limits: &FrameLimits, out: &mut FrameData) -> Result<(), DecodeError> {
    let shown = || path.display().to_string();
    let size = std::fs::metadata(path).map_err(|source| DecodeError::Read { path: shown(), source })?.len();
    limits.check_bytes(size)?;
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|source| DecodeError::Read { path: shown(), source })?;
    let (width, height) = reader.into_dimensions().map_err(|source| DecodeError::Image { path: shown(), source })?;
    limits.check_size(u64::from(width), u64::from(height))?;
    let mut reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|source| DecodeError::Read { path: shown(), source })?;
    // `image` enforces these again itself, against what the decoder finds.
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_width);
    l.max_image_height = Some(limits.max_height);
    reader.limits(l);
    let img = reader.decode().map_err(|source| DecodeError::Image { path: shown(), source })?;
    let format = match img {
        image::DynamicImage::ImageLuma8(_) => PixelFormat::Gray8,
        _ => PixelFormat::Rgb8,
    };
    out.fill_from_image(&img, format);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
        out.into_inner()
    }

    /// The JPEG with its SOF0 claiming `w × h`.
    fn claim(mut jpeg: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
        let at = jpeg.windows(2).position(|m| m == [0xff, 0xc0]).expect("baseline SOF0");
        jpeg[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
        jpeg[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
        jpeg
    }

    #[test]
    fn a_jpeg_decodes_into_the_reused_buffer() {
        let mut out = FrameData::default();
        jpeg(&encode(64, 48), &FrameLimits::DEFAULT, &mut out).expect("decodes");
        assert_eq!((out.width, out.height, out.format, out.data.len()), (64, 48, PixelFormat::Rgb8, 64 * 48 * 3));
        // Close to the encoded colours (JPEG is lossy).
        let p = &out.data[(10 * 64 + 20) * 3..][..3];
        assert!((i32::from(p[0]) - 140).abs() < 16 && (i32::from(p[2]) - 90).abs() < 16, "{p:?}");
        let ptr = out.data.as_ptr();
        jpeg(&encode(64, 48), &FrameLimits::DEFAULT, &mut out).expect("decodes");
        assert_eq!(out.data.as_ptr(), ptr, "same geometry, same allocation");
        let gray = {
            let img = image::GrayImage::from_pixel(16, 8, image::Luma([77]));
            let mut c = std::io::Cursor::new(Vec::new());
            image::DynamicImage::ImageLuma8(img).write_to(&mut c, image::ImageFormat::Jpeg).expect("encode");
            c.into_inner()
        };
        jpeg(&gray, &FrameLimits::DEFAULT, &mut out).expect("gray decodes");
        assert_eq!((out.format, out.data.len()), (PixelFormat::Gray8, 16 * 8));
        assert!(out.data.iter().all(|&v| (i32::from(v) - 77).abs() < 4));
    }

    #[test]
    fn a_header_claiming_a_huge_frame_is_refused_before_decoding() {
        // 60000 × 60000 would be 10.8 GB of RGB: refused by its header.
        let lie = claim(encode(16, 16), 60_000, 60_000);
        assert_eq!(sof_dimensions(&lie), Some((60_000, 60_000)));
        let mut out = FrameData::default();
        let err = jpeg(&lie, &FrameLimits::DEFAULT, &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Limit(LimitError::Size { width: 60_000, height: 60_000, .. })), "{err}");
        assert!(out.data.capacity() == 0, "nothing was allocated for it");
        // Over a camera's own limit, and over its byte limit.
        let small = FrameLimits { max_width: 32, max_height: 32, max_bytes: 1 << 20 };
        assert!(matches!(jpeg(&encode(40, 8), &small, &mut out), Err(DecodeError::Limit(LimitError::Size { .. }))));
        let tight = FrameLimits { max_bytes: 1024, ..FrameLimits::DEFAULT };
        assert!(matches!(jpeg(&encode(256, 256), &tight, &mut out), Err(DecodeError::Limit(LimitError::Bytes { .. }))));
    }

    #[test]
    fn sampling_factors_that_crash_the_decoder_are_refused() {
        // `make fuzz` found this one (fuzz/seeds/decode_jpeg/crash-idct-sampling.jpg):
        // Y 2×2, Cb 1×1, Cr 4×1 made zune-jpeg 0.5.15 panic in its IDCT.
        let crash = include_bytes!("../../fuzz/seeds/decode_jpeg/crash-idct-sampling.jpg");
        let mut out = FrameData::default();
        let err = jpeg(crash, &FrameLimits::DEFAULT, &mut out).unwrap_err().to_string();
        assert!(err.contains("sampling factors [(2, 2), (1, 1), (4, 1)]"), "{err}");
        // What cameras write passes: 4:2:0 from `image`'s encoder, gray, 4:4:4.
        let mut good = encode(32, 16);
        assert!(check_sampling(&good).is_ok());
        // The same header with Cr at 2×2 beside Y at 2×2 is still fine (all equal).
        let sof = good.windows(2).position(|m| m == [0xff, 0xc0]).expect("SOF0");
        let comps = good[sof + 9] as usize;
        assert_eq!(comps, 3);
        for c in 0..comps {
            good[sof + 10 + 3 * c + 1] = 0x11;
        }
        assert!(check_sampling(&good).is_ok());
        good[sof + 10 + 3 * 2 + 1] = 0x21;
        assert!(check_sampling(&good).is_err(), "chroma wider than luma");
        // 4:1:1 (DV-style cameras): Y 4×1, chroma 1×1.
        good[sof + 10 + 1] = 0x41;
        good[sof + 10 + 3 * 2 + 1] = 0x11;
        assert!(check_sampling(&good).is_ok());
    }

    #[test]
    fn corrupt_jpegs_are_errors() {
        let mut out = FrameData::default();
        for bad in [&b""[..], b"\xff\xd8", b"not a jpeg at all", &encode(32, 32)[..200]] {
            assert!(jpeg(bad, &FrameLimits::DEFAULT, &mut out).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn image_files_are_checked_against_the_limits_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.png");
        image::GrayImage::from_pixel(40, 30, image::Luma([9])).save(&p).expect("png");
        let mut out = FrameData::default();
        image_file(&p, &FrameLimits::DEFAULT, &mut out).expect("decodes");
        assert_eq!((out.width, out.height, out.format), (40, 30, PixelFormat::Gray8));
        let small = FrameLimits { max_width: 32, ..FrameLimits::DEFAULT };
        assert!(matches!(image_file(&p, &small, &mut out), Err(DecodeError::Limit(LimitError::Size { .. }))));
        let q = dir.path().join("big.png");
        std::fs::write(&q, vec![0u8; 4096]).expect("write");
        let tight = FrameLimits { max_bytes: 1024, ..FrameLimits::DEFAULT };
        assert!(matches!(image_file(&q, &tight, &mut out), Err(DecodeError::Limit(LimitError::Bytes { .. }))));
    }
}
