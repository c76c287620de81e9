//! Architectures as data plus shared blocks: the architecture table, the transformer blocks
//! every MoE family is wired from (attention, rotary embeddings, norms, dense MLP, sparse MoE
//! block), the batched decoder forward pass and per-sequence KV caches.
//!
//! Knows checkpoint tensor *names* (through [`moe_loader::TensorLookup`]) but not file formats;
//! reaches expert weights only through [`ExpertSource`], never knowing where they live.
#![warn(missing_docs)]

pub mod arch;
pub mod blocks;
pub mod decoder;
pub mod experts;
pub mod hparams;
pub mod kv_cache;
pub mod load;
pub mod mxfp4;
pub mod stage_times;
pub mod summary;

pub use arch::{find_architecture, supported_architectures, Architecture, ARCHITECTURES};
pub use decoder::{DecoderModel, ForwardContext, LogitsWanted, RoutingObserver, SequenceInput};
pub use experts::{
    ExpertGuess, ExpertLayerLayout, ExpertLayout, ExpertNames, ExpertOnDisk, ExpertSource,
    ExpertSourceFactory, ResidentExperts,
};
pub use hparams::{DecoderHParams, LoadOptions};
pub use kv_cache::KvCache;
pub use load::load_decoder;
pub use summary::ModelSummary;
