//! The tiered expert cache: an [`moe_models::ExpertSource`] that keeps routed experts on disk
//! (the checkpoint's safetensors files, read on demand with positioned reads into owned buffers,
//! not through the mmap) and at most a byte budget of them in host RAM — or, with two tiers, a
//! device budget of them on the GPU over a host-RAM cache. A cache loads its misses from a
//! [`LowerTier`] ([`DiskTier`], [`HostTier`]); [`placement`] is Fiddler's fetch-or-compute cost
//! model for a lower tier that can compute.
//!
//! The budget counts everything experts take, including reads in flight and experts in use, and
//! is never exceeded. A [`CachePolicy`] ([`Lru`], [`LfuDecay`], [`RoutingPrefetch`]) picks what to
//! evict and whether a loader thread reads the experts the next layer's router guesses ahead of
//! use; routing is the model's. Everything that is not a routed expert stays resident as the
//! model loads it. [`ExpertCacheStats`] reports hits, misses, prefetch hits and waste, guess
//! accuracy, bytes read per token, evictions, stall time and a per-layer expert-usage histogram.
#![warn(missing_docs)]

pub mod budget;
pub mod calibration;
mod direct_io;
mod loader;
pub mod placement;
pub mod policy;
pub mod stats;
pub mod tier;
pub mod tiered;

pub use budget::ExpertBudget;
pub use calibration::GuessCalibration;
pub use placement::{ExpertCost, Placement, TierCosts};
pub use policy::{CachePolicy, LfuDecay, Lru, PolicyKind, RoutingPrefetch};
pub use stats::{ExpertCacheStats, LayerUsage};
pub use tier::{transient_bytes, DiskTier, HostTier, Loaded, LowerTier, PageCache};
pub use tiered::{TieredExperts, TieredExpertsBuilder};
