//! Weakly-supervised localization metrics, accumulated one image at a time.
//!
//! - **Top-1 localization** (the paper's Table 9): the predicted class is right and the box of
//!   the ground-truth class's CAM at threshold `sigma` (default 0.15 of its maximum, largest
//!   component) has IoU >= 0.5 with one of the image's ground-truth boxes. (When the class is
//!   right, the predicted class's CAM is the ground-truth class's.)
//! - **GT-known localization**: the IoU condition alone.
//! - **MaxBoxAcc** (wsolevaluation, Choe et al. CVPR 2020): over thresholds `tau` in
//!   `[0, 1)` (step 0.01), the fraction of images whose largest component's box reaches IoU
//!   0.5, at the best `tau`; **MaxBoxAccV2**: the same with every component's box, at IoU 0.3,
//!   0.5 and 0.7 each at its best `tau`, averaged.
//!
//! Maps are min-max normalised (maximum 1), so `map >= tau * max` is `map >= tau`.

use crate::boxes::{
    PixelBox, Select, best_iou, boxes_from_map, foreground_components, select_boxes,
};

/// The paper's CAM threshold ("sigma = 0.15 for all our experiments").
pub const PAPER_THRESHOLD: f32 = 0.15;

/// The IoU levels MaxBoxAccV2 averages over.
pub const V2_IOUS: [f64; 3] = [0.3, 0.5, 0.7];

/// Running counts over a validation set.
#[derive(Clone, Debug)]
pub struct LocalizationTally {
    threshold: f32,
    thresholds: Vec<f32>,
    images: usize,
    correct: usize,
    top1_loc: usize,
    gt_known: usize,
    /// Per sweep threshold: images whose largest box reaches IoU 0.5.
    max_box: Vec<usize>,
    /// Per sweep threshold and V2 IoU level: images whose best box of all reaches it.
    max_box_v2: Vec<[usize; 3]>,
}

/// One image's outcome under a [`LocalizationTally`]'s thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageScore {
    pub correct: bool,
    /// IoU >= 0.5 at the tally's threshold (GT-known localization).
    pub localized: bool,
    /// Per sweep threshold: the largest component's box reaches IoU 0.5.
    pub max_box: Vec<bool>,
    /// Per sweep threshold: the best box of all components reaches IoU 0.3, 0.5, 0.7.
    pub max_box_v2: Vec<[bool; 3]>,
}

/// The numbers of a [`LocalizationTally`], in percent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalizationSummary {
    pub images: usize,
    pub threshold: f32,
    pub top1_cls: f64,
    pub top1_loc: f64,
    pub gt_known_loc: f64,
    pub max_box_acc: f64,
    /// The sweep threshold MaxBoxAcc was reached at.
    pub max_box_acc_threshold: f32,
    pub max_box_acc_v2: f64,
}

impl LocalizationTally {
    /// `threshold`: the CAM threshold of top-1 and GT-known localization (fraction of the map's
    /// maximum); `sweep_step`: the spacing of MaxBoxAcc's thresholds in `[0, 1)`.
    pub fn new(threshold: f32, sweep_step: f32) -> Self {
        assert!(
            sweep_step > 0.0 && sweep_step < 1.0,
            "sweep step {sweep_step} not in (0, 1)"
        );
        let steps = (1.0 / sweep_step as f64).round() as usize;
        let thresholds: Vec<f32> = (0..steps)
            .map(|i| (i as f64 * sweep_step as f64) as f32)
            .collect();
        Self {
            threshold,
            max_box: vec![0; thresholds.len()],
            max_box_v2: vec![[0; 3]; thresholds.len()],
            thresholds,
            images: 0,
            correct: 0,
            top1_loc: 0,
            gt_known: 0,
        }
    }

    /// One image: its ground-truth class's normalised CAM (`[height, width]`, the input's
    /// size), its ground-truth boxes in the same pixel frame, and whether the predicted class
    /// is right.
    pub fn add(&mut self, map: &[f32], shape: [usize; 2], truth: &[PixelBox], correct: bool) {
        let score = self.score(map, shape, truth, correct);
        self.add_score(&score);
    }

    /// What [`add`](Self::add) counts for one image, without counting it (images can be
    /// scored in parallel and added in order).
    pub fn score(
        &self,
        map: &[f32],
        shape: [usize; 2],
        truth: &[PixelBox],
        correct: bool,
    ) -> ImageScore {
        let boxes = boxes_from_map(map, shape, self.threshold, Select::Largest);
        let mut score = ImageScore {
            correct,
            localized: best_iou(&boxes, truth) >= 0.5,
            max_box: Vec::with_capacity(self.thresholds.len()),
            max_box_v2: Vec::with_capacity(self.thresholds.len()),
        };
        for &tau in &self.thresholds {
            let found = foreground_components(map, shape, tau);
            let largest = select_boxes(&found, Select::Largest);
            score.max_box.push(best_iou(&largest, truth) >= 0.5);
            let best = best_iou(&select_boxes(&found, Select::All), truth);
            score.max_box_v2.push(V2_IOUS.map(|level| best >= level));
        }
        score
    }

    /// Counts an image [`score`](Self::score)d by a tally with the same thresholds.
    pub fn add_score(&mut self, score: &ImageScore) {
        assert_eq!(
            score.max_box.len(),
            self.thresholds.len(),
            "a score of another sweep"
        );
        self.images += 1;
        self.correct += score.correct as usize;
        self.gt_known += score.localized as usize;
        self.top1_loc += (score.localized && score.correct) as usize;
        for (count, &hit) in self.max_box.iter_mut().zip(&score.max_box) {
            *count += hit as usize;
        }
        for (counts, hits) in self.max_box_v2.iter_mut().zip(&score.max_box_v2) {
            for (count, &hit) in counts.iter_mut().zip(hits) {
                *count += hit as usize;
            }
        }
    }

    /// The metrics so far (zeros before any image).
    pub fn summary(&self) -> LocalizationSummary {
        let percent = |n: usize| 100.0 * n as f64 / self.images.max(1) as f64;
        let (best, hits) =
            self.max_box.iter().enumerate().fold(
                (0, 0),
                |(bi, bh), (i, &h)| if h > bh { (i, h) } else { (bi, bh) },
            );
        let v2 = (0..V2_IOUS.len())
            .map(|level| {
                let hits = self.max_box_v2.iter().map(|c| c[level]).max().unwrap_or(0);
                percent(hits)
            })
            .sum::<f64>()
            / V2_IOUS.len() as f64;
        LocalizationSummary {
            images: self.images,
            threshold: self.threshold,
            top1_cls: percent(self.correct),
            top1_loc: percent(self.top1_loc),
            gt_known_loc: percent(self.gt_known),
            max_box_acc: percent(hits),
            max_box_acc_threshold: self.thresholds.get(best).copied().unwrap_or(0.0),
            max_box_acc_v2: v2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[h, w]` map with value `v` inside each box and 0 elsewhere.
    fn blobs(shape: [usize; 2], parts: &[(PixelBox, f32)]) -> Vec<f32> {
        let [h, w] = shape;
        let mut map = vec![0f32; h * w];
        for &(b, v) in parts {
            for y in b.y0 as usize..=b.y1 as usize {
                for x in b.x0 as usize..=b.x1 as usize {
                    map[y * w + x] = map[y * w + x].max(v);
                }
            }
        }
        map
    }

    #[test]
    fn counts_follow_their_definitions() {
        let shape = [20, 20];
        let truth = PixelBox::new(2.0, 2.0, 9.0, 9.0);
        // Image 1: a map exactly on the box, class right: localized at every threshold.
        let exact = blobs(shape, &[(truth, 1.0)]);
        // Image 2: the same map, class wrong: GT-known but not top-1.
        // Image 3: a strong small blob elsewhere (9 px) and a weak large one on the box (0.4,
        // 64 px).
        let elsewhere = PixelBox::new(14.0, 14.0, 16.0, 16.0);
        let mixed = blobs(shape, &[(elsewhere, 1.0), (truth, 0.4)]);
        let mut tally = LocalizationTally::new(PAPER_THRESHOLD, 0.01);
        tally.add(&exact, shape, &[truth], true);
        tally.add(&exact, shape, &[truth], false);
        tally.add(&mixed, shape, &[truth], true);
        let s = tally.summary();
        assert_eq!(s.images, 3);
        assert!((s.top1_cls - 200.0 / 3.0).abs() < 1e-9);
        // Image 3 at 0.15: both blobs are foreground, the box's blob (64 px) is the largest.
        assert!((s.gt_known_loc - 100.0).abs() < 1e-9, "{s:?}");
        assert!((s.top1_loc - 200.0 / 3.0).abs() < 1e-9, "{s:?}");
        // Above 0.4 image 3's largest box is the wrong blob; at 0.15 all three localize, so
        // MaxBoxAcc is 100% at a threshold below 0.4.
        assert!((s.max_box_acc - 100.0).abs() < 1e-9);
        assert!(s.max_box_acc_threshold < 0.4 + 1e-6);
        assert!((s.max_box_acc_v2 - 100.0).abs() < 1e-9, "{s:?}");
    }

    /// MaxBoxAccV2 takes every component: a map with the object split in two far blobs, one
    /// matching the box, localizes with all components at IoU 0.7 though the largest blob is
    /// the wrong one.
    #[test]
    fn v2_takes_every_component_and_three_iou_levels() {
        let shape = [30, 30];
        let truth = PixelBox::new(0.0, 0.0, 4.0, 4.0); // 25 px
        let decoy = PixelBox::new(15.0, 15.0, 29.0, 29.0); // 225 px, larger
        let map = blobs(shape, &[(truth, 1.0), (decoy, 1.0)]);
        let mut tally = LocalizationTally::new(PAPER_THRESHOLD, 0.1);
        tally.add(&map, shape, &[truth], true);
        let s = tally.summary();
        assert_eq!(s.max_box_acc, 0.0);
        assert_eq!(s.gt_known_loc, 0.0);
        assert!((s.max_box_acc_v2 - 100.0).abs() < 1e-9);
        // A box that overlaps the truth at IoU 0.5 exactly-ish: passes 0.3 and 0.5, not 0.7.
        let shifted = PixelBox::new(0.0, 0.0, 4.0, 9.0); // 50 px holding the 25 px truth
        let map = blobs(shape, &[(shifted, 1.0)]);
        let mut tally = LocalizationTally::new(PAPER_THRESHOLD, 0.1);
        tally.add(&map, shape, &[truth], true);
        let s = tally.summary();
        assert!((s.max_box_acc_v2 - 200.0 / 3.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.max_box_acc, 100.0);
    }

    #[test]
    fn an_empty_map_localizes_nothing() {
        let mut tally = LocalizationTally::new(PAPER_THRESHOLD, 0.01);
        tally.add(
            &[0.0; 16],
            [4, 4],
            &[PixelBox::new(0.0, 0.0, 3.0, 3.0)],
            true,
        );
        let s = tally.summary();
        assert_eq!(
            (s.gt_known_loc, s.max_box_acc, s.max_box_acc_v2),
            (0.0, 0.0, 0.0)
        );
        assert_eq!(s.top1_cls, 100.0);
        assert_eq!(LocalizationTally::new(0.15, 0.01).summary().images, 0);
    }
}
