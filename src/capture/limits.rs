//! What one frame from a camera may cost: the largest width, height and
//! encoded size accepted, per camera (`limits = { ... }` in the camera's
//! table or in `[defaults]`), so that a corrupt, hostile or misconfigured
//! camera cannot make the daemon allocate what a frame header claims.
//!
//! Every source kind gets its camera's [`FrameLimits`] in
//! [`CameraContext`](super::CameraContext) and applies them before it
//! allocates: a JPEG's header is read and checked before its pixels are
//! decoded ([`super::decode`]), a multipart part's length before its body is
//! read, a raw buffer's geometry before it is copied. A frame over a limit is
//! a broken frame (counted, skipped), never a crash. [`fit_capacity`] lets a
//! buffer that grew for one huge frame shrink back.

use serde::{Deserialize, Serialize};

use crate::base::check::count_between;

/// `limits = { max_width = 4096, max_height = 4096, max_bytes = 16_777_216 }`;
/// unset fields inherit `[defaults].limits`, then the built-in defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsTable {
    pub max_width: Option<u32>,
    pub max_height: Option<u32>,
    /// Largest *encoded* frame (a JPEG part, an image file, a compressed
    /// buffer); raw frames are bounded by width × height.
    pub max_bytes: Option<u64>,
}

/// A camera's limits, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_bytes: usize,
}

/// A frame over its camera's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("a {width}x{height} frame is over the camera's limits ({max_width}x{max_height}; see `limits`)")]
    Size { width: u64, height: u64, max_width: u32, max_height: u32 },
    #[error("a {bytes}-byte frame is over the camera's limit of {max_bytes} bytes (`limits.max_bytes`)")]
    Bytes { bytes: u64, max_bytes: usize },
}

/// Largest side JPEG can express (and the most any limit may allow).
pub const MAX_SIDE: u32 = 65_535;
/// Most pixels a limit may allow: 2²⁷ (134 Mpx, 400 MB as RGB) is beyond
/// any camera on a line today and still fits a box's memory once.
pub const MAX_PIXELS: u64 = 1 << 27;
/// Largest `max_bytes` a limit may allow.
pub const MAX_BYTES: u64 = 256 << 20;

impl FrameLimits {
    /// 4096 × 4096 covers 4K UHD (3840 × 2160) and 12 Mpx machine-vision
    /// sensors (4024 × 3036) and costs 50 MB as RGB; 16 MiB holds a 4096²
    /// JPEG at high quality (5–8 MB). Larger sensors set their own.
    pub const DEFAULT: FrameLimits = FrameLimits { max_width: 4096, max_height: 4096, max_bytes: 16 << 20 };

    /// Whether a `width × height` frame may be allocated.
    pub fn check_size(&self, width: u64, height: u64) -> Result<(), LimitError> {
        if width > u64::from(self.max_width) || height > u64::from(self.max_height) {
            return Err(LimitError::Size { width, height, max_width: self.max_width, max_height: self.max_height });
        }
        Ok(())
    }

    /// Whether an encoded frame of `bytes` may be read.
    pub fn check_bytes(&self, bytes: u64) -> Result<(), LimitError> {
        if bytes > self.max_bytes as u64 {
            return Err(LimitError::Bytes { bytes, max_bytes: self.max_bytes });
        }
        Ok(())
    }
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits::DEFAULT
    }
}

impl LimitsTable {
    /// Range checks on the fields this table sets (`p`: its dotted path).
    pub fn check(&self, p: &str, problems: &mut Vec<String>) {
        for (key, v) in [("max_width", self.max_width), ("max_height", self.max_height)] {
            if let Some(v) = v {
                count_between(problems, &format!("{p}.{key}"), u64::from(v), 1, u64::from(MAX_SIDE));
            }
        }
        if let Some(b) = self.max_bytes {
            count_between(problems, &format!("{p}.max_bytes"), b, 1024, MAX_BYTES);
        }
    }

    /// `own` over `defaults` over [`FrameLimits::DEFAULT`], field by field;
    /// pushes a problem when the merged width × height allows too many pixels.
    pub fn merge(
        own: Option<&LimitsTable>,
        defaults: Option<&LimitsTable>,
        p: &str,
        problems: &mut Vec<String>,
    ) -> FrameLimits {
        let (o, d) = (own.copied().unwrap_or_default(), defaults.copied().unwrap_or_default());
        let base = FrameLimits::DEFAULT;
        let side = |v: Option<u32>, b: u32| v.unwrap_or(b).clamp(1, MAX_SIDE);
        let limits = FrameLimits {
            max_width: side(o.max_width.or(d.max_width), base.max_width),
            max_height: side(o.max_height.or(d.max_height), base.max_height),
            max_bytes: o.max_bytes.or(d.max_bytes).map_or(base.max_bytes, |b| b.clamp(1024, MAX_BYTES) as usize),
        };
        let pixels = u64::from(limits.max_width) * u64::from(limits.max_height);
        if pixels > MAX_PIXELS {
            problems.push(format!(
                "{p}: max_width × max_height = {}x{} allows {pixels} pixels per frame; at most {MAX_PIXELS} \
                 ({} MB as RGB) are accepted",
                limits.max_width,
                limits.max_height,
                MAX_PIXELS * 3 / 1_000_000
            ));
        }
        limits
    }
}

/// Keeps `buf`'s allocation when it is within twice what the current frame
/// needs (plus 1 MiB), so a steady stream never reallocates, and shrinks it
/// to `needed` otherwise: a buffer that grew for one huge frame gives the
/// memory back at the next normal one.
pub fn fit_capacity<T>(buf: &mut Vec<T>, needed: usize) {
    let slack = (1 << 20) / size_of::<T>().max(1);
    if buf.capacity() > needed.saturating_mul(2).saturating_add(slack) {
        buf.shrink_to(needed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camera_fields_override_defaults_field_by_field() {
        let mut p = Vec::new();
        let d = LimitsTable { max_width: Some(8000), max_height: Some(6000), max_bytes: None };
        let own = LimitsTable { max_width: Some(1920), ..Default::default() };
        let l = LimitsTable::merge(Some(&own), Some(&d), "cameras.a.limits", &mut p);
        assert_eq!(l, FrameLimits { max_width: 1920, max_height: 6000, max_bytes: 16 << 20 });
        assert_eq!(LimitsTable::merge(None, None, "x", &mut p), FrameLimits::DEFAULT);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn out_of_range_limits_are_named() {
        let mut p = Vec::new();
        LimitsTable { max_width: Some(0), max_height: Some(70_000), max_bytes: Some(1 << 40) }
            .check("defaults.limits", &mut p);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("defaults.limits.max_width: must be between 1 and 65535"), "{p:?}");
        assert!(p[1].starts_with("defaults.limits.max_height"), "{p:?}");
        assert!(p[2].starts_with("defaults.limits.max_bytes: must be between 1024 and 268435456"), "{p:?}");
        let mut p = Vec::new();
        let huge = LimitsTable { max_width: Some(60_000), max_height: Some(60_000), max_bytes: None };
        LimitsTable::merge(Some(&huge), None, "cameras.a.limits", &mut p);
        assert!(p.len() == 1 && p[0].starts_with("cameras.a.limits: max_width × max_height"), "{p:?}");
    }

    #[test]
    fn checks_compare_against_the_limits() {
        let l = FrameLimits { max_width: 640, max_height: 480, max_bytes: 2048 };
        assert!(l.check_size(640, 480).is_ok());
        assert!(matches!(l.check_size(641, 10), Err(LimitError::Size { width: 641, .. })));
        assert!(l.check_size(10, 65_535).is_err());
        assert!(l.check_bytes(2048).is_ok());
        assert_eq!(l.check_bytes(2049), Err(LimitError::Bytes { bytes: 2049, max_bytes: 2048 }));
    }

    #[test]
    fn a_buffer_grown_by_one_huge_frame_shrinks_at_the_next() {
        let mut buf: Vec<u8> = vec![0; 64 << 20];
        buf.clear();
        buf.resize(1000, 0);
        fit_capacity(&mut buf, 1000);
        assert!(buf.capacity() < 2 << 20, "capacity {}", buf.capacity());
        // Within the slack nothing moves: steady frames never reallocate.
        let mut steady: Vec<u8> = Vec::with_capacity(3 << 20);
        steady.resize(2 << 20, 0);
        let ptr = steady.as_ptr();
        fit_capacity(&mut steady, 2 << 20);
        assert_eq!((steady.as_ptr(), steady.capacity()), (ptr, 3 << 20));
    }
}
