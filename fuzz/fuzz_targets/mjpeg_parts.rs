//! The MJPEG part reader (`capture::multipart`) over any byte stream, each
//! part then decoded as the http-mjpeg source does: parts never exceed the
//! limit, the reader ends (no endless loop on a finite stream), and nothing
//! panics.
#![no_main]

use ganomalyd_fuzz::capture::decode;
use ganomalyd_fuzz::capture::limits::FrameLimits;
use ganomalyd_fuzz::capture::multipart::{boundary_of, PartReader};
use ganomalyd_fuzz::capture::FrameData;
use libfuzzer_sys::fuzz_target;

const LIMITS: FrameLimits = FrameLimits { max_width: 1024, max_height: 1024, max_bytes: 64 << 10 };

fuzz_target!(|data: &[u8]| {
    // The first line may be a content type, as the HTTP header gives it.
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) if i < 200 => (&data[..i], &data[i + 1..]),
        _ => (&b""[..], data),
    };
    let boundary = std::str::from_utf8(head).ok().and_then(boundary_of).unwrap_or_else(|| "frame".to_string());
    let mut reader = PartReader::new(body, &boundary, None, LIMITS.max_bytes);
    let mut part = Vec::new();
    let mut frame = FrameData::default();
    // Each part consumes at least one byte of a finite stream.
    for _ in 0..=body.len() {
        match reader.next_part(&mut part) {
            Ok(true) => {
                assert!(part.len() <= LIMITS.max_bytes);
                let _ = decode::jpeg(&part, &LIMITS, &mut frame);
            }
            Ok(false) | Err(_) => return,
        }
    }
    panic!("the part reader did not end on a finite stream");
});
