//! Randomness for request ids and backoff jitter, without a dependency:
//! wyrand (Wang Yi's mixer) over a counter whose start is drawn from std's
//! randomly keyed SipHash (`RandomState`) once. A few instructions per number,
//! where SipHash per number cost ~150. Not for secrets.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static SEED: OnceLock<u64> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// wyrand's increment: odd, so the state visits every `u64`.
const INCREMENT: u64 = 0xa076_1d64_78bd_642f;

/// A uniformly distributed `u64`.
pub fn next_u64() -> u64 {
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(0u64));
    let s = seed.wrapping_add(COUNTER.fetch_add(INCREMENT, Ordering::Relaxed));
    let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
    ((t >> 64) as u64) ^ (t as u64)
}

/// A uniformly distributed number in `[0, 1)`.
pub fn unit() -> f64 {
    (next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_values_stay_in_range_and_vary() {
        let values: Vec<f64> = (0..1000).map(|_| super::unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }

    #[test]
    fn numbers_do_not_repeat_and_every_bit_varies() {
        let values: Vec<u64> = (0..10_000).map(|_| super::next_u64()).collect();
        let distinct: std::collections::HashSet<u64> = values.iter().copied().collect();
        assert_eq!(distinct.len(), values.len());
        let ones = values.iter().fold(0u64, |acc, v| acc | v);
        let zeros = values.iter().fold(0u64, |acc, v| acc | !v);
        assert_eq!((ones, zeros), (u64::MAX, u64::MAX));
    }
}
