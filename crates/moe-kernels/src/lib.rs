//! The MoE compute stages, each a function with a written contract: top-k routing, grouping
//! token rows by expert, the expert FFN, and the weighted combine; every stage has a plain
//! reference made of candle ops (`*_reference`) that tests hold the fast path to. Also the
//! matmul, softmax and RMSNorm that round like torch's CPU kernels, for bf16 parity, and the
//! int8 form of routed experts (`expert_q8`).
//! Knows nothing of checkpoints, architectures or where expert weights live.
#![warn(missing_docs)]

pub mod align;
pub mod combine;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_pool;
pub mod dense_panels;
pub mod dense_q8;
pub mod expert_ffn;
pub mod expert_q8;
pub mod fused;
pub mod grouping;
pub mod matmul;
pub mod rms_norm;
pub mod routing;
pub mod slot_pool;
pub mod softmax;

pub use align::{align_capacity, AlignedGroups};
pub use combine::combine;
pub use dense_panels::{PanelDense, MIN_PANEL_COLUMNS};
pub use dense_q8::Q8Dense;
pub use expert_ffn::{expert_ffn, expert_ffn_reference, ExpertActivation, ExpertWeights};
pub use expert_q8::{Q8Scales, WeightDtype};
pub use fused::{MoeExperts, StackedExperts};
pub use grouping::ExpertGroups;
pub use matmul::{matmul_nn, matmul_nt, SumOrder};
pub use rms_norm::{rms_norm, rms_norm_rows_in_place};
pub use routing::{route, route_reference, route_reference_with_bias, route_with_bias};
pub use slot_pool::{PoolFull, SlotTable};
pub use softmax::softmax_last_dim;
