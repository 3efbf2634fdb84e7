//! `ganomalyd cameras`: the V4L2 cameras on this machine and their formats,
//! to write a `source = { kind = "v4l2", ... }` table from.

use std::process::ExitCode;

pub fn run() -> anyhow::Result<ExitCode> {
    let cams = crate::capture::v4l2::list_cameras().map_err(anyhow::Error::msg)?;
    if cams.is_empty() {
        eprintln!("no V4L2 cameras found");
    }
    for c in cams {
        println!("{c}");
    }
    Ok(ExitCode::SUCCESS)
}
