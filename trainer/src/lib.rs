//! `ganomaly-train`: GANomaly in libtorch (tch) — learns from images of good parts,
//! evaluates on defects, and exports the ONNX model (calibration inside) that
//! ganomalyd serves.
//!
//! # Layout
//! - [`net`]: NetG/NetD built from `ganomaly_core::arch`'s layer lists; DCGAN init;
//!   weights to and from `ganomaly_core::Weights`.
//! - [`adam`]: torch's Adam, written out so its moments can be checkpointed.
//! - [`train`]: the reference's training step, epochs, checkpoints and resume.
//! - [`data`]: MVTec-style folders → tensors through core's preprocessing; the
//!   held-out calibration slice; the data digest.
//! - [`score`]: eval-mode scores, op for op what the ONNX graph computes.
//! - [`evaluate`]: AUROC, F1, per-defect figures, histograms, ROC.
//! - [`export`]: calibration + provenance → metadata → core's ONNX writer.
//! - [`report`]: PNG plots and the JSON report.
//! - [`select`]: which generator is exported (weight average, epoch chosen on
//!   held-out good images, learning-rate schedule) and `--score auto`.
//! - [`cli`]: the command line (`datagen`, `train`, `eval`, `export`).

pub mod adam;
pub mod cli;
pub mod data;
pub mod evaluate;
pub mod export;
pub mod net;
pub mod report;
pub mod score;
pub mod select;
pub mod train;
