//! What the stages share without depending on one another: the retry
//! backoff (cameras and the MQTT link), a sleep that a shutdown cuts short,
//! the inference heartbeat (the watchdog and `/healthz` read it), and a
//! lower CPU priority for a shadow model's threads.

pub mod backoff;
pub mod check;
pub mod digest;
pub mod http;
pub mod liveness;
pub mod paths;
pub mod priority;
pub mod redact;
pub mod report;
pub mod stop;

pub use liveness::Liveness;
