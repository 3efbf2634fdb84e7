//! The operator's feedback folder (written by the daemon's `feedback` command,
//! MVTec layout: `val/good/` = confirmed false alarms, `val/<defect>/` = confirmed
//! defects) merged into a run: every image joins the validation split
//! (`--select`, `--score auto`), and the confirmed false alarms also join the
//! held-out slice the thresholds are calibrated on, because they are exactly the
//! good frames of this line that the last model scored too high. Never trained on.

use std::path::{Path, PathBuf};

use ganomaly_core::preprocess::Preprocessor;
use serde::Serialize;
use tch::Tensor;

use crate::data::{list_images, load, DataError, LabelledSet, Splits, TestItem};

/// What a run took from a feedback folder (in the report and the model's provenance).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FeedbackUse {
    pub dir: String,
    /// Confirmed false alarms: validation and calibration.
    pub good: usize,
    /// Confirmed defects per type: validation.
    pub defects: std::collections::BTreeMap<String, usize>,
}

impl FeedbackUse {
    pub fn summary(&self) -> String {
        format!(
            "feedback {}: {} confirmed false alarm(s) in validation and calibration, {} confirmed defect(s) in validation",
            self.dir,
            self.good,
            self.defects.values().sum::<usize>()
        )
    }
}

/// Adds `dir/val/*` to `splits` (see the module doc). A missing `dir/val` is an error:
/// a mistyped `--feedback` must not train as if there were no feedback.
pub fn merge(dir: &Path, splits: &mut Splits, pre: &mut Preprocessor) -> Result<FeedbackUse, DataError> {
    let val = dir.join("val");
    if !val.is_dir() {
        return Err(DataError::Missing(val));
    }
    let mut kinds: Vec<PathBuf> = std::fs::read_dir(&val)
        .map_err(|source| DataError::Io { path: val.clone(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    kinds.sort();
    let mut items = Vec::new();
    let mut used = FeedbackUse { dir: dir.display().to_string(), good: 0, defects: Default::default() };
    for k in kinds {
        let name = k.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let defect = (name != "good").then_some(name.clone());
        let images = list_images(&k)?;
        match &defect {
            None => used.good += images.len(),
            Some(d) => {
                if !images.is_empty() {
                    used.defects.insert(d.clone(), images.len());
                }
            }
        }
        items.extend(images.into_iter().map(|path| TestItem { path, defect: defect.clone() }));
    }
    if items.is_empty() {
        tracing::warn!(dir = %val.display(), "the feedback folder holds no images yet");
        return Ok(used);
    }
    let goods: Vec<PathBuf> = items.iter().filter(|i| i.defect.is_none()).map(|i| i.path.clone()).collect();
    if !goods.is_empty() {
        let x = load(&goods, pre)?;
        splits.hold = Tensor::cat(&[&splits.hold, &x], 0);
    }
    let extra = LabelledSet::load(items, pre)?;
    splits.val = Some(match splits.val.take() {
        Some(v) => {
            let x = Tensor::cat(&[&v.x, &extra.x], 0);
            let mut all = v.items;
            all.extend(extra.items);
            LabelledSet { items: all, x, groups: None }
        }
        None => extra,
    })
    // `--select`/`--score auto` need defects to compare; without any the split is left out.
    .filter(LabelledSet::has_defects);
    tracing::info!(
        dir = %dir.display(), false_alarms = used.good, defects = used.defects.values().sum::<usize>(),
        "feedback: confirmed false alarms join validation and calibration, confirmed defects join validation"
    );
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ganomaly_core::metadata::ColorMode;

    fn png(path: &Path, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(20, 12, image::Luma([v])).save(path).unwrap();
    }

    #[test]
    fn false_alarms_join_calibration_and_validation_defects_only_validation() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("val/good/a.png"), 10);
        png(&d.path().join("val/good/b.png"), 20);
        png(&d.path().join("val/scratch/c.png"), 200);
        std::fs::write(d.path().join("val/good/a.json"), "{}").unwrap();
        let mut pre = Preprocessor::new(ColorMode::Gray, 16);
        let mut splits = Splits {
            fit: Tensor::zeros([4, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu)),
            hold: Tensor::zeros([3, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu)),
            test: None,
            val: None,
            hold_groups: None,
            tiling: None,
        };
        let used = merge(d.path(), &mut splits, &mut pre).unwrap();
        assert_eq!((used.good, used.defects.get("scratch").copied()), (2, Some(1)));
        assert_eq!(splits.n_hold(), 5, "3 held out + 2 confirmed false alarms");
        assert_eq!(splits.n_fit(), 4, "never trained on");
        let val = splits.val.as_ref().expect("a validation split with a defect");
        assert_eq!(val.items.len(), 3);
        assert_eq!(val.items.iter().filter(|i| i.defect.as_deref() == Some("scratch")).count(), 1);
        assert!(used.summary().contains("2 confirmed false alarm(s)"), "{}", used.summary());

        // Only false alarms: calibration grows, no validation split (nothing to compare).
        let only_good = tempfile::tempdir().unwrap();
        png(&only_good.path().join("val/good/a.png"), 10);
        let mut splits = Splits {
            fit: Tensor::zeros([4, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu)),
            hold: Tensor::zeros([3, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu)),
            test: None,
            val: None,
            hold_groups: None,
            tiling: None,
        };
        merge(only_good.path(), &mut splits, &mut pre).unwrap();
        assert_eq!((splits.n_hold(), splits.val.is_none()), (4, true));

        let err = merge(&d.path().join("nope"), &mut splits, &mut pre).unwrap_err();
        assert!(err.to_string().contains("nope/val"), "{err}");
    }
}
