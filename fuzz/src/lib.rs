//! The daemon's capture files that read what a camera sends, compiled as they
//! are (`#[path]`, in `base.rs` and `capture.rs`) into a crate the fuzz
//! targets link: the same code, without the rest of the daemon. The module
//! tree mirrors the daemon's, so the files' `super::` and `crate::base` paths
//! resolve unchanged.
#![allow(dead_code)]

pub mod base;
pub mod capture;
