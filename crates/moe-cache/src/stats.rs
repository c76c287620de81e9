//! What the cache did, counted where it happened.

use std::fmt;

use serde::Serialize;

/// How often each expert of one MoE layer was looked up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerUsage {
    /// Decoder layer index.
    pub layer: usize,
    /// Lookups per expert, indexed by expert id.
    pub counts: Vec<u64>,
}

/// A snapshot of the cache's counters (cumulative since load or the last reset).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertCacheStats {
    /// Cache policy (`lru`, `lfu-decay`, `prefetch`).
    pub policy: String,
    /// The RAM tier's budget in bytes.
    pub budget_bytes: u64,
    /// Bytes of all routed experts as held in RAM (compute dtype, or int8 with q8 experts).
    pub expert_bytes_total: u64,
    /// The smallest budget that works: the most one expert's read reserves (raw buffers and
    /// decoded weights).
    pub min_budget_bytes: u64,
    /// Bytes of experts resident now.
    pub resident_bytes: u64,
    /// Experts resident now.
    pub resident_experts: usize,
    /// The most bytes ever held at once: resident experts plus what reads in flight reserved
    /// (raw buffers and decoded weights). Never above the budget.
    pub peak_bytes: u64,
    /// Rows (tokens) that went through the first MoE layer.
    pub tokens: u64,
    /// Expert lookups (`hits + misses + computed_in_place`).
    pub lookups: u64,
    /// Lookups served from RAM (possibly after waiting for a read already in flight).
    pub hits: u64,
    /// Lookups that read the expert from disk themselves.
    pub misses: u64,
    /// Further reads by lookups already counted: a lookup of several experts that found no
    /// room released them and read one again (callers contending for a small budget).
    pub rereads: u64,
    /// `hits / lookups` (0 when nothing was looked up).
    pub hit_rate: f64,
    /// Experts dropped to make room.
    pub evictions: u64,
    /// Bytes read from the checkpoint files (on demand and ahead of use).
    pub bytes_read: u64,
    /// `bytes_read / tokens` (0 before any token).
    pub bytes_per_token: f64,
    /// Seconds spent in positioned reads (on demand and ahead of use).
    pub read_seconds: f64,
    /// Seconds lookups waited: for their own reads, for reads in flight, for room.
    pub stall_seconds: f64,
    /// Experts the loader thread read ahead of use (routing-aware prefetch).
    pub prefetches: u64,
    /// Prefetched experts that a lookup then used.
    pub prefetch_hits: u64,
    /// Of the prefetch hits, those whose lookup had to wait for the read to finish.
    pub prefetch_late: u64,
    /// Prefetched experts evicted before use or not routed to by the layer they were guessed for.
    pub prefetch_wasted: u64,
    /// Prefetched experts not yet used nor wasted (`prefetches = hits + wasted + pending`).
    pub prefetch_pending: u64,
    /// Guessed experts the loader skipped: no room without evicting what is in use.
    pub prefetch_dropped: u64,
    /// Guessed experts, neither resident nor being read, not read ahead because guesses of
    /// their strength have come true too rarely
    /// ([`crate::calibration::GuessCalibration`]).
    pub prefetch_unsure: u64,
    /// Experts routed to by layers that had a guess.
    pub guessed_layer_experts: u64,
    /// Of those, experts that were in the guess.
    pub guessed_correctly: u64,
    /// `guessed_correctly / guessed_layer_experts`: the fraction of actual experts guessed.
    pub guess_accuracy: f64,
    /// Lookups of experts this tier did not hold whose rows were computed on the lower tier
    /// instead of fetching the weights (Fiddler's choice; GPU over host only).
    pub computed_in_place: u64,
    /// Token rows those lookups computed on the lower tier.
    pub rows_in_place: u64,
    /// Per-layer expert-usage histogram (MoE layers only).
    pub layer_usage: Vec<LayerUsage>,
}

/// `a / b`, 0 when `b` is 0.
pub(crate) fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = b as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

impl fmt::Display for ExpertCacheStats {
    /// Several lines: a summary, prefetch (with that policy), then one histogram line per MoE
    /// layer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let share = 100.0 * self.budget_bytes as f64 / self.expert_bytes_total.max(1) as f64;
        writeln!(
            f,
            "expert cache: policy {} | budget {} ({share:.1} % of {} routed-expert bytes) | resident {} in {} experts, peak {}",
            self.policy,
            human_bytes(self.budget_bytes),
            human_bytes(self.expert_bytes_total),
            human_bytes(self.resident_bytes),
            self.resident_experts,
            human_bytes(self.peak_bytes),
        )?;
        write!(
            f,
            "expert cache: {} lookups, {} hits, {} misses (hit rate {:.1} %), {} evictions | read {} from disk in {:.3} s ({}/token over {} tokens), stalled {:.3} s",
            self.lookups,
            self.hits,
            self.misses,
            100.0 * self.hit_rate,
            self.evictions,
            human_bytes(self.bytes_read),
            self.read_seconds,
            human_bytes(self.bytes_per_token.round() as u64),
            self.tokens,
            self.stall_seconds,
        )?;
        if self.policy == "prefetch" {
            write!(
                f,
                "\nexpert cache: prefetch {} read ahead, {} used ({} late), {} wasted, {} pending, {} dropped, {} unsure guesses not read | guess accuracy {:.1} % ({} of {} routed experts)",
                self.prefetches,
                self.prefetch_hits,
                self.prefetch_late,
                self.prefetch_wasted,
                self.prefetch_pending,
                self.prefetch_dropped,
                self.prefetch_unsure,
                100.0 * self.guess_accuracy,
                self.guessed_correctly,
                self.guessed_layer_experts,
            )?;
        }
        if self.computed_in_place > 0 {
            write!(
                f,
                "\nexpert cache: {} lookups computed in place on the lower tier ({} token rows) instead of fetching",
                self.computed_in_place, self.rows_in_place,
            )?;
        }
        for usage in &self.layer_usage {
            let counts: Vec<String> = usage.counts.iter().map(u64::to_string).collect();
            write!(
                f,
                "\nexpert usage layer {:>3}: {}",
                usage.layer,
                counts.join(" ")
            )?;
        }
        Ok(())
    }
}
