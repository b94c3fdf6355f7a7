//! Cutout (DeVries and Taylor, 2017), the paper's baseline: a `size x size` square around a
//! centre drawn uniformly over the image, clipped, set to zero (the normalised mean) in each
//! image independently; labels untouched.

use rand::{Rng, RngExt};

use crate::{CutBox, Draw};

/// Cutout of a `size`-pixel square (16 on CIFAR in the paper), applied to each image with
/// probability `prob`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cutout {
    pub size: usize,
    pub prob: f64,
}

impl Cutout {
    /// The draws for a batch: per image `r < prob`, then the centre.
    pub fn draw(&self, batch: usize, height: usize, width: usize, rng: &mut impl Rng) -> Draw {
        let mut draw = Draw::identity(batch);
        draw.zero_fill = true;
        for i in 0..batch {
            if rng.random::<f64>() < self.prob {
                draw.boxes[i] =
                    CutBox::around_random_centre(height, width, self.size, self.size, rng);
            }
        }
        draw
    }
}
