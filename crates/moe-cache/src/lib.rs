//! The tiered expert cache: an [`moe_models::ExpertSource`] that keeps routed experts on disk
//! (the checkpoint's safetensors files, read on demand with positioned reads into owned buffers,
//! not through the mmap) and at most a byte budget of them in host RAM.
//!
//! The cache decides eviction only, through a [`CachePolicy`] ([`Lru`], [`LfuDecay`]); routing
//! is the model's. Everything that is not a routed expert stays resident as the model loads it.
//! [`ExpertCacheStats`] reports hits, misses, bytes read, evictions, stall time and a per-layer
//! expert-usage histogram.
#![warn(missing_docs)]

pub mod budget;
pub mod policy;
pub mod stats;
pub mod tiered;

pub use budget::ExpertBudget;
pub use policy::{CachePolicy, LfuDecay, Lru, PolicyKind};
pub use stats::{ExpertCacheStats, LayerUsage};
pub use tiered::{TieredExperts, TieredExpertsBuilder};
