//! The [`Engine`]: a loaded model with its tokenizer, chat template and generation defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use moe_cache::{
    ExpertBudget, ExpertCacheStats, PageCache, PolicyKind, TieredExperts, TieredExpertsBuilder,
};
use moe_core::{Error, Result};
use moe_loader::{resolve_model, Checkpoint, ConfigFile};
use moe_models::{load_decoder, DecoderModel, LoadOptions, ModelSummary};

use crate::chat::ChatTemplate;
use crate::device::{DeviceChoice, DtypeChoice};
use crate::request::{ChatMessage, Prompt};
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;

/// How to load an engine.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// A local folder or a hub id (`org/name[@revision]`); `None` is the bundled demo model.
    pub model: Option<String>,
    /// Where to run.
    pub device: DeviceChoice,
    /// Compute dtype.
    pub dtype: DtypeChoice,
    /// Show progress bars while downloading and loading.
    pub show_progress: bool,
    /// Host-RAM budget for routed experts: `None` loads every expert; `Some` reads them on
    /// demand from the checkpoint files into a cache of at most this many bytes.
    pub expert_budget: Option<ExpertBudget>,
    /// Policy of the expert cache: eviction, and whether to prefetch (ignored without a budget).
    pub expert_policy: PolicyKind,
    /// With a GPU device: `expert_budget` is the GPU tier's and this the host-RAM tier's under
    /// it (`--host-budget`). Refused on the CPU, where `expert_budget` is the RAM budget.
    pub host_budget: Option<ExpertBudget>,
    /// Whether the expert cache's disk tier drops the experts' file pages from the kernel's
    /// page cache (the default: the budget is then all the RAM experts take) or keeps them.
    pub expert_page_cache: PageCache,
    /// How routed experts are held (`--expert-dtype`): the compute dtype, or int8 with per-row
    /// scales, quantized at load (CPU with fast numerics only; a clear error otherwise).
    pub expert_dtype: moe_kernels::WeightDtype,
    /// How the dense projections (attention, dense and shared-expert MLPs, lm head) are held
    /// (`--dense-dtype`): the compute dtype, or int8 with per-row scales, quantized at load
    /// (CPU with fast numerics only; a clear error otherwise).
    pub dense_dtype: moe_kernels::WeightDtype,
}

/// The folder of the bundled demo model: `$MOE_INFER_BUNDLED_MODEL`, else `models/tinystories-moe`
/// of the source tree this binary was built from.
pub fn bundled_model_dir() -> PathBuf {
    match std::env::var_os("MOE_INFER_BUNDLED_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tinystories-moe");
            dir.canonicalize().unwrap_or(dir)
        }
    }
}

/// A loaded model ready to serve requests. `Sync`: share it by reference across threads.
pub struct Engine {
    pub(crate) model: DecoderModel,
    pub(crate) tokenizer: TextTokenizer,
    chat_template: Option<ChatTemplate>,
    default_sampling: SamplingParams,
    default_max_new_tokens: Option<usize>,
    model_dir: PathBuf,
    load_seconds: f64,
    expert_cache: Option<Arc<TieredExperts>>,
    /// The host-RAM tier under a GPU expert cache (`--host-budget`).
    host_cache: Option<Arc<TieredExperts>>,
}

impl Engine {
    /// Resolves and loads a model.
    pub fn load(options: &EngineOptions) -> Result<Self> {
        let start = Instant::now();
        let dir = match &options.model {
            Some(spec) => resolve_model(spec, options.show_progress)?.path,
            None => {
                let dir = bundled_model_dir();
                if !dir.join("config.json").exists() {
                    return Err(Error::ModelNotFound {
                        spec: dir.display().to_string(),
                        message: "the bundled model is missing; pass --model DIR or set MOE_INFER_BUNDLED_MODEL".into(),
                    });
                }
                dir
            }
        };
        let device = options.device.to_device()?;
        let config = ConfigFile::read(&dir.join("config.json"))?;
        let stored = Checkpoint::open_dir(&dir)?.dominant_dtype();
        let dtype = options.dtype.resolve(&device, stored.as_deref());
        let builder = match (options.expert_budget, options.host_budget) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::InvalidRequest(
                    "--host-budget is the RAM tier under --expert-budget's GPU tier: give --expert-budget too".into(),
                ))
            }
            (Some(budget), None) => Some(
                TieredExpertsBuilder::new(budget, options.expert_policy)
                    .with_page_cache(options.expert_page_cache),
            ),
            (Some(_), Some(_)) if device.is_cpu() => {
                return Err(Error::InvalidRequest(
                    "--host-budget needs --device cuda: on the CPU, --expert-budget is the RAM budget".into(),
                ))
            }
            (Some(budget), Some(host)) => Some(
                TieredExpertsBuilder::new(budget, options.expert_policy)
                    .with_host_tier(host, device.clone())
                    .with_page_cache(options.expert_page_cache),
            ),
        }
        .map(Arc::new);
        let load_options = LoadOptions {
            dtype,
            device,
            expert_source: builder
                .clone()
                .map(|b| b as Arc<dyn moe_models::ExpertSourceFactory>),
            expert_dtype: options.expert_dtype,
            dense_dtype: options.dense_dtype,
        };
        let model = load_decoder(&dir, &load_options, options.show_progress)?;
        let expert_cache = builder.as_ref().and_then(|b| b.built());
        let host_cache = builder.and_then(|b| b.built_host());
        let tokenizer_config = ConfigFile::read_optional(&dir.join("tokenizer_config.json"))?;
        let generation_config = ConfigFile::read_optional(&dir.join("generation_config.json"))?;
        let tokenizer = TextTokenizer::load(
            &dir,
            &config,
            tokenizer_config.as_ref(),
            generation_config.as_ref(),
        )?;
        let chat_template = match &tokenizer_config {
            Some(t) => ChatTemplate::from_tokenizer_config(t)?,
            None => None,
        };
        let (default_sampling, default_max_new_tokens) = match &generation_config {
            Some(g) => generation_defaults(g)?,
            None => (SamplingParams::default(), None),
        };
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            default_sampling,
            default_max_new_tokens,
            model_dir: dir,
            load_seconds: start.elapsed().as_secs_f64(),
            expert_cache,
            host_cache,
        })
    }

    /// The tiered expert cache, when the engine was loaded with an expert budget.
    pub fn expert_cache(&self) -> Option<&Arc<TieredExperts>> {
        self.expert_cache.as_ref()
    }

    /// The expert cache's statistics since load (or the last reset); `None` without a budget.
    pub fn expert_cache_stats(&self) -> Option<ExpertCacheStats> {
        self.expert_cache.as_ref().map(|c| c.stats())
    }

    /// The host-RAM tier's statistics under a GPU expert cache; `None` without `--host-budget`.
    pub fn host_cache_stats(&self) -> Option<ExpertCacheStats> {
        self.host_cache.as_ref().map(|c| c.stats())
    }

    /// The model.
    pub fn model(&self) -> &DecoderModel {
        &self.model
    }

    /// Facts for `inspect`.
    pub fn summary(&self) -> &ModelSummary {
        self.model.summary()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The folder the model was loaded from.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// Seconds `load` took.
    pub fn load_seconds(&self) -> f64 {
        self.load_seconds
    }

    /// Context window in tokens.
    pub fn context_length(&self) -> usize {
        self.model.hparams().max_position_embeddings
    }

    /// Sampling defaults from `generation_config.json` (greedy when it does not sample).
    pub fn default_sampling(&self) -> &SamplingParams {
        &self.default_sampling
    }

    /// `max_new_tokens` from `generation_config.json`, if set.
    pub fn default_max_new_tokens(&self) -> Option<usize> {
        self.default_max_new_tokens
    }

    /// Does the model ship a chat template?
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Turns a prompt into token ids (chat template, BOS) and checks they fit the context.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true)?,
            Prompt::Chat(messages) => self.render_chat(messages)?,
            Prompt::TokenIds(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = self.model.hparams().vocab_size;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let ctx = self.context_length();
        if ids.len() >= ctx {
            return Err(Error::InvalidRequest(format!(
                "the prompt has {} tokens but the context window is {ctx} tokens (at least one must be left to generate)",
                ids.len()
            )));
        }
        Ok(ids)
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::InvalidRequest(format!(
                "{} has no chat template (tokenizer_config.json `chat_template`); drop --chat",
                self.model_dir.display()
            ))
        })?;
        let text = template.render(messages)?;
        // The template writes its own BOS when the model wants one.
        self.tokenizer.encode(&text, false)
    }
}

fn generation_defaults(g: &ConfigFile) -> Result<(SamplingParams, Option<usize>)> {
    let mut s = SamplingParams::default();
    if g.bool_or("do_sample", false)? {
        s.temperature = g.opt_f64("temperature")?.unwrap_or(1.0) as f32;
        s.top_k = g.opt_usize("top_k")?.unwrap_or(50);
        s.top_p = g.opt_f64("top_p")?.unwrap_or(1.0) as f32;
        s.min_p = g.opt_f64("min_p")?.unwrap_or(0.0) as f32;
    }
    s.repetition_penalty = g.opt_f64("repetition_penalty")?.unwrap_or(1.0) as f32;
    s.validate()
        .map_err(|e| g.error("sampling defaults", e.to_string()))?;
    Ok((s, g.opt_usize("max_new_tokens")?))
}
