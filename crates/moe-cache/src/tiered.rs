//! [`TieredExperts`]: routed experts on disk, at most a budget of them in host RAM.
//!
//! Accounting: every byte an expert takes counts against the budget from the moment a read is
//! decided, not when it lands. A read first *reserves* its transient bytes (raw buffers plus
//! decoded weights, [`transient_bytes`]), evicting experts nobody holds to make room; once
//! decoded, the reservation shrinks to the weights' size and they become resident. An expert a
//! lookup returned is *pinned* while the caller holds it (its `Arc` has another owner) and is
//! never evicted then, so dropping the cache's reference always frees the memory. A lookup that
//! finds no room releases what it pinned and waits until callers computing with pinned experts
//! release them (no caller waits while holding experts: no deadlock). The MoE block takes a
//! layer's experts in waves of as many as fit ([`ExpertSource::max_held_experts`]), at least
//! one, so one expert's transient bytes are the minimum budget.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Device;
use moe_core::{Error, ExpertKey, Result};
use moe_kernels::{ExpertGroups, ExpertWeights};
use moe_models::{ExpertGuess, ExpertLayerLayout, ExpertSource, ExpertSourceFactory};

use crate::budget::ExpertBudget;
use crate::calibration::GuessCalibration;
use crate::loader::Loader;
use crate::placement::{Placement, TierCosts};
use crate::policy::{CachePolicy, PolicyKind};
use crate::stats::{ratio, ExpertCacheStats, LayerUsage};
use crate::tier::{DiskTier, HostTier, LowerTier, PageCache};

/// How long a lookup waits for room before concluding that the budget is held by experts in
/// use that will not be released (a caller holding more experts at once than fit).
const ROOM_TIMEOUT: Duration = Duration::from_secs(60);

/// Counters, zeroed by [`TieredExperts::reset_stats`].
#[derive(Default)]
struct Counters {
    tokens: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
    bytes_read: u64,
    read_time: Duration,
    stall_time: Duration,
    prefetches: u64,
    prefetch_hits: u64,
    prefetch_late: u64,
    prefetch_wasted: u64,
    prefetch_dropped: u64,
    prefetch_unsure: u64,
    guessed_layer_experts: u64,
    guessed_correctly: u64,
    computed_in_place: u64,
    rows_in_place: u64,
    rereads: u64,
}

/// A guessed expert waiting for the loader, tagged with the guess it came from.
#[derive(Clone, Copy)]
pub(crate) struct Job {
    pub(crate) key: ExpertKey,
    guess: u64,
}

/// Mutable state, under one lock.
pub(crate) struct State {
    /// Resident experts with their size in bytes.
    resident: HashMap<ExpertKey, (Arc<ExpertWeights>, u64)>,
    resident_bytes: u64,
    /// Experts being read, with the bytes reserved for them.
    in_flight: HashMap<ExpertKey, u64>,
    reserved_bytes: u64,
    peak_bytes: u64,
    policy: Box<dyn CachePolicy>,
    counters: Counters,
    /// `usage[layer][expert]`; empty for dense layers.
    usage: Vec<Vec<u64>>,
    /// Prefetched experts no lookup has used yet.
    unused_prefetches: HashSet<ExpertKey>,
    /// The latest guess per layer, until the layer routes.
    guesses: HashMap<usize, Vec<ExpertGuess>>,
    /// How often guesses of each strength came true: what decides which are read ahead.
    calibration: GuessCalibration,
    /// Experts of the layer computing now (the loader must not evict them).
    active: HashSet<ExpertKey>,
    /// Guessed experts for the loader, oldest first.
    pub(crate) queue: VecDeque<Job>,
    /// Guesses made so far (tags [`Job`]s so stale ones can be dropped).
    guess_count: u64,
    /// Set when the cache is dropped: the loader exits.
    pub(crate) shutdown: bool,
    /// Fetch-or-compute costs, when misses may be computed on the lower tier (Fiddler).
    placement: Option<TierCosts>,
}

/// The part of the cache the loader thread shares.
pub(crate) struct Inner {
    /// Where misses come from.
    lower: Arc<dyn LowerTier>,
    budget: u64,
    total_bytes: u64,
    /// The most one read reserves: the minimum budget.
    min_budget: u64,
    /// Experts one caller may hold at once ([`ExpertSource::max_held_experts`]).
    max_held: usize,
    /// The first MoE layer, whose rows count as the tokens.
    first_moe_layer: usize,
    state: Mutex<State>,
    /// Signalled when an expert lands, is evicted or a read fails.
    changed: Condvar,
    /// Signalled when the loader has work (or must exit).
    pub(crate) work: Condvar,
}

/// Who reads an expert.
#[derive(Clone, Copy, PartialEq)]
enum Reader {
    /// A lookup that missed.
    Demand,
    /// The loader thread, ahead of use.
    Prefetch,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters, not invariants, half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Evicts experts (policy's choice among those `reader` may evict) until `need` more bytes
    /// fit; false when no such expert is left. Nobody else holds an evicted expert, so its
    /// memory is freed here.
    fn make_room(&self, s: &mut State, need: u64, reader: Reader) -> bool {
        while s.resident_bytes + s.reserved_bytes + need > self.budget {
            let State {
                policy,
                resident,
                active,
                guesses,
                ..
            } = s;
            let evictable = |k: ExpertKey| {
                let unpinned = resident
                    .get(&k)
                    .is_some_and(|(w, _)| Arc::strong_count(w) == 1);
                // The loader keeps what the computing and the guessed layers need.
                let needed = reader == Reader::Prefetch
                    && (active.contains(&k)
                        || guesses
                            .get(&k.layer)
                            .is_some_and(|g| g.iter().any(|g| g.expert == k.expert)));
                unpinned && !needed
            };
            let Some(victim) = policy.evict(&evictable) else {
                return false;
            };
            if let Some((_, bytes)) = s.resident.remove(&victim) {
                s.resident_bytes -= bytes;
                s.counters.evictions += 1;
                if s.unused_prefetches.remove(&victim) {
                    s.counters.prefetch_wasted += 1;
                }
            }
        }
        true
    }

    /// Reserves `need` bytes for reading `key` (room was made).
    fn reserve(&self, s: &mut State, key: ExpertKey, need: u64) {
        s.in_flight.insert(key, need);
        s.reserved_bytes += need;
        self.note_peak(s);
    }

    fn note_peak(&self, s: &mut State) {
        let held = s.resident_bytes + s.reserved_bytes;
        s.peak_bytes = s.peak_bytes.max(held);
        assert!(
            held <= self.budget,
            "expert cache over budget: {held} > {}",
            self.budget
        );
    }

    /// Loads `key` from the lower tier, for which room was made, without the lock, and makes
    /// it resident.
    fn load<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        key: ExpertKey,
        reader: Reader,
    ) -> (MutexGuard<'a, State>, Result<Arc<ExpertWeights>>) {
        let sizes = self
            .lower
            .transient_bytes(key)
            .and_then(|need| Ok((need, self.lower.ram_bytes(key)?)));
        let (need, size) = match sizes {
            Ok(sizes) => sizes,
            Err(e) => return (s, Err(e)),
        };
        self.reserve(&mut s, key, need);
        drop(s);
        let loaded = self.lower.load(key);
        let mut s = self.lock();
        s.in_flight.remove(&key);
        s.reserved_bytes -= need;
        let result = loaded.map(|loaded| {
            debug_assert_eq!(loaded.weights.n_bytes() as u64, size);
            let weights = Arc::new(loaded.weights);
            s.counters.bytes_read += loaded.bytes_moved;
            s.counters.read_time += loaded.move_time;
            s.resident.insert(key, (weights.clone(), size));
            s.resident_bytes += size;
            self.note_peak(&mut s);
            s.policy.on_insert(key);
            if reader == Reader::Prefetch {
                s.counters.prefetches += 1;
                s.unused_prefetches.insert(key);
            }
            weights
        });
        self.changed.notify_all();
        (s, result)
    }

    /// The loader's step: reads one guessed expert if it is still wanted and room can be made
    /// without evicting what is in use or needed. Returns the lock.
    pub(crate) fn prefetch_one<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        job: Job,
    ) -> MutexGuard<'a, State> {
        let key = job.key;
        if job.guess + 1 < s.guess_count
            || s.resident.contains_key(&key)
            || s.in_flight.contains_key(&key)
        {
            return s;
        }
        let Ok(need) = self.lower.transient_bytes(key) else {
            return s;
        };
        if !self.make_room(&mut s, need, Reader::Prefetch) {
            s.counters.prefetch_dropped += 1;
            return s;
        }
        // A failed read is not reported here: the lookup reads again and reports it.
        self.load(s, key, Reader::Prefetch).0
    }
}

impl Inner {
    /// The lookup behind [`ExpertSource::expert`] and [`ExpertSource::experts`]: every key's
    /// weights, pinned for the caller, in the order asked. Resident keys are pinned first (so
    /// making room for the misses cannot evict them), then the misses are read one at a time.
    /// When no room can be made and no read is in flight, what this call pinned is released
    /// before it waits: a caller holds experts while it waits only for reads in flight, which
    /// land without needing anything, so callers cannot deadlock. Each key
    /// counts once, as the hit or miss of its first resolution; reading it again after letting
    /// it go counts as a reread.
    fn acquire(&self, keys: &[ExpertKey]) -> Result<Vec<Arc<ExpertWeights>>> {
        let start = Instant::now();
        let mut counted = vec![false; keys.len()];
        let mut held: Vec<Option<Arc<ExpertWeights>>> = vec![None; keys.len()];
        let (mut waited, mut missed) = (false, false);
        let mut s = self.lock();
        for k in keys {
            s.usage[k.layer][k.expert] += 1;
        }
        loop {
            // Pin what is resident.
            for (i, &key) in keys.iter().enumerate() {
                if held[i].is_some() {
                    continue;
                }
                let Some((weights, _)) = s.resident.get(&key) else {
                    continue;
                };
                held[i] = Some(weights.clone());
                if !counted[i] {
                    counted[i] = true;
                    s.counters.hits += 1;
                    s.policy.on_hit(key);
                    if s.unused_prefetches.remove(&key) {
                        s.counters.prefetch_hits += 1;
                        s.counters.prefetch_late += u64::from(waited);
                    }
                }
            }
            let Some(i) = held.iter().position(Option::is_none) else {
                break;
            };
            let key = keys[i];
            // A key being read (by the loader or another caller) is waited for, not read again.
            if !s.in_flight.contains_key(&key)
                && self.make_room(&mut s, self.lower.transient_bytes(key)?, Reader::Demand)
            {
                if counted[i] {
                    s.counters.rereads += 1;
                } else {
                    counted[i] = true;
                    s.counters.misses += 1;
                }
                missed = true;
                let (guard, result) = self.load(s, key, Reader::Demand);
                s = guard;
                held[i] = Some(result?);
                continue;
            }
            // Reads in flight land without needing more room, so waiting for them while
            // holding ours is safe; with none in flight, only callers' experts hold the room:
            // let ours go before waiting.
            if s.in_flight.is_empty() {
                held.iter_mut().for_each(|w| *w = None);
            }
            self.check_room_timeout(&s, key, start)?;
            waited = true;
            s = self.wait_for_change(s);
        }
        if waited || missed {
            s.counters.stall_time += start.elapsed();
        }
        Ok(held.into_iter().map(|w| w.expect("all pinned")).collect())
    }

    /// An error once a lookup has waited [`ROOM_TIMEOUT`] for room that only experts held
    /// by callers could free (one caller holding more experts than fit).
    fn check_room_timeout(&self, s: &State, key: ExpertKey, start: Instant) -> Result<()> {
        if start.elapsed() > ROOM_TIMEOUT && s.in_flight.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "expert cache: no room for layer {} expert {} in the budget of {} bytes after {} s: the experts in use hold it",
                key.layer,
                key.expert,
                self.budget,
                ROOM_TIMEOUT.as_secs()
            )));
        }
        Ok(())
    }

    /// Waits until an expert lands, is evicted or a read fails, or 2 ms pass (a caller
    /// dropping an expert it held is not signalled).
    fn wait_for_change<'a>(&'a self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(s, Duration::from_millis(2))
            .unwrap_or_else(|p| p.into_inner())
            .0
    }
}

/// An [`ExpertSource`] that reads routed experts from the checkpoint files on demand (plain
/// positioned reads into owned buffers, not the mmap) and keeps at most `budget` bytes of them
/// — resident, in use, or being read — in RAM, evicting by a [`CachePolicy`]. With a policy
/// that prefetches, a loader thread reads guessed experts ahead of use.
pub struct TieredExperts {
    inner: Arc<Inner>,
    /// The loader thread (policies that prefetch); joined on drop.
    _loader: Option<Loader>,
}

impl TieredExperts {
    /// A cache over the checkpoint files ([`DiskTier`]) for the MoE layers `layouts` of a
    /// model of `n_layers` decoder layers; see [`TieredExperts::over`].
    pub fn open(
        n_layers: usize,
        layouts: &[ExpertLayerLayout],
        budget: ExpertBudget,
        policy: Box<dyn CachePolicy>,
        page_cache: PageCache,
    ) -> Result<Self> {
        let disk = DiskTier::open(n_layers, layouts, page_cache)?;
        Self::over(Arc::new(disk), budget, policy)
    }

    /// A cache of at most `budget` over `lower` (nothing is loaded yet). Checks that the
    /// budget holds one expert while it is loaded ([`LowerTier::transient_bytes`]): the MoE
    /// block computes in waves of as many experts as fit, at least one, so that is what one
    /// step needs.
    pub fn over(
        lower: Arc<dyn LowerTier>,
        budget: ExpertBudget,
        policy: Box<dyn CachePolicy>,
    ) -> Result<Self> {
        let per_layer = lower.experts_per_layer();
        let mut total_bytes = 0u64;
        // (bytes, layer) of the largest single-expert need.
        let mut min_need = (0u64, 0usize);
        let mut largest = 0u64;
        for (layer, &n) in per_layer.iter().enumerate() {
            for expert in 0..n {
                let key = ExpertKey { layer, expert };
                let ram = lower.ram_bytes(key)?;
                total_bytes += ram;
                largest = largest.max(ram);
                let need = lower.transient_bytes(key)?;
                if need > min_need.0 {
                    min_need = (need, layer);
                }
            }
        }
        let budget_bytes = budget.resolve(total_bytes);
        if budget_bytes < min_need.0 {
            let given = match budget {
                ExpertBudget::Bytes(_) => format!("{budget_bytes} bytes"),
                ExpertBudget::Percent(p) => format!("{p}% ({budget_bytes} bytes)"),
            };
            return Err(Error::InvalidRequest(format!(
                "--expert-budget {given} cannot hold one step's working set: the minimum is {} bytes (one expert of layer {} while it is read and decoded)",
                min_need.0, min_need.1
            )));
        }
        let usage = per_layer.iter().map(|&n| vec![0; n]).collect();
        let prefetches = policy.prefetches();
        let inner = Arc::new(Inner {
            first_moe_layer: per_layer.iter().position(|&n| n > 0).unwrap_or(0),
            lower,
            budget: budget_bytes,
            total_bytes,
            min_budget: min_need.0,
            max_held: 1 + ((budget_bytes - min_need.0) / largest.max(1)) as usize,
            state: Mutex::new(State {
                resident: HashMap::new(),
                resident_bytes: 0,
                in_flight: HashMap::new(),
                reserved_bytes: 0,
                peak_bytes: 0,
                policy,
                counters: Counters::default(),
                usage,
                unused_prefetches: HashSet::new(),
                guesses: HashMap::new(),
                calibration: GuessCalibration::default(),
                active: HashSet::new(),
                queue: VecDeque::new(),
                guess_count: 0,
                shutdown: false,
                placement: None,
            }),
            changed: Condvar::new(),
            work: Condvar::new(),
        });
        let loader = prefetches
            .then(|| Loader::spawn(inner.clone()))
            .transpose()?;
        Ok(Self {
            inner,
            _loader: loader,
        })
    }

    /// Lets misses be computed on the lower tier when that is cheaper than fetching the
    /// weights (Fiddler), by these costs; `None` turns it off. Only a lower tier that can
    /// compute ([`LowerTier::weights_in_place`]) is ever asked.
    pub fn set_placement(&self, costs: Option<TierCosts>) {
        self.inner.lock().placement = costs;
    }

    /// The tier this cache loads from.
    pub fn lower(&self) -> &Arc<dyn LowerTier> {
        &self.inner.lower
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.inner.budget
    }

    /// Bytes of all routed experts as held in RAM (compute dtype, or int8 with q8 experts).
    pub fn total_expert_bytes(&self) -> u64 {
        self.inner.total_bytes
    }

    /// Waits until the loader has nothing queued and no read is in flight (tests, benchmarks:
    /// a snapshot then has no read half-counted).
    pub fn wait_idle(&self) {
        let mut s = self.inner.lock();
        while !(s.queue.is_empty() && s.in_flight.is_empty()) {
            s = self
                .inner
                .changed
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ExpertCacheStats {
        let s = self.inner.lock();
        let c = &s.counters;
        let lookups = c.hits + c.misses + c.computed_in_place;
        ExpertCacheStats {
            policy: s.policy.name().to_string(),
            budget_bytes: self.inner.budget,
            expert_bytes_total: self.inner.total_bytes,
            min_budget_bytes: self.inner.min_budget,
            resident_bytes: s.resident_bytes,
            resident_experts: s.resident.len(),
            peak_bytes: s.peak_bytes,
            tokens: c.tokens,
            lookups,
            hits: c.hits,
            misses: c.misses,
            hit_rate: ratio(c.hits, lookups),
            evictions: c.evictions,
            bytes_read: c.bytes_read,
            bytes_per_token: ratio(c.bytes_read, c.tokens),
            read_seconds: c.read_time.as_secs_f64(),
            stall_seconds: c.stall_time.as_secs_f64(),
            prefetches: c.prefetches,
            prefetch_hits: c.prefetch_hits,
            prefetch_late: c.prefetch_late,
            prefetch_wasted: c.prefetch_wasted,
            prefetch_pending: s.unused_prefetches.len() as u64,
            prefetch_dropped: c.prefetch_dropped,
            prefetch_unsure: c.prefetch_unsure,
            guessed_layer_experts: c.guessed_layer_experts,
            guessed_correctly: c.guessed_correctly,
            guess_accuracy: ratio(c.guessed_correctly, c.guessed_layer_experts),
            computed_in_place: c.computed_in_place,
            rows_in_place: c.rows_in_place,
            rereads: c.rereads,
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

    /// Zeroes the counters (resident experts stay, and count as neither pending nor wasted
    /// prefetches; the peak restarts at the bytes held now).
    pub fn reset_stats(&self) {
        let mut s = self.inner.lock();
        s.counters = Counters::default();
        s.unused_prefetches.clear();
        s.peak_bytes = s.resident_bytes + s.reserved_bytes;
        for counts in &mut s.usage {
            counts.iter_mut().for_each(|c| *c = 0);
        }
    }
}

impl ExpertSource for TieredExperts {
    fn expert(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>> {
        let mut weights = self.inner.acquire(&[key])?;
        Ok(weights.pop().expect("one expert asked, one returned"))
    }

    fn experts(&self, layer: usize, experts: &[usize]) -> Result<Vec<Arc<ExpertWeights>>> {
        let keys: Vec<ExpertKey> = experts
            .iter()
            .map(|&expert| ExpertKey { layer, expert })
            .collect();
        self.inner.acquire(&keys)
    }

    /// Experts neither resident nor being read whose rows the cost model places on the lower
    /// tier. They count as lookups, neither hits nor misses ([`ExpertCacheStats`]).
    fn compute_in_place(
        &self,
        layer: usize,
        groups: &ExpertGroups,
        experts: &[usize],
    ) -> Result<Vec<(usize, Arc<ExpertWeights>)>> {
        let inner = &*self.inner;
        let (costs, missing) = {
            let s = inner.lock();
            let Some(costs) = s.placement else {
                return Ok(Vec::new());
            };
            let missing: Vec<usize> = experts
                .iter()
                .copied()
                .filter(|&expert| {
                    let key = ExpertKey { layer, expert };
                    !s.resident.contains_key(&key) && !s.in_flight.contains_key(&key)
                })
                .collect();
            (costs, missing)
        };
        let mut placed = Vec::new();
        let mut rows = 0u64;
        for expert in missing {
            let n = groups.rows(expert).0.len();
            let key = ExpertKey { layer, expert };
            if costs.place(&inner.lower.expert_cost(key)?, n) != Placement::ComputeInPlace {
                continue;
            }
            let Some(weights) = inner.lower.weights_in_place(key)? else {
                break;
            };
            placed.push((expert, weights));
            rows += n as u64;
        }
        if !placed.is_empty() {
            let mut s = inner.lock();
            s.counters.computed_in_place += placed.len() as u64;
            s.counters.rows_in_place += rows;
            for (expert, _) in &placed {
                s.usage[layer][*expert] += 1;
            }
        }
        Ok(placed)
    }

    fn prefetch(&self, layer: usize, guesses: &[ExpertGuess]) {
        let inner = &*self.inner;
        let mut s = inner.lock();
        if !s.policy.prefetches() {
            return;
        }
        // Prefetches of this layer's previous guess that no lookup used are wasted.
        let stale: Vec<ExpertKey> = s
            .unused_prefetches
            .iter()
            .filter(|k| k.layer == layer)
            .copied()
            .collect();
        for k in stale {
            s.unused_prefetches.remove(&k);
            s.counters.prefetch_wasted += 1;
        }
        let guess = s.guess_count;
        s.guess_count += 1;
        // Jobs of guesses before the previous one are stale (the previous layer still runs).
        s.queue.retain(|j| j.guess + 1 >= guess);
        // Only what is neither resident nor being read goes to the loader, only if guesses of
        // its strength have come true often enough, and the loader is woken only when there
        // is such work: once the working set is resident, a guess costs no thread switch (on
        // two cores, a woken loader preempts a computing thread).
        let mut queued = false;
        for g in guesses {
            let key = ExpertKey {
                layer,
                expert: g.expert,
            };
            if s.resident.contains_key(&key) || s.in_flight.contains_key(&key) {
                continue;
            }
            if s.calibration.worth_reading(g.strength) {
                s.queue.push_back(Job { key, guess });
                queued = true;
            } else {
                s.counters.prefetch_unsure += 1;
            }
        }
        s.guesses.insert(layer, guesses.to_vec());
        if queued {
            inner.work.notify_one();
        }
    }

    fn wants_prefetch(&self) -> bool {
        self.inner.lock().policy.prefetches()
    }

    fn routed(&self, layer: usize, n_tokens: usize, experts: &[usize]) {
        let inner = &*self.inner;
        let mut s = inner.lock();
        if layer == inner.first_moe_layer {
            s.counters.tokens += n_tokens as u64;
        }
        s.policy.on_layer(layer);
        s.active = experts
            .iter()
            .map(|&expert| ExpertKey { layer, expert })
            .collect();
        if let Some(guess) = s.guesses.remove(&layer) {
            s.counters.guessed_layer_experts += experts.len() as u64;
            s.counters.guessed_correctly +=
                guess.iter().filter(|g| experts.contains(&g.expert)).count() as u64;
            for g in &guess {
                s.calibration
                    .observe(g.strength, experts.contains(&g.expert));
            }
            // Prefetched for this layer but not routed to: wasted.
            let unused: Vec<ExpertKey> = guess
                .iter()
                .filter(|g| !experts.contains(&g.expert))
                .map(|g| ExpertKey {
                    layer,
                    expert: g.expert,
                })
                .filter(|k| s.unused_prefetches.contains(k))
                .collect();
            for k in unused {
                s.unused_prefetches.remove(&k);
                s.counters.prefetch_wasted += 1;
            }
        }
    }

    /// As many as fit in the budget while the last of them is read: `n - 1` of the largest
    /// experts resident plus one largest read in flight. A wave that large still waits if
    /// other callers hold part of the budget, without holding anything meanwhile.
    fn max_held_experts(&self) -> Option<usize> {
        Some(self.inner.max_held)
    }

    fn resident_bytes(&self) -> usize {
        self.inner.lock().resident_bytes as usize
    }
}

/// The [`ExpertSourceFactory`] the engine passes in `LoadOptions`: builds a [`TieredExperts`]
/// with this budget and policy, and keeps it so the engine can read its statistics. With
/// [`TieredExpertsBuilder::with_host_tier`], two tiers: a cache on a device over an LRU host-RAM
/// cache over the files.
pub struct TieredExpertsBuilder {
    budget: ExpertBudget,
    policy: PolicyKind,
    /// Host-RAM budget and the upper tier's device, for two tiers.
    host: Option<(ExpertBudget, Device)>,
    /// Fetch-or-compute costs for the upper tier of two, when set by
    /// [`TieredExpertsBuilder::with_placement`]; unset: [`TierCosts::gpu_over_host`] on a GPU,
    /// none otherwise.
    placement: Option<Option<TierCosts>>,
    /// What the disk tier does with the page cache.
    page_cache: PageCache,
    built: Mutex<Option<(Arc<TieredExperts>, Option<Arc<TieredExperts>>)>>,
}

impl TieredExpertsBuilder {
    /// A builder for `budget` and `policy` (one tier: RAM over disk).
    pub fn new(budget: ExpertBudget, policy: PolicyKind) -> Self {
        Self {
            budget,
            policy,
            host: None,
            placement: None,
            page_cache: PageCache::default(),
            built: Mutex::new(None),
        }
    }

    /// Two tiers: the cache of `budget` holds experts on `device` and loads them from an LRU
    /// host-RAM cache of `host_budget` (`--host-budget`), which reads the files. A miss whose
    /// few rows are cheaper to compute on the host than the weights are to copy is computed
    /// there (Fiddler; on a GPU by [`TierCosts::gpu_over_host`] unless
    /// [`TieredExpertsBuilder::with_placement`] says otherwise).
    pub fn with_host_tier(mut self, host_budget: ExpertBudget, device: Device) -> Self {
        self.host = Some((host_budget, device));
        self
    }

    /// Whether the experts' file pages may stay in the page cache (default: dropped, see
    /// [`PageCache`]).
    pub fn with_page_cache(mut self, page_cache: PageCache) -> Self {
        self.page_cache = page_cache;
        self
    }

    /// The fetch-or-compute costs of the two-tier cache (`None`: always fetch), whatever the
    /// device (a test with the CPU standing in for the GPU sets them).
    pub fn with_placement(mut self, costs: Option<TierCosts>) -> Self {
        self.placement = Some(costs);
        self
    }

    fn built_pair(&self) -> Option<(Arc<TieredExperts>, Option<Arc<TieredExperts>>)> {
        self.built.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The (upper) cache built by the last successful load, if any.
    pub fn built(&self) -> Option<Arc<TieredExperts>> {
        self.built_pair().map(|(upper, _)| upper)
    }

    /// The host-RAM cache under the upper one, with two tiers.
    pub fn built_host(&self) -> Option<Arc<TieredExperts>> {
        self.built_pair().and_then(|(_, host)| host)
    }
}

impl std::fmt::Debug for TieredExpertsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredExpertsBuilder")
            .field("budget", &self.budget)
            .field("policy", &self.policy)
            .field("host", &self.host.as_ref().map(|(b, _)| b))
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
        let policy = self.policy.build(lookups_per_token, n_layers);
        let (cache, host) = match &self.host {
            None => (
                TieredExperts::open(n_layers, layouts, self.budget, policy, self.page_cache)?,
                None,
            ),
            Some((host_budget, device)) => {
                // The host tier decodes into host RAM, whatever the model's device.
                let on_host: Vec<ExpertLayerLayout> = layouts
                    .iter()
                    .map(|l| ExpertLayerLayout {
                        block: l.block.on_device(Device::Cpu),
                        ..l.clone()
                    })
                    .collect();
                let disk: Arc<dyn LowerTier> =
                    Arc::new(DiskTier::open(n_layers, &on_host, self.page_cache)?);
                let host = Arc::new(TieredExperts::over(
                    disk,
                    *host_budget,
                    PolicyKind::Lru.build(lookups_per_token, n_layers),
                )?);
                let tier = Arc::new(HostTier::new(host.clone(), device.clone()));
                let upper = TieredExperts::over(tier, self.budget, policy)?;
                upper.set_placement(
                    self.placement
                        .unwrap_or_else(|| device.is_cuda().then(TierCosts::gpu_over_host)),
                );
                (upper, Some(host))
            }
        };
        let cache = Arc::new(cache);
        *self.built.lock().unwrap_or_else(|p| p.into_inner()) = Some((cache.clone(), host));
        Ok(cache)
    }
}
