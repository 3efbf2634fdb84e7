//! MVTec-style image folders (`train/good`, `test/good`, `test/<defect>`) → tensors,
//! through `ganomaly_core::preprocess` (the daemon's function, so no train/serve
//! skew); the seeded held-out calibration slice; the data digest.

use std::path::{Path, PathBuf};

use ganomaly_core::metadata::ColorMode;
use ganomaly_core::preprocess::Preprocessor;
use sha2::{Digest, Sha256};
use tch::Tensor;

/// Extensions read as images (lower-case).
const IMAGE_EXTS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

/// Problems with a dataset folder; each names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data folder {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} holds no images (looked for .png/.jpg/.jpeg/.bmp); an MVTec-style folder has train/good/*.png")]
    Empty(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot decode image {path}: {source}")]
    Decode { path: PathBuf, source: image::ImageError },
    #[error("images of mixed sizes: {first} is {first_size:?} but {other} is {other_size:?} (resize them to one size first)")]
    MixedSizes { first: PathBuf, first_size: (u32, u32), other: PathBuf, other_size: (u32, u32) },
    #[error("images of mixed colour modes: {first} is {first_mode} but {other} is {other_mode} (convert them to one mode first)")]
    MixedModes { first: PathBuf, first_mode: &'static str, other: PathBuf, other_mode: &'static str },
    #[error("preprocessing {path}: {source}")]
    Preprocess { path: PathBuf, source: ganomaly_core::preprocess::PreprocessError },
    #[error("{0}")]
    Split(String),
}

/// One test image: `defect` is `None` for `test/good`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestItem {
    pub path: PathBuf,
    pub defect: Option<String>,
}

/// The files of an MVTec-style folder, sorted so that every run sees one order.
#[derive(Debug, Clone)]
pub struct DataFiles {
    pub root: PathBuf,
    pub train: Vec<PathBuf>,
    pub test: Vec<TestItem>,
    /// Colour mode of the images (all the same, checked).
    pub mode: ColorMode,
    /// Pixel size of the images (all the same, checked).
    pub size: (u32, u32),
}

impl DataFiles {
    /// Defect type names found under `test/`, sorted.
    pub fn defect_types(&self) -> Vec<String> {
        let mut d: Vec<String> = self.test.iter().filter_map(|t| t.defect.clone()).collect();
        d.sort();
        d.dedup();
        d
    }
}

pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.to_path_buf(), source })?;
    let mut v = Vec::new();
    for e in rd {
        let p = e.map_err(|source| DataError::Io { path: dir.to_path_buf(), source })?.path();
        let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        if p.is_file() && ext.is_some_and(|e| IMAGE_EXTS.contains(&e.as_str())) {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// Scans `root`. `train/good` must hold images; `test/` is optional (no evaluation
/// then). `need_train` is false for `eval`, which only reads `test/`.
pub fn scan(root: &Path, need_train: bool) -> Result<DataFiles, DataError> {
    if !root.is_dir() {
        return Err(DataError::Missing(root.to_path_buf()));
    }
    let train_dir = root.join("train").join("good");
    let train = if train_dir.is_dir() { list_images(&train_dir)? } else { Vec::new() };
    if need_train && train.is_empty() {
        if !train_dir.is_dir() {
            return Err(DataError::Missing(train_dir));
        }
        return Err(DataError::Empty(train_dir));
    }
    let mut test = Vec::new();
    let test_dir = root.join("test");
    if test_dir.is_dir() {
        let mut kinds: Vec<PathBuf> = std::fs::read_dir(&test_dir)
            .map_err(|source| DataError::Io { path: test_dir.clone(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        kinds.sort();
        for k in kinds {
            let name = k.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let defect = if name == "good" { None } else { Some(name) };
            for path in list_images(&k)? {
                test.push(TestItem { path, defect: defect.clone() });
            }
        }
    }
    if !need_train && test.is_empty() {
        return Err(DataError::Empty(test_dir));
    }
    // One size and one mode across the whole dataset: a stray image of another
    // camera or a gray export among RGB ones is a data mistake worth stopping for.
    let mut first: Option<(PathBuf, (u32, u32), ColorMode)> = None;
    for p in train.iter().chain(test.iter().map(|t| &t.path)) {
        let (size, mode) = probe(p)?;
        match &first {
            None => first = Some((p.clone(), size, mode)),
            Some((fp, fsize, fmode)) => {
                if *fsize != size {
                    return Err(DataError::MixedSizes {
                        first: fp.clone(),
                        first_size: *fsize,
                        other: p.clone(),
                        other_size: size,
                    });
                }
                if *fmode != mode {
                    return Err(DataError::MixedModes {
                        first: fp.clone(),
                        first_mode: mode_name(*fmode),
                        other: p.clone(),
                        other_mode: mode_name(mode),
                    });
                }
            }
        }
    }
    let (_, size, mode) = first.ok_or_else(|| DataError::Empty(root.to_path_buf()))?;
    Ok(DataFiles { root: root.to_path_buf(), train, test, mode, size })
}

fn mode_name(m: ColorMode) -> &'static str {
    match m {
        ColorMode::Gray => "gray",
        ColorMode::Rgb => "RGB",
    }
}

/// Size and colour mode from the header (no full decode).
fn probe(path: &Path) -> Result<((u32, u32), ColorMode), DataError> {
    let reader = image::ImageReader::open(path)
        .map_err(|source| DataError::Io { path: path.to_path_buf(), source })?
        .with_guessed_format()
        .map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let decoder = reader.into_decoder().map_err(|source| DataError::Decode { path: path.to_path_buf(), source })?;
    use image::ImageDecoder;
    let size = decoder.dimensions();
    let mode = if decoder.color_type().has_color() { ColorMode::Rgb } else { ColorMode::Gray };
    Ok((size, mode))
}

/// Decodes and preprocesses `paths` into one `[N, C, S, S]` tensor (CPU).
pub fn load(paths: &[PathBuf], pre: &mut Preprocessor) -> Result<Tensor, DataError> {
    let len = pre.tensor_len();
    let mut buf = vec![0f32; len * paths.len()];
    for (p, out) in paths.iter().zip(buf.chunks_exact_mut(len)) {
        let img = image::open(p).map_err(|source| DataError::Decode { path: p.clone(), source })?;
        pre.run_image(&img, None, out).map_err(|source| DataError::Preprocess { path: p.clone(), source })?;
    }
    let c = i64::from(pre.color().channels());
    let s = i64::from(pre.size());
    Ok(Tensor::from_slice(&buf).reshape([paths.len() as i64, c, s, s]))
}

/// sha256 over the relative path and bytes of every file, in order: the same data
/// gives the same digest on any machine, whatever the folder is called.
pub fn digest(root: &Path, paths: &[PathBuf]) -> Result<String, DataError> {
    let mut h = Sha256::new();
    for p in paths {
        let rel = p.strip_prefix(root).unwrap_or(p);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        let bytes = std::fs::read(p).map_err(|source| DataError::Io { path: p.clone(), source })?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// SplitMix64: a tiny seeded generator for shuffles that must not depend on
/// libtorch's RNG state (so a resumed run shuffles epoch e as the first run did).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Images with their labels (`test/` or the validation split `val/`), loaded.
pub struct LabelledSet {
    pub items: Vec<TestItem>,
    pub x: Tensor,
    /// Tiles per item, when each is cut into tiles (`--tile`, see `tiles.rs`):
    /// `x` holds the tiles and an item scores as the maximum over its own.
    pub groups: Option<Vec<usize>>,
}

impl LabelledSet {
    /// Loads `items` through `pre`.
    pub fn load(items: Vec<TestItem>, pre: &mut Preprocessor) -> Result<LabelledSet, DataError> {
        let paths: Vec<PathBuf> = items.iter().map(|i| i.path.clone()).collect();
        let x = load(&paths, pre)?;
        Ok(LabelledSet { items, x, groups: None })
    }

    /// Whether any image is defective (AUROC needs both kinds).
    pub fn has_defects(&self) -> bool {
        self.items.iter().any(|i| i.defect.is_some())
    }

    /// The optional validation split `root/val/good` + `root/val/<defect>`: images
    /// that `--score auto` and `--select val-auroc` choose with. Never trained on,
    /// and never the test images. `None` unless it holds defect images.
    pub fn load_val(root: &Path, pre: &mut Preprocessor) -> Result<Option<LabelledSet>, DataError> {
        let dir = root.join("val");
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut kinds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| DataError::Io { path: dir.clone(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        kinds.sort();
        let mut items = Vec::new();
        for k in kinds {
            let name = k.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let defect = (name != "good").then_some(name);
            for path in list_images(&k)? {
                items.push(TestItem { path, defect: defect.clone() });
            }
        }
        if !items.iter().any(|i| i.defect.is_some()) {
            return Ok(None);
        }
        LabelledSet::load(items, pre).map(Some)
    }
}

/// Every image set of a run, loaded through one preprocessor: `fit` (trained on),
/// `hold` (the held-out good slice that calibrates), and the labelled sets.
pub struct Splits {
    pub fit: Tensor,
    pub hold: Tensor,
    /// `test/`, when it holds defect images (else there is no AUROC to measure).
    pub test: Option<LabelledSet>,
    /// `val/`, when it holds defect images.
    pub val: Option<LabelledSet>,
    /// Tiles per held-out image (`--tile`: `fit` and `hold` hold tiles; `tiles.rs`).
    pub hold_groups: Option<Vec<usize>>,
    /// `--tile`: what every image was cut into.
    pub tiling: Option<ganomaly_core::tiles::Tiling>,
}

impl Splits {
    /// Loads the sets of `files`, holding out `holdout` of `train/good` with `seed`
    /// ([`split_holdout`]: `train` and `export` of its checkpoint draw the same slice).
    pub fn load(files: &DataFiles, holdout: f64, seed: u64, pre: &mut Preprocessor) -> Result<Splits, DataError> {
        let (fit, hold) = split_holdout(&files.train, holdout, seed)?;
        let fit = load(&fit, pre)?;
        let hold = load(&hold, pre)?;
        let test = if files.test.is_empty() { None } else { Some(LabelledSet::load(files.test.clone(), pre)?) };
        let val = LabelledSet::load_val(&files.root, pre)?;
        Ok(Splits { fit, hold, test: test.filter(LabelledSet::has_defects), val, hold_groups: None, tiling: None })
    }

    /// Images trained on.
    pub fn n_fit(&self) -> usize {
        self.fit.size()[0] as usize
    }

    /// Held-out good images.
    pub fn n_hold(&self) -> usize {
        self.hold.size()[0] as usize
    }
}

/// Splits `train` into (fit, held-out) with a seeded shuffle; the held-out slice
/// calibrates thresholds and is never trained on. Both halves keep file order.
pub fn split_holdout(train: &[PathBuf], fraction: f64, seed: u64) -> Result<(Vec<PathBuf>, Vec<PathBuf>), DataError> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(DataError::Split(format!("--holdout must be in [0, 1), got {fraction}")));
    }
    let n = train.len();
    let n_hold = ((n as f64) * fraction).round() as usize;
    let n_hold = if fraction > 0.0 { n_hold.max(1) } else { 0 };
    if n_hold >= n {
        return Err(DataError::Split(format!(
            "train/good has {n} images: too few to hold out {n_hold} for calibration and train on the rest"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix::new(seed ^ 0x005E_ED0F_4E1D).shuffle(&mut idx);
    let mut hold: Vec<usize> = idx[..n_hold].to_vec();
    let mut fit: Vec<usize> = idx[n_hold..].to_vec();
    hold.sort_unstable();
    fit.sort_unstable();
    Ok((fit.into_iter().map(|i| train[i].clone()).collect(), hold.into_iter().map(|i| train[i].clone()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, w: u32, h: u32, gray: bool) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if gray {
            image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 7 + y) as u8])).save(path).unwrap();
        } else {
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9])).save(path).unwrap();
        }
    }

    #[test]
    fn scans_mvtec_layout() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..3 {
            write(&d.path().join(format!("train/good/{i}.png")), 20, 10, false);
        }
        write(&d.path().join("test/good/a.png"), 20, 10, false);
        write(&d.path().join("test/scratch/b.png"), 20, 10, false);
        write(&d.path().join("test/crack/c.jpg"), 20, 10, false);
        std::fs::write(d.path().join("test/crack/notes.txt"), "x").unwrap();
        let f = scan(d.path(), true).unwrap();
        assert_eq!(f.train.len(), 3);
        assert_eq!(f.test.len(), 3);
        assert_eq!(f.defect_types(), vec!["crack".to_string(), "scratch".to_string()]);
        assert_eq!(f.size, (20, 10));
        assert_eq!(f.mode, ColorMode::Rgb);
        let mut pre = Preprocessor::new(ColorMode::Rgb, 16);
        let t = load(&f.train, &mut pre).unwrap();
        assert_eq!(t.size(), vec![3, 3, 16, 16]);
        assert!(t.max().double_value(&[]) <= 1.0 && t.min().double_value(&[]) >= -1.0);
    }

    #[test]
    fn bad_folders_are_named() {
        let d = tempfile::tempdir().unwrap();
        let err = scan(&d.path().join("nope"), true).unwrap_err();
        assert!(matches!(err, DataError::Missing(_)) && err.to_string().contains("nope"), "{err}");
        std::fs::create_dir_all(d.path().join("train/good")).unwrap();
        let err = scan(d.path(), true).unwrap_err();
        assert!(matches!(err, DataError::Empty(_)) && err.to_string().contains("train/good"), "{err}");

        write(&d.path().join("train/good/a.png"), 20, 10, false);
        write(&d.path().join("train/good/b.png"), 21, 10, false);
        let err = scan(d.path(), true).unwrap_err();
        assert!(matches!(err, DataError::MixedSizes { .. }) && err.to_string().contains("b.png"), "{err}");

        write(&d.path().join("train/good/b.png"), 20, 10, true);
        let err = scan(d.path(), true).unwrap_err();
        assert!(matches!(err, DataError::MixedModes { .. }) && err.to_string().contains("gray"), "{err}");

        std::fs::write(d.path().join("train/good/b.png"), b"not a png").unwrap();
        let err = scan(d.path(), true).unwrap_err();
        assert!(err.to_string().contains("b.png"), "{err}");
    }

    #[test]
    fn holdout_is_seeded_and_disjoint() {
        let files: Vec<PathBuf> = (0..50).map(|i| PathBuf::from(format!("{i:03}.png"))).collect();
        let (fit, hold) = split_holdout(&files, 0.2, 7).unwrap();
        assert_eq!((fit.len(), hold.len()), (40, 10));
        assert!(hold.iter().all(|h| !fit.contains(h)));
        assert_eq!(split_holdout(&files, 0.2, 7).unwrap().1, hold);
        assert_ne!(split_holdout(&files, 0.2, 8).unwrap().1, hold);
        assert!(split_holdout(&files[..1], 0.2, 7).is_err());
    }

    #[test]
    fn digest_depends_on_bytes_not_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [&a, &b] {
            write(&d.path().join("train/good/x.png"), 8, 8, true);
        }
        let da = digest(a.path(), &[a.path().join("train/good/x.png")]).unwrap();
        let db = digest(b.path(), &[b.path().join("train/good/x.png")]).unwrap();
        assert_eq!(da, db);
        write(&b.path().join("train/good/x.png"), 8, 8, false);
        assert_ne!(da, digest(b.path(), &[b.path().join("train/good/x.png")]).unwrap());
    }
}
