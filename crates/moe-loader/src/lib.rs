//! Finding and reading Hugging Face checkpoints: config files, validated (sharded) safetensors
//! through mmap, and hf-hub resolution. Knows file formats, not the math of any model.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod hub;
pub mod safetensors_file;

pub use checkpoint::{Checkpoint, TensorLocation, TensorLookup, WeightDtype};
pub use config::ConfigFile;
pub use hub::{resolve_model, ModelDir};
pub use safetensors_file::{SafetensorsFile, TensorEntry};
