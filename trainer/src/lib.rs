//! `ganomaly-train`: GANomaly in libtorch (tch) — learns from images of good parts,
//! evaluates on defects, and exports the ONNX model (calibration inside) that
//! ganomalyd serves.
//!
//! # Layout
//! From the ground up; each module imports only modules above it in this list.
//! - [`ops`]: the libtorch calls tch's bindings cannot make (LeakyReLU with a
//!   slope, the fused Adam kernel), through a small C++ shim (`ops.cpp`).
//! - [`adam`]: torch's Adam, its moments kept here so they can be checkpointed.
//! - [`data`]: MVTec-style folders → tensors through core's preprocessing; the
//!   held-out calibration slice, the validation split, the data digest.
//! - [`augment`]: `--augment`, seeded flips, quarter turns and shifts of the
//!   training images (textures; off by default).
//! - [`feedback`]: the daemon's feedback folder merged into validation and calibration.
//! - [`features`]: the `mahalanobis` and `patch` scores' statistics (Ledoit–Wolf
//!   whitening of the encoder features: one Gaussian, or one per grid position).
//! - [`net`]: NetG/NetD built from `ganomaly_core::arch`'s layer lists; DCGAN init;
//!   weights to and from `ganomaly_core::Weights`; fitting the feature statistics.
//! - [`score`]: eval-mode scores, op for op what the ONNX graph computes.
//! - [`tiles`]: `--tile`: images cut into tiles (core's grid), each image scored as its hottest tile.
//! - [`evaluate`]: AUROC, F1, per-defect figures, histograms, ROC.
//! - [`score_choice`]: `--default-score` and `--score auto`'s rule; the quality
//!   benchmark's default and its evidence.
//! - [`patch_choice`]: `--patch-maps auto`, the patch score's layers chosen on the
//!   validation split.
//! - [`model`]: the two networks and their optimisers; the reference's training
//!   step, one epoch's pass, the weight average.
//! - [`checkpoint`]: per-epoch checkpoints and resume.
//! - [`select`]: which epoch's generator is exported (on held-out or validation
//!   images) and the learning-rate schedule.
//! - [`train`]: the epoch loop of a run.
//! - [`export`]: calibration + test figures + provenance → metadata → core's ONNX writer.
//! - [`candidates`]: measurement only: pixel AUROC of the maps where masks exist,
//!   other patch configurations and fusion recipes on one generator (`--candidates`).
//! - [`report`]: the JSON report, the table on stdout, PNG plots.
//! - [`cmd`]: the command line, one module per command (`datagen`, `train`,
//!   `eval`, `export`, `bench-step`).

// `unwrap` on outside data (image files, checkpoints) fails a training run
// with a panic instead of a message; tests may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod adam;
pub mod augment;
pub mod candidates;
pub mod checkpoint;
pub mod cmd;
pub mod data;
pub mod evaluate;
pub mod export;
pub mod features;
pub mod feedback;
#[cfg(test)]
mod fixtures;
pub mod model;
pub mod net;
pub mod ops;
pub mod patch_choice;
pub mod report;
pub mod score;
pub mod score_choice;
pub mod select;
pub mod tiles;
pub mod train;
