//! Out-of-distribution detection from a score per image, higher meaning "more like the
//! training distribution" (the max-softmax baseline of Hendrycks & Gimpel 2017), with the
//! in-distribution images as the positives, as ODIN and the CutMix paper count them:
//!
//! - the exact ROC of the sorted scores: one point per distinct score (tied scores move
//!   together), from (0, 0), as scikit-learn's `roc_curve(drop_intermediate=False)`;
//! - AUROC by the trapezoid rule over it (`roc_auc_score`);
//! - TNR at TPR 95%: 1 - FPR at the ROC point whose TPR is closest to 0.95 (the first such
//!   point, from the highest threshold);
//! - detection accuracy: the best `(TPR + TNR) / 2` over the points;
//! - AUPR-in / AUPR-out: scikit-learn's `average_precision_score` with the in-distribution
//!   images as positives, and with the out-of-distribution images as positives and the scores
//!   negated.

/// The detection metrics of one out-of-distribution set, as fractions in [0, 1].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Detection {
    pub tnr_at_tpr95: f64,
    pub auroc: f64,
    pub detection_acc: f64,
    pub aupr_in: f64,
    pub aupr_out: f64,
}

impl Detection {
    /// The metrics of `positive` (in-distribution) against `negative` scores. Both must be
    /// non-empty and finite.
    pub fn of(positive: &[f32], negative: &[f32]) -> Self {
        let roc = roc(positive, negative);
        let auroc = roc
            .windows(2)
            .map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0)
            .sum();
        let closest = roc
            .iter()
            .min_by(|a, b| (a.tpr - 0.95).abs().total_cmp(&(b.tpr - 0.95).abs()))
            .expect("a ROC has points");
        let detection_acc = roc
            .iter()
            .map(|p| (p.tpr + 1.0 - p.fpr) / 2.0)
            .fold(0.0, f64::max);
        let negated = |s: &[f32]| s.iter().map(|v| -v).collect::<Vec<f32>>();
        Self {
            tnr_at_tpr95: 1.0 - closest.fpr,
            auroc,
            detection_acc,
            aupr_in: average_precision(positive, negative),
            aupr_out: average_precision(&negated(negative), &negated(positive)),
        }
    }

    /// The mean of several sets' metrics (the paper's "average" row).
    pub fn mean(all: &[Detection]) -> Detection {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Detection) -> f64| all.iter().map(f).sum::<f64>() / n;
        Detection {
            tnr_at_tpr95: sum(|d| d.tnr_at_tpr95),
            auroc: sum(|d| d.auroc),
            detection_acc: sum(|d| d.detection_acc),
            aupr_in: sum(|d| d.aupr_in),
            aupr_out: sum(|d| d.aupr_out),
        }
    }
}

/// One point of a ROC curve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RocPoint {
    pub fpr: f64,
    pub tpr: f64,
}

/// True and false positives above each distinct score, from the highest: `(tp, fp)` after
/// every group of tied scores.
fn cumulative_counts(positive: &[f32], negative: &[f32]) -> Vec<(usize, usize)> {
    assert!(
        !positive.is_empty() && !negative.is_empty(),
        "both sets need scores"
    );
    let mut all: Vec<(f32, bool)> = positive
        .iter()
        .map(|&s| (s, true))
        .chain(negative.iter().map(|&s| (s, false)))
        .collect();
    assert!(all.iter().all(|(s, _)| s.is_finite()), "scores are finite");
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0, 0);
    let mut counts = Vec::new();
    for (i, &(score, is_positive)) in all.iter().enumerate() {
        if is_positive {
            tp += 1;
        } else {
            fp += 1;
        }
        if all.get(i + 1).is_none_or(|next| next.0 != score) {
            counts.push((tp, fp));
        }
    }
    counts
}

/// The exact ROC: (0, 0), then one point per distinct score from the highest.
pub fn roc(positive: &[f32], negative: &[f32]) -> Vec<RocPoint> {
    let (p, n) = (positive.len() as f64, negative.len() as f64);
    std::iter::once(RocPoint { fpr: 0.0, tpr: 0.0 })
        .chain(
            cumulative_counts(positive, negative)
                .into_iter()
                .map(|(tp, fp)| RocPoint {
                    fpr: fp as f64 / n,
                    tpr: tp as f64 / p,
                }),
        )
        .collect()
}

/// scikit-learn's average precision: `sum_k (R_k - R_{k-1}) P_k` over the distinct scores
/// from the highest.
pub fn average_precision(positive: &[f32], negative: &[f32]) -> f64 {
    let total = positive.len() as f64;
    let mut previous_recall = 0.0;
    let mut sum = 0.0;
    for (tp, fp) in cumulative_counts(positive, negative) {
        let recall = tp as f64 / total;
        let precision = tp as f64 / (tp + fp) as f64;
        sum += (recall - previous_recall) * precision;
        previous_recall = recall;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_scores_are_perfect_and_identical_scores_are_chance() {
        let d = Detection::of(&[0.9, 0.8, 0.7], &[0.1, 0.2]);
        assert_eq!(d.auroc, 1.0);
        assert_eq!(d.tnr_at_tpr95, 1.0);
        assert_eq!(d.detection_acc, 1.0);
        assert_eq!((d.aupr_in, d.aupr_out), (1.0, 1.0));
        // Every score tied: the ROC jumps from (0, 0) to (1, 1) at once.
        let tied = Detection::of(&[0.5; 4], &[0.5; 6]);
        assert_eq!(tied.auroc, 0.5);
        assert_eq!(tied.tnr_at_tpr95, 0.0);
        assert_eq!(tied.detection_acc, 0.5);
        assert!((tied.aupr_in - 0.4).abs() < 1e-12 && (tied.aupr_out - 0.6).abs() < 1e-12);
    }

    #[test]
    fn ties_move_together_on_the_curve() {
        // Scores 3 (+), 2 (+, -), 1 (-): points (0,0), (0,.5), (.5,1), (1,1).
        let points = roc(&[3.0, 2.0], &[2.0, 1.0]);
        let pairs: Vec<(f64, f64)> = points.iter().map(|p| (p.fpr, p.tpr)).collect();
        assert_eq!(pairs, [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        let d = Detection::of(&[3.0, 2.0], &[2.0, 1.0]);
        assert_eq!(d.auroc, 0.875);
        // AP: recall .5 at precision 1, then recall 1 at precision 2/3.
        assert!((d.aupr_in - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
    }
}
