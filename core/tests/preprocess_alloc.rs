//! Preprocessing allocates nothing frame- or tensor-sized per frame after
//! warm-up. A counting global allocator watches only the calling thread, so
//! the harness's own threads do not disturb the count.
//!
//! Not zero: fast_image_resize rebuilds its filter-coefficient tables on every
//! call (one small Vec per output column/row, ~2·S allocations, ~23 KB at
//! S = 64). We keep it anyway: it is 13× faster than the `resize` crate, which
//! caches its tables (100 µs vs 1.3 ms for a 400² RGB crop → 64², measured
//! side by side), and on 2 cores preprocessing time is taken from inference.

// A global allocator is an unsafe trait: this counting one only forwards to
// the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ganomaly_core::metadata::ColorMode;
use ganomaly_core::preprocess::{FrameRef, PixelLayout, Preprocessor, Roi};

struct Counting;

thread_local! {
    static WATCH: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: the thread-locals may be gone while a thread shuts down.
        let _ = WATCH.try_with(|w| {
            if w.get() {
                COUNT.with(|c| c.set(c.get() + 1));
                BYTES.with(|b| b.set(b.get() + layout.size()));
                LARGEST.with(|l| l.set(l.get().max(layout.size())));
            }
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn no_frame_sized_allocations_after_warm_up() {
    let (w, h) = (640u32, 480u32);
    let frame_bytes: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
    let frame = FrameRef { width: w, height: h, layout: PixelLayout::Rgb8, data: &frame_bytes };
    let roi = Some(Roi { x: 40, y: 20, width: 400, height: 400 });
    for (color, size) in [(ColorMode::Rgb, 64u32), (ColorMode::Gray, 128)] {
        let mut p = Preprocessor::new(color, size);
        let mut out = vec![0.0f32; p.tensor_len()];
        p.run(&frame, roi, &mut out).unwrap(); // warm-up: scratch and resizer buffers grow here
        COUNT.with(|c| c.set(0));
        BYTES.with(|b| b.set(0));
        LARGEST.with(|l| l.set(0));
        WATCH.with(|wt| wt.set(true));
        const FRAMES: usize = 50;
        for _ in 0..FRAMES {
            p.run(&frame, roi, &mut out).unwrap();
        }
        WATCH.with(|wt| wt.set(false));
        let (count, bytes, largest) = (COUNT.with(Cell::get), BYTES.with(Cell::get), LARGEST.with(Cell::get));
        eprintln!(
            "{color:?} {size}: {} allocations/frame, {} bytes/frame, largest {largest} B (tensor {} B, scratch {} B)",
            count / FRAMES,
            bytes / FRAMES,
            out.len() * 4,
            (size * size * 3) as usize
        );
        // What remains are fast_image_resize's per-call coefficient tables: about one
        // per output row and column. Nothing as large as the model-sized scratch
        // image or the tensor may be allocated per frame.
        assert!(count / FRAMES <= 2 * size as usize + 16, "{count} allocations in {FRAMES} frames");
        let scratch = (size * size * 3) as usize;
        assert!(
            largest < scratch,
            "an allocation of {largest} B per frame (scratch is {scratch} B): a buffer is not being reused"
        );
    }
}
