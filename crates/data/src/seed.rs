//! Seeded random streams keyed by purpose, epoch and index, so that any draw can be made on any
//! thread, in any order, and come out the same.

use rand::SeedableRng;
use rand::rngs::StdRng;

/// What a random stream is for; each has its own sequence for the same seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Weight initialisation.
    Init = 1,
    /// Which examples a `train_limit` / `val_limit` subset keeps.
    Subset = 2,
    /// The order of examples in an epoch.
    Order = 3,
    /// Per-example transforms (crops, flips).
    Transform = 4,
    /// Batch mixing (CutMix draws).
    Mix = 5,
    /// Stochastic layers inside the model (ShakeDrop's gates and scales).
    Regularize = 6,
    /// The analyses' draws: synthetic out-of-distribution images, in-between-class pairs.
    Analysis = 7,
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A generator for `(seed, stream, epoch, index)`: independent of every other key.
pub fn keyed_rng(seed: u64, stream: Stream, epoch: u64, index: u64) -> StdRng {
    let mut key = mix(seed ^ 0x9e37_79b9_7f4a_7c15);
    for part in [stream as u64, epoch, index] {
        key = mix(key ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    StdRng::seed_from_u64(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    #[test]
    fn keys_give_distinct_repeatable_streams() {
        let draw = |s, e, i| keyed_rng(7, s, e, i).random::<u64>();
        assert_eq!(draw(Stream::Order, 3, 0), draw(Stream::Order, 3, 0));
        assert_ne!(draw(Stream::Order, 3, 0), draw(Stream::Order, 4, 0));
        assert_ne!(draw(Stream::Order, 3, 0), draw(Stream::Mix, 3, 0));
        assert_ne!(draw(Stream::Mix, 0, 1), draw(Stream::Mix, 1, 0));
    }
}
