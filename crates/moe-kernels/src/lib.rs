//! The MoE compute stages, each a function with a written contract: top-k routing, grouping
//! token rows by expert, the expert FFN, and the weighted combine. Every stage has a plain
//! reference made of candle ops (`*_reference`) that tests hold the fast path to.
//! Knows nothing of checkpoints, architectures or where expert weights live.
#![warn(missing_docs)]

pub mod combine;
pub mod expert_ffn;
pub mod grouping;
pub mod routing;

pub use combine::combine;
pub use expert_ffn::{expert_ffn, expert_ffn_reference, ExpertActivation, ExpertWeights};
pub use grouping::ExpertGroups;
pub use routing::{route, route_reference};
