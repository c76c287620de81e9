//! Turning logits into the next token: repetition penalty, then greedy or temperature with
//! top-k, top-p and min-p filters, from a seeded generator (same seed, same tokens).

use moe_core::{Error, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of already-seen tokens by this (1.0 = off).
    pub repetition_penalty: f32,
    /// Seed of the random generator; `None` draws one (reported in the response).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every value is in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "invalid temperature {}: must be 0 (greedy) or positive",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("invalid top-p {}: must be in (0, 1]", self.top_p));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(format!("invalid min-p {}: must be in [0, 1)", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "invalid repetition penalty {}: must be positive",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A stateful sampler for one sequence.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: rand::rngs::StdRng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler with `params` (validated).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(rand::random);
        Ok(Self {
            params,
            seed,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
        })
    }

    /// The seed in use.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from `logits` (`[vocab]`), given the tokens seen so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, p.repetition_penalty);
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, descending.
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / p.temperature)),
        );
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        let max = c[0].1;
        let mut sum = 0.0;
        for cand in c.iter_mut() {
            cand.1 = (cand.1 - max).exp();
            sum += cand.1;
        }
        for cand in c.iter_mut() {
            cand.1 /= sum;
        }
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = c.len();
            for (i, cand) in c.iter().enumerate() {
                cumulative += cand.1;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let threshold = p.min_p * c[0].1;
            c.retain(|cand| cand.1 >= threshold);
        }
        let total: f32 = c.iter().map(|cand| cand.1).sum();
        let mut target = self.rng.random::<f32>() * total;
        for cand in c.iter() {
            target -= cand.1;
            if target <= 0.0 {
                return cand.0;
            }
        }
        c.last().expect("at least one candidate").0
    }
}

fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::with_capacity(history.len());
    for &t in history {
        if let Some(l) = logits.get_mut(t as usize) {
            if seen.insert(t) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, -1.0, 2.9]
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&mut logits(), &[]), 1);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let params = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        // Token 1 was seen: 3.0 / 1.5 = 2.0 < 2.9.
        assert_eq!(s.sample(&mut logits(), &[1]), 5);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_restricts() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(42),
            ..Default::default()
        };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone()).unwrap();
            (0..200)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(
            a.iter().all(|&t| t == 1 || t == 5),
            "top-k 2 keeps tokens 1 and 5 only"
        );
        assert!(a.contains(&1) && a.contains(&5));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        // p(1) ≈ 0.39, p(5) ≈ 0.35: top-p 0.5 keeps exactly these two.
        for _ in 0..100 {
            let t = s.sample(&mut logits(), &[]);
            assert!(t == 1 || t == 5);
        }
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        // min-p 0.5 of p(1) keeps 1, 5 and 2 (p(2)/p(1) = e^-1 ≈ 0.37 < 0.5 → dropped).
        for _ in 0..100 {
            let t = s.sample(&mut logits(), &[]);
            assert!(t == 1 || t == 5, "{t}");
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        for params in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.0,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(params).is_err());
        }
    }
}
