//! The bdSeq state file: the birth/death sequence number of the last
//! connection, so that a restarted daemon's first session has a new one
//! (the host then never takes the old session's NDEATH for the new one's).
//!
//! One line, the number (0–255). Written before each CONNECT (temp file and
//! rename, so a crash leaves the old number or the new one, never half a
//! file). A file that cannot be read or written does not stop the edge node:
//! the number then counts in memory (logged once).

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct BdSeqFile {
    path: PathBuf,
    /// The bdSeq of the last CONNECT, None before the first ever.
    last: Option<u8>,
    warned: bool,
}

impl BdSeqFile {
    /// Reads the file (absent or unreadable: no connection made yet).
    pub fn open(path: &Path) -> BdSeqFile {
        let last = match std::fs::read_to_string(path) {
            Ok(s) => match s.trim().parse::<u8>() {
                Ok(n) => Some(n),
                Err(_) => {
                    tracing::warn!(path = %path.display(), "Sparkplug bdSeq file does not hold a number 0-255: starting from 0");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Sparkplug bdSeq file unreadable: starting from 0");
                None
            }
        };
        BdSeqFile { path: path.to_path_buf(), last, warned: false }
    }

    /// The bdSeq of the next CONNECT (0 first, then one more each time,
    /// 255 wrapping to 0), stored before it is used.
    pub fn next_connect(&mut self) -> u8 {
        let n = self.last.map_or(0, |l| l.wrapping_add(1));
        self.last = Some(n);
        if let Err(e) = self.store(n) {
            if !self.warned {
                self.warned = true;
                tracing::error!(path = %self.path.display(), error = %e, "Sparkplug bdSeq file not written: a restart reuses bdSeq numbers");
            }
        }
        n
    }

    fn store(&self, n: u8) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("bdseq.tmp");
        std::fs::write(&tmp, format!("{n}\n"))?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_on_across_restarts_and_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/spb.bdseq");
        let mut f = BdSeqFile::open(&p);
        assert_eq!((f.next_connect(), f.next_connect()), (0, 1));
        let mut again = BdSeqFile::open(&p);
        assert_eq!(again.next_connect(), 2, "a restart goes on from the last connection's number");
        std::fs::write(&p, "255\n").unwrap();
        assert_eq!(BdSeqFile::open(&p).next_connect(), 0);
        std::fs::write(&p, "garbage").unwrap();
        assert_eq!(BdSeqFile::open(&p).next_connect(), 0);
    }
}
