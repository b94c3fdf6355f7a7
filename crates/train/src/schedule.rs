//! Learning-rate schedules, as PyTorch's `MultiStepLR`, `StepLR` and `CosineAnnealingLR` step
//! them once per epoch, with an optional linear warmup stepped per batch.

use crate::config::{ScheduleKind, TrainSection};

/// The learning rate for batch `step` (of `steps_per_epoch`) in `epoch` (both from 0).
pub fn learning_rate(t: &TrainSection, epoch: usize, step: usize, steps_per_epoch: usize) -> f64 {
    if epoch < t.warmup_epochs {
        let done = (epoch * steps_per_epoch + step + 1) as f64;
        return t.lr * done / (t.warmup_epochs * steps_per_epoch.max(1)) as f64;
    }
    match t.schedule {
        ScheduleKind::Multistep => {
            let passed = t.milestones.iter().filter(|&&m| m <= epoch).count();
            t.lr * t.gamma.powi(passed as i32)
        }
        ScheduleKind::Step => t.lr * t.gamma.powi((epoch / t.step_size.max(1)) as i32),
        ScheduleKind::Cosine => {
            let span = t.epochs.saturating_sub(t.warmup_epochs).max(1) as f64;
            let progress = (epoch - t.warmup_epochs) as f64 / span;
            0.5 * t.lr * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(schedule: ScheduleKind) -> TrainSection {
        TrainSection {
            epochs: 300,
            batch_size: 64,
            lr: 0.25,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
            schedule,
            milestones: vec![150, 225],
            gamma: 0.1,
            step_size: 75,
            warmup_epochs: 0,
            keep_last: 1,
            label_smoothing: 0.0,
            decay_bn_and_bias: true,
            clip_grad_norm: 0.0,
            classifier_lr: 0.0,
            accumulate: 1,
            ema_decay: 0.0,
            log_every: 20,
            checkpoint_minutes: 0.0,
            checkpoint_steps: 0,
            sync_bn: false,
        }
    }

    #[test]
    fn multistep_matches_the_reference_cifar_rule() {
        let t = section(ScheduleKind::Multistep);
        // train.py: lr * 0.1 ** (epoch // 150) * 0.1 ** (epoch // 225) for 300 epochs.
        for epoch in [0, 149, 150, 224, 225, 299] {
            let reference =
                0.25 * 0.1f64.powi((epoch / 150) as i32) * 0.1f64.powi((epoch / 225) as i32);
            let lr = learning_rate(&t, epoch, 0, 10);
            assert!(
                (lr - reference).abs() < 1e-12,
                "epoch {epoch}: {lr} vs {reference}"
            );
        }
    }

    #[test]
    fn step_cosine_and_warmup() {
        let t = section(ScheduleKind::Step);
        assert!((learning_rate(&t, 75, 0, 1) - 0.025).abs() < 1e-12);
        let t = section(ScheduleKind::Cosine);
        assert!((learning_rate(&t, 0, 0, 1) - 0.25).abs() < 1e-12);
        assert!((learning_rate(&t, 150, 0, 1) - 0.125).abs() < 1e-12);
        let mut t = section(ScheduleKind::Multistep);
        t.warmup_epochs = 2;
        assert!((learning_rate(&t, 0, 0, 10) - 0.25 / 20.0).abs() < 1e-12);
        assert!((learning_rate(&t, 1, 9, 10) - 0.25).abs() < 1e-12);
        assert!((learning_rate(&t, 2, 0, 10) - 0.25).abs() < 1e-12);
    }
}
