//! `ganomalyd cameras`: the V4L2 cameras on this machine and the GenICam
//! cameras Aravis's discovery finds, to write a `source = { kind = "v4l2", ... }`
//! or `{ kind = "genicam", camera = "..." }` table from.

use std::process::ExitCode;

pub fn run() -> anyhow::Result<ExitCode> {
    // Either list may fail alone (no V4L2 subsystem in a container, no
    // aravis-tools-cli): say why and show the other.
    match crate::capture::v4l2::list_cameras() {
        Ok(cams) if cams.is_empty() => eprintln!("no V4L2 cameras found"),
        Ok(cams) => cams.iter().for_each(|c| println!("{c}")),
        Err(e) => eprintln!("V4L2: {e}"),
    }
    match crate::capture::genicam::discover() {
        Ok(cams) if cams.is_empty() => eprintln!("no GenICam cameras found"),
        Ok(cams) => {
            for c in cams {
                println!("genicam\t{}\t{}\tsource = {{ kind = \"genicam\", camera = \"{}\" }}", c.id, c.address, c.id)
            }
        }
        Err(e) => eprintln!("GenICam: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}
