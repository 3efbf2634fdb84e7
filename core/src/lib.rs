//! `ganomaly-core`: the pure-Rust heart of ganomalyd, shared by the daemon and
//! the trainer. No ONNX Runtime, libtorch or tokio here.
//!
//! # Layout
//! - [`arch`]: the GANomaly network as data (layers, parameter names/shapes).
//! - [`weights`]: plain f32 weights keyed by those names.
//! - [`onnx`]: ONNX protobuf messages (prost) and the graph writer/reader.
//! - [`metadata`]: the versioned model metadata inside the ONNX file.
//! - [`patch`]: the `patch` score's configuration (maps, grid, channels) and statistics.
//! - [`preprocess`]: the one frame → tensor function (trainer and daemon alike).
//! - [`tiles`]: a region cut into model-sized tiles, and their maps stitched back (daemon and trainer alike).
//! - [`calibrate`]: thresholds, normalized scores, AUROC and F1.
//! - [`synth`]: deterministic synthetic textures and defects, MVTec-style writer.
//! - [`reference`](mod@reference): a slow, obviously-correct forward pass used to test the graph.

// `unwrap` on outside data is a crash on a plant floor (STYLE.md); tests may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod arch;
pub mod calibrate;
pub mod metadata;
pub mod onnx;
pub mod patch;
pub mod preprocess;
pub mod reference;
pub mod synth;
pub mod tiles;
pub mod weights;

pub use arch::ArchSpec;
pub use metadata::{Calibration, ModelMetadata, ScoreKind};
pub use weights::Weights;
