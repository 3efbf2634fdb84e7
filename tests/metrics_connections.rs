//! `/metrics` against clients that hold sockets (issue 16.5): many idle
//! connections cost the daemon at most `max_connections` descriptors (the
//! rest are answered 503 and closed at once), the ones it holds are closed
//! after `header_timeout_s`, and a scrape is answered again once they are.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ganomalyd::config::MetricsSettings;
use ganomalyd::exporter::{self, Exporter};

/// What the server sent on `sock` until it closed it (or `within` passed).
fn read_until_closed(sock: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        sock.set_read_timeout(Some(left.min(Duration::from_millis(200)))).expect("timeout");
        match sock.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // A reset is a close too.
            Err(_) => return (got, true),
        }
    }
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let (body, _) = read_until_closed(&mut s, Duration::from_secs(5));
    Some(String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn idle_sockets_are_capped_and_closed_and_metrics_still_answers() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let cfg = MetricsSettings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stale_after: Duration::from_secs(10),
        max_connections: 8,
        header_timeout: Duration::from_secs(3),
    };
    let e = Exporter::start(exporter::bind(&cfg).expect("bind"), &cfg, rt.handle()).expect("start");
    let addr = e.addr;
    assert!(get(addr, "/metrics").is_some_and(|r| r.starts_with("HTTP/1.1 200")), "answers before");

    // 200 clients that connect and never send a byte. The descriptors this
    // process holds beyond theirs are the server's side of them.
    let fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    let before = fds();
    // Before the first connect: every held socket is closed at least 3 s after it.
    let t = Instant::now();
    let mut idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    // Refused connections are answered and closed at once; the cap's worth
    // stay until the header timeout (3 s). Without a cap the server would
    // hold all 200 until then.
    let server_side = || fds().saturating_sub(before + 200);
    while server_side() > cfg.max_connections {
        assert!(
            t.elapsed() < Duration::from_millis(2800),
            "the server holds {} sockets for 200 idle clients, cap {}",
            server_side(),
            cfg.max_connections
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut refused = 0;
    let mut held = 0;
    let mut closed_late = Duration::ZERO;
    for sock in &mut idle {
        let (got, closed) = read_until_closed(sock, Duration::from_secs(15));
        assert!(closed, "an idle socket was still open after 15 s (header timeout 3 s)");
        if got.starts_with(b"HTTP/1.1 503") {
            refused += 1;
        } else {
            assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
            held += 1;
            closed_late = closed_late.max(t.elapsed());
        }
    }
    assert_eq!(refused + held, 200);
    assert!(refused >= 200 - 2 * cfg.max_connections, "{refused} refused: the cap let the rest in");
    assert!(held > 0, "the cap's worth were served (and timed out), not refused");
    // The held ones were closed by the header timeout, not by the test's end.
    assert!(closed_late >= Duration::from_millis(2500), "{closed_late:?}");

    // With the idle ones gone, a scrape is answered.
    let r = get(addr, "/metrics").expect("connect");
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("ganomalyd_build_info"), "{r}");
    e.shutdown(rt.handle(), Duration::from_secs(2));
}

#[test]
fn a_client_sending_its_request_too_slowly_is_closed() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let cfg = MetricsSettings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stale_after: Duration::from_secs(10),
        max_connections: 4,
        header_timeout: Duration::from_secs(1),
    };
    let e = Exporter::start(exporter::bind(&cfg).expect("bind"), &cfg, rt.handle()).expect("start");
    let mut s = TcpStream::connect(e.addr).expect("connect");
    // A slow-loris head: a byte every 300 ms never completes within the timeout.
    let t = Instant::now();
    let mut closed = false;
    for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        s.set_read_timeout(Some(Duration::from_millis(1))).expect("timeout");
        let mut buf = [0u8; 64];
        if matches!(s.read(&mut buf), Ok(0)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "still open after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    e.shutdown(rt.handle(), Duration::from_secs(2));
}
