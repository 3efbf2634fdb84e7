//! `ganomalyd::base`, the part the capture files use.

#[path = "../../src/base/check.rs"]
pub mod check;
