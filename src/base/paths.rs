//! Paths from the command line: made absolute against the working directory
//! once, so that what they mean does not depend on where they are used.

use std::path::{Path, PathBuf};

/// `p` made absolute against the working directory (as given when that fails).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The absolute directory of a config file: what its relative paths mean.
pub fn config_dir(config: &Path) -> PathBuf {
    absolute(config).parent().map(Path::to_path_buf).unwrap_or_default()
}
