//! A keyed pseudo-random permutation of `0..n` evaluated one index at a time (a balanced
//! Feistel network on the next even power of two, with cycle-walking back into range): the
//! shuffled position of a sample depends only on (key, index), and nothing is stored.

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A permutation of `0..len` chosen by `key`.
#[derive(Clone, Copy, Debug)]
pub struct Permutation {
    len: u64,
    half_bits: u32,
    key: u64,
}

const ROUNDS: u64 = 4;

impl Permutation {
    /// The permutation of `0..len` for `key`.
    pub fn new(len: u64, key: u64) -> Self {
        let bits = (64 - len.saturating_sub(1).leading_zeros()).max(2);
        Permutation {
            len,
            half_bits: bits.div_ceil(2),
            key,
        }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for round in 0..ROUNDS {
            let f = mix(self.key ^ mix(round ^ mix(right))) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }

    /// Where `index` (< len) goes.
    pub fn apply(&self, index: u64) -> u64 {
        assert!(
            index < self.len,
            "index {index} outside a permutation of {}",
            self.len
        );
        let mut x = self.feistel(index);
        while x >= self.len {
            x = self.feistel(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_bijection_for_many_lengths_and_depends_on_the_key() {
        for len in [1u64, 2, 3, 7, 64, 100, 1000, 4097] {
            let p = Permutation::new(len, 42);
            let mut seen = vec![false; len as usize];
            for i in 0..len {
                let j = p.apply(i) as usize;
                assert!(!seen[j], "{j} hit twice for len {len}");
                seen[j] = true;
            }
        }
        let a: Vec<u64> = (0..100)
            .map(|i| Permutation::new(100, 1).apply(i))
            .collect();
        let b: Vec<u64> = (0..100)
            .map(|i| Permutation::new(100, 2).apply(i))
            .collect();
        assert_ne!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>(), "not the identity");
    }
}
