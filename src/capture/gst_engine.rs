//! GStreamer as the ingestion engine of the `rtsp`, `genicam` and `gstreamer`
//! sources: a pipeline that ends in an `appsink` named `ganomaly`, pulled on
//! the camera thread as RGB or gray frames with the pipeline's timestamps.
//!
//! Each kind (`rtsp.rs`, `genicam.rs`, `gstreamer.rs`) only says which
//! pipeline to build ([`PipelineSpec`]); this file runs it:
//! - the appsink's streaming thread hands samples to the camera thread through
//!   a queue of `SAMPLE_QUEUE`, **dropping the oldest** when the camera thread
//!   is behind (counted, and added to the camera's `dropped`), so a slow
//!   consumer never blocks the pipeline (a blocked RTSP pipeline loses packets
//!   and then decodes garbage);
//! - bus errors and end of stream become a lost camera (the camera thread
//!   reports it offline and reopens with its backoff), a decoder's warning a
//!   broken frame, a buffer flagged corrupt by the decoder a broken frame;
//! - no frame for `timeout` is a lost camera too (a wedged source);
//! - `open` waits for the first frame or the first error, so a wrong
//!   password or a feature the camera lacks is an open error with its reason
//!   (a decoder's warning before the first frame is a broken frame, and the
//!   wait goes on);
//! - the decoder that `decodebin` picked (hardware when present: it ranks
//!   nvv4l2decoder and vaapi above the software ones) is reported.
//!
//! Timestamps: the pipeline runs on a realtime system clock, so a buffer's
//! running time plus the pipeline's base time is the wall-clock time GStreamer
//! gave the frame (a live source stamps capture, RTSP arrival less latency).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use gst::prelude::*;
use gst_video::prelude::*;

use super::limits::FrameLimits;
use super::{CaptureError, FrameData, FrameSource, PixelFormat};

/// The appsink every pipeline ends in.
pub const APPSINK_NAME: &str = "ganomaly";

/// Samples waiting for the camera thread: two, like the camera's own queue;
/// more would only add latency (the camera thread copies a frame in well under
/// a frame interval).
const SAMPLE_QUEUE: usize = 2;

/// A decoded frame's geometry within the camera's `limits`, or why not
/// (checked from the caps, before a byte is copied). A raw frame is bounded
/// by its width and height; `max_bytes` bounds *encoded* frames (a JPEG part,
/// a file), so a 4K RGB frame (25 MB) is not refused by the 16 MiB default.
pub fn check_frame(width: u32, height: u32, limits: &FrameLimits) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("an empty {width}x{height} frame"));
    }
    limits.check_size(u64::from(width), u64::from(height)).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum GstError {
    #[error("GStreamer is not usable here: {0}")]
    Init(String),
    #[error("the pipeline does not parse: {0}")]
    Parse(String),
    #[error("the pipeline has no appsink named `{APPSINK_NAME}` (end it with `appsink name={APPSINK_NAME}`)")]
    NoAppsink,
    #[error("cannot set up the pipeline: {0}")]
    Setup(String),
}

/// Starts GStreamer once per process (later calls are free).
pub fn init() -> Result<(), GstError> {
    gst::init().map_err(|e| GstError::Init(e.to_string()))
}

/// Pushes a problem for each element this machine lacks, naming the Debian
/// package that ships it (`check-config` probes, so `run` does not fail on a
/// missing plugin).
pub fn require_elements(elements: &[(&str, &str)], field: &str, problems: &mut Vec<String>) {
    if let Err(e) = init() {
        problems.push(format!("{field}: {e}"));
        return;
    }
    for (name, package) in elements {
        if gst::ElementFactory::find(name).is_none() {
            problems
                .push(format!("{field}: the GStreamer element `{name}` is not installed (Debian package {package})"));
        }
    }
}

/// Sets properties on the parsed pipeline's elements (`rtspsrc`'s location
/// and credentials, `aravissrc`'s camera), so that no value is ever quoted
/// into a launch line and no secret is in the pipeline's description.
pub type Configure = Arc<dyn Fn(&gst::Pipeline) -> Result<(), String> + Send + Sync>;

/// What a source kind asks the engine to run.
#[derive(Clone)]
pub struct PipelineSpec {
    /// For logs and errors: the kind and what it reads, without credentials.
    pub label: String,
    /// A `gst-launch-1.0` line ending in `appsink name=ganomaly`; holds no secret.
    pub launch: String,
    pub configure: Option<Configure>,
    /// Formats the appsink is given when its caps are not set in `launch`:
    /// the first one the pipeline can produce is used.
    pub formats: Vec<PixelFormat>,
    /// Our own pipelines don't sync to the clock (a live source paces itself);
    /// a user's appsink keeps what the user wrote.
    pub set_sync_false: bool,
    /// No frame for this long (and before the first one, at open) is a lost camera.
    pub timeout: Duration,
    /// Turns a bus error into the reason shown (credentials, missing features).
    pub explain: fn(&BusFault) -> String,
    /// The camera's frame limits (`limits` in its table).
    pub limits: FrameLimits,
}

impl std::fmt::Debug for PipelineSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineSpec")
            .field("label", &self.label)
            .field("launch", &self.launch)
            .field("formats", &self.formats)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// An error message from the bus, as the kinds' `explain` reads it.
#[derive(Debug, Clone)]
pub struct BusFault {
    /// The element that posted it (`rtspsrc0`), when known.
    pub element: String,
    pub message: String,
    pub debug: String,
    /// `gst::ResourceError::NotAuthorized` and the like.
    pub resource: Option<gst::ResourceError>,
}

impl BusFault {
    /// The message and the element, without GStreamer's debug details (file
    /// and function names).
    pub fn plain(&self) -> String {
        if self.element.is_empty() {
            self.message.clone()
        } else {
            format!("{} ({})", self.message, self.element)
        }
    }
}

/// Whether `obj` is a video decoder element (by its factory's class).
fn is_video_decoder(obj: &gst::Object) -> bool {
    obj.downcast_ref::<gst::Element>()
        .and_then(|e| e.factory())
        .and_then(|f| {
            f.metadata(gst::ELEMENT_METADATA_KLASS.as_str()).map(|k| k.contains("Decoder") && k.contains("Video"))
        })
        .unwrap_or(false)
}

/// A bus fault shown as it is.
pub fn explain_plain(f: &BusFault) -> String {
    f.plain()
}

/// What the camera thread's wait for a frame ended with.
enum Got {
    Sample(gst::Sample),
    Broken(String),
    Lost(String),
}

enum BusEvent {
    Error(BusFault),
    /// A decoder's warning ("could not decode stream"): one broken frame.
    Warning(String),
    Eos,
}

/// A pipeline that is playing.
struct Running {
    pipeline: gst::Pipeline,
    samples: Receiver<gst::Sample>,
    events: Receiver<BusEvent>,
    /// The first sample, read by `open` to know the pipeline works.
    pending: Option<gst::Sample>,
}

/// How long the camera thread waits for a pipeline to stop. Stopping talks to
/// the camera: `aravissrc` stopping the acquisition of a GigE camera that is
/// gone blocks for about 12 s of control-channel retries (measured with the
/// fake camera), which would hold the offline report and a daemon stop.
const TEARDOWN_WAIT: Duration = Duration::from_secs(1);

impl Drop for Running {
    fn drop(&mut self) {
        // Null releases sockets, devices and threads, on a thread of its own
        // so that a camera that does not answer delays nothing; its result is
        // not actionable on the way out.
        let pipeline = self.pipeline.clone();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let spawned = std::thread::Builder::new().name("gst-teardown".into()).spawn(move || {
            let _ = pipeline.set_state(gst::State::Null);
            let _ = done_tx.send(());
        });
        match spawned {
            Ok(_) => {
                if done_rx.recv_timeout(TEARDOWN_WAIT).is_err() {
                    tracing::warn!(
                        wait_s = TEARDOWN_WAIT.as_secs_f64(),
                        "a GStreamer pipeline is slow to stop; left to stop on its own"
                    );
                }
            }
            Err(_) => {
                let _ = self.pipeline.set_state(gst::State::Null);
            }
        }
    }
}

/// A [`FrameSource`] that runs a GStreamer pipeline.
pub struct GstSource {
    spec: PipelineSpec,
    running: Option<Running>,
    /// The video decoder `decodebin` (or the user's pipeline) holds.
    decoder: Arc<Mutex<Option<String>>>,
    /// Samples the appsink's queue dropped, not yet reported.
    dropped: Arc<AtomicU64>,
    /// Frames missing from the stream (gaps in its timestamps, warnings
    /// before the first frame), not yet reported as broken frames.
    missing: Arc<AtomicU64>,
    last_ts_ms: Option<u64>,
    /// The caps of the last frame and what they mean: re-read only when the
    /// stream changes (a new resolution mid-stream).
    geometry: Option<(gst::Caps, gst_video::VideoInfo)>,
}

impl GstSource {
    pub fn new(spec: PipelineSpec) -> Self {
        GstSource {
            spec,
            running: None,
            decoder: Arc::new(Mutex::new(None)),
            dropped: Arc::new(AtomicU64::new(0)),
            missing: Arc::new(AtomicU64::new(0)),
            last_ts_ms: None,
            geometry: None,
        }
    }

    fn open_error(&self, reason: String) -> CaptureError {
        CaptureError::Open { source_name: self.spec.label.clone(), reason }
    }

    fn lost(&self, reason: String) -> CaptureError {
        CaptureError::Disconnected { source_name: self.spec.label.clone(), reason }
    }

    fn broken(&self, reason: String) -> CaptureError {
        CaptureError::BrokenFrame { source_name: self.spec.label.clone(), reason }
    }

    /// Parses and wires the pipeline, without starting it.
    fn build(&self) -> Result<(gst::Pipeline, Receiver<gst::Sample>, Receiver<BusEvent>), GstError> {
        init()?;
        let element = gst::parse::launch(&self.spec.launch).map_err(|e| GstError::Parse(e.to_string()))?;
        let pipeline = match element.downcast::<gst::Pipeline>() {
            Ok(p) => p,
            // A single element parses as itself: no appsink then.
            Err(_) => return Err(GstError::NoAppsink),
        };
        let sink = pipeline
            .by_name(APPSINK_NAME)
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or(GstError::NoAppsink)?;
        if let Some(configure) = &self.spec.configure {
            configure(&pipeline).map_err(GstError::Setup)?;
        }
        let clock: gst::SystemClock =
            gst::glib::Object::builder().property("clock-type", gst::ClockType::Realtime).build();
        pipeline.use_clock(Some(&clock));

        if sink.caps().is_none() {
            let formats: Vec<&str> = self.spec.formats.iter().map(|f| gst_format(*f)).collect();
            let caps = gst::Caps::builder("video/x-raw").field("format", gst::List::new(formats)).build();
            sink.set_caps(Some(&caps));
        }
        if self.spec.set_sync_false {
            sink.set_property("sync", false);
        }
        // The appsink's own queue stays short; ours (below) drops and counts.
        sink.set_max_buffers(1);
        sink.set_drop(false);

        let (sample_tx, sample_rx) = crossbeam_channel::bounded::<gst::Sample>(SAMPLE_QUEUE);
        let (event_tx, event_rx) = crossbeam_channel::bounded::<BusEvent>(64);
        let dropped = self.dropped.clone();
        let missing = self.missing.clone();
        let mut last_pts: Option<gst::ClockTime> = None;
        let drop_rx = sample_rx.clone();
        let eos_tx = event_tx.clone();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    // Counted here, before our queue: its drops are not gaps.
                    if let Some(pts) = sample.buffer().and_then(|b| b.pts()) {
                        let rate = sample
                            .caps()
                            .and_then(|c| c.structure(0))
                            .and_then(|s| s.get::<gst::Fraction>("framerate").ok())
                            .map(|f| (f.numer(), f.denom()));
                        missing.fetch_add(missing_frames(last_pts, pts, rate), Ordering::Relaxed);
                        last_pts = Some(pts);
                    }
                    push_drop_oldest(&sample_tx, &drop_rx, sample, &dropped);
                    Ok(gst::FlowSuccess::Ok)
                })
                .eos(move |_| {
                    let _ = eos_tx.try_send(BusEvent::Eos);
                })
                .build(),
        );

        let decoder = self.decoder.clone();
        pipeline.connect_deep_element_added(move |_, _, element| {
            if is_video_decoder(element.upcast_ref()) {
                let Some(factory) = element.factory() else { return };
                // A decode error is one broken frame, not the end of the
                // stream (GstVideoDecoder's max-errors; -1 = never fatal).
                if element.find_property("max-errors").is_some() {
                    element.set_property("max-errors", -1i32);
                }
                if let Ok(mut d) = decoder.lock() {
                    *d = Some(factory.name().to_string());
                }
            }
        });

        let bus = pipeline.bus().ok_or_else(|| GstError::Setup("the pipeline has no bus".into()))?;
        bus.set_sync_handler(move |_, msg| {
            let event = match msg.view() {
                gst::MessageView::Error(e) => {
                    let err = e.error();
                    Some(BusEvent::Error(BusFault {
                        element: msg.src().map(|s| s.name().to_string()).unwrap_or_default(),
                        message: err.message().to_string(),
                        debug: e.debug().map(|d| d.to_string()).unwrap_or_default(),
                        resource: err.kind::<gst::ResourceError>(),
                    }))
                }
                gst::MessageView::Warning(w) if w.error().kind::<gst::StreamError>().is_some() => {
                    Some(BusEvent::Warning(w.error().message().to_string()))
                }
                // A decoder that drops a frame it could not decode says so
                // only in a QoS message (its decode errors are debug logs
                // while max-errors is -1).
                gst::MessageView::Qos(_) if msg.src().is_some_and(is_video_decoder) => {
                    Some(BusEvent::Warning("the decoder dropped a frame it could not decode".into()))
                }
                gst::MessageView::Eos(_) => Some(BusEvent::Eos),
                _ => None,
            };
            if let Some(event) = event {
                // Full only if nobody reads: then the first events said enough.
                let _ = event_tx.try_send(event);
            }
            gst::BusSyncReply::Drop
        });
        Ok((pipeline, sample_rx, event_rx))
    }

    /// Waits for the first frame; fails on the first bus error, the end of
    /// the stream, or `timeout` without a frame. A decoder's warning before
    /// the first frame is a broken frame (counted with the missing ones), not
    /// a failed open: a camera whose stream starts with a damaged unit, or
    /// whose first frames a loaded decoder drops, is up. It still names the
    /// warning if no frame follows.
    fn wait_first(&self, running: &mut Running) -> Result<(), String> {
        let deadline = std::time::Instant::now() + self.spec.timeout;
        let mut warned: Option<String> = None;
        loop {
            // Samples before events, as in `next_frame`.
            if let Ok(sample) = running.samples.try_recv() {
                running.pending = Some(sample);
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            crossbeam_channel::select! {
                recv(running.samples) -> s => return match s {
                    Ok(sample) => { running.pending = Some(sample); Ok(()) }
                    Err(_) => Err("the pipeline stopped".into()),
                },
                recv(running.events) -> e => match e {
                    Ok(BusEvent::Warning(w)) => {
                        self.missing.fetch_add(1, Ordering::Relaxed);
                        warned = Some(w);
                    }
                    Ok(BusEvent::Error(f)) => return Err((self.spec.explain)(&f)),
                    Ok(BusEvent::Eos) => return Err("the stream ended before its first frame".into()),
                    Err(_) => return Err("the pipeline stopped".into()),
                },
                default(left) => {
                    let secs = self.spec.timeout.as_secs_f64();
                    return Err(match warned {
                        Some(w) => format!("no frame within {secs:.1} s: the stream does not decode: {w}"),
                        None => format!("no frame within {secs:.1} s"),
                    });
                }
            }
        }
    }

    /// Copies one sample into `out`; its wall-clock time into `last_ts_ms`.
    fn convert(&mut self, sample: &gst::Sample, out: &mut FrameData) -> Result<(), String> {
        let caps = sample.caps().ok_or("a sample without caps")?;
        let stale = self.geometry.as_ref().is_none_or(|(c, _)| c.as_ref() != caps);
        if stale {
            let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| format!("caps `{caps}`: {e}"))?;
            self.geometry = Some((caps.to_owned(), info));
        }
        let Some((_, info)) = self.geometry.as_ref() else { return Err("no caps".into()) };
        let format = match info.format() {
            gst_video::VideoFormat::Rgb => PixelFormat::Rgb8,
            gst_video::VideoFormat::Gray8 => PixelFormat::Gray8,
            other => {
                return Err(format!(
                    "the pipeline gives {other:?} frames; end it with `videoconvert ! appsink name={APPSINK_NAME}`"
                ))
            }
        };
        let (width, height) = (info.width(), info.height());
        check_frame(width, height, &self.spec.limits)?;
        let buffer = sample.buffer().ok_or("a sample without a buffer")?;
        if buffer.flags().contains(gst::BufferFlags::CORRUPTED) {
            return Err("the decoder flagged the frame corrupt".into());
        }
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, info)
            .map_err(|_| format!("a buffer too small for {width}x{height}"))?;
        let stride = frame.plane_stride()[0] as usize;
        let src = frame.plane_data(0).map_err(|e| e.to_string())?;
        let row = width as usize * format.bytes_per_pixel();
        let dst = out.reshape(width, height, format);
        for (y, d) in dst.chunks_exact_mut(row).enumerate() {
            let s = src.get(y * stride..y * stride + row).ok_or("a truncated frame")?;
            d.copy_from_slice(s);
        }
        self.last_ts_ms = self.wall_clock_ms(sample);
        Ok(())
    }

    /// Base time + running time of the buffer on the realtime clock.
    fn wall_clock_ms(&self, sample: &gst::Sample) -> Option<u64> {
        let pts = sample.buffer()?.pts()?;
        let segment = sample.segment()?.downcast_ref::<gst::ClockTime>()?;
        let running = segment.to_running_time(pts)?;
        let base = self.running.as_ref()?.pipeline.base_time()?;
        Some((base + running).mseconds())
    }
}

/// Frames missing between two timestamps of a stream at `rate` (n/d fps): a
/// frame the decoder could not decode, or that never arrived, leaves a gap
/// (decoders drop such frames with no message on the bus). Unknown or
/// variable rates (0/1) and backward steps count nothing.
pub fn missing_frames(prev: Option<gst::ClockTime>, pts: gst::ClockTime, rate: Option<(i32, i32)>) -> u64 {
    let (Some(prev), Some((n, d))) = (prev, rate) else { return 0 };
    if n <= 0 || d <= 0 || pts <= prev {
        return 0;
    }
    let interval_ns = 1e9 * f64::from(d) / f64::from(n);
    let frames = (pts - prev).nseconds() as f64 / interval_ns;
    // Jitter moves a timestamp by a fraction of a frame, not by half of one.
    (frames.round() as u64).saturating_sub(1)
}

/// Sends `sample`, dropping (and counting) the oldest queued one while full.
fn push_drop_oldest(
    tx: &Sender<gst::Sample>,
    rx: &Receiver<gst::Sample>,
    mut sample: gst::Sample,
    dropped: &AtomicU64,
) {
    loop {
        match tx.try_send(sample) {
            Ok(()) => return,
            Err(TrySendError::Full(s)) => {
                if rx.try_recv().is_ok() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                sample = s;
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// GStreamer's name of a pixel format.
pub fn gst_format(f: PixelFormat) -> &'static str {
    match f {
        PixelFormat::Rgb8 => "RGB",
        PixelFormat::Gray8 => "GRAY8",
    }
}

impl FrameSource for GstSource {
    fn describe(&self) -> String {
        self.spec.label.clone()
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        self.running = None;
        self.geometry = None;
        self.missing.store(0, Ordering::Relaxed);
        if let Ok(mut d) = self.decoder.lock() {
            *d = None;
        }
        let (pipeline, samples, events) = self.build().map_err(|e| self.open_error(e.to_string()))?;
        let mut running = Running { pipeline, samples, events, pending: None };
        if running.pipeline.set_state(gst::State::Playing).is_err() {
            // The reason is on the bus.
            let reason = match running.events.recv_timeout(Duration::from_millis(500)) {
                Ok(BusEvent::Error(f)) => (self.spec.explain)(&f),
                _ => "the pipeline does not start".to_string(),
            };
            return Err(self.open_error(reason));
        }
        match self.wait_first(&mut running) {
            Ok(()) => {
                self.running = Some(running);
                Ok(())
            }
            Err(reason) => Err(self.open_error(reason)),
        }
    }

    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        let timeout = self.spec.timeout;
        let explain = self.spec.explain;
        let got = match self.running.as_mut() {
            None => Got::Lost("not open".into()),
            // Samples before events: the end of a stream comes after its
            // last frames, and `select!` picks at random among ready channels.
            Some(running) => match running.pending.take().or_else(|| running.samples.try_recv().ok()) {
                Some(s) => Got::Sample(s),
                None => crossbeam_channel::select! {
                    recv(running.samples) -> s => match s {
                        Ok(s) => Got::Sample(s),
                        Err(_) => Got::Lost("the pipeline stopped".into()),
                    },
                    recv(running.events) -> e => match e {
                        Ok(BusEvent::Error(f)) => Got::Lost(explain(&f)),
                        Ok(BusEvent::Warning(w)) => Got::Broken(w),
                        Ok(BusEvent::Eos) => Got::Lost("end of stream".into()),
                        Err(_) => Got::Lost("the pipeline stopped".into()),
                    },
                    default(timeout) => Got::Lost(format!("no frame for {:.1} s", timeout.as_secs_f64())),
                },
            },
        };
        match got {
            Got::Sample(sample) => self.convert(&sample, out).map_err(|reason| self.broken(reason)),
            Got::Broken(reason) => Err(self.broken(reason)),
            Got::Lost(reason) => {
                self.running = None;
                Err(self.lost(reason))
            }
        }
    }

    fn close(&mut self) {
        self.running = None;
    }

    fn self_paced(&self) -> bool {
        true
    }

    fn decoder(&self) -> Option<String> {
        self.decoder.lock().ok().and_then(|d| d.clone())
    }

    fn take_dropped(&mut self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    fn take_missing(&mut self) -> u64 {
        self.missing.swap(0, Ordering::Relaxed)
    }

    fn timestamp_ms(&self) -> Option<u64> {
        self.last_ts_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(launch: &str) -> PipelineSpec {
        PipelineSpec {
            label: "test".into(),
            launch: launch.into(),
            configure: None,
            formats: vec![PixelFormat::Rgb8, PixelFormat::Gray8],
            set_sync_false: true,
            timeout: Duration::from_secs(5),
            explain: explain_plain,
            limits: FrameLimits::default(),
        }
    }

    /// A `Running` fed by the test through its channels (an idle pipeline).
    fn fed() -> (Running, Sender<gst::Sample>, Sender<BusEvent>) {
        gst::init().expect("gst init");
        let (stx, srx) = crossbeam_channel::bounded(4);
        let (etx, erx) = crossbeam_channel::bounded(4);
        (Running { pipeline: gst::Pipeline::new(), samples: srx, events: erx, pending: None }, stx, etx)
    }

    #[test]
    fn a_warning_before_the_first_frame_is_a_broken_frame_not_a_failed_open() {
        // A long timeout for the frame that follows the warning (a loaded box
        // may be slow to run the feeder); a short one where it must expire.
        let src = GstSource::new(spec(""));
        let (mut running, samples, events) = fed();
        events.send(BusEvent::Warning("Invalid input packet".into())).expect("send");
        let feeder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            samples.send(gst::Sample::builder().buffer(&gst::Buffer::new()).build()).expect("send");
            samples
        });
        src.wait_first(&mut running).expect("the frame after the warning opens the source");
        assert!(running.pending.is_some(), "the first frame is kept for next_frame");
        assert_eq!(src.missing.load(Ordering::Relaxed), 1, "the warning is one broken frame");
        drop(feeder.join());

        // Warnings and no frame: the timeout names the last warning.
        let src = GstSource::new(PipelineSpec { timeout: Duration::from_millis(300), ..spec("") });
        let (mut running, _samples, events) = fed();
        events.send(BusEvent::Warning("Invalid input packet".into())).expect("send");
        let e = src.wait_first(&mut running).expect_err("no frame");
        assert!(e.contains("no frame within 0.3 s") && e.contains("Invalid input packet"), "{e}");

        // An error still fails the open at once (long before the timeout), with its reason.
        let src = GstSource::new(PipelineSpec { timeout: Duration::from_secs(60), ..spec("") });
        let (mut running, _samples, events) = fed();
        let fault =
            BusFault { element: "src".into(), message: "Unauthorized".into(), debug: String::new(), resource: None };
        events.send(BusEvent::Error(fault)).expect("send");
        let t = std::time::Instant::now();
        let e = src.wait_first(&mut running).expect_err("an error");
        assert!(e.contains("Unauthorized") && !e.contains("no frame"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(30), "not after the timeout");
    }

    #[test]
    fn gaps_in_timestamps_are_missing_frames() {
        let ms = gst::ClockTime::from_mseconds;
        let fps15 = Some((15, 1));
        assert_eq!(missing_frames(None, ms(100), fps15), 0);
        assert_eq!(missing_frames(Some(ms(0)), ms(67), fps15), 0, "one interval");
        assert_eq!(missing_frames(Some(ms(0)), ms(90), fps15), 0, "jitter");
        assert_eq!(missing_frames(Some(ms(0)), ms(200), fps15), 2);
        assert_eq!(missing_frames(Some(ms(0)), ms(200), Some((0, 1))), 0, "variable rate");
        assert_eq!(missing_frames(Some(ms(0)), ms(200), None), 0);
        assert_eq!(missing_frames(Some(ms(300)), ms(200), fps15), 0, "backwards");
        assert_eq!(missing_frames(Some(ms(0)), ms(1001), Some((30000, 1001))), 29);
    }

    #[test]
    fn frame_limits() {
        let l = FrameLimits::default();
        assert!(check_frame(640, 480, &l).is_ok());
        assert!(
            check_frame(3840, 2160, &l).is_ok(),
            "4K RGB is 25 MB, over max_bytes, and fine: raw frames are bounded by size"
        );
        assert!(check_frame(0, 480, &l).unwrap_err().contains("empty"));
        assert!(check_frame(l.max_width + 1, 2, &l).is_err(), "wider than the limit");
        let small = FrameLimits { max_width: 320, ..l };
        assert!(check_frame(640, 480, &small).is_err(), "wider than the camera's own limit");
    }

    #[test]
    fn a_test_pattern_arrives_as_rgb_and_gray_with_timestamps() {
        let mut src = GstSource::new(spec(
            "videotestsrc is-live=true pattern=white ! video/x-raw,width=34,height=20,framerate=30/1 ! videoconvert ! appsink name=ganomaly",
        ));
        src.open().expect("open");
        let mut f = FrameData::default();
        src.next_frame(&mut f).expect("frame");
        assert_eq!((f.width, f.height, f.format, f.data.len()), (34, 20, PixelFormat::Rgb8, 34 * 20 * 3));
        // Rows are copied without the stride's padding (34·3 is not a multiple of 4).
        assert!(f.data.iter().all(|&v| v > 240), "white frame");
        let ts = src.timestamp_ms().expect("timestamp");
        let now = crate::events::now_ms();
        assert!(ts <= now + 1000 && now - ts < 10_000, "pipeline time {ts} vs wall clock {now}");
        src.close();

        let mut src = GstSource::new(PipelineSpec {
            formats: vec![PixelFormat::Gray8],
            ..spec("videotestsrc is-live=true ! video/x-raw,width=16,height=8 ! videoconvert ! appsink name=ganomaly")
        });
        src.open().expect("open gray");
        src.next_frame(&mut f).expect("gray frame");
        assert_eq!((f.format, f.data.len()), (PixelFormat::Gray8, 16 * 8));
    }

    #[test]
    fn end_of_stream_and_errors_are_a_lost_camera_and_bad_pipelines_are_named() {
        let mut src = GstSource::new(spec(
            "videotestsrc num-buffers=2 ! video/x-raw,width=8,height=8 ! videoconvert ! appsink name=ganomaly",
        ));
        src.open().expect("open");
        let mut f = FrameData::default();
        src.next_frame(&mut f).expect("frame 1");
        src.next_frame(&mut f).expect("frame 2");
        match src.next_frame(&mut f) {
            Err(CaptureError::Disconnected { reason, .. }) => assert!(reason.contains("end of stream"), "{reason}"),
            other => panic!("expected the end of the stream, got {other:?}"),
        }
        // Reopens.
        src.open().expect("reopen");
        src.next_frame(&mut f).expect("frame after reopen");

        let mut src = GstSource::new(spec("videotestsrc ! fakesink"));
        assert!(
            matches!(src.open(), Err(CaptureError::Open { reason, .. }) if reason.contains("appsink named `ganomaly`"))
        );
        let mut src = GstSource::new(spec("nosuchelement ! appsink name=ganomaly"));
        assert!(matches!(src.open(), Err(CaptureError::Open { reason, .. }) if reason.contains("nosuchelement")));
        // A source that fails at start: the element's own message.
        let mut src = GstSource::new(spec(
            "filesrc location=/nonexistent/x.mkv ! decodebin ! videoconvert ! appsink name=ganomaly",
        ));
        match src.open() {
            Err(CaptureError::Open { reason, .. }) => assert!(
                reason.contains("/nonexistent/x.mkv")
                    || reason.contains("not found")
                    || reason.contains("Could not open"),
                "{reason}"
            ),
            other => panic!("expected an open error, got {other:?}"),
        }
    }
}
