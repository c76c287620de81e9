//! Fiddler's decision for a missed expert when the lower tier can compute (GPU ← host): bring
//! the expert's weights up, or compute its tokens where the weights are. A pure cost model,
//! called by [`crate::TieredExperts`] for a cache whose lower tier computes
//! ([`crate::tier::LowerTier::weights_in_place`]); the RAM-over-disk tier never needs it
//! (disk cannot compute).

/// Where a missed expert's tokens are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Copy the weights to the upper tier (and cache them there), compute there.
    Fetch,
    /// Send the tokens' activations down, compute on the lower tier, send the results back.
    ComputeInPlace,
}

/// Throughputs of the two tiers and the link between them (bytes/s and FLOP/s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierCosts {
    /// Copy bandwidth from the lower to the upper tier (PCIe host → device).
    pub link_bytes_per_s: f64,
    /// Memory bandwidth of the lower tier, for streaming weights through its compute.
    pub lower_memory_bytes_per_s: f64,
    /// Sustained matmul throughput of the lower tier.
    pub lower_flops: f64,
    /// Sustained matmul throughput of the upper tier.
    pub upper_flops: f64,
}

/// One expert's shape as the cost model sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertCost {
    /// Bytes of its weights.
    pub weight_bytes: u64,
    /// FLOPs per token (a gated FFN: `2 × 3 × hidden × intermediate`).
    pub flops_per_token: f64,
    /// Bytes of one token's input plus output activations.
    pub activation_bytes_per_token: u64,
}

impl ExpertCost {
    /// A gated FFN expert (`gate`, `up`: `[intermediate, hidden]`, `down`) whose weights take
    /// `weight_bytes`, with activations of `activation_elem_bytes` per element.
    pub fn gated_ffn(
        hidden: usize,
        intermediate: usize,
        weight_bytes: u64,
        activation_elem_bytes: usize,
    ) -> Self {
        Self {
            weight_bytes,
            flops_per_token: 2.0 * 3.0 * hidden as f64 * intermediate as f64,
            activation_bytes_per_token: (2 * hidden * activation_elem_bytes) as u64,
        }
    }
}

impl TierCosts {
    /// A GPU over host RAM as this build copies: pageable (not pinned) host-to-device copies
    /// (about 10 GB/s on PCIe 4), a desktop CPU's memory bandwidth (20 GB/s) and matmul rate
    /// (100 GFLOP/s), a data-centre GPU's tensor cores (100 TFLOP/s). Rough on purpose: the
    /// decision only needs the crossover's order of magnitude.
    pub fn gpu_over_host() -> Self {
        Self {
            link_bytes_per_s: 10e9,
            lower_memory_bytes_per_s: 20e9,
            lower_flops: 100e9,
            upper_flops: 100e12,
        }
    }

    /// Seconds to copy the weights up and compute `n_tokens` there.
    pub fn fetch_seconds(&self, expert: &ExpertCost, n_tokens: usize) -> f64 {
        expert.weight_bytes as f64 / self.link_bytes_per_s
            + n_tokens as f64 * expert.flops_per_token / self.upper_flops
    }

    /// Seconds to compute `n_tokens` on the lower tier (the slower of streaming the weights and
    /// the arithmetic: a roofline) plus moving their activations both ways.
    pub fn in_place_seconds(&self, expert: &ExpertCost, n_tokens: usize) -> f64 {
        let n = n_tokens as f64;
        let stream = expert.weight_bytes as f64 / self.lower_memory_bytes_per_s;
        let math = n * expert.flops_per_token / self.lower_flops;
        stream.max(math) + n * expert.activation_bytes_per_token as f64 / self.link_bytes_per_s
    }

    /// The cheaper placement for `n_tokens` routed to a missed expert (ties fetch: the copy
    /// also warms the cache).
    pub fn place(&self, expert: &ExpertCost, n_tokens: usize) -> Placement {
        if self.in_place_seconds(expert, n_tokens) < self.fetch_seconds(expert, n_tokens) {
            Placement::ComputeInPlace
        } else {
            Placement::Fetch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Qwen3-30B-A3B expert in bf16 (hidden 2048, intermediate 768) on a PCIe 4 host with
    /// a 2-core-class CPU and an H100-class GPU.
    fn setup() -> (TierCosts, ExpertCost) {
        let (h, i) = (2048.0, 768.0);
        (
            TierCosts {
                link_bytes_per_s: 25e9,
                lower_memory_bytes_per_s: 20e9,
                lower_flops: 100e9,
                upper_flops: 400e12,
            },
            ExpertCost::gated_ffn(h as usize, i as usize, (3.0 * h * i * 2.0) as u64, 2),
        )
    }

    #[test]
    fn few_tokens_compute_in_place_many_fetch() {
        let (tiers, expert) = setup();
        // Streaming 9 MiB through host memory (20 GB/s) costs about the copy (25 GB/s) plus
        // one token's math; with so little math, the copy loses only when the host streams
        // faster than the link. Make the host a little faster to get a crossover.
        let tiers = TierCosts {
            lower_memory_bytes_per_s: 40e9,
            ..tiers
        };
        assert_eq!(tiers.place(&expert, 1), Placement::ComputeInPlace);
        assert_eq!(tiers.place(&expert, 512), Placement::Fetch);
        // One crossover: once fetching wins, it keeps winning.
        let first_fetch = (1..=512)
            .find(|&n| tiers.place(&expert, n) == Placement::Fetch)
            .unwrap();
        assert!(first_fetch > 1);
        assert!((first_fetch..=512).all(|n| tiers.place(&expert, n) == Placement::Fetch));
        // At the crossover the two costs meet (within one token's math on the host).
        let gap = tiers.in_place_seconds(&expert, first_fetch)
            - tiers.fetch_seconds(&expert, first_fetch);
        assert!(gap >= 0.0 && gap < expert.flops_per_token / tiers.lower_flops * 1.01);
    }

    #[test]
    fn pageable_copies_keep_decode_tokens_in_place() {
        // A Qwen3-30B-A3B bf16 expert: one decoding token computes on the host, a prefill
        // chunk of 256 tokens fetches.
        let (_, expert) = setup();
        let tiers = TierCosts::gpu_over_host();
        assert_eq!(tiers.place(&expert, 1), Placement::ComputeInPlace);
        assert_eq!(tiers.place(&expert, 256), Placement::Fetch);
    }

    #[test]
    fn a_slow_link_keeps_more_tokens_in_place() {
        let (fast, expert) = setup();
        let fast = TierCosts {
            lower_memory_bytes_per_s: 40e9,
            ..fast
        };
        let slow = TierCosts {
            link_bytes_per_s: 8e9,
            ..fast
        };
        let crossover = |t: &TierCosts| {
            (1..=4096)
                .find(|&n| t.place(&expert, n) == Placement::Fetch)
                .unwrap()
        };
        assert!(crossover(&slow) > crossover(&fast));
        // The setup's host streams slower than the link: even one token fetches.
        let (as_given, _) = setup();
        assert_eq!(as_given.place(&expert, 1), Placement::Fetch);
    }
}
