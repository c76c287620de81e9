//! Test helpers shared by the kernel test targets: a seeded random source, tensor values.
#![allow(dead_code)]

/// xorshift64*; seeded from the clock unless MOE_TEST_SEED is set.
pub struct Rng(u64);

impl Rng {
    pub fn new(test: &str) -> Self {
        let seed = std::env::var("MOE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{test}: seed {seed} (MOE_TEST_SEED={seed} replays it)");
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    /// A routing table: `top_k` distinct experts per token, in random order.
    pub fn routing(&mut self, n_tokens: usize, top_k: usize, n_experts: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(n_tokens * top_k);
        for _ in 0..n_tokens {
            let mut all: Vec<u32> = (0..n_experts as u32).collect();
            for i in 0..top_k {
                let j = i + self.below(n_experts - i);
                all.swap(i, j);
            }
            ids.extend_from_slice(&all[..top_k]);
        }
        ids
    }
    pub fn permutation(&mut self, n: usize) -> Vec<i32> {
        let mut p: Vec<i32> = (0..n as i32).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

/// A tensor's values as f32, flattened.
pub fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
