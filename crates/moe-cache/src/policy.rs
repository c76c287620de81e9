//! Cache policies. A policy tracks which experts are resident and picks the one to drop when
//! the budget needs room, and says whether the cache should load guessed experts ahead of use
//! ([`RoutingPrefetch`]); it never sees routing itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use moe_core::{Error, ExpertKey};

/// Decides which resident expert to evict (and whether to prefetch). The cache calls it under
/// its lock.
pub trait CachePolicy: Send {
    /// Short name for statistics (`lru`, `lfu-decay`, `prefetch`).
    fn name(&self) -> &'static str;
    /// Whether the cache should guess the next layer's experts (its router applied early) and
    /// load them ahead of use on its loader thread.
    fn prefetches(&self) -> bool {
        false
    }
    /// `key` was looked up and found resident.
    fn on_hit(&mut self, key: ExpertKey);
    /// `key` was read from disk and is now resident (by default, a use like a hit).
    fn on_insert(&mut self, key: ExpertKey) {
        self.on_hit(key);
    }
    /// Decoder layer `layer` is about to look up its experts (once per MoE layer per forward
    /// pass): policies that model the layer cycle track where it is; the default ignores it.
    fn on_layer(&mut self, _layer: usize) {}
    /// Picks a resident expert for which `evictable` holds (experts in use cannot go), and
    /// stops tracking it as resident; `None` when there is none.
    fn evict(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey>;
}

/// Which policy `--expert-policy` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Least recently used (the baseline).
    #[default]
    Lru,
    /// Least frequently used, with counts that halve every `half_life` lookups.
    LfuDecay,
    /// Evicts the expert whose next use is furthest away ([`NextUse`]): layers run in a
    /// cycle, so the least recently used expert is usually the next layer's.
    NextUse,
    /// [`NextUse`] eviction plus routing-aware prefetch ([`RoutingPrefetch`]).
    Prefetch,
}

impl PolicyKind {
    /// A fresh policy for a model of `n_layers` decoder layers. `lookups_per_token` (Σ top_k
    /// over MoE layers) sets LFU's half-life to [`LfuDecay::HALF_LIFE_TOKENS`] tokens' worth of
    /// lookups.
    pub fn build(self, lookups_per_token: usize, n_layers: usize) -> Box<dyn CachePolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::LfuDecay => Box::new(LfuDecay::new(
                (LfuDecay::HALF_LIFE_TOKENS * lookups_per_token.max(1)) as f64,
            )),
            PolicyKind::NextUse => Box::new(NextUse::new(n_layers)),
            PolicyKind::Prefetch => Box::new(RoutingPrefetch {
                eviction: NextUse::new(n_layers),
            }),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::Lru => "lru",
            PolicyKind::LfuDecay => "lfu-decay",
            PolicyKind::NextUse => "next-use",
            PolicyKind::Prefetch => "prefetch",
        })
    }
}

impl FromStr for PolicyKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "lfu-decay" | "lfu_decay" | "lfu" => Ok(PolicyKind::LfuDecay),
            "next-use" | "next_use" => Ok(PolicyKind::NextUse),
            "prefetch" => Ok(PolicyKind::Prefetch),
            other => Err(Error::InvalidRequest(format!(
                "--expert-policy `{other}`: expected lru, lfu-decay, next-use or prefetch"
            ))),
        }
    }
}

/// Least recently used: evicts the resident expert whose last use is oldest.
#[derive(Debug, Default)]
pub struct Lru {
    tick: u64,
    last_use: HashMap<ExpertKey, u64>,
    by_age: BTreeMap<u64, ExpertKey>,
}

impl Lru {
    fn touch(&mut self, key: ExpertKey) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(key, self.tick) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.tick, key);
    }
}

impl CachePolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.touch(key);
    }

    fn evict(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        let (&age, &key) = self.by_age.iter().find(|(_, &k)| evictable(k))?;
        self.by_age.remove(&age);
        self.last_use.remove(&key);
        Some(key)
    }
}

/// Evicts the resident expert whose next use is estimated furthest away. Layers run in a
/// cycle, so LRU's victim, the expert used longest ago, is usually one the very next layer is
/// about to need again (the layer after the current one ran longest ago); at a budget below
/// what one step touches, LRU then misses nearly every lookup. Here an expert's next use is
/// estimated as the layers until its layer comes round again, plus one whole cycle for every
/// time its layer ran without it (an expert a layer keeps skipping is likely to be skipped
/// again); ties go to the least recently used. Belady's rule with that estimate of the future.
#[derive(Debug)]
pub struct NextUse {
    n_layers: u64,
    /// The layer looking up now, and how many layer starts there have been (the clock).
    current: usize,
    clock: u64,
    /// Use order, for ties.
    seq: u64,
    /// Per resident expert: `(seq, clock)` of its last use.
    last_use: HashMap<ExpertKey, (u64, u64)>,
    /// Per layer: resident experts by `seq` of last use, oldest first.
    by_layer: Vec<BTreeMap<u64, usize>>,
}

impl NextUse {
    /// A policy for a model of `n_layers` decoder layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            n_layers: n_layers.max(1) as u64,
            current: 0,
            clock: 0,
            seq: 0,
            last_use: HashMap::new(),
            by_layer: Vec::new(),
        }
    }

    fn touch(&mut self, key: ExpertKey) {
        self.seq += 1;
        if self.by_layer.len() <= key.layer {
            self.by_layer.resize_with(key.layer + 1, BTreeMap::new);
        }
        if let Some((old, _)) = self.last_use.insert(key, (self.seq, self.clock)) {
            self.by_layer[key.layer].remove(&old);
        }
        self.by_layer[key.layer].insert(self.seq, key.expert);
    }

    /// Estimated layer starts until `key`, last used at `used_at`, is needed again.
    fn next_use(&self, layer: usize, used_at: u64) -> u64 {
        let n = self.n_layers;
        let until_layer = (layer as u64 + 2 * n - self.current as u64 - 1) % n;
        let skipped = (self.clock - used_at) / n;
        until_layer + n * skipped
    }
}

impl CachePolicy for NextUse {
    fn name(&self) -> &'static str {
        "next-use"
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.touch(key);
    }

    fn on_layer(&mut self, layer: usize) {
        let n = self.n_layers;
        let step = (layer as u64 + n - self.current as u64) % n;
        // The same layer again is a whole cycle later.
        self.clock += if step == 0 { n } else { step };
        self.current = layer;
    }

    fn evict(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        // Within a layer the oldest evictable expert has the furthest next use; compare the
        // layers' candidates.
        let victim = self
            .by_layer
            .iter()
            .enumerate()
            .filter_map(|(layer, experts)| {
                experts
                    .iter()
                    .map(|(&seq, &expert)| (seq, ExpertKey { layer, expert }))
                    .find(|&(_, key)| evictable(key))
            })
            .max_by_key(|&(seq, key)| {
                let (_, used_at) = self.last_use[&key];
                (self.next_use(key.layer, used_at), std::cmp::Reverse(seq))
            })
            .map(|(_, key)| key)?;
        if let Some((seq, _)) = self.last_use.remove(&victim) {
            self.by_layer[victim.layer].remove(&seq);
        }
        Some(victim)
    }
}

/// Routing-aware prefetch (the Pre-gated / Mixtral-offloading idea): the cache applies layer
/// L+1's router to the hidden state after layer L's attention and loads the guessed experts
/// on its loader thread while layer L computes. Eviction is [`NextUse`]'s, whose victims are
/// the experts of the layers that just ran rather than the next layer's.
#[derive(Debug)]
pub struct RoutingPrefetch {
    eviction: NextUse,
}

impl CachePolicy for RoutingPrefetch {
    fn name(&self) -> &'static str {
        "prefetch"
    }

    fn prefetches(&self) -> bool {
        true
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.eviction.on_hit(key);
    }

    fn on_layer(&mut self, layer: usize) {
        self.eviction.on_layer(layer);
    }

    fn evict(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.eviction.evict(evictable)
    }
}

/// Least frequently used with exponential decay: each use adds 1 to an expert's score, and
/// scores halve every `half_life` lookups (of any expert), so old popularity fades. Scores are
/// remembered across evictions; ties go to the least recently used.
#[derive(Debug)]
pub struct LfuDecay {
    /// Per-lookup decay factor, `0.5^(1 / half_life)`.
    decay: f64,
    tick: u64,
    /// `(score at last_tick, last_tick)` of every expert ever used.
    scores: HashMap<ExpertKey, (f64, u64)>,
    resident: HashSet<ExpertKey>,
}

impl LfuDecay {
    /// Default half-life in tokens (see [`PolicyKind::build`]).
    pub const HALF_LIFE_TOKENS: usize = 16;

    /// A policy whose scores halve every `half_life` lookups.
    pub fn new(half_life: f64) -> Self {
        Self {
            decay: 0.5f64.powf(1.0 / half_life.max(1.0)),
            tick: 0,
            scores: HashMap::new(),
            resident: HashSet::new(),
        }
    }

    fn score_now(&self, key: &ExpertKey) -> (f64, u64) {
        match self.scores.get(key) {
            Some(&(score, last)) => (score * self.decay.powf((self.tick - last) as f64), last),
            None => (0.0, 0),
        }
    }

    fn touch(&mut self, key: ExpertKey) {
        self.tick += 1;
        let (score, _) = self.score_now(&key);
        self.scores.insert(key, (score + 1.0, self.tick));
    }
}

impl CachePolicy for LfuDecay {
    fn name(&self) -> &'static str {
        "lfu-decay"
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.touch(key);
    }

    fn on_insert(&mut self, key: ExpertKey) {
        self.touch(key);
        self.resident.insert(key);
    }

    fn evict(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        let victim = self
            .resident
            .iter()
            .filter(|k| evictable(**k))
            .map(|k| (self.score_now(k), *k))
            .min_by(|((a, ta), ka), ((b, tb), kb)| a.total_cmp(b).then(ta.cmp(tb)).then(ka.cmp(kb)))
            .map(|(_, k)| k)?;
        self.resident.remove(&victim);
        Some(victim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(expert: usize) -> ExpertKey {
        ExpertKey { layer: 0, expert }
    }

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = Lru::default();
        p.on_insert(k(0));
        p.on_insert(k(1));
        p.on_insert(k(2));
        p.on_hit(k(0));
        assert_eq!(p.evict(&|_| true), Some(k(1)));
        assert_eq!(p.evict(&|_| true), Some(k(2)));
        assert_eq!(p.evict(&|_| true), Some(k(0)));
        assert_eq!(p.evict(&|_| true), None);
    }

    #[test]
    fn experts_in_use_are_skipped() {
        for kind in [
            PolicyKind::Lru,
            PolicyKind::LfuDecay,
            PolicyKind::NextUse,
            PolicyKind::Prefetch,
        ] {
            let mut p = kind.build(1, 1);
            p.on_insert(k(0));
            p.on_insert(k(1));
            p.on_insert(k(2));
            assert_eq!(p.evict(&|key| key != k(0)), Some(k(1)), "{kind}");
            assert_eq!(p.evict(&|key| key != k(0)), Some(k(2)), "{kind}");
            assert_eq!(p.evict(&|key| key != k(0)), None, "{kind}");
            assert_eq!(p.evict(&|_| true), Some(k(0)), "{kind}");
        }
        assert!(PolicyKind::Prefetch.build(1, 1).prefetches());
        assert!(!PolicyKind::Lru.build(1, 1).prefetches());
        assert!(!PolicyKind::NextUse.build(1, 1).prefetches());
    }

    #[test]
    fn next_use_keeps_the_next_layers_experts_and_drops_skipped_ones() {
        let key = |layer, expert| ExpertKey { layer, expert };
        let mut p = NextUse::new(4);
        // One cycle over layers 0..4, two experts each.
        for layer in 0..4 {
            p.on_layer(layer);
            p.on_insert(key(layer, 0));
            p.on_insert(key(layer, 1));
        }
        // Next cycle: layer 0 uses expert 0, then layer 1 uses expert 0 (in use: pinned).
        p.on_layer(0);
        p.on_hit(key(0, 0));
        p.on_layer(1);
        p.on_hit(key(1, 0));
        let unpinned = |k: ExpertKey| k != key(1, 0);
        // First what the layers running now and just before skipped (a cycle or more off),
        // then layer 0 (three layers off), layer 3, and last layer 2, which runs next; LRU
        // would have started with layer 2.
        for expected in [(1, 1), (0, 1), (0, 0), (3, 0), (3, 1), (2, 0), (2, 1)] {
            assert_eq!(p.evict(&unpinned), Some(key(expected.0, expected.1)));
        }
        assert_eq!(p.evict(&unpinned), None);
        assert_eq!(p.evict(&|_| true), Some(key(1, 0)));
    }

    #[test]
    fn lfu_evicts_least_frequent_and_decays() {
        let mut p = LfuDecay::new(1e9);
        p.on_insert(k(0));
        p.on_hit(k(0));
        p.on_hit(k(0));
        p.on_insert(k(1));
        p.on_insert(k(2));
        p.on_hit(k(2));
        assert_eq!(p.evict(&|_| true), Some(k(1)));
        assert_eq!(p.evict(&|_| true), Some(k(2)));
        // With a short half-life, recent use beats old frequency.
        let mut p = LfuDecay::new(1.0);
        p.on_insert(k(0));
        for _ in 0..5 {
            p.on_hit(k(0));
        }
        p.on_insert(k(1));
        for _ in 0..10 {
            p.on_hit(k(1));
        }
        assert_eq!(p.evict(&|_| true), Some(k(0)));
    }

    #[test]
    fn policy_names_parse() {
        assert_eq!("lru".parse::<PolicyKind>().unwrap(), PolicyKind::Lru);
        assert_eq!(
            "LFU-decay".parse::<PolicyKind>().unwrap(),
            PolicyKind::LfuDecay
        );
        assert_eq!(
            "prefetch".parse::<PolicyKind>().unwrap(),
            PolicyKind::Prefetch
        );
        let err = "fifo".parse::<PolicyKind>().unwrap_err().to_string();
        assert!(
            err.contains("--expert-policy") && !err.contains('\n'),
            "{err}"
        );
        assert_eq!(PolicyKind::LfuDecay.build(4, 2).name(), "lfu-decay");
        assert_eq!(
            "next-use".parse::<PolicyKind>().unwrap().build(4, 2).name(),
            "next-use"
        );
    }
}
