//! An RTSP camera in the test process: gst-rtsp-server serving `videotestsrc`
//! as H.264 or H.265 on 127.0.0.1, with what the tests need to break it
//! (stop and restart on the same port, basic authentication, a resolution
//! change, corrupt NAL units). Used by `tests/capture_gst.rs` and the RTSP bench.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use gst::glib;
use gst::prelude::*;
use gst_rtsp_server::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    H264,
    H265,
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub codec: Codec,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Basic authentication: the user and password the server accepts.
    pub auth: Option<(String, String)>,
    /// Corrupt every n-th encoded frame (0: none): the middle of its NAL
    /// units is overwritten, start codes kept.
    pub corrupt_every: u64,
    /// Corrupt the first n encoded frames as well (the key frame that carries
    /// the stream's parameters among them): a stream that starts damaged.
    pub corrupt_first: u64,
    /// One encoder for every client of the mount (the bench's 8 streams).
    pub shared: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            codec: Codec::H264,
            width: 64,
            height: 48,
            fps: 15,
            auth: None,
            corrupt_every: 0,
            corrupt_first: 0,
            shared: false,
        }
    }
}

/// A running server; `stop` and `start` keep its port.
pub struct RtspServer {
    pub port: u16,
    opts: ServerOptions,
    running: Option<(glib::MainLoop, JoinHandle<()>)>,
    /// The capsfilters that set the size, one per media made.
    sizes: Arc<Mutex<Vec<gst::Element>>>,
    /// Encoded frames corrupted so far.
    pub corrupted: Arc<AtomicU64>,
}

impl RtspServer {
    pub fn start_new(opts: ServerOptions) -> RtspServer {
        gst::init().expect("gst init");
        let mut s = RtspServer {
            port: 0,
            opts,
            running: None,
            sizes: Arc::new(Mutex::new(Vec::new())),
            corrupted: Arc::new(AtomicU64::new(0)),
        };
        s.start();
        s
    }

    /// `rtsp://[user:pw@]127.0.0.1:PORT/cam`.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((u, p)) => format!("rtsp://{u}:{p}@127.0.0.1:{}/cam", self.port),
            None => format!("rtsp://127.0.0.1:{}/cam", self.port),
        }
    }

    fn launch(&self) -> String {
        let o = &self.opts;
        let enc = match o.codec {
            // Key frames every second so a client that joins (or recovers) waits little.
            Codec::H264 => format!(
                "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={} ! video/x-h264,stream-format=byte-stream,profile=baseline ! identity name=corrupt ! rtph264pay name=pay0 pt=96 config-interval=-1",
                o.fps
            ),
            Codec::H265 => format!(
                "x265enc tune=zerolatency speed-preset=ultrafast key-int-max={} ! identity name=corrupt ! rtph265pay name=pay0 pt=96 config-interval=-1",
                o.fps
            ),
        };
        format!(
            "( videotestsrc is-live=true pattern=ball ! capsfilter name=size caps=video/x-raw,width={},height={},framerate={}/1 ! videoconvert ! video/x-raw,format=I420 ! {enc} )",
            o.width, o.height, o.fps
        )
    }

    /// Starts serving (again) on the port; the first start picks a free one.
    pub fn start(&mut self) {
        assert!(self.running.is_none(), "already running");
        let ctx = glib::MainContext::new();
        let server = gst_rtsp_server::RTSPServer::new();
        server.set_address("127.0.0.1");
        server.set_service(&self.port.to_string());
        let factory = gst_rtsp_server::RTSPMediaFactory::new();
        factory.set_launch(&self.launch());
        factory.set_shared(self.opts.shared);
        let sizes = self.sizes.clone();
        let corrupted = self.corrupted.clone();
        let every = self.opts.corrupt_every;
        let first = self.opts.corrupt_first;
        factory.connect_media_configure(move |_, media| {
            let Ok(bin) = media.element().downcast::<gst::Bin>() else { return };
            if let Some(size) = bin.by_name("size") {
                sizes.lock().expect("sizes").push(size);
            }
            if every > 0 || first > 0 {
                let pad = bin.by_name("corrupt").and_then(|e| e.static_pad("src")).expect("corrupt pad");
                let n = AtomicU64::new(0);
                let corrupted = corrupted.clone();
                pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                    let i = n.fetch_add(1, Ordering::Relaxed);
                    if i < first || (every > 0 && i % every == every - 1) {
                        if let Some(gst::PadProbeData::Buffer(buf)) = info.data.as_mut() {
                            corrupt(buf.make_mut());
                            corrupted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    gst::PadProbeReturn::Ok
                });
            }
        });
        if let Some((user, pw)) = &self.opts.auth {
            let auth = gst_rtsp_server::RTSPAuth::new();
            let token = gst_rtsp_server::RTSPToken::builder()
                .field(gst_rtsp_server::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
                .build();
            auth.add_basic(&gst_rtsp_server::RTSPAuth::make_basic(user, pw), &token);
            server.set_auth(Some(&auth));
            factory.add_role_from_structure(
                &gst::Structure::builder("user")
                    .field(gst_rtsp_server::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                    .field(gst_rtsp_server::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                    .build(),
            );
        }
        server.mount_points().expect("mount points").add_factory("/cam", factory);
        let source = server.attach(Some(&ctx)).expect("attach the RTSP server");
        self.port = u16::try_from(server.bound_port()).expect("port");
        let main_loop = glib::MainLoop::new(Some(&ctx), false);
        let ml = main_loop.clone();
        let handle = std::thread::Builder::new()
            .name("rtsp-server".into())
            .spawn(move || {
                ctx.with_thread_default(|| ml.run()).expect("main context");
                // Stopping: no new connections, and every client cut (their
                // sockets close, so the camera sees the server go away). The
                // source is on this context, not the default one.
                if let Some(s) = ctx.find_source_by_id(&source) {
                    s.destroy();
                }
                server.client_filter(Some(&mut |_, _| gst_rtsp_server::RTSPFilterResult::Remove));
                // Let the removals run (they are dispatched on this context).
                while ctx.iteration(false) {}
            })
            .expect("spawn");
        self.running = Some((main_loop, handle));
    }

    /// Stops serving: the listening socket and every client connection close.
    pub fn stop(&mut self) {
        if let Some((ml, handle)) = self.running.take() {
            ml.quit();
            handle.join().expect("server thread");
        }
        self.sizes.lock().expect("sizes").clear();
    }

    /// Changes the served resolution of every stream now playing.
    pub fn set_size(&self, width: u32, height: u32) {
        let caps = gst::Caps::builder("video/x-raw")
            .field("width", width as i32)
            .field("height", height as i32)
            .field("framerate", gst::Fraction::new(self.opts.fps as i32, 1))
            .build();
        for f in self.sizes.lock().expect("sizes").iter() {
            f.set_property("caps", &caps);
        }
    }

    pub fn streams_made(&self) -> usize {
        self.sizes.lock().expect("sizes").len()
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Breaks each NAL unit of an Annex B frame: the forbidden_zero_bit of its
/// header set, the rest of it noise that holds no start code. Parsers and
/// decoders see a unit that is there but does not decode.
fn corrupt(buf: &mut gst::BufferRef) {
    let Ok(mut map) = buf.map_writable() else { return };
    let data = map.as_mut_slice();
    let mut starts = Vec::new();
    for i in 0..data.len().saturating_sub(3) {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
        }
    }
    starts.push(data.len());
    for w in starts.windows(2) {
        let (s, e) = (w[0], w[1]);
        if s < e {
            data[s] |= 0x80;
        }
        for (k, b) in data.iter_mut().enumerate().take(e.saturating_sub(4)).skip(s + 8) {
            *b = 0x55 ^ (k as u8).wrapping_mul(31) | 0x80;
        }
    }
}
