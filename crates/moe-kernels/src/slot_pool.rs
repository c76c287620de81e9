//! The bookkeeping of a device expert pool, independent of any device: which expert sits in
//! which of a fixed number of slots, which slots the steps in flight still read (pinned), and
//! which slot to reuse next (least recently used among the unpinned ones). The CUDA pool
//! (`cuda_pool.rs`, `cuda` feature) holds the buffers and does the copies; this table decides.
//!
//! A step pins every expert it needs with [`SlotTable::lookup_or_assign`] (an expert already in
//! a slot is a hit, otherwise it gets a free or the least recently used unpinned slot and must
//! be uploaded), launches, then [`SlotTable::release`]s its experts. Pins are counted, so the
//! next layer's experts can be pinned (and their uploads issued) while this layer's are still
//! pinned: double buffering needs as many slots as the two steps' experts together.

use std::collections::HashMap;
use std::hash::Hash;

/// A step asked for a slot while every slot is pinned by steps in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFull {
    /// Slots of the pool.
    pub n_slots: usize,
}

impl std::fmt::Display for PoolFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expert pool: all {} slots are pinned by the steps in flight; a step needs more \
             experts at once than the pool holds (raise the slot count)",
            self.n_slots
        )
    }
}

impl std::error::Error for PoolFull {}

/// Slot table of a pool of `n_slots` expert slots; keys are whatever names an expert
/// (e.g. `(layer, expert)`), so one pool can serve every layer.
#[derive(Debug, Clone)]
pub struct SlotTable<K> {
    /// Key held by each slot.
    held: Vec<Option<K>>,
    /// Pin count of each slot.
    pins: Vec<u32>,
    /// Clock value of each slot's last use (0: never used).
    last_used: Vec<u64>,
    slot_of: HashMap<K, usize>,
    clock: u64,
}

impl<K: Eq + Hash + Clone> SlotTable<K> {
    /// An empty table of `n_slots` slots.
    pub fn new(n_slots: usize) -> Self {
        Self {
            held: vec![None; n_slots],
            pins: vec![0; n_slots],
            last_used: vec![0; n_slots],
            slot_of: HashMap::new(),
            clock: 0,
        }
    }

    /// Slots of the pool.
    pub fn n_slots(&self) -> usize {
        self.held.len()
    }

    /// The slot holding `key`, if any (does not pin or touch it).
    pub fn slot_of(&self, key: &K) -> Option<usize> {
        self.slot_of.get(key).copied()
    }

    /// The key held by `slot`.
    pub fn key_in(&self, slot: usize) -> Option<&K> {
        self.held[slot].as_ref()
    }

    /// Whether a step in flight still reads `slot`.
    pub fn is_pinned(&self, slot: usize) -> bool {
        self.pins[slot] > 0
    }

    /// Pins `key` for the current step and returns `(slot, needs_upload)`: `needs_upload` is
    /// false when the key already sat in its slot. A new key takes a never-used slot, else the
    /// least recently used unpinned one (its old key is forgotten). Pinning the same key twice
    /// pins it twice (release it twice).
    pub fn lookup_or_assign(&mut self, key: K) -> Result<(usize, bool), PoolFull> {
        self.clock += 1;
        if let Some(&slot) = self.slot_of.get(&key) {
            self.pins[slot] += 1;
            self.last_used[slot] = self.clock;
            return Ok((slot, false));
        }
        let victim = (0..self.n_slots())
            .filter(|&s| self.pins[s] == 0)
            .min_by_key(|&s| (self.held[s].is_some(), self.last_used[s]))
            .ok_or(PoolFull {
                n_slots: self.n_slots(),
            })?;
        if let Some(old) = self.held[victim].take() {
            self.slot_of.remove(&old);
        }
        self.held[victim] = Some(key.clone());
        self.slot_of.insert(key, victim);
        self.pins[victim] = 1;
        self.last_used[victim] = self.clock;
        Ok((victim, true))
    }

    /// Unpins `key` once (a step done with it); returns its slot. Unknown or unpinned keys are
    /// ignored (`None`).
    pub fn release(&mut self, key: &K) -> Option<usize> {
        let slot = *self.slot_of.get(key)?;
        if self.pins[slot] == 0 {
            return None;
        }
        self.pins[slot] -= 1;
        Some(slot)
    }

    /// Forgets `key` (e.g. its upload failed), freeing its slot; a pinned slot is unpinned.
    pub fn forget(&mut self, key: &K) {
        if let Some(slot) = self.slot_of.remove(key) {
            self.held[slot] = None;
            self.pins[slot] = 0;
            self.last_used[slot] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_fill_free_slots_then_hit() {
        let mut t = SlotTable::new(3);
        assert_eq!(t.lookup_or_assign((0, 5)), Ok((0, true)));
        assert_eq!(t.lookup_or_assign((0, 7)), Ok((1, true)));
        assert_eq!(t.lookup_or_assign((1, 5)), Ok((2, true)));
        // same key again: a hit, same slot, no upload
        assert_eq!(t.lookup_or_assign((0, 7)), Ok((1, false)));
        assert_eq!(t.slot_of(&(1, 5)), Some(2));
        assert_eq!(t.key_in(0), Some(&(0, 5)));
    }

    #[test]
    fn reuses_the_least_recently_used_unpinned_slot() {
        let mut t = SlotTable::new(3);
        for k in [1, 2, 3] {
            t.lookup_or_assign(k).unwrap();
        }
        // touch 1 again, so 2 is the least recently used
        t.lookup_or_assign(1).unwrap();
        for k in [1, 1, 2, 3] {
            t.release(&k).unwrap();
        }
        assert!((0..3).all(|s| !t.is_pinned(s)));
        let (slot, upload) = t.lookup_or_assign(4).unwrap();
        assert_eq!((slot, upload), (1, true), "slot of key 2 reused");
        assert_eq!(t.slot_of(&2), None, "the evicted key is forgotten");
        assert_eq!(t.key_in(1), Some(&4));
        // key 2 comes back: needs an upload, takes the LRU slot (key 3's)
        assert_eq!(t.lookup_or_assign(2), Ok((2, true)));
        assert_eq!(t.slot_of(&3), None);
        assert_eq!(t.slot_of(&1), Some(0));
    }

    #[test]
    fn no_slot_is_reused_while_pinned() {
        let mut t = SlotTable::new(4);
        // step A pins 2 experts, step B (the next layer, prefetched) pins 2 more
        let a: Vec<usize> = [10, 11]
            .iter()
            .map(|&k| t.lookup_or_assign(k).unwrap().0)
            .collect();
        let b: Vec<usize> = [20, 21]
            .iter()
            .map(|&k| t.lookup_or_assign(k).unwrap().0)
            .collect();
        let mut all = [a.clone(), b.clone()].concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
        // everything pinned: a fifth expert fails, and nothing was evicted
        assert_eq!(t.lookup_or_assign(30), Err(PoolFull { n_slots: 4 }));
        for k in [10, 11, 20, 21] {
            assert!(t.slot_of(&k).is_some());
        }
        // step A done: only A's slots can be reused, B's stay put
        t.release(&10);
        t.release(&11);
        let (s1, _) = t.lookup_or_assign(30).unwrap();
        let (s2, _) = t.lookup_or_assign(31).unwrap();
        assert!(a.contains(&s1) && a.contains(&s2) && s1 != s2);
        assert!(b.iter().all(|&s| t.is_pinned(s)));
        assert_eq!(t.slot_of(&20), Some(b[0]));
        assert_eq!(t.slot_of(&21), Some(b[1]));
    }

    #[test]
    fn pins_are_counted() {
        let mut t = SlotTable::new(1);
        t.lookup_or_assign('x').unwrap();
        t.lookup_or_assign('x').unwrap();
        t.release(&'x');
        assert!(t.is_pinned(0), "pinned twice, released once");
        assert!(t.lookup_or_assign('y').is_err());
        t.release(&'x');
        assert!(!t.is_pinned(0));
        assert_eq!(
            t.release(&'x'),
            None,
            "releasing an unpinned key is a no-op"
        );
        assert_eq!(t.lookup_or_assign('y'), Ok((0, true)));
    }

    #[test]
    fn full_pool_error_names_the_slot_count() {
        let mut t = SlotTable::new(2);
        t.lookup_or_assign(1).unwrap();
        t.lookup_or_assign(2).unwrap();
        let e = t.lookup_or_assign(3).unwrap_err();
        assert_eq!(e.n_slots, 2);
        assert!(e.to_string().contains("all 2 slots are pinned"), "{e}");
        // an empty pool can hold nothing
        assert!(SlotTable::<u8>::new(0).lookup_or_assign(0).is_err());
    }

    #[test]
    fn forget_frees_the_slot() {
        let mut t = SlotTable::new(2);
        t.lookup_or_assign(1).unwrap();
        t.lookup_or_assign(2).unwrap();
        t.forget(&1);
        assert_eq!(t.slot_of(&1), None);
        assert_eq!(t.lookup_or_assign(3), Ok((0, true)));
        assert_eq!(t.lookup_or_assign(1).unwrap_err().n_slots, 2);
    }
}
