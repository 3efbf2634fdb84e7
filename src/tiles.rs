//! Tiled cameras: a camera whose `[cameras.<name>.tiles]` is set (or whose
//! model was trained on tiles) scores its ROI as a grid of square tiles,
//! each resized to the model's input, instead of the whole ROI shrunk to it.
//! A 10-pixel scratch on a 1,280×960 part is 0.5 px at 64 px; on 128 px tiles
//! it is 5 px.
//!
//! How a frame travels:
//! - **preprocess** ([`prepare`]): the grid comes from `ganomaly_core::tiles`
//!   (the trainer's `--tile` cuts with the same function); every tile goes
//!   through the one preprocessing function into one buffer, tile after tile.
//!   The frame stays one [`Prepared`](crate::preprocess::Prepared) item.
//! - **inference**: a frame's tiles are one unit of the batch, never split
//!   across two batches. `max_batch` counts model inputs (tiles): frames join a
//!   batch while it holds fewer than `max_batch` inputs, so a batch holds at
//!   most `max_batch − 1 +` one frame's tiles, and a frame with more tiles
//!   than `max_batch` forms a batch alone. A batch runs in session runs of at
//!   most `max_batch` inputs (`Model::run_chunked`), and the queue into
//!   inference is bounded in inputs (`preprocess::ImageBudget`), so neither
//!   ONNX Runtime nor the queue is ever sized for a whole large grid.
//! - **decision** ([`frame_score`]): the frame's score is the maximum over its
//!   tiles (the hottest tile is recorded on the camera's counters); the alarm
//!   machine sees one score per frame, as for an untiled camera.
//! - **snapshot** ([`stitch_map`]): the tiles' anomaly maps are stitched over
//!   the ROI, the maximum where tiles overlap (as the score), only for frames
//!   whose map is used (an alarm event or a console live view).
//!
//! Metrics count frames, as for any camera; `tiles` counts the tiles scored.

use std::sync::Arc;

use ganomaly_core::preprocess::{FrameRef, PreprocessError, Preprocessor, Roi};
use ganomaly_core::tiles::{Grid, TileError, Tiling};
use ganomaly_core::ScoreKind;

use crate::infer::BatchOutput;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TilesError {
    #[error("cannot cut the region into tiles: {0}")]
    Grid(#[from] TileError),
    #[error("tile {tile} at {roi:?}: {source}")]
    Tile { tile: usize, roi: Roi, source: PreprocessError },
}

/// The grid of `region` (reused from `cache` when the region is the same as
/// last frame's: a camera's frames rarely change size).
pub fn grid_for(region: Roi, tiling: Tiling, cache: &mut Option<Arc<Grid>>) -> Result<Arc<Grid>, TileError> {
    if let Some(g) = cache.as_ref().filter(|g| g.region == region) {
        return Ok(g.clone());
    }
    let g = Arc::new(ganomaly_core::tiles::grid(region, tiling)?);
    *cache = Some(g.clone());
    Ok(g)
}

/// Preprocesses every tile of `frame`'s ROI (the whole frame without one)
/// into `tensor`, tile after tile (resized to hold them all); returns the grid.
pub fn prepare(
    pre: &mut Preprocessor,
    frame: &FrameRef<'_>,
    roi: Option<Roi>,
    tiling: Tiling,
    cache: &mut Option<Arc<Grid>>,
    tensor: &mut Vec<f32>,
) -> Result<Arc<Grid>, TilesError> {
    let region = roi.unwrap_or(Roi { x: 0, y: 0, width: frame.width, height: frame.height });
    let grid = grid_for(region, tiling, cache)?;
    let len = pre.tensor_len();
    tensor.resize(len * grid.len(), 0.0);
    for (i, (tile, out)) in grid.tiles.iter().zip(tensor.chunks_exact_mut(len)).enumerate() {
        pre.run(frame, Some(*tile), out).map_err(|source| TilesError::Tile { tile: i, roi: *tile, source })?;
    }
    Ok(grid)
}

/// A tiled frame's score from the batch: the maximum over its `n` tiles,
/// which start at image `first`, and that tile's index. A tile without a
/// score, or with a non-finite one, makes the frame's score non-finite (the
/// decision counts it broken, as an untiled frame with that score).
pub fn frame_score(out: &BatchOutput, kind: ScoreKind, first: usize, n: usize) -> Option<(f32, usize)> {
    ganomaly_core::tiles::max_tile((first..first + n).map(|i| out.score(kind, i).unwrap_or(f32::NAN)))
}

/// The frame's anomaly map stitched from its tiles' maps (the camera's
/// score's map, as for an untiled frame) into `buf`; returns its side (the
/// map is square over the ROI, as the snapshot overlay reads it).
pub fn stitch_map(
    out: &BatchOutput,
    kind: ScoreKind,
    first: usize,
    grid: &Grid,
    side: usize,
    buf: &mut Vec<f32>,
) -> usize {
    stitch_tile_maps(grid, out.maps(kind, first, grid.len(), side), side, buf)
}

/// [`stitch_map`] from the tiles' `side × side` maps laid back to back (however
/// they were computed); returns the stitched map's side, 0 (and an empty `buf`)
/// when `maps` does not hold one map per tile.
pub fn stitch_tile_maps(grid: &Grid, maps: &[f32], side: usize, buf: &mut Vec<f32>) -> usize {
    if maps.len() != grid.len() * side * side {
        buf.clear();
        return 0;
    }
    let out_side = grid.stitched_side(side);
    ganomaly_core::tiles::stitch(grid, maps, side, out_side, buf);
    out_side
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile_str;
    use ganomaly_core::metadata::ColorMode;
    use ganomaly_core::preprocess::PixelLayout;
    use std::path::Path;

    fn demo_model() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx")
    }

    fn config(camera: &str) -> String {
        format!(
            "[defaults]\nmodel = \"{}\"\nsource = {{ kind = \"synthetic\", size = 256 }}\n[cameras.a]\n{camera}\n",
            demo_model().display()
        )
    }

    fn problems(camera: &str) -> Vec<String> {
        match compile_str(&config(camera), Path::new("/")) {
            Ok(_) => Vec::new(),
            Err(crate::config::Error::Invalid(p)) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn tiles_compile_from_the_table_with_model_defaults() {
        let s = compile_str(&config(""), Path::new("/")).unwrap();
        assert_eq!(s.cameras[0].tiles, None, "an untiled model and no table: untiled");
        // Size defaults to the model's input (64), overlap to 0.
        let s = compile_str(&config("[cameras.a.tiles]"), Path::new("/")).unwrap();
        assert_eq!(s.cameras[0].tiles, Some(Tiling { size: 64, stride: 64 }));
        let s = compile_str(&config("[cameras.a.tiles]\nsize = 128\noverlap = 32"), Path::new("/")).unwrap();
        assert_eq!(s.cameras[0].tiles, Some(Tiling { size: 128, stride: 96 }));
        // A fraction of the tile.
        let s = compile_str(&config("[cameras.a.tiles]\nsize = 128\noverlap = 0.25"), Path::new("/")).unwrap();
        assert_eq!(s.cameras[0].tiles, Some(Tiling { size: 128, stride: 96 }));
        // The ROI is what is cut; a tile as large as it is allowed.
        let roi = "roi = { x = 0, y = 0, width = 100, height = 100 }\n[cameras.a.tiles]\nsize = 100";
        assert_eq!(compile_str(&config(roi), Path::new("/")).unwrap().cameras[0].tiles, Some(Tiling::abutting(100)));
        // Switched off: whole frames, whatever else the table says.
        let s = compile_str(&config("[cameras.a.tiles]\nenabled = false\nsize = 128"), Path::new("/")).unwrap();
        assert_eq!(s.cameras[0].tiles, None);
        let s = compile_str(&config("[cameras.a.tiles]\nenabled = true\nsize = 128"), Path::new("/")).unwrap();
        assert_eq!(s.cameras[0].tiles, Some(Tiling::abutting(128)));
        // A triggered camera can say so (tiles on it are refused).
        let p = problems("mode = \"triggered\"\n[cameras.a.tiles]\nenabled = false\nsize = 64");
        assert!(!p.iter().any(|p| p.starts_with("cameras.a.tiles")), "{p:#?}");
    }

    #[test]
    fn bad_tiles_are_named_by_field() {
        let cases = [
            ("[cameras.a.tiles]\nsize = 0", "cameras.a.tiles.size:"),
            ("[cameras.a.tiles]\nsize = 64\noverlap = 64", "cameras.a.tiles.overlap:"),
            ("[cameras.a.tiles]\nsize = 64\noverlap = 1.5", "cameras.a.tiles.overlap:"),
            ("[cameras.a.tiles]\nsize = 64\noverlap = -0.5", "cameras.a.tiles.overlap:"),
            // Larger than the 256 px frame, and than the ROI.
            ("[cameras.a.tiles]\nsize = 300", "cameras.a.tiles:"),
            ("roi = { x = 0, y = 0, width = 100, height = 50 }\n[cameras.a.tiles]\nsize = 64", "cameras.a.tiles:"),
            // 256 tiles of 1 px at stride 1 over 256×256 is 65,536 tiles.
            ("[cameras.a.tiles]\nsize = 2\noverlap = 1", "cameras.a.tiles:"),
            ("mode = \"triggered\"\n[cameras.a.tiles]\nsize = 64", "cameras.a.tiles:"),
            ("[cameras.a.tiles]\nsize = 64\nstride = 32", ""),
        ];
        for (camera, want) in cases {
            if want.is_empty() {
                // An unknown key is a parse error, not a compile problem.
                assert!(compile_str(&config(camera), Path::new("/")).is_err(), "{camera}");
                continue;
            }
            let p = problems(camera);
            assert!(p.iter().any(|p| p.starts_with(want)), "{camera}: want `{want}` in {p:#?}");
        }
        let p = problems("[cameras.a.tiles]\nsize = 300");
        assert!(p.iter().any(|p| p.contains("300 px tiles do not fit the 256x256")), "{p:#?}");
    }

    #[test]
    fn every_tile_is_preprocessed_in_place() {
        // 8×4 gray frame: left half 0, right half 255; 4 px tiles → two tensors, −1 then +1.
        let mut data = vec![0u8; 32];
        for y in 0..4 {
            for x in 4..8 {
                data[y * 8 + x] = 255;
            }
        }
        let frame = FrameRef { width: 8, height: 4, layout: PixelLayout::Gray8, data: &data };
        let mut pre = Preprocessor::new(ColorMode::Gray, 2);
        let (mut cache, mut tensor) = (None, Vec::new());
        let g = prepare(&mut pre, &frame, None, Tiling::abutting(4), &mut cache, &mut tensor).unwrap();
        assert_eq!((g.cols, g.rows), (2, 1));
        // Tile 0 dark, tile 1 bright. The resize filter reads a little past a tile's
        // edge, as for any ROI, so the columns at the shared edge lean toward the
        // neighbour; the outer columns are exact.
        assert_eq!(tensor.len(), 8);
        assert!(tensor[..4].iter().all(|&v| v < -0.5) && tensor[4..].iter().all(|&v| v > 0.5), "{tensor:?}");
        assert_eq!([tensor[0], tensor[2], tensor[5], tensor[7]], [-1.0, -1.0, 1.0, 1.0]);
        // The same region again: the cached grid.
        let again = prepare(&mut pre, &frame, None, Tiling::abutting(4), &mut cache, &mut tensor).unwrap();
        assert!(Arc::ptr_eq(&g, &again));
        // A ROI outside the frame is an error naming the tile, not a panic.
        let roi = Some(Roi { x: 6, y: 0, width: 4, height: 4 });
        assert!(matches!(
            prepare(&mut pre, &frame, roi, Tiling::abutting(4), &mut cache, &mut tensor),
            Err(TilesError::Tile { tile: 0, .. })
        ));
    }

    #[test]
    fn the_frame_takes_its_hottest_tile_and_the_map_is_stitched_from_the_tiles() {
        let kind = ScoreKind::Recon;
        let mut out = BatchOutput { n: 5, maps: vec![0.0; 5 * 4], ..Default::default() };
        // Image 0 is another camera's frame; images 1..5 are this frame's 2×2 grid.
        out.scores[ScoreKind::ALL.iter().position(|k| *k == kind).unwrap()] = vec![9.0, 0.1, 0.2, 0.8, 0.3];
        out.maps[3 * 4 + 3] = 5.0; // tile 2 (bottom-left), its map's bottom-right pixel
        assert_eq!(frame_score(&out, kind, 1, 4), Some((0.8, 2)));
        assert_eq!(frame_score(&out, ScoreKind::Latent, 1, 4).map(|(s, _)| s.is_nan()), Some(true));
        let grid = ganomaly_core::tiles::grid(Roi { x: 0, y: 0, width: 8, height: 8 }, Tiling::abutting(4)).unwrap();
        let mut buf = Vec::new();
        let side = stitch_map(&out, kind, 1, &grid, 2, &mut buf);
        assert_eq!(side, 4);
        // Tile 2 covers the bottom-left quarter: its map's bottom-right pixel is (1, 3).
        assert_eq!(buf[3 * 4 + 1], 5.0);
        assert_eq!(buf.iter().filter(|&&v| v != 0.0).count(), 1);
    }
}
