//! The moe-infer engine: what other Rust programs link. Load a Hugging Face MoE checkpoint,
//! then generate from plain-data requests — one at a time with streaming, or many at once in
//! one batch, each sequence with its own KV cache.
//!
//! ```
//! use moe_engine::{Engine, EngineOptions, GenerateRequest, Prompt, SamplingParams};
//!
//! # fn main() -> Result<(), moe_engine::Error> {
//! // `model: None` is the bundled demo model; use a folder or a hub id for a real one.
//! let engine = Engine::load(&EngineOptions::default())?;
//! let request = GenerateRequest {
//!     prompt: Prompt::Text("Once upon a time".into()),
//!     max_new_tokens: 16,
//!     sampling: SamplingParams { temperature: 0.8, top_k: 40, seed: Some(7), ..Default::default() },
//!     ..Default::default()
//! };
//! let mut streamed = String::new();
//! let response = engine.generate(&request, &mut |piece: &str| streamed.push_str(piece))?;
//! assert_eq!(streamed, response.text);
//! assert!(!response.generated_token_ids.is_empty());
//! # Ok(())
//! # }
//! ```
//!
//! Knows requests, tokenizers, sampling and sequences; does not know how a layer is computed
//! (that is `moe-models`) nor how files are read (`moe-loader`).
#![warn(missing_docs)]

pub mod bench;
pub mod chat;
pub mod device;
pub mod engine;
pub mod generate;
pub mod perplexity;
pub mod request;
pub mod sampling;
pub mod tokenizer;

pub use bench::{run_bench, BenchConfig, BenchReport};
pub use device::{DeviceChoice, DtypeChoice};
pub use engine::{bundled_model_dir, Engine, EngineOptions};
pub use moe_cache::{ExpertBudget, ExpertCacheStats, LayerUsage, PageCache, PolicyKind};
pub use moe_core::{Error, Result};
pub use moe_kernels::WeightDtype;
pub use perplexity::PerplexityReport;
pub use request::{ChatMessage, FinishReason, GenerateRequest, GenerateResponse, Prompt, Timings};
pub use sampling::{Sampler, SamplingParams};
