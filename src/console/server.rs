//! The console's HTTP side: pages and assets embedded in the binary, the JSON
//! the pages read, the live view (long-polled JPEGs and MJPEG), history as
//! JSON and CSV, and the command buttons' `POST /api/cmd/...` (the intake's,
//! answered as on the metrics port). Every route sits behind [`authorized`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::Serialize;
use serde_json::json;

use super::config::Credential;
use super::live::{LiveFrame, LiveTaps};
use super::store::{AlarmRow, ConsolePublisher, Counters, Store};
use crate::base::http::COMMAND_BODY_LIMIT;
use crate::commands::Intake;
use crate::events::{Verdict, VerdictEvent};
use crate::metrics::CameraCounters;

/// What a camera's page shows beside its history.
#[derive(Debug, Clone, Serialize)]
pub struct CameraInfo {
    pub name: String,
    /// Normalised alarm thresholds from the config (0.5 is the calibrated one).
    pub threshold: f64,
    pub clear_threshold: f64,
    pub min_frames: u64,
    pub clear_frames: u64,
    pub model: String,
}

/// Everything the handlers read.
pub struct Shared {
    pub credential: Credential,
    /// The cameras of the start, in their order; their settings follow reloads.
    pub cameras: RwLock<Vec<CameraInfo>>,
    pub counters: Counters,
    pub store: Arc<Mutex<Store>>,
    pub live: Arc<LiveTaps>,
    pub latest: Vec<tokio::sync::watch::Receiver<Option<LiveFrame>>>,
    /// Per model file: its metadata as JSON, and its training report folder.
    pub models: Vec<(serde_json::Value, Option<PathBuf>)>,
    pub snapshot_dir: Option<PathBuf>,
    pub intake: OnceLock<Arc<Intake>>,
    pub publisher: Arc<ConsolePublisher>,
    /// Turns true at shutdown: live streams end so connections can close.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

type St = State<Arc<Shared>>;

/// The embedded pages and assets: plain files, nothing fetched from elsewhere.
const OVERVIEW: &str = include_str!("assets/overview.html");
const CAMERA: &str = include_str!("assets/camera.html");
const HISTORY: &str = include_str!("assets/history.html");
const MODEL: &str = include_str!("assets/model.html");
const JS: &str = include_str!("assets/console.js");
const CSS: &str = include_str!("assets/console.css");

/// Seconds of samples in an overview tile's sparkline.
const SPARKLINE_MS: u64 = 60_000;
/// How long a live-frame request waits for a frame newer than it has.
const LONG_POLL: Duration = Duration::from_secs(2);
/// MJPEG part boundary.
const BOUNDARY: &str = "ganomalydframe";

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| page(OVERVIEW)))
        .route("/camera/:name", get(|| page(CAMERA)))
        .route("/history", get(|| page(HISTORY)))
        .route("/model", get(|| page(MODEL)))
        .route("/assets/console.js", get(|| asset(JS, "text/javascript; charset=utf-8")))
        .route("/assets/console.css", get(|| asset(CSS, "text/css; charset=utf-8")))
        .route("/api/overview", get(overview))
        .route("/api/camera/:name", get(camera))
        .route("/api/live/:name/frame.jpg", get(live_frame))
        .route("/api/live/:name/stream.mjpg", get(live_stream))
        .route("/api/alarms", get(alarms_json))
        .route("/api/alarms.csv", get(alarms_csv))
        .route("/api/verdicts", get(verdicts_json))
        .route("/api/verdicts.csv", get(verdicts_csv))
        .route("/api/snapshot/:id", get(snapshot))
        .route("/api/events", get(events))
        .route("/api/model", get(model))
        .route("/api/model/:index/plot/:file", get(model_plot))
        .route("/api/cmd/:camera/:name", post(command))
        .layer(axum::extract::DefaultBodyLimit::max(COMMAND_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), auth))
        .with_state(shared)
}

/// Whether a request's `Authorization` header satisfies the credential.
/// A token is taken as `Bearer <token>`, or as a basic-auth password with
/// any user (what a browser's login prompt sends). Comparisons take the same
/// time whatever matches.
pub fn authorized(cred: &Credential, authorization: Option<&str>) -> bool {
    let basic = || {
        let b64 = authorization?.strip_prefix("Basic ")?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        text.split_once(':').map(|(u, p)| (u.to_string(), p.to_string()))
    };
    match cred {
        Credential::None => true,
        Credential::Token(t) => {
            let bearer = authorization.and_then(|a| a.strip_prefix("Bearer ")).map(str::trim);
            match (bearer, basic()) {
                (Some(b), _) => same(b.as_bytes(), t.expose().as_bytes()),
                (None, Some((_, p))) => same(p.as_bytes(), t.expose().as_bytes()),
                (None, None) => false,
            }
        }
        Credential::Basic { user, password } => match basic() {
            Some((u, p)) => same(u.as_bytes(), user.as_bytes()) & same(p.as_bytes(), password.expose().as_bytes()),
            None => false,
        },
    }
}

/// Byte equality in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): St, req: Request, next: Next) -> Response {
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if authorized(&s.credential, given) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"ganomalyd console\", charset=\"UTF-8\"")],
        "authentication required\n",
    )
        .into_response()
}

async fn page(html: &'static str) -> impl IntoResponse {
    asset(html, "text/html; charset=utf-8").await
}

async fn asset(body: &'static str, kind: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body)
}

fn json_response<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("{what}\n")).into_response()
}

fn camera_index(s: &Shared, name: &str) -> Option<usize> {
    infos(s).iter().position(|c| c.name == name)
}

fn infos(s: &Shared) -> std::sync::RwLockReadGuard<'_, Vec<CameraInfo>> {
    s.cameras.read().unwrap_or_else(|e| e.into_inner())
}

fn info(s: &Shared, i: usize) -> Option<CameraInfo> {
    infos(s).get(i).cloned()
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Store> {
    s.store.lock().unwrap_or_else(|e| e.into_inner())
}

/// A camera's live figures: the counters the stages keep, the store's fps.
fn camera_state(s: &Shared, store: &Store, info: &CameraInfo, i: usize) -> serde_json::Value {
    let c: Option<Arc<CameraCounters>> = s.counters.read().unwrap_or_else(|e| e.into_inner()).get(i).cloned().flatten();
    let h = store.cameras.get(i);
    let get = |f: fn(&CameraCounters) -> u64| c.as_deref().map(f).unwrap_or(0);
    json!({
        "name": info.name,
        "online": c.as_deref().is_some_and(|c| c.online.load(std::sync::atomic::Ordering::Relaxed)),
        "alarm": c.as_deref().is_some_and(|c| c.alarm_active.load(std::sync::atomic::Ordering::Relaxed)),
        "fps": h.map(|h| h.fps).unwrap_or(0.0),
        "decided": get(|c| CameraCounters::get(&c.decided)),
        "dropped": get(|c| CameraCounters::get(&c.dropped)),
        "broken": get(|c| CameraCounters::get(&c.broken)),
        "alarms_raised": get(|c| CameraCounters::get(&c.alarms_raised)),
        "score": c.as_deref().map(CameraCounters::last_score),
        "threshold": info.threshold,
        "clear_threshold": info.clear_threshold,
        "threshold_raw": h.and_then(|h| h.threshold_raw),
    })
}

async fn overview(State(s): St) -> Response {
    let store = lock(&s);
    let infos = infos(&s).clone();
    let cameras: Vec<serde_json::Value> = (infos.iter().enumerate())
        .map(|(i, info)| {
            let mut v = camera_state(&s, &store, info, i);
            let samples = &store.cameras[i].samples;
            let newest = samples.back().map(|x| x.ts).unwrap_or(0);
            let recent: Vec<_> = samples.iter().filter(|x| x.ts + SPARKLINE_MS >= newest).collect();
            v["samples"] = json!(recent);
            v
        })
        .collect();
    let body = json!({
        "cameras": cameras,
        "console": {
            "dropped": s.publisher.dropped.load(std::sync::atomic::Ordering::Relaxed),
            "live_skipped": s.live.skipped.load(std::sync::atomic::Ordering::Relaxed),
        },
    });
    drop(store);
    json_response(&body)
}

async fn camera(State(s): St, Path(name): Path<String>) -> Response {
    let Some((i, info)) = camera_index(&s, &name).and_then(|i| Some((i, info(&s, i)?))) else {
        return not_found("no such camera");
    };
    let store = lock(&s);
    let mut v = camera_state(&s, &store, &info, i);
    v["min_frames"] = json!(info.min_frames);
    v["clear_frames"] = json!(info.clear_frames);
    v["model"] = json!(info.model);
    v["samples"] = json!(store.cameras[i].samples);
    let alarms: Vec<serde_json::Value> =
        store.alarms.iter().rev().filter(|a| a.camera == name).take(50).map(|a| alarm_json(&store, a)).collect();
    v["alarms"] = json!(alarms);
    drop(store);
    json_response(&v)
}

fn alarm_json(store: &Store, a: &AlarmRow) -> serde_json::Value {
    let mut v = json!(a);
    v["has_snapshot"] = json!(a.snapshot.is_some() || store.has_snapshot(&a.id));
    v
}

/// The `after` query parameter: the newest frame number a poller has.
fn query(uri: &Uri) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

fn jpeg_response(f: &LiveFrame) -> Response {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for (k, v) in [("x-frame-n", f.n), ("x-frame-seq", f.seq), ("x-frame-ts", f.ts_ms)] {
        h.insert(k, HeaderValue::from(v));
    }
    (h, f.jpeg.clone()).into_response()
}

/// The latest live frame of a camera; with `after=N`, waits (up to
/// [`LONG_POLL`]) for a newer one than frame N, so a page that loops on it
/// gets frames at the tap's rate without polling in a hurry.
async fn live_frame(State(s): St, Path(name): Path<String>, uri: Uri) -> Response {
    let Some(i) = camera_index(&s, &name) else { return not_found("no such camera") };
    let after: u64 = query(&uri).get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    s.live.want(i);
    let mut rx = s.latest[i].clone();
    let fresh = |f: &Option<LiveFrame>| f.as_ref().is_some_and(|f| f.n > after);
    let _ = tokio::time::timeout(LONG_POLL, rx.wait_for(fresh)).await;
    let latest = rx.borrow().clone();
    match latest {
        Some(f) => jpeg_response(&f),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no frame yet (camera offline or starting)\n").into_response(),
    }
}

/// `multipart/x-mixed-replace` of a camera's live frames, for as long as the
/// client reads (or until the console stops).
async fn live_stream(State(s): St, Path(name): Path<String>) -> Response {
    let Some(i) = camera_index(&s, &name) else { return not_found("no such camera") };
    let state = (s.clone(), s.latest[i].clone(), s.stopping.clone(), 0u64);
    let stream = futures_util::stream::unfold(state, move |(s, mut rx, mut stopping, last)| async move {
        loop {
            if *stopping.borrow() {
                return None;
            }
            s.live.want(i);
            let fresh = |f: &Option<LiveFrame>| f.as_ref().is_some_and(|f| f.n > last);
            tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(fresh)) => {
                    if let Ok(Err(_)) = r {
                        return None;
                    }
                }
                _ = stopping.changed() => return None,
            }
            let frame = rx.borrow().clone();
            if let Some(f) = frame.filter(|f| f.n > last) {
                let head =
                    format!("--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", f.jpeg.len());
                let mut part = Vec::with_capacity(head.len() + f.jpeg.len() + 2);
                part.extend_from_slice(head.as_bytes());
                part.extend_from_slice(&f.jpeg);
                part.extend_from_slice(b"\r\n");
                let n = f.n;
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(part)), (s, rx, stopping, n)));
            }
        }
    });
    let kind = format!("multipart/x-mixed-replace; boundary={BOUNDARY}");
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-store".to_string())], Body::from_stream(stream))
        .into_response()
}

/// History filters: `camera`, `since` and `until` (ms since epoch),
/// `verdict` (verdicts only).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Filter {
    pub camera: Option<String>,
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub verdict: Option<String>,
}

impl Filter {
    pub fn from_query(q: &BTreeMap<String, String>) -> Filter {
        let nonempty = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
        Filter {
            camera: nonempty("camera"),
            since: nonempty("since").and_then(|v| v.parse().ok()),
            until: nonempty("until").and_then(|v| v.parse().ok()),
            verdict: nonempty("verdict"),
        }
    }

    fn time_ok(&self, ts: u64) -> bool {
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts <= u)
    }

    pub fn alarm(&self, a: &AlarmRow) -> bool {
        self.camera.as_ref().is_none_or(|c| *c == a.camera) && self.time_ok(a.start_ts)
    }

    pub fn verdict(&self, v: &VerdictEvent) -> bool {
        self.camera.as_ref().is_none_or(|c| *c == v.camera)
            && self.time_ok(v.ts)
            && self.verdict.as_ref().is_none_or(|want| *want == verdict_name(v.verdict))
    }
}

fn verdict_name(v: Verdict) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

async fn alarms_json(State(s): St, uri: Uri) -> Response {
    let f = Filter::from_query(&query(&uri));
    let store = lock(&s);
    let rows: Vec<serde_json::Value> =
        store.alarms.iter().rev().filter(|a| f.alarm(a)).map(|a| alarm_json(&store, a)).collect();
    drop(store);
    json_response(&rows)
}

async fn verdicts_json(State(s): St, uri: Uri) -> Response {
    let f = Filter::from_query(&query(&uri));
    let rows: Vec<VerdictEvent> = lock(&s).verdicts.iter().rev().filter(|v| f.verdict(v)).cloned().collect();
    json_response(&rows)
}

fn csv_response(name: &str, body: Result<Vec<u8>, csv::Error>) -> Response {
    match body {
        Ok(b) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}\"")),
            ],
            b,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("csv: {e}\n")).into_response(),
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

/// The alarms as CSV, newest first.
pub fn alarms_csv_body<'a>(rows: impl Iterator<Item = &'a AlarmRow>) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["id", "camera", "start_ts", "end_ts", "peak", "peak_raw", "frames", "snapshot", "reason"])?;
    for a in rows {
        let reason = a.reason.map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(String::from)));
        w.write_record([
            a.id.clone(),
            a.camera.clone(),
            a.start_ts.to_string(),
            opt(&a.end_ts),
            a.peak.to_string(),
            a.peak_raw.to_string(),
            a.frames.to_string(),
            opt(&a.snapshot),
            reason.flatten().unwrap_or_default(),
        ])?;
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

async fn alarms_csv(State(s): St, uri: Uri) -> Response {
    let f = Filter::from_query(&query(&uri));
    let store = lock(&s);
    let body = alarms_csv_body(store.alarms.iter().rev().filter(|a| f.alarm(a)));
    drop(store);
    csv_response("alarms.csv", body)
}

async fn verdicts_csv(State(s): St, uri: Uri) -> Response {
    let f = Filter::from_query(&query(&uri));
    let store = lock(&s);
    let body = (|| {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record([
            "camera",
            "part_id",
            "verdict",
            "seq",
            "ts",
            "latency_ms",
            "score",
            "raw_score",
            "threshold",
            "model_sha256",
            "reason",
        ])?;
        for v in store.verdicts.iter().rev().filter(|v| f.verdict(v)) {
            w.write_record([
                v.camera.clone(),
                v.part_id.clone(),
                verdict_name(v.verdict),
                v.seq.to_string(),
                v.ts.to_string(),
                v.latency_ms.to_string(),
                opt(&v.score),
                opt(&v.raw_score),
                opt(&v.threshold),
                opt(&v.model_sha256),
                opt(&v.reason),
            ])?;
        }
        w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
    })();
    drop(store);
    csv_response("verdicts.csv", body)
}

/// An alarm's snapshot: from memory, else the file the snapshot writer left
/// (named by the alarm's row, and only a name the daemon makes).
async fn snapshot(State(s): St, Path(id): Path<String>) -> Response {
    let (mem, file) = {
        let store = lock(&s);
        let file = store.alarms.iter().rev().find(|a| a.id == id).and_then(|a| a.snapshot.clone());
        (store.snapshot(&id), file)
    };
    let jpeg = [(header::CONTENT_TYPE, "image/jpeg")];
    if let Some(j) = mem {
        return (jpeg, j).into_response();
    }
    let (Some(dir), Some(name)) = (s.snapshot_dir.clone(), file.filter(|f| crate::snapshot::is_ours(f))) else {
        return not_found("no snapshot for this alarm");
    };
    match tokio::task::spawn_blocking(move || std::fs::read(dir.join(name))).await {
        Ok(Ok(bytes)) => (jpeg, bytes).into_response(),
        _ => not_found("the snapshot file is gone (retention)"),
    }
}

async fn events(State(s): St) -> Response {
    let rows: Vec<_> = lock(&s).events.iter().rev().cloned().collect();
    json_response(&rows)
}

async fn model(State(s): St) -> Response {
    let models: Vec<serde_json::Value> = s
        .models
        .iter()
        .enumerate()
        .map(|(i, (meta, report))| {
            let mut v = meta.clone();
            v["index"] = json!(i);
            v["plots"] = json!(report.as_ref().map(|d| plots(d)).unwrap_or_default());
            v
        })
        .collect();
    json_response(&models)
}

/// The PNG plots in a training report folder, by name.
fn plots(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| plot_name_ok(n)).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// A plain file name ending in `.png`: nothing that leaves the folder.
fn plot_name_ok(n: &str) -> bool {
    n.ends_with(".png") && !n.starts_with('.') && n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

async fn model_plot(State(s): St, Path((index, file)): Path<(usize, String)>) -> Response {
    let Some(dir) = s.models.get(index).and_then(|(_, d)| d.clone()) else { return not_found("no such model") };
    if !plot_name_ok(&file) {
        return not_found("no such plot");
    }
    match tokio::task::spawn_blocking(move || std::fs::read(dir.join(file))).await {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, "image/png")], bytes).into_response(),
        _ => not_found("no such plot"),
    }
}

async fn command(State(s): St, Path((camera, name)): Path<(String, String)>, body: Bytes) -> Response {
    crate::base::http::command_answer(s.intake.get().cloned(), camera, name, body).await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::config::Secret;

    fn basic(user: &str, pw: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")))
    }

    #[test]
    fn credentials_are_checked_as_configured() {
        assert!(authorized(&Credential::None, None));
        let token = Credential::Token(Secret::new("t0k"));
        assert!(!authorized(&token, None));
        assert!(authorized(&token, Some("Bearer t0k")));
        assert!(!authorized(&token, Some("Bearer t0kk")));
        assert!(authorized(&token, Some(&basic("anyone", "t0k"))), "a browser's prompt");
        assert!(!authorized(&token, Some(&basic("t0k", "x"))));
        let b = Credential::Basic { user: "op".into(), password: Secret::new("pw:with:colons") };
        assert!(authorized(&b, Some(&basic("op", "pw:with:colons"))));
        assert!(!authorized(&b, Some(&basic("OP", "pw:with:colons"))));
        assert!(!authorized(&b, Some("Bearer pw:with:colons")));
        assert!(!authorized(&b, Some("Basic not-base64!")));
    }

    fn row(id: &str, camera: &str, start_ts: u64) -> AlarmRow {
        AlarmRow {
            id: id.into(),
            camera: camera.into(),
            start_ts,
            end_ts: Some(start_ts + 5),
            peak: 0.75,
            peak_raw: 3.5,
            frames: 4,
            snapshot: None,
            reason: Some(crate::events::EndReason::Cleared),
        }
    }

    #[test]
    fn filters_and_csv() {
        let q: BTreeMap<String, String> = [("camera", "a"), ("since", "100"), ("until", ""), ("verdict", "ng")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let f = Filter::from_query(&q);
        assert_eq!(f, Filter { camera: Some("a".into()), since: Some(100), until: None, verdict: Some("ng".into()) });
        let rows = [row("a-1", "a", 50), row("a-2", "a", 150), row("b-1", "b", 150)];
        let kept: Vec<&str> = rows.iter().filter(|r| f.alarm(r)).map(|r| r.id.as_str()).collect();
        assert_eq!(kept, ["a-2"]);
        let csv = String::from_utf8(alarms_csv_body(rows.iter().filter(|r| f.alarm(r))).expect("csv")).expect("utf8");
        assert_eq!(
            csv,
            "id,camera,start_ts,end_ts,peak,peak_raw,frames,snapshot,reason\na-2,a,150,155,0.75,3.5,4,,cleared\n"
        );
    }

    #[test]
    fn plot_names_cannot_leave_the_folder() {
        assert!(plot_name_ok("hist_map_max.png"));
        for bad in ["../x.png", "a/b.png", ".hidden.png", "x.jpg", "x.png/.."] {
            assert!(!plot_name_ok(bad), "{bad}");
        }
    }
}
