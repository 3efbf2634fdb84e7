//! Tiles: a region of a frame cut into a grid of square tiles, each scored by
//! the model on its own, so that a small defect on a large part is seen at
//! (close to) the camera's resolution instead of being shrunk away with the
//! whole region.
//!
//! The daemon (`[cameras.<name>.tiles]`) and the trainer (`--tile`) both cut
//! with [`grid`], so a model is trained on the tiles it will score. A tiling is
//! a tile side and a stride in source pixels; tiles start every `stride`
//! pixels and the last tile of a row or column is moved back so that it ends
//! flush with the region's edge (it then overlaps its neighbour more): every
//! source pixel is in at least one tile and no tile reaches outside the region.
//!
//! [`stitch`] lays the tiles' anomaly maps back over the region, taking the
//! maximum where tiles overlap: the image score is the maximum over tiles too,
//! so the hottest spot of the stitched map is in the tile that scored highest.

use serde::{Deserialize, Serialize};

use crate::preprocess::Roi;

/// Most tiles one region may be cut into: every tile is one model input in the
/// frame's batch (4,096 px of 64 px tiles at stride 64 is 4,096 px wide).
pub const MAX_TILES: usize = 1024;

/// Largest side of a stitched map: enough for a few tiles' detail per overlay
/// pixel on any camera, bounded so one snapshot's map stays a few MB.
pub const MAX_STITCHED_SIDE: usize = 1024;

/// A tile side and the step between tiles, in source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiling {
    /// Side of one tile in source pixels (each tile is resized to the model's input).
    pub size: u32,
    /// Step between the origins of neighbouring tiles, 1 ≤ stride ≤ size
    /// (`size − stride` is the overlap).
    pub stride: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TileError {
    #[error("tile size must be ≥ 1")]
    ZeroSize,
    #[error("stride {stride} must be between 1 and the tile size {size} (overlap below the tile size)")]
    Stride { size: u32, stride: u32 },
    #[error("`{0}` is not SIZE or SIZE:STRIDE (source pixels, e.g. 128 or 128:96)")]
    Parse(String),
    #[error("{n} tiles of {size} px at stride {stride} over {width}x{height}: more than {max}")]
    TooMany { n: usize, size: u32, stride: u32, width: u32, height: u32, max: usize },
}

impl Tiling {
    /// Tiles side by side (no overlap).
    pub fn abutting(size: u32) -> Tiling {
        Tiling { size, stride: size }
    }

    pub fn check(&self) -> Result<(), TileError> {
        if self.size == 0 {
            return Err(TileError::ZeroSize);
        }
        if self.stride == 0 || self.stride > self.size {
            return Err(TileError::Stride { size: self.size, stride: self.stride });
        }
        Ok(())
    }

    /// `SIZE` or `SIZE:STRIDE` (the trainer's `--tile`), checked.
    pub fn parse(s: &str) -> Result<Tiling, TileError> {
        let bad = || TileError::Parse(s.to_string());
        let (size, stride) = match s.split_once(':') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let v = s.trim().parse().map_err(|_| bad())?;
                (v, v)
            }
        };
        let t = Tiling { size, stride };
        t.check()?;
        Ok(t)
    }

    /// Pixels shared by neighbouring tiles.
    pub fn overlap(&self) -> u32 {
        self.size.saturating_sub(self.stride)
    }

    /// `SIZE:STRIDE`, as [`parse`](Self::parse) reads it.
    pub fn label(&self) -> String {
        format!("{}:{}", self.size, self.stride)
    }
}

/// Tile origins along one axis of `len` pixels: `0, stride, 2·stride, …` while
/// the tile fits, then one flush with the end. A tile longer than the axis is
/// cut to it (one tile of `len`). Returns (origins, tile length on this axis).
pub fn axis(len: u32, size: u32, stride: u32) -> (Vec<u32>, u32) {
    let side = size.min(len);
    let stride = stride.max(1);
    let last = len - side;
    let mut v: Vec<u32> = (0..).map(|i: u32| i.saturating_mul(stride)).take_while(|&o| o < last).collect();
    v.push(last);
    (v, side)
}

/// The tiles of one region, in region coordinates (row-major: tile `r·cols + c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// The region cut (in frame pixels): tiles are relative to its corner.
    pub region: Roi,
    pub cols: usize,
    pub rows: usize,
    /// In frame pixels (the region's offset added): ready for the preprocessor's crop.
    pub tiles: Vec<Roi>,
}

impl Grid {
    pub fn len(&self) -> usize {
        self.tiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }

    /// Side of the square map [`stitch`] draws for tiles whose maps are
    /// `side × side`: about one map pixel per tile-map pixel along the region's
    /// longer axis, at most [`MAX_STITCHED_SIDE`].
    pub fn stitched_side(&self, side: usize) -> usize {
        (side * self.cols.max(self.rows)).clamp(1, MAX_STITCHED_SIDE.max(side))
    }
}

/// Cuts `region` by `tiling` ([`axis`] on each side). Errors only when the
/// tiling is invalid or the grid would hold more than [`MAX_TILES`] tiles.
pub fn grid(region: Roi, tiling: Tiling) -> Result<Grid, TileError> {
    tiling.check()?;
    let (xs, tw) = axis(region.width, tiling.size, tiling.stride);
    let (ys, th) = axis(region.height, tiling.size, tiling.stride);
    let n = xs.len() * ys.len();
    if n > MAX_TILES {
        return Err(TileError::TooMany {
            n,
            size: tiling.size,
            stride: tiling.stride,
            width: region.width,
            height: region.height,
            max: MAX_TILES,
        });
    }
    let mut tiles = Vec::with_capacity(n);
    for &y in &ys {
        for &x in &xs {
            tiles.push(Roi { x: region.x + x, y: region.y + y, width: tw, height: th });
        }
    }
    Ok(Grid { region, cols: xs.len(), rows: ys.len(), tiles })
}

/// How many tiles `tiling` cuts a `width × height` region into, without building them.
pub fn count(width: u32, height: u32, tiling: Tiling) -> usize {
    axis(width, tiling.size, tiling.stride).0.len() * axis(height, tiling.size, tiling.stride).0.len()
}

/// Stitches the tiles' anomaly maps (`maps`: tile after tile, each
/// `side × side` over its tile) into one `out_side × out_side` map over the
/// grid's region (resampled per axis, as the snapshot overlay reads it), the
/// **maximum** where tiles overlap. `out` is resized; missing maps (a short
/// `maps`) leave 0.
pub fn stitch(grid: &Grid, maps: &[f32], side: usize, out_side: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(out_side * out_side, f32::NEG_INFINITY);
    let r = grid.region;
    let px = side * side;
    if side == 0 || out_side == 0 || r.width == 0 || r.height == 0 {
        out.fill(0.0);
        return;
    }
    // Centre of output pixel `o` along an axis of `len` source pixels, in source pixels.
    let centre = |o: usize, len: u32| (o as f64 + 0.5) * f64::from(len) / out_side as f64;
    for (t, tile) in grid.tiles.iter().enumerate() {
        let Some(map) = maps.get(t * px..(t + 1) * px) else { break };
        let (tx, ty) = (f64::from(tile.x - r.x), f64::from(tile.y - r.y));
        let (tw, th) = (f64::from(tile.width), f64::from(tile.height));
        // Output pixels whose centres fall inside this tile.
        let span = |start: f64, len: f64, full: u32| {
            let lo = ((start * out_side as f64 / f64::from(full)) - 0.5).ceil().max(0.0) as usize;
            let hi = (((start + len) * out_side as f64 / f64::from(full)) - 0.5).ceil().max(0.0) as usize;
            lo..hi.min(out_side)
        };
        for oy in span(ty, th, r.height) {
            let sy = centre(oy, r.height) - ty;
            let my = ((sy / th * side as f64) as usize).min(side - 1);
            let row = &map[my * side..(my + 1) * side];
            for ox in span(tx, tw, r.width) {
                let sx = centre(ox, r.width) - tx;
                let mx = ((sx / tw * side as f64) as usize).min(side - 1);
                let o = &mut out[oy * out_side + ox];
                *o = o.max(row[mx]);
            }
        }
    }
    // Pixels no tile covered (the −∞ start) are cold; a broken tile's +∞ or NaN
    // stays as it is, so the map shows what the score saw.
    for v in out.iter_mut().filter(|v| **v == f32::NEG_INFINITY) {
        *v = 0.0;
    }
}

/// The frame's score from its tiles' scores: the maximum, and the tile that
/// has it. A non-finite tile score makes the frame's score that value (the
/// frame is broken, as an untiled frame with that score would be); `None`
/// when there are no scores.
pub fn max_tile(scores: impl IntoIterator<Item = f32>) -> Option<(f32, usize)> {
    let mut best: Option<(f32, usize)> = None;
    for (i, s) in scores.into_iter().enumerate() {
        if !s.is_finite() {
            return Some((s, i));
        }
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, i));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roi(x: u32, y: u32, width: u32, height: u32) -> Roi {
        Roi { x, y, width, height }
    }

    #[test]
    fn axis_ends_flush_with_the_edge() {
        // Exact multiple: 0, 64, 128, 192.
        assert_eq!(axis(256, 64, 64), (vec![0, 64, 128, 192], 64));
        // Not a multiple: the last tile moves back to end at 300.
        assert_eq!(axis(300, 64, 64), (vec![0, 64, 128, 192, 236], 64));
        // Overlap 16 (stride 48): 0, 48, …, 192, then flush at 200.
        assert_eq!(axis(264, 64, 48), (vec![0, 48, 96, 144, 192, 200], 64));
        // Tile as large as the axis: one; larger: cut to the axis.
        assert_eq!(axis(64, 64, 64), (vec![0], 64));
        assert_eq!(axis(40, 64, 64), (vec![0], 40));
    }

    #[test]
    fn grid_covers_the_region_and_stays_inside_it() {
        let region = roi(10, 20, 300, 130);
        for t in [Tiling::abutting(64), Tiling { size: 64, stride: 40 }, Tiling { size: 100, stride: 30 }] {
            let g = grid(region, t).unwrap();
            assert_eq!(g.len(), g.cols * g.rows);
            assert_eq!(g.len(), count(300, 130, t));
            let mut covered = vec![false; 300 * 130];
            for tile in &g.tiles {
                assert!(tile.x >= 10 && tile.y >= 20, "{tile:?}");
                assert!(tile.x + tile.width <= 310 && tile.y + tile.height <= 150, "{tile:?} outside");
                assert_eq!((tile.width, tile.height), (t.size.min(300), t.size.min(130)));
                for y in tile.y - 20..tile.y - 20 + tile.height {
                    for x in tile.x - 10..tile.x - 10 + tile.width {
                        covered[(y * 300 + x) as usize] = true;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c), "{t:?} leaves pixels uncovered");
        }
        // Row-major, the region's offset added.
        let g = grid(region, Tiling::abutting(64)).unwrap();
        assert_eq!((g.cols, g.rows), (5, 3));
        assert_eq!(g.tiles[0], roi(10, 20, 64, 64));
        assert_eq!(g.tiles[1], roi(74, 20, 64, 64));
        assert_eq!(g.tiles[4], roi(10 + 236, 20, 64, 64));
        assert_eq!(g.tiles[14], roi(10 + 236, 20 + 66, 64, 64));
    }

    #[test]
    fn bad_tilings_are_errors() {
        let r = roi(0, 0, 100, 100);
        assert_eq!(grid(r, Tiling { size: 0, stride: 0 }), Err(TileError::ZeroSize));
        assert_eq!(grid(r, Tiling { size: 10, stride: 0 }), Err(TileError::Stride { size: 10, stride: 0 }));
        assert_eq!(grid(r, Tiling { size: 10, stride: 11 }), Err(TileError::Stride { size: 10, stride: 11 }));
        assert!(matches!(grid(roi(0, 0, 4096, 4096), Tiling::abutting(8)), Err(TileError::TooMany { .. })));
        assert_eq!(Tiling::parse("128"), Ok(Tiling { size: 128, stride: 128 }));
        assert_eq!(Tiling::parse("128:96"), Ok(Tiling { size: 128, stride: 96 }));
        assert!(matches!(Tiling::parse("128:"), Err(TileError::Parse(_))));
        assert!(matches!(Tiling::parse("64:65"), Err(TileError::Stride { .. })));
        assert_eq!(Tiling { size: 128, stride: 96 }.overlap(), 32);
    }

    #[test]
    fn stitched_map_puts_each_tile_in_place_and_takes_the_max_on_overlaps() {
        // A 4×2 region in two 2×2 tiles abutting, maps 1×1 (side 1): left 1, right 5.
        let g = grid(roi(0, 0, 4, 2), Tiling::abutting(2)).unwrap();
        let mut out = Vec::new();
        stitch(&g, &[1.0, 5.0], 1, 4, &mut out);
        assert_eq!(out, [1.0, 1.0, 5.0, 5.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0, 5.0, 5.0]);
        // Overlapping: 3 tiles of 2 over 4 px at stride 1; the middle column is
        // in tiles 0 and 1 (and 1 and 2): the larger value wins.
        let g = grid(roi(0, 0, 4, 1), Tiling { size: 2, stride: 1 }).unwrap();
        assert_eq!(g.len(), 3);
        stitch(&g, &[1.0, 9.0, 2.0], 1, 4, &mut out);
        assert_eq!(&out[..4], [1.0, 9.0, 9.0, 2.0]);
        // A tile's own 2×2 map lands on its quarter of the output.
        let g = grid(roi(0, 0, 4, 4), Tiling::abutting(2)).unwrap();
        let mut maps = vec![0.0; 4 * 4];
        maps[3 * 4 + 3] = 7.0; // bottom-right pixel of the bottom-right tile
        stitch(&g, &maps, 2, 4, &mut out);
        assert_eq!(out[15], 7.0);
        assert_eq!(out.iter().filter(|&&v| v != 0.0).count(), 1);
    }

    #[test]
    fn frame_score_is_the_hottest_tile() {
        assert_eq!(max_tile([0.1, 0.7, 0.3]), Some((0.7, 1)));
        assert_eq!(max_tile([]), None);
        let (s, i) = max_tile([0.1, f32::NAN, 9.0]).unwrap();
        assert!(s.is_nan() && i == 1);
    }
}
