//! HTTP plumbing that the metrics endpoint and the console share: the
//! bounded accept loop (hyper's header read timeout and a connection cap,
//! which `axum::serve` exposes neither of) and the answer to
//! `POST /api/cmd/<camera>/<name>` through the command intake.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use crate::commands::{Intake, Status};

/// A command is a small JSON object; anything larger is refused unread.
pub const COMMAND_BODY_LIMIT: usize = 64 * 1024;

/// What a client may hold of an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// The answer to a connection over the cap, written without reading.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\
Retry-After: 5\r\nConnection: close\r\n\r\ntoo many connections\n";

/// Accepts until `until`, each connection on its own task, within `limits`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    until: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, closed) = tokio::sync::watch::channel(false);
    tokio::pin!(until);
    loop {
        let accepted = tokio::select! {
            () = &mut until => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors (EMFILE) and the like: wait rather
                // than spin; the cap keeps this endpoint's own share bounded.
                tracing::warn!(error = %e, "HTTP endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(max = limits.max_connections, "HTTP endpoint: connection over the cap refused");
            // A fresh socket is not writable until the reactor says so: a
            // short task, at most a second, writes the 503 and closes.
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
            });
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut closed = closed.clone();
        let closing = async move {
            // The guard `wait_for` returns is not Send: dropped here.
            let _ = closed.wait_for(|c| *c).await;
        };
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP connection closed");
                    }
                }
                () = closing => {
                    // In-flight requests finish; idle keep-alives close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = closing.send(true);
}

/// How long an HTTP caller waits for a command's first answer: a trigger's
/// verdict comes within its deadline (seconds at most), long jobs answer
/// `accepted` at once.
const COMMAND_ANSWER: Duration = Duration::from_secs(10);

/// The answer to `POST /api/cmd/<camera>/<name>` (`-` for node commands)
/// as JSON; 200 accepted/done, 422 refused, 500 failed, 504 no answer in time.
pub async fn command_answer(
    intake: Option<Arc<Intake>>,
    camera: String,
    name: String,
    body: axum::body::Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let json = [(header::CONTENT_TYPE, "application/json")];
    let Some(intake) = intake else {
        let body = r#"{"status":"refused","reason":"the daemon is starting"}"#.to_string();
        return (StatusCode::SERVICE_UNAVAILABLE, json, body);
    };
    let answered = tokio::task::spawn_blocking(move || intake.from_http(&camera, &name, &body, COMMAND_ANSWER)).await;
    match answered {
        Ok(Some(ev)) => {
            let code = match ev.status {
                Status::Accepted | Status::Done | Status::Progress => StatusCode::OK,
                Status::Refused => StatusCode::UNPROCESSABLE_ENTITY,
                Status::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (code, json, serde_json::to_string(&ev).unwrap_or_default())
        }
        Ok(None) => {
            let body = r#"{"status":"failed","reason":"no answer in time"}"#.to_string();
            (StatusCode::GATEWAY_TIMEOUT, json, body)
        }
        Err(_) => {
            let body = r#"{"status":"failed","reason":"command handling failed"}"#.to_string();
            (StatusCode::INTERNAL_SERVER_ERROR, json, body)
        }
    }
}
