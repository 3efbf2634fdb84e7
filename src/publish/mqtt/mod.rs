//! [`MqttPublisher`]: the pipeline's [`Publisher`](crate::events::Publisher)
//! on rumqttc.
//!
//! # Layout
//! - `publisher.rs`: the front end the pipeline's threads call
//!   ([`MqttPublisher`], [`PublisherHandle`], [`PublisherCounters`]).
//! - `handoff.rs`: the slots, outbox and counters between those threads and
//!   the sender task.
//! - `link.rs`: the link task, which owns rumqttc's event loop.
//! - `sender.rs`: the sender task, which turns what was handed over into
//!   publishes.
//! - `state.rs`: the I/O-free packet-id ↔ outbox-row bookkeeping the sender
//!   task keeps, tested without a network.
//!
//! # Two tasks
//! The *link* task owns rumqttc's event loop: it connects, forwards every
//! event, and after an error waits out the backoff before a fresh connection
//! (a new client and event loop each time, so nothing queued for a dead
//! connection leaks into the next one). The *sender* task owns everything
//! else: it turns the pipeline's calls into publishes, maps packet ids to
//! outbox rows, deletes a row on its PUBACK, and re-publishes the retained
//! state and every unacknowledged alarm after each (re)connect.
//!
//! The pipeline's threads never wait: scores go through a bounded channel
//! (`try_send`, drops counted), camera/alarm state, snapshots and stats are
//! last-value slots, and alarms are a SQLite insert (the outbox) and a wake-up.
//!
//! # Delivery
//! Alarm delivery is at least once: a row is deleted only on its PUBACK, so an
//! alarm whose PUBACK was lost to a disconnect is sent again. Consumers
//! de-duplicate on (`id`, `type`). Everything else is best effort: scores are
//! dropped while the broker is down, the last camera state, snapshot and stats
//! wait in their slots, and the retained state is re-published on every
//! reconnect.

mod handoff;
mod link;
mod publisher;
mod sender;
pub(crate) mod state;

pub use link::secure;
pub use publisher::{MqttPublisher, PublisherCounters, PublisherHandle};
