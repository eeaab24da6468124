//! The simulator's only source of randomness: a seeded xoshiro256++.

/// xoshiro256++ seeded through splitmix64. Deterministic on every platform.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed`; `stream` separates independent users of one seed.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut x = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Exponentially distributed with the given mean (at least 1 ns when `mean > 0`).
    #[inline]
    pub fn exp(&mut self, mean: u64) -> u64 {
        if mean == 0 {
            return 0;
        }
        let u = 1.0 - self.unit();
        ((-u.ln() * mean as f64) as u64).max(1)
    }

    /// Uniform in `[mean/2, 3*mean/2]`: bounded jitter around a mean.
    #[inline]
    pub fn jitter(&mut self, mean: u64) -> u64 {
        if mean < 2 {
            return mean;
        }
        mean / 2 + self.below(mean + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Rng::new(7, 1);
        let mut b = Rng::new(7, 1);
        let mut c = Rng::new(7, 2);
        let xa: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn exp_has_roughly_its_mean() {
        let mut r = Rng::new(1, 0);
        let n = 20_000;
        let sum: u64 = (0..n).map(|_| r.exp(1000)).sum();
        let mean = sum as f64 / n as f64;
        assert!((900.0..1100.0).contains(&mean), "mean {mean}");
        assert!((0..1000).all(|_| r.below(10) < 10));
    }
}
