//! Tiled cameras with the real ONNX Runtime and the bundled demo model
//! (brushed metal, 64 px): a 256×256 part is a mosaic of 16 good 64 px images
//! from the model's own training distribution, one per tile, and a defect is
//! painted into one of them. Nothing here asserts a speed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ganomaly_core::preprocess::{FrameRef, PixelLayout, Preprocessor};
use ganomaly_core::synth::{self, Defect, Texture};
use ganomaly_core::tiles::Tiling;
use ganomaly_core::ScoreKind;
use ganomalyd::events::{AlarmKind, Recorder};
use ganomalyd::infer::{BatchOutput, Model};
use ganomalyd::pipeline::{Pipeline, StartOptions};

mod support;

const SIDE: u32 = 256;
const TILE: u32 = 64;
/// The tile the defect goes into: row 1, column 2 of the 4 × 4 grid.
const HOT: usize = 6;

fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx")
}

/// The 4 × 4 mosaic of good 64 px brushed-metal images (variant `v`), with a
/// hole pasted into tile [`HOT`] when `defect`.
fn part(v: u64, defect: bool) -> image::RgbImage {
    let mut img = image::RgbImage::new(SIDE, SIDE);
    for t in 0..16u64 {
        let tile = if defect && t as usize == HOT {
            synth::defective(Texture::BrushedMetal, Defect::Hole, 1.0, TILE, 0, 7).0
        } else {
            synth::good(Texture::BrushedMetal, TILE, 0, v * 16 + t)
        };
        let (x, y) = ((t % 4) as u32 * TILE, (t / 4) as u32 * TILE);
        image::imageops::replace(&mut img, &tile, i64::from(x), i64::from(y));
    }
    img
}

/// (frame score, hottest tile, stitched map and its side) of `img` tiled, and its whole-frame score.
fn score(model: &mut Model, img: &image::RgbImage, kind: ScoreKind) -> ((f32, usize), Vec<f32>, usize, f32) {
    let mut pre = Preprocessor::from_meta(&model.meta.preprocess);
    let frame = FrameRef { width: SIDE, height: SIDE, layout: PixelLayout::Rgb8, data: img.as_raw() };
    let (mut cache, mut tensor, mut out) = (None, Vec::new(), BatchOutput::default());
    let grid = ganomalyd::tiles::prepare(&mut pre, &frame, None, Tiling::abutting(TILE), &mut cache, &mut tensor)
        .expect("tiles preprocess");
    assert_eq!((grid.cols, grid.rows), (4, 4));
    model.run(&tensor, grid.len(), &mut out).expect("one batch of every tile");
    let tiled = ganomalyd::tiles::frame_score(&out, kind, 0, grid.len()).expect("a score");
    let mut map = Vec::new();
    let side = ganomalyd::tiles::stitch_map(&out, kind, 0, &grid, model.side(), &mut map);
    let mut whole = vec![0.0; pre.tensor_len()];
    pre.run(&frame, None, &mut whole).expect("whole frame");
    model.run(&whole, 1, &mut out).expect("run");
    (tiled, map, side, out.score(kind, 0).expect("score"))
}

#[test]
fn a_frame_run_in_chunks_of_max_batch_scores_and_maps_as_one_run() {
    // The inference thread runs a frame of 16 tiles with `max_batch` 5 as
    // runs of 5, 5, 5 and 1: the outputs must be those of one run of 16.
    let mut model = Model::load(&demo_model(), &support::cpu()).expect("demo model loads");
    let mut pre = Preprocessor::from_meta(&model.meta.preprocess);
    let img = part(2, true);
    let frame = FrameRef { width: SIDE, height: SIDE, layout: PixelLayout::Rgb8, data: img.as_raw() };
    let (mut cache, mut tensor) = (None, Vec::new());
    let grid = ganomalyd::tiles::prepare(&mut pre, &frame, None, Tiling::abutting(TILE), &mut cache, &mut tensor)
        .expect("tiles preprocess");
    let (mut one, mut chunked) = (BatchOutput::default(), BatchOutput::default());
    model.run(&tensor, grid.len(), &mut one).expect("one run");
    // Stale outputs from a larger batch must not survive into the chunked result.
    let twice = [tensor.as_slice(), tensor.as_slice()].concat();
    model.run(&twice, 2 * grid.len(), &mut chunked).expect("a larger run");
    model.run_chunked(&tensor, grid.len(), 5, &mut chunked).expect("chunked run");
    assert_eq!(chunked.n, grid.len());
    let mut compared = 0;
    for kind in ScoreKind::ALL {
        for i in 0..=grid.len() {
            match (one.score(kind, i), chunked.score(kind, i)) {
                (Some(x), Some(y)) => {
                    assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{kind:?} tile {i}: {x} vs {y}");
                    compared += 1;
                }
                (None, None) => {}
                (x, y) => panic!("{kind:?} tile {i}: {x:?} in one run, {y:?} chunked"),
            }
        }
    }
    assert!(compared >= grid.len(), "at least one score compared per tile");
    assert_eq!(one.maps.len(), chunked.maps.len());
    assert!(one.maps.iter().zip(&chunked.maps).all(|(x, y)| (x - y).abs() <= 1e-5 * x.abs().max(1.0)), "maps");
}

#[test]
fn a_defect_in_one_tile_raises_the_frame_score_and_the_stitched_map_is_hot_in_that_tile() {
    let mut model = Model::load(&demo_model(), &support::cpu()).expect("demo model loads");
    let kind = ScoreKind::MapMax;
    let ((good, _), _, _, _) = score(&mut model, &part(1, false), kind);
    let ((bad, tile), map, side, _) = score(&mut model, &part(1, true), kind);
    assert!(bad > good * 1.5, "the defect tile must raise the frame's score: {good} → {bad}");
    assert_eq!(tile, HOT, "the frame's score is the defect tile's");
    // The stitched map covers the part (4 tiles of 64 map pixels per side);
    // its hottest pixel lies in the defect's tile.
    assert_eq!(side, 256);
    let (at, _) = map.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    let (x, y) = (at % side, at / side);
    let cell = side / 4;
    assert_eq!((y / cell) * 4 + x / cell, HOT, "hot spot at ({x}, {y}) of {side}");
}

#[test]
fn a_tiled_camera_scores_one_score_per_frame_and_snapshots_the_stitched_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    // 12 parts: 4 good, 4 with the defect, 4 good.
    for i in 0..12u64 {
        part(i % 3, (4..8).contains(&i)).save(frames.join(format!("{i:03}.png"))).unwrap();
    }
    // max_batch 5 < 16 tiles: every batch holds whole frames only.
    let body = format!(
        r#"
            [inference]
            providers = ["cpu"]
            max_batch = 5
            [pipeline]
            frame_queue = 16
            [snapshots]
            dir = "{snaps}"
            [defaults]
            model = "{model}"
            score = "map_max"
            fps = 0
            [cameras.part]
            source = {{ kind = "replay", path = "{frames}", loop = false }}
            [cameras.part.tiles]
            size = 64
            [cameras.part.alarm]
            min_frames = 2
            clear_frames = 2
            "#,
        snaps = dir.path().join("snaps").display(),
        model = demo_model().display(),
        frames = frames.display(),
    );
    let cfg = support::compile(dir.path(), &body);
    assert_eq!(cfg.cameras[0].tiles, Some(Tiling::abutting(64)));
    let rec = Recorder::default();
    let sources = BTreeMap::new();
    let p =
        Pipeline::start(&cfg, Arc::new(rec.clone()), StartOptions { sources, stats: false, ..StartOptions::default() })
            .expect("pipeline starts");
    support::wait_sources_done(&p, "source");
    let report = p.join();
    let cam = &report.cameras[0];
    assert_eq!((cam.decided, cam.broken), (12, 0), "frames, not tiles, are counted: {cam:?}");
    let scores = rec.scores();
    assert_eq!(scores.len(), 12, "one score per frame");
    let max_good = scores.iter().filter(|s| !(4..8).contains(&s.seq)).map(|s| s.raw_score).fold(0.0, f64::max);
    let min_bad = scores.iter().filter(|s| (4..8).contains(&s.seq)).map(|s| s.raw_score).fold(f64::MAX, f64::min);
    assert!(min_bad > max_good, "defect parts {min_bad} vs good {max_good}");
    let starts: Vec<_> = rec.alarms().into_iter().filter(|a| a.kind == AlarmKind::Start).collect();
    assert_eq!(starts.len(), 1, "{:#?}", rec.alarms());
    assert!((4..8).contains(&starts[0].seq));
    assert!(starts[0].snapshot.is_some(), "the alarm's snapshot carries the stitched map");
}

#[test]
fn the_score_command_scores_a_tiled_model_as_the_daemon_does() {
    // The demo model, marked as trained on 64 px tiles (what `train --tile 64`
    // records): `ganomalyd score` must then score an image as the max over
    // its tiles, not the whole image shrunk to 64 px.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut meta, weights) =
        ganomaly_core::onnx::read_model(&std::fs::read(demo_model()).expect("demo model")).expect("read");
    meta.tiling = Some(Tiling::abutting(TILE));
    let tiled = dir.path().join("tiled.onnx");
    std::fs::write(&tiled, ganomaly_core::onnx::write_model(&meta.arch.clone(), &weights, &meta).expect("write"))
        .expect("save");
    let (good, bad) = (dir.path().join("good.png"), dir.path().join("bad.png"));
    part(1, false).save(&good).unwrap();
    part(1, true).save(&bad).unwrap();
    let lines = |model: &Path| {
        let mut out = Vec::new();
        let failed =
            ganomalyd::cmds::score::score_images(model, &[good.clone(), bad.clone()], true, &support::cpu(), &mut out)
                .expect("score");
        assert_eq!(failed, 0);
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
            .collect::<Vec<_>>()
    };
    let kind = meta.default_score;
    let mut model = Model::load(&tiled, &support::cpu()).expect("tiled model loads");
    let tiled_lines = lines(&tiled);
    let whole_lines = lines(&demo_model());
    for (img, line, whole_line) in
        [(part(1, false), &tiled_lines[0], &whole_lines[0]), (part(1, true), &tiled_lines[1], &whole_lines[1])]
    {
        let ((frame, tile), _, _, whole) = score(&mut model, &img, kind);
        let raw = line["raw"].as_f64().expect("raw");
        assert!((raw - f64::from(frame)).abs() <= 1e-5 * raw.abs().max(1.0), "tiled: {raw} vs the daemon's {frame}");
        assert_eq!(line["tiles"], 16);
        assert_eq!(line["hottest_tile"], tile);
        // The untiled model: one input per image, no tile fields.
        let raw = whole_line["raw"].as_f64().expect("raw");
        assert!((raw - f64::from(whole)).abs() <= 1e-5 * raw.abs().max(1.0), "whole: {raw} vs {whole}");
        assert!(whole_line.get("tiles").is_none());
    }
    assert!(tiled_lines[1]["raw"].as_f64() > tiled_lines[0]["raw"].as_f64(), "the defect raises the tiled score");
    // An image smaller than one tile is an error for that image, not a stretched tile.
    let small = dir.path().join("small.png");
    image::imageops::crop_imm(&part(1, false), 0, 0, 48, 48).to_image().save(&small).unwrap();
    let mut out = Vec::new();
    let failed = ganomalyd::cmds::score::score_images(&tiled, &[small, good.clone()], false, &support::cpu(), &mut out)
        .expect("score");
    assert_eq!(failed, 1, "only the small image fails");
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("smaller than one tile") && text.contains("48x48"), "{text}");
}
