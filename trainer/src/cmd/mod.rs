//! The command line (a stable interface: scripts and ops tooling call it): one
//! module per command, each with its `Args` and its `run`, and [`flags`] for the
//! flags that several commands share.

pub mod bench_step;
pub mod datagen;
pub mod eval;
pub mod export;
pub mod flags;
pub mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ganomaly-train", version, about = "Train, evaluate and export GANomaly models for ganomalyd")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// These doc comments are the CLI's help, which writes placeholders as <defect>;
// rustdoc would read those as HTML tags.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the project's synthetic MVTec-style dataset (train/good, test/good, test/<defect>).
    Datagen(datagen::Args),
    /// Train on DIR/train/good, evaluate on DIR/test, export MODEL.onnx with its calibration.
    Train(Box<train::Args>),
    /// Score DIR/test with an exported model: AUROC, best F1, per-defect AUROC, histograms.
    Eval(eval::Args),
    /// Export a checkpoint as ONNX with calibration and provenance.
    Export(export::Args),
    /// Time training steps on random data (for benches/train_speed.py); prints JSON.
    BenchStep(bench_step::Args),
}

impl Command {
    /// Runs the command. What it prints on stdout is its output (scripts parse
    /// `eval --json` and `bench-step`); progress and diagnostics go to the log.
    pub fn run(self) -> Result<()> {
        match self {
            Command::Datagen(a) => datagen::run(&a).map(drop),
            Command::Train(a) => train::run(&a).map(drop),
            Command::Eval(a) => eval::print(&eval::run(&a)?, a.json),
            Command::Export(a) => export::run(&a),
            Command::BenchStep(a) => bench_step::print(&bench_step::run(&a)?),
        }
    }
}
