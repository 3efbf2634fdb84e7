//! `ganomalyd::capture`, the files that read what a camera sends.

#[path = "../../src/capture/decode.rs"]
pub mod decode;
#[path = "../../src/capture/frame.rs"]
pub mod frame;
#[path = "../../src/capture/limits.rs"]
pub mod limits;
#[path = "../../src/capture/multipart.rs"]
pub mod multipart;

pub use frame::{FrameData, PixelFormat};
