//! Test fixtures the trainer's unit tests share: a tiny architecture that
//! trains in milliseconds, and seeded random images for it.

use ganomaly_core::arch::ArchSpec;
use tch::{Device, Kind, Tensor};

use crate::net::seeded;

/// 16 px gray, 8 latent channels: a training step in milliseconds.
pub fn tiny() -> ArchSpec {
    ArchSpec { isize: 16, nc: 1, nz: 8, ngf: 8, ndf: 8, extralayers: 0, ..Default::default() }
}

/// `n` seeded random images in [-1, 1] of [`tiny`]'s shape.
pub fn data(n: i64) -> Tensor {
    seeded(99, || Tensor::rand([n, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0)
}
