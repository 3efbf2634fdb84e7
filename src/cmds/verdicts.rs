//! `ganomalyd verdicts`: exports the inspection record (`record.rs`) as CSV,
//! JSON lines or a text table, filtered by time, camera and kind. It reads
//! the file the config names while the daemon writes it (WAL).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::config::{self, Probe};
use crate::record::{self, Query, Row};

/// `ganomalyd verdicts --config F [--since T] [--until T] [--camera C]… [--kind K] [--csv|--json]`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The daemon's config (where the record is: `[record] path`, or beside the outbox).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The record file itself, instead of the config's.
    #[arg(long, conflicts_with = "config")]
    pub record: Option<PathBuf>,
    /// From this time on: ms since the epoch, an RFC 3339 time (`2026-12-01T14:00:00Z`),
    /// or an age (`90s`, `30m`, `24h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Up to this time (same forms as `--since`).
    #[arg(long)]
    pub until: Option<String>,
    /// Only these cameras (repeat for several).
    #[arg(long)]
    pub camera: Vec<String>,
    /// Only verdicts or only alarms (default: both).
    #[arg(long, value_parser = ["verdict", "alarm"])]
    pub kind: Option<String>,
    /// CSV with a header row (the `payload` column is the JSON as published).
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VerdictsError {
    #[error("give --config FILE or --record FILE")]
    NoSource,
    #[error("the config has no record ([record] enabled = false)")]
    RecordOff,
    #[error("no record at {0} (the daemon writes it once it has a verdict or an alarm)")]
    Missing(PathBuf),
    #[error("--{flag}: `{value}` is not ms since the epoch, an RFC 3339 time or an age like 24h")]
    Time { flag: &'static str, value: String },
}

pub fn run(args: &Args) -> anyhow::Result<std::process::ExitCode> {
    let path = match (&args.record, &args.config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => config::load_with(c, Probe::Offline)?.record.ok_or(VerdictsError::RecordOff)?.path,
        (None, None) => return Err(VerdictsError::NoSource.into()),
    };
    if !path.exists() {
        return Err(VerdictsError::Missing(path).into());
    }
    let db = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open the record {}", path.display()))?;
    let now = crate::events::now_ms() as i64;
    let q = Query {
        since_ms: args.since.as_deref().map(|v| when(&db, v, now).ok_or(time_err("since", v))).transpose()?,
        until_ms: args.until.as_deref().map(|v| when(&db, v, now).ok_or(time_err("until", v))).transpose()?,
        cameras: args.camera.clone(),
        kind: args.kind.clone(),
    };
    let rows = record::select(&db, &q).with_context(|| format!("cannot read the record {}", path.display()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.csv {
        write_csv(&mut out, &rows)?;
    } else if args.json {
        for r in &rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    } else {
        for r in &rows {
            writeln!(
                out,
                "{:>13} {:<7} {:<12} {:<24} {:<7} score {:<8} {}",
                r.ts_ms,
                r.kind,
                r.camera,
                r.key,
                r.outcome,
                r.score.map_or("-".to_string(), |s| format!("{s:.4}")),
                r.reason.as_deref().unwrap_or("")
            )?;
        }
    }
    out.flush()?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn time_err(flag: &'static str, value: &str) -> VerdictsError {
    VerdictsError::Time { flag, value: value.to_string() }
}

/// The rows as CSV, one header row, the columns of [`Row`].
pub fn write_csv(out: impl Write, rows: &[Row]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}

/// A time given on the command line, as ms since the epoch. RFC 3339 is
/// parsed by SQLite's own date functions (no hand-written date parser).
fn when(db: &rusqlite::Connection, v: &str, now_ms: i64) -> Option<i64> {
    let v = v.trim();
    if let Ok(ms) = v.parse::<i64>() {
        return Some(ms);
    }
    let units = [("ms", 1i64), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)];
    for (suffix, ms) in units {
        if let Some(n) = v.strip_suffix(suffix).and_then(|n| n.parse::<i64>().ok()) {
            return now_ms.checked_sub(n.checked_mul(ms)?);
        }
    }
    db.query_row("SELECT CAST(ROUND(unixepoch(?1, 'subsec') * 1000) AS INTEGER)", [v], |r| r.get::<_, Option<i64>>(0))
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_ms_ages_or_rfc3339() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        assert_eq!(when(&db, "1700000000000", 0), Some(1_700_000_000_000));
        assert_eq!(when(&db, "24h", 100_000_000), Some(100_000_000 - 86_400_000));
        assert_eq!(when(&db, "90s", 100_000), Some(10_000));
        assert_eq!(when(&db, "2023-11-14T22:13:20Z", 0), Some(1_700_000_000_000));
        assert_eq!(when(&db, "2023-11-14T22:13:20.5+00:00", 0), Some(1_700_000_000_500));
        assert_eq!(when(&db, "yesterday", 0), None);
    }
}
