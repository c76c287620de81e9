//! Shared vocabulary of moe-infer: the error type, the routing contract and expert keys.
//! Loads nothing, computes nothing heavy, knows no file format and no device backend.
#![warn(missing_docs)]

pub mod error;
pub mod routing;

pub use error::{Error, Result};
pub use routing::{ExpertKey, GroupLimit, GroupScore, Routing, RoutingSpec, ScoringFunction};
