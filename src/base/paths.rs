//! Paths from the command line: made absolute against the working directory
//! once, so that what they mean does not depend on where they are used; and
//! whether two folders overlap (a snapshot folder inside a replay folder).

use std::path::{Path, PathBuf};

/// `p` made absolute against the working directory (as given when that fails).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The absolute directory of a config file: what its relative paths mean.
pub fn config_dir(config: &Path) -> PathBuf {
    absolute(config).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `p` as the file system resolves it: the longest existing ancestor
/// canonicalized (symbolic links and `..` followed), the rest appended with
/// `.` and `..` folded lexically.
pub fn resolved(p: &Path) -> PathBuf {
    let p = absolute(p);
    let mut existing = p.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                match part {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::Normal(n) => out.push(n),
                    _ => {}
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return p.clone(),
        }
    }
}

/// True when `a` and `b` are the same folder or one holds the other.
pub fn overlap(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolved(a), resolved(b));
    a.starts_with(&b) || b.starts_with(&a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_sees_through_dots_and_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let frames = dir.path().join("frames");
        std::fs::create_dir(&frames).expect("mkdir");
        std::os::unix::fs::symlink(&frames, dir.path().join("link")).expect("symlink");
        assert!(overlap(&frames, &dir.path().join("link")));
        assert!(overlap(&frames.join("snaps/new"), &frames));
        assert!(overlap(dir.path(), &dir.path().join("x/../frames")));
        assert!(!overlap(&frames, &dir.path().join("snaps")));
        assert!(!overlap(&dir.path().join("frames2"), &frames), "a prefix of a name is not a parent");
    }
}
