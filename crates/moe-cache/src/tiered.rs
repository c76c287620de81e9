//! [`TieredExperts`]: routed experts on disk, at most a budget of them in host RAM.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moe_core::{Error, ExpertKey, Result};
use moe_kernels::ExpertWeights;
use moe_models::{ExpertLayerLayout, ExpertOnDisk, ExpertSource, ExpertSourceFactory};

use crate::budget::ExpertBudget;
use crate::policy::{CachePolicy, PolicyKind};
use crate::stats::{ExpertCacheStats, LayerUsage};

/// Mutable state, under one lock.
struct State {
    /// Resident experts with their size in bytes.
    resident: HashMap<ExpertKey, (Arc<ExpertWeights>, u64)>,
    resident_bytes: u64,
    high_water: u64,
    policy: Box<dyn CachePolicy>,
    hits: u64,
    misses: u64,
    evictions: u64,
    bytes_read: u64,
    read_time: Duration,
    stall_time: Duration,
    /// `usage[layer][expert]`; empty for dense layers.
    usage: Vec<Vec<u64>>,
}

/// An [`ExpertSource`] that reads routed experts from the checkpoint files on demand (plain
/// positioned reads into owned buffers, not the mmap) and keeps at most `budget` bytes of them
/// in RAM, evicting by a [`CachePolicy`] before every insert that would exceed it.
pub struct TieredExperts {
    /// `experts[layer][expert]`; empty for dense layers.
    experts: Vec<Vec<ExpertOnDisk>>,
    files: HashMap<PathBuf, File>,
    budget: u64,
    total_bytes: u64,
    state: Mutex<State>,
}

impl TieredExperts {
    /// Indexes where every routed expert of `layouts` lies (nothing is read; every expert
    /// layout, per-expert or stacked, float or MXFP4, is supported) and checks that
    /// the budget holds the largest layer's working set (top_k of its experts).
    pub fn open(
        n_layers: usize,
        layouts: &[ExpertLayerLayout],
        budget: ExpertBudget,
        policy: Box<dyn CachePolicy>,
    ) -> Result<Self> {
        let mut experts: Vec<Vec<ExpertOnDisk>> = (0..n_layers).map(|_| Vec::new()).collect();
        let mut files = HashMap::new();
        // (bytes, layer, top_k) of the largest working set.
        let mut min_need = (0u64, 0usize, 0usize);
        for l in layouts {
            let layer = l.experts_on_disk()?;
            for t in layer.iter().flat_map(|x| &x.tensors) {
                if !files.contains_key(&t.path) {
                    let file = File::open(&t.path).map_err(|source| Error::Io {
                        path: t.path.clone(),
                        source,
                    })?;
                    files.insert(t.path.clone(), file);
                }
            }
            let largest = layer.iter().map(|x| x.ram_bytes as u64).max().unwrap_or(0);
            let need = largest * l.top_k.min(l.n_experts) as u64;
            if need > min_need.0 {
                min_need = (need, l.layer, l.top_k);
            }
            experts[l.layer] = layer;
        }
        let total_bytes: u64 = experts.iter().flatten().map(|x| x.ram_bytes as u64).sum();
        let budget_bytes = budget.resolve(total_bytes);
        if budget_bytes < min_need.0 {
            let given = match budget {
                ExpertBudget::Bytes(_) => format!("{budget_bytes} bytes"),
                ExpertBudget::Percent(p) => format!("{p}% ({budget_bytes} bytes)"),
            };
            return Err(Error::InvalidRequest(format!(
                "--expert-budget {given} cannot hold one layer's working set: the minimum is {} bytes (top-{} experts of layer {})",
                min_need.0, min_need.2, min_need.1
            )));
        }
        let usage = experts.iter().map(|l| vec![0; l.len()]).collect();
        Ok(Self {
            experts,
            files,
            budget: budget_bytes,
            total_bytes,
            state: Mutex::new(State {
                resident: HashMap::new(),
                resident_bytes: 0,
                high_water: 0,
                policy,
                hits: 0,
                misses: 0,
                evictions: 0,
                bytes_read: 0,
                read_time: Duration::ZERO,
                stall_time: Duration::ZERO,
                usage,
            }),
        })
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    /// Bytes of all routed experts in the compute dtype.
    pub fn total_expert_bytes(&self) -> u64 {
        self.total_bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters, not invariants, half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ExpertCacheStats {
        let s = self.lock();
        let lookups = s.hits + s.misses;
        ExpertCacheStats {
            policy: s.policy.name().to_string(),
            budget_bytes: self.budget,
            expert_bytes_total: self.total_bytes,
            resident_bytes: s.resident_bytes,
            resident_experts: s.resident.len(),
            resident_high_water_bytes: s.high_water,
            lookups,
            hits: s.hits,
            misses: s.misses,
            hit_rate: if lookups == 0 {
                0.0
            } else {
                s.hits as f64 / lookups as f64
            },
            evictions: s.evictions,
            bytes_read: s.bytes_read,
            read_seconds: s.read_time.as_secs_f64(),
            stall_seconds: s.stall_time.as_secs_f64(),
            layer_usage: s
                .usage
                .iter()
                .enumerate()
                .filter(|(_, counts)| !counts.is_empty())
                .map(|(layer, counts)| LayerUsage {
                    layer,
                    counts: counts.clone(),
                })
                .collect(),
        }
    }

    /// Zeroes the counters (resident experts stay; the high-water mark restarts at the
    /// bytes resident now).
    pub fn reset_stats(&self) {
        let mut s = self.lock();
        s.hits = 0;
        s.misses = 0;
        s.evictions = 0;
        s.bytes_read = 0;
        s.read_time = Duration::ZERO;
        s.stall_time = Duration::ZERO;
        s.high_water = s.resident_bytes;
        for counts in &mut s.usage {
            counts.iter_mut().for_each(|c| *c = 0);
        }
    }

    /// Reads and decodes one expert; returns it with the bytes read and the time spent reading.
    fn read(&self, on_disk: &ExpertOnDisk) -> Result<(ExpertWeights, u64, Duration)> {
        let mut read_time = Duration::ZERO;
        let mut bytes_read = 0u64;
        let mut buffers = Vec::with_capacity(on_disk.tensors.len());
        for t in &on_disk.tensors {
            let file = &self.files[&t.path];
            let mut buffer = vec![0u8; t.len];
            let start = Instant::now();
            file.read_exact_at(&mut buffer, t.offset)
                .map_err(|source| Error::Io {
                    path: t.path.clone(),
                    source,
                })?;
            read_time += start.elapsed();
            bytes_read += t.len as u64;
            buffers.push(buffer);
        }
        let weights = on_disk.decode(&buffers)?;
        Ok((weights, bytes_read, read_time))
    }
}

impl ExpertSource for TieredExperts {
    fn expert(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>> {
        let on_disk = self
            .experts
            .get(key.layer)
            .and_then(|layer| layer.get(key.expert))
            .ok_or_else(|| {
                Error::InvalidRequest(format!("layer {} has no expert {}", key.layer, key.expert))
            })?;
        {
            let mut s = self.lock();
            s.usage[key.layer][key.expert] += 1;
            if let Some((weights, _)) = s.resident.get(&key).cloned() {
                s.hits += 1;
                s.policy.on_hit(key);
                return Ok(weights);
            }
            s.misses += 1;
        }
        // Read without the lock: other lookups (other threads' batches) go on meanwhile.
        let start = Instant::now();
        let (weights, bytes_read, read_time) = self.read(on_disk)?;
        let weights = Arc::new(weights);
        let mut s = self.lock();
        s.bytes_read += bytes_read;
        s.read_time += read_time;
        s.stall_time += start.elapsed();
        if let Some((existing, _)) = s.resident.get(&key).cloned() {
            // Another thread brought it in while this one read.
            return Ok(existing);
        }
        let size = on_disk.ram_bytes as u64;
        while s.resident_bytes + size > self.budget {
            let victim = s.policy.evict().ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "expert cache: an expert of {size} bytes does not fit the budget of {} bytes",
                    self.budget
                ))
            })?;
            if let Some((_, evicted)) = s.resident.remove(&victim) {
                s.resident_bytes -= evicted;
                s.evictions += 1;
            }
        }
        debug_assert_eq!(weights.n_bytes() as u64, size);
        s.resident.insert(key, (weights.clone(), size));
        s.resident_bytes += size;
        s.high_water = s.high_water.max(s.resident_bytes);
        assert!(
            s.resident_bytes <= self.budget,
            "expert cache over budget: {} > {}",
            s.resident_bytes,
            self.budget
        );
        s.policy.on_insert(key);
        Ok(weights)
    }

    fn resident_bytes(&self) -> usize {
        self.lock().resident_bytes as usize
    }
}

/// The [`ExpertSourceFactory`] the engine passes in `LoadOptions`: builds a [`TieredExperts`]
/// with this budget and policy, and keeps it so the engine can read its statistics.
pub struct TieredExpertsBuilder {
    budget: ExpertBudget,
    policy: PolicyKind,
    built: Mutex<Option<Arc<TieredExperts>>>,
}

impl TieredExpertsBuilder {
    /// A builder for `budget` and `policy`.
    pub fn new(budget: ExpertBudget, policy: PolicyKind) -> Self {
        Self {
            budget,
            policy,
            built: Mutex::new(None),
        }
    }

    /// The cache built by the last successful load, if any.
    pub fn built(&self) -> Option<Arc<TieredExperts>> {
        self.built.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::fmt::Debug for TieredExpertsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredExpertsBuilder")
            .field("budget", &self.budget)
            .field("policy", &self.policy)
            .field("built", &self.built().is_some())
            .finish()
    }
}

impl ExpertSourceFactory for TieredExpertsBuilder {
    fn build(
        &self,
        n_layers: usize,
        layouts: &[ExpertLayerLayout],
    ) -> Result<Arc<dyn ExpertSource>> {
        let lookups_per_token = layouts.iter().map(|l| l.top_k).sum();
        let cache = Arc::new(TieredExperts::open(
            n_layers,
            layouts,
            self.budget,
            self.policy.build(lookups_per_token),
        )?);
        *self.built.lock().unwrap_or_else(|p| p.into_inner()) = Some(cache.clone());
        Ok(cache)
    }
}
