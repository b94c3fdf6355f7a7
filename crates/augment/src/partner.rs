//! Which image each image is mixed with.

use rand::Rng;
use rand::seq::SliceRandom;

/// How mixing partners are chosen. Image `i` takes its partner's pixels from image
/// `partners[i]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Partner {
    /// A random permutation of the batch (the reference's `randperm`); may pair an image with
    /// itself.
    #[default]
    Permutation,
    /// The batch reversed (timm's `flip(0)`): `i` pairs with `batch - 1 - i`; with an odd batch
    /// the middle image pairs with itself.
    Flip,
    /// The batch shifted by one (torchvision's `roll(1, 0)`): `i` pairs with `i - 1`, the first
    /// with the last. Meant for batches that are already shuffled.
    Roll,
}

impl Partner {
    /// The partner of every image; only `Permutation` draws from `rng`.
    pub fn draw(self, batch: usize, rng: &mut impl Rng) -> Vec<usize> {
        match self {
            Self::Permutation => {
                let mut order: Vec<usize> = (0..batch).collect();
                order.shuffle(rng);
                order
            }
            Self::Flip => (0..batch).rev().collect(),
            Self::Roll => (0..batch).map(|i| (i + batch - 1) % batch).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn partners_are_what_each_rule_says() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(Partner::Flip.draw(5, &mut rng), [4, 3, 2, 1, 0]);
        assert_eq!(Partner::Roll.draw(4, &mut rng), [3, 0, 1, 2]);
        let mut permutation = Partner::Permutation.draw(16, &mut rng);
        permutation.sort_unstable();
        assert_eq!(permutation, (0..16).collect::<Vec<_>>());
    }
}
