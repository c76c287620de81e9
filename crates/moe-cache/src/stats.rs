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
    /// Eviction policy (`lru`, `lfu-decay`).
    pub policy: String,
    /// The RAM tier's budget in bytes.
    pub budget_bytes: u64,
    /// Bytes of all routed experts in the compute dtype.
    pub expert_bytes_total: u64,
    /// Bytes of experts resident now.
    pub resident_bytes: u64,
    /// Experts resident now.
    pub resident_experts: usize,
    /// The most bytes ever resident, checked after every insert (never above the budget).
    pub resident_high_water_bytes: u64,
    /// Expert lookups (`hits + misses`).
    pub lookups: u64,
    /// Lookups served from RAM.
    pub hits: u64,
    /// Lookups that read the expert from disk.
    pub misses: u64,
    /// `hits / lookups` (0 when nothing was looked up).
    pub hit_rate: f64,
    /// Experts dropped to make room.
    pub evictions: u64,
    /// Bytes read from the checkpoint files.
    pub bytes_read: u64,
    /// Seconds spent in positioned reads.
    pub read_seconds: f64,
    /// Seconds lookups waited for misses (read and conversion to the compute dtype).
    pub stall_seconds: f64,
    /// Per-layer expert-usage histogram (MoE layers only).
    pub layer_usage: Vec<LayerUsage>,
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
    /// Several lines: a summary, then one histogram line per MoE layer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let share = 100.0 * self.budget_bytes as f64 / self.expert_bytes_total.max(1) as f64;
        writeln!(
            f,
            "expert cache: policy {} | budget {} ({share:.1} % of {} routed-expert bytes) | resident {} in {} experts, high-water {}",
            self.policy,
            human_bytes(self.budget_bytes),
            human_bytes(self.expert_bytes_total),
            human_bytes(self.resident_bytes),
            self.resident_experts,
            human_bytes(self.resident_high_water_bytes),
        )?;
        write!(
            f,
            "expert cache: {} lookups, {} hits, {} misses (hit rate {:.1} %), {} evictions | read {} from disk in {:.3} s, stalled {:.3} s",
            self.lookups,
            self.hits,
            self.misses,
            100.0 * self.hit_rate,
            self.evictions,
            human_bytes(self.bytes_read),
            self.read_seconds,
            self.stall_seconds,
        )?;
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
