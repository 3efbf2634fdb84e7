//! JPEG decoding as the capture path calls it (`capture::decode::jpeg`, with
//! a camera's limits): any input is a frame or an error, never a panic, and a
//! decoded frame is within the limits and exactly as large as its geometry.
#![no_main]

use ganomalyd_fuzz::capture::decode;
use ganomalyd_fuzz::capture::limits::FrameLimits;
use ganomalyd_fuzz::capture::FrameData;
use libfuzzer_sys::fuzz_target;

/// Small limits, so that the fuzzer explores headers rather than spending
/// its time decoding megapixels.
const LIMITS: FrameLimits = FrameLimits { max_width: 1024, max_height: 1024, max_bytes: 1 << 20 };

fuzz_target!(|data: &[u8]| {
    let mut out = FrameData::default();
    if decode::jpeg(data, &LIMITS, &mut out).is_ok() {
        assert!(out.width <= LIMITS.max_width && out.height <= LIMITS.max_height);
        let want = out.width as usize * out.height as usize * out.format.bytes_per_pixel();
        assert_eq!(out.data.len(), want);
    }
    let _ = decode::sof_dimensions(data);
});
