//! The durable alarm outbox: every alarm event is a row in a SQLite file
//! before it is published, and the row is deleted only when the broker has
//! acknowledged it (PUBACK). A broker outage or a daemon restart therefore
//! loses no alarm; row ids (AUTOINCREMENT, never reused) give the order.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("outbox directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("outbox: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("outbox: lock poisoned")]
    Poisoned,
}

/// One queued alarm.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub camera: String,
    /// The JSON payload exactly as it will be published.
    pub payload: Vec<u8>,
    pub created_ms: u64,
}

/// A bounded on-disk FIFO of alarm payloads. Cheap to share (`Arc`); the
/// connection sits behind a mutex held for single statements only.
#[derive(Debug)]
pub struct Outbox {
    conn: Mutex<Connection>,
    max_rows: u64,
    max_age: Duration,
    dropped: AtomicU64,
}

impl Outbox {
    /// Opens (creating if needed) the outbox file and drops rows already past
    /// `max_age`.
    pub fn open(path: &Path, max_rows: u64, max_age: Duration) -> Result<Outbox, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| OutboxError::Dir { path: dir.display().to_string(), source })?;
        }
        let open_err = |source| OutboxError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(open_err)?;
        // WAL + NORMAL: a commit survives a daemon crash without an fsync per
        // alarm (which on an SD card could stall the calling frame thread for
        // tens of ms); only a power cut can lose the last commits.
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS alarm_outbox (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 camera TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 created_ms INTEGER NOT NULL
             );",
        )
        .map_err(open_err)?;
        let outbox = Outbox { conn: Mutex::new(conn), max_rows: max_rows.max(1), max_age, dropped: AtomicU64::new(0) };
        outbox.prune_expired(crate::events::now_ms())?;
        Ok(outbox)
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, OutboxError> {
        self.conn.lock().map_err(|_| OutboxError::Poisoned)
    }

    /// Appends an alarm; returns its row id. Beyond `max_rows` the oldest rows
    /// are dropped (counted and logged): the newest alarms matter most.
    pub fn push(&self, camera: &str, payload: &[u8], now_ms: u64) -> Result<i64, OutboxError> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO alarm_outbox (camera, payload, created_ms) VALUES (?1, ?2, ?3)",
            params![camera, payload, now_ms as i64],
        )?;
        let id = conn.last_insert_rowid();
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM alarm_outbox", [], |r| r.get(0))?;
        let excess = n - self.max_rows as i64;
        if excess > 0 {
            let gone = conn.execute(
                "DELETE FROM alarm_outbox WHERE id IN (SELECT id FROM alarm_outbox ORDER BY id LIMIT ?1)",
                params![excess],
            )?;
            self.dropped.fetch_add(gone as u64, Ordering::Relaxed);
            tracing::warn!(
                dropped = gone,
                max_rows = self.max_rows,
                "alarm outbox full: oldest undelivered alarms dropped"
            );
        }
        Ok(id)
    }

    /// Up to `limit` rows with an id above `after`, oldest first.
    pub fn next_after(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT id, camera, payload, created_ms FROM alarm_outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(params![after, limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                camera: r.get(1)?,
                payload: r.get(2)?,
                created_ms: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The broker has the alarm: forget it. False if it was already gone
    /// (acked twice after a re-send, or dropped by the bounds).
    pub fn ack(&self, id: i64) -> Result<bool, OutboxError> {
        Ok(self.conn()?.execute("DELETE FROM alarm_outbox WHERE id = ?1", params![id])? > 0)
    }

    /// Drops rows older than `max_age` (counted and logged); returns how many.
    pub fn prune_expired(&self, now_ms: u64) -> Result<u64, OutboxError> {
        let cutoff = now_ms.saturating_sub(self.max_age.as_millis() as u64) as i64;
        let gone = self.conn()?.execute("DELETE FROM alarm_outbox WHERE created_ms < ?1", params![cutoff])? as u64;
        if gone > 0 {
            self.dropped.fetch_add(gone, Ordering::Relaxed);
            tracing::warn!(
                dropped = gone,
                max_age_s = self.max_age.as_secs(),
                "undelivered alarms older than the outbox's max age dropped"
            );
        }
        Ok(gone)
    }

    /// Rows waiting for an acknowledgement.
    pub fn len(&self) -> Result<u64, OutboxError> {
        Ok(self.conn()?.query_row("SELECT COUNT(*) FROM alarm_outbox", [], |r| r.get::<_, i64>(0))? as u64)
    }

    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self
            .conn()?
            .query_row("SELECT id FROM alarm_outbox LIMIT 1", [], |r| r.get::<_, i64>(0))
            .optional()?
            .is_none())
    }

    /// Alarms dropped undelivered by the size and age bounds since open.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_survives_reopen_and_ack_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/outbox.sqlite");
        let now = crate::events::now_ms();
        let ids: Vec<i64> = {
            let ob = Outbox::open(&path, 100, Duration::from_secs(3600)).unwrap();
            (0..5).map(|i| ob.push("cam", format!("{{\"n\":{i}}}").as_bytes(), now).unwrap()).collect()
        };
        let ob = Outbox::open(&path, 100, Duration::from_secs(3600)).unwrap();
        assert_eq!(ob.len().unwrap(), 5);
        let rows = ob.next_after(0, 3).unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), ids[..3]);
        assert_eq!(rows[1].payload, b"{\"n\":1}");
        assert!(ob.ack(ids[0]).unwrap());
        assert!(!ob.ack(ids[0]).unwrap(), "second ack of the same row");
        assert_eq!(ob.next_after(ids[2], 10).unwrap().len(), 2);
        // Ids are never reused, so order holds across deletes.
        for &id in &ids[1..] {
            ob.ack(id).unwrap();
        }
        assert!(ob.is_empty().unwrap());
        let next = ob.push("cam", b"{}", now).unwrap();
        assert!(next > ids[4]);
    }

    #[test]
    fn bounds_drop_oldest_and_expired_and_count_them() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("o.sqlite"), 3, Duration::from_secs(60)).unwrap();
        let now = crate::events::now_ms();
        let ids: Vec<i64> = (0..5).map(|_| ob.push("cam", b"{}", now).unwrap()).collect();
        assert_eq!(ob.next_after(0, 10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), ids[2..]);
        assert_eq!(ob.dropped(), 2);
        ob.push("cam", b"{}", now - 120_000).unwrap(); // over max rows too: drops ids[2]
        assert_eq!(ob.dropped(), 3);
        assert_eq!(ob.prune_expired(now).unwrap(), 1);
        assert_eq!(ob.dropped(), 4);
        assert_eq!(ob.len().unwrap(), 2);
    }
}
