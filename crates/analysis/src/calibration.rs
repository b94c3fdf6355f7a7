//! Calibration of a classifier's confidences (Guo et al. 2017): the expected calibration error
//! over equal-width bins of the max softmax (a sample in `(lower, upper]`, empty bins skipped,
//! as gpleiss/temperature_scaling counts it), the negative log-likelihood, the Brier score
//! (`sum_c (p_c - y_c)^2` per sample, averaged), top-1 error, the reliability diagram's bins,
//! and temperature scaling (the one temperature that minimises the NLL of a held split).
//!
//! Logits are `[n][classes]` row-major; softmax is computed in f64.

/// One bin of a reliability diagram.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bin {
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    /// Mean max-softmax of the bin's samples (0 when empty).
    pub confidence: f64,
    /// Fraction of them classified right (0 when empty).
    pub accuracy: f64,
}

/// Calibration of one set of logits at one temperature.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    pub ece: f64,
    pub nll: f64,
    pub brier: f64,
    /// Top-1 error as a fraction.
    pub top1_err: f64,
    pub bins: Vec<Bin>,
}

/// Softmax of `logits / temperature` in f64.
fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let exp: Vec<f64> = logits
        .iter()
        .map(|&v| ((v as f64 - max) / temperature).exp())
        .collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// The first index of the largest value (as `argmax` in PyTorch and NumPy).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// The calibration of `logits` scaled by `1 / temperature` against `labels`, with `bins`
/// equal-width confidence bins (15 in Guo et al.).
pub fn calibration(
    logits: &[f32],
    classes: usize,
    labels: &[usize],
    temperature: f64,
    bins: usize,
) -> Calibration {
    assert_eq!(
        logits.len(),
        labels.len() * classes,
        "logits are [n][classes]"
    );
    assert!(temperature > 0.0 && bins > 0 && !labels.is_empty());
    let n = labels.len() as f64;
    let mut counts = vec![(0usize, 0.0f64, 0usize); bins];
    let (mut nll, mut brier, mut wrong) = (0.0, 0.0, 0usize);
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let p = softmax(row, temperature);
        let predicted = argmax(&p);
        let confidence = p[predicted];
        nll -= p[label].max(f64::MIN_POSITIVE).ln();
        brier += p
            .iter()
            .enumerate()
            .map(|(c, &pc)| (pc - f64::from(u8::from(c == label))).powi(2))
            .sum::<f64>();
        wrong += usize::from(predicted != label);
        // (lower, upper]: bin b holds confidences in (b / bins, (b + 1) / bins].
        let bin = ((confidence * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        let slot = &mut counts[bin];
        slot.0 += 1;
        slot.1 += confidence;
        slot.2 += usize::from(predicted == label);
    }
    let bins_out: Vec<Bin> = counts
        .iter()
        .enumerate()
        .map(|(b, &(count, confidence, right))| {
            let mean = |v: f64| if count == 0 { 0.0 } else { v / count as f64 };
            Bin {
                lower: b as f64 / bins as f64,
                upper: (b + 1) as f64 / bins as f64,
                count,
                confidence: mean(confidence),
                accuracy: mean(right as f64),
            }
        })
        .collect();
    let ece = bins_out
        .iter()
        .map(|b| b.count as f64 / n * (b.accuracy - b.confidence).abs())
        .sum();
    Calibration {
        ece,
        nll: nll / n,
        brier: brier / n,
        top1_err: wrong as f64 / n,
        bins: bins_out,
    }
}

/// The mean negative log-likelihood of `labels` under `softmax(logits / temperature)`.
pub fn nll(logits: &[f32], classes: usize, labels: &[usize], temperature: f64) -> f64 {
    logits
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &label)| -softmax(row, temperature)[label].max(f64::MIN_POSITIVE).ln())
        .sum::<f64>()
        / labels.len() as f64
}

/// The temperature in [e^-4, e^4] that minimises the NLL (temperature scaling, fitted on a
/// held split). The NLL is convex in `1 / temperature`, so a golden-section search over
/// `ln temperature` finds its minimum.
pub fn fit_temperature(logits: &[f32], classes: usize, labels: &[usize]) -> f64 {
    let f = |log_t: f64| nll(logits, classes, labels, log_t.exp());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (-4.0f64, 4.0f64);
    let mut c = b - ratio * (b - a);
    let mut d = a + ratio * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-9 {
        if fc < fd {
            (b, d, fd) = (d, c, fc);
            c = b - ratio * (b - a);
            fc = f(c);
        } else {
            (a, c, fc) = (c, d, fd);
            d = a + ratio * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confident_right_classifier_is_calibrated_and_bins_are_half_open() {
        // Two classes, logits giving confidence exactly 1 (rounded) and a sample at 0.5.
        let logits = [50.0, 0.0, 0.0, 50.0, 0.0, 0.0];
        let c = calibration(&logits, 2, &[0, 1, 1], 1.0, 10);
        // The tie (0.5, 0.5) predicts class 0 at confidence 0.5: bin (0.4, 0.5], wrong.
        assert_eq!(c.bins[4].count, 1);
        assert_eq!(c.bins[9].count, 2);
        assert!((c.ece - 1.0 / 3.0 * 0.5).abs() < 1e-9, "{}", c.ece);
        assert!((c.top1_err - 1.0 / 3.0).abs() < 1e-12);
        assert!((c.brier - 0.5 / 3.0).abs() < 1e-9, "{}", c.brier);
    }

    #[test]
    fn the_fitted_temperature_undoes_a_known_scaling() {
        // Labels drawn from softmax(z); logits handed over as 3 z: the best temperature is
        // near 3.
        let mut state = 12345u64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (classes, n) = (5, 4000);
        let mut logits = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            let z: Vec<f32> = (0..classes)
                .map(|_| (uniform() * 4.0 - 2.0) as f32)
                .collect();
            let p = softmax(&z, 1.0);
            let u = uniform();
            let mut acc = 0.0;
            let label = p
                .iter()
                .position(|&pc| {
                    acc += pc;
                    u < acc
                })
                .unwrap_or(classes - 1);
            labels.push(label);
            logits.extend(z.iter().map(|v| v * 3.0));
        }
        let t = fit_temperature(&logits, classes, &labels);
        assert!((t - 3.0).abs() < 0.3, "{t}");
        let best = nll(&logits, classes, &labels, t);
        assert!(best <= nll(&logits, classes, &labels, t * 1.05));
        assert!(best <= nll(&logits, classes, &labels, t / 1.05));
    }
}
