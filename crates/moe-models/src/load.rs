//! Loading a checkpoint folder into a [`DecoderModel`]: config → architecture row → recipe →
//! tensors. The one entry point the engine calls.

use std::path::Path;
use std::sync::Arc;

use moe_core::Result;
use moe_loader::{Checkpoint, ConfigFile, TensorLookup};

use crate::arch::find_architecture;
use crate::decoder::DecoderModel;
use crate::hparams::LoadOptions;

/// Loads the model in `dir` (config.json + safetensors), showing a progress bar when asked.
pub fn load_decoder(
    dir: &Path,
    options: &LoadOptions,
    show_progress: bool,
) -> Result<DecoderModel> {
    let config = ConfigFile::read(&dir.join("config.json"))?;
    let architecture = find_architecture(&config)?;
    let recipe = (architecture.recipe)(&config)?;
    let mut checkpoint = Checkpoint::open_dir(dir)?;
    if show_progress {
        checkpoint.show_progress("loading weights");
    }
    let checkpoint = Arc::new(checkpoint);
    let lookup = TensorLookup::new(checkpoint.clone(), options.dtype, options.device.clone());
    let model = DecoderModel::build(recipe, &lookup, options);
    checkpoint.finish_progress();
    model
}
