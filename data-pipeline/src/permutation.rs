//! A seeded permutation of [0, n) evaluated one index at a time (a Feistel network on the next
//! power of four, with cycle walking). It needs O(1) memory and no set-up, so a 100M-sample epoch
//! costs nothing at start-up and every rank computes the same order independently.

use crate::rng::{key, mix64};

#[derive(Debug, Clone, Copy)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Permutation {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let keys = [key(&[seed, 0]), key(&[seed, 1]), key(&[seed, 2]), key(&[seed, 3])];
        Permutation { n, half_bits, keys }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = mix64(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The i-th element of the permutation, i < n.
    pub fn get(&self, i: u64) -> u64 {
        assert!(i < self.n, "index {i} out of a permutation of {}", self.n);
        // The Feistel network permutes [0, 4^half_bits) and n > 4^half_bits / 4, so walking the
        // cycle until it re-enters [0, n) takes a few steps on average.
        let mut x = self.feistel(i);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_permutation_for_awkward_sizes() {
        for n in [1u64, 2, 3, 5, 17, 100, 1000, 4097] {
            let p = Permutation::new(n, 42);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let x = p.get(i) as usize;
                assert!(!seen[x], "n={n}: {x} twice");
                seen[x] = true;
            }
        }
    }

    #[test]
    fn depends_on_the_seed_and_shuffles() {
        let (a, b) = (Permutation::new(1000, 1), Permutation::new(1000, 2));
        let differ = (0..1000).filter(|&i| a.get(i) != b.get(i)).count();
        assert!(differ > 900, "{differ}");
        let fixed = (0..1000).filter(|&i| a.get(i) == i).count();
        assert!(fixed < 20, "{fixed} fixed points");
    }
}
