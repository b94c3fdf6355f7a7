//! Mixup (Zhang et al., 2018), the paper's baseline: images and targets interpolated with
//! `lambda ~ Beta(alpha, alpha)`, per batch (timm's `batch`) or per image (`elem`).

use rand::{Rng, RngExt};
use rand_distr::{Beta, Distribution};

use crate::{Draw, Mode, Partner};

/// Mixup with `lambda ~ Beta(alpha, alpha)`, applied with probability `prob` per batch or per
/// image.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixup {
    pub alpha: f64,
    pub prob: f64,
    pub mode: Mode,
    pub partner: Partner,
}

impl Mixup {
    /// One lambda.
    pub fn draw_lambda(&self, rng: &mut impl Rng) -> f32 {
        Beta::new(self.alpha, self.alpha)
            .expect("alpha > 0")
            .sample(rng) as f32
    }

    /// The draws for a batch: partners, then `r < prob` and lambda once per batch (`Batch`)
    /// or per image (`Elem`).
    pub fn draw(&self, batch: usize, rng: &mut impl Rng) -> Draw {
        let mut draw = Draw::identity(batch);
        if self.alpha <= 0.0 {
            return draw;
        }
        draw.partners = self.partner.draw(batch, rng);
        match self.mode {
            Mode::Batch => {
                if rng.random::<f64>() < self.prob {
                    let lambda = self.draw_lambda(rng);
                    draw.blends = vec![lambda; batch];
                    draw.lambdas = vec![lambda; batch];
                }
            }
            Mode::Elem => {
                for i in 0..batch {
                    if rng.random::<f64>() < self.prob {
                        let lambda = self.draw_lambda(rng);
                        draw.blends[i] = lambda;
                        draw.lambdas[i] = lambda;
                    }
                }
            }
        }
        draw
    }
}
