//! The `moe-infer` command line: `generate`, `perplexity`, `inspect` and `bench`. Parses flags into the
//! engine's plain request types and prints; all the work is in `moe-engine`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
mod bench;

use moe_engine::{
    ChatMessage, DeviceChoice, DtypeChoice, Engine, EngineOptions, ExpertBudget, GenerateRequest,
    PageCache, PolicyKind, Prompt, SamplingParams, WeightDtype,
};

/// mimalloc keeps freed activation buffers for reuse; glibc's malloc returns large ones to the
/// OS and page-faults them back in on the next step (≈15 % of prefill time in profiles).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter (linked with the allocator; `mi_option_t` is a C enum).
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;

/// Whether the user chose mimalloc's purge delay (`MIMALLOC_PURGE_DELAY`); we then leave it.
fn purge_delay_chosen_by_user() -> bool {
    std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
}

/// Sets mimalloc's purge delay in ms (0: hand freed pages back to the OS at once; -1: never).
fn set_purge_delay(ms: std::os::raw::c_long) {
    if !purge_delay_chosen_by_user() {
        // SAFETY: sets one integer option; mimalloc reads it when it next frees a page.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms) };
    }
}

/// While loading, freed pages go back to the OS at once: load replaces matrices with new
/// forms (panels, int8) and frees the originals, which would otherwise stay in the resident
/// set (the bench model's bf16 lm head alone is 311 MB).
fn return_freed_pages_while_loading() {
    set_purge_delay(0);
}

/// After load, mimalloc never hands freed pages back to the OS. By default it purges them
/// after 10 ms, so every expert the expert cache reads landed in fresh pages the kernel had to
/// fault in and zero (10 % of CPU samples at 4 sequences and a 50 % budget); kept, an evicted
/// expert's pages take the next one. Peak RSS does not change: the cache's budget bounds what
/// is freed and reused.
fn keep_freed_pages() {
    set_purge_delay(-1);
}

/// A local inference engine for sparse mixture-of-experts language models.
#[derive(Parser)]
#[command(name = "moe-infer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (streams to stdout, stats to stderr).
    Generate(GenerateArgs),
    /// Perplexity of a text file (or token ids).
    Perplexity(PerplexityArgs),
    /// Print a model's architecture, experts, parameter counts and bytes.
    Inspect(InspectArgs),
    /// Measure prefill/decode speed, time to first token, memory and the decode roofline.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Model folder or Hugging Face hub id (org/name[@revision]); default: the bundled demo model.
    #[arg(long)]
    model: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, checkpoint dtype on GPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Host-RAM budget for routed experts, in bytes (12GiB, 512MB) or as a share of all
    /// routed-expert bytes (40%); experts beyond it are read from the checkpoint on demand.
    /// Default: every expert resident.
    #[arg(long)]
    expert_budget: Option<String>,
    /// Policy of the expert cache: lru, lfu-decay, next-use (evicts the expert whose next use,
    /// going round the layers, is furthest away), or prefetch (next-use plus routing-aware
    /// prefetch of the next layer's guessed experts).
    #[arg(long, default_value = "lru", requires = "expert_budget")]
    expert_policy: String,
    /// With --device cuda: host-RAM budget (bytes or %) of the tier under --expert-budget's
    /// GPU tier.
    #[arg(long)]
    host_budget: Option<String>,
    /// Let the kernel's page cache keep the experts' file pages the cache reads (faster when
    /// the files fit in RAM, but that RAM is outside --expert-budget). Default: dropped, so
    /// a miss is a disk read and the budget is all the RAM experts take.
    #[arg(long, requires = "expert_budget")]
    keep_page_cache: bool,
    /// CPU numerics: fast (AVX2 kernels, bf16 close to transformers) or torch-exact (bf16
    /// bit-for-bit as transformers on the CPU, slower). Default: fast, or MOE_NUMERICS.
    #[arg(long)]
    numerics: Option<String>,
    /// Routed experts' storage: auto (the compute dtype) or q8 (int8 with one f32 scale per
    /// output row, quantized at load; CPU and fast numerics only).
    #[arg(long, default_value = "auto")]
    expert_dtype: String,
    /// Dense projections' storage (attention, dense and shared-expert MLPs, lm head; not
    /// routers or embeddings): auto (the compute dtype) or q8 (int8 with one f32 scale per
    /// output row, quantized at load; CPU and fast numerics only).
    #[arg(long, default_value = "auto")]
    dense_dtype: String,
}

impl ModelArgs {
    fn load(&self, show_progress: bool) -> Result<Engine> {
        if let Some(numerics) = &self.numerics {
            moe_kernels::cpu::set_numerics(numerics.parse::<moe_kernels::cpu::Numerics>()?);
        }
        let options = EngineOptions {
            expert_dtype: self.expert_dtype.parse::<WeightDtype>()?,
            dense_dtype: self.dense_dtype.parse::<WeightDtype>()?,
            model: self.model.clone(),
            device: self.device.parse::<DeviceChoice>()?,
            dtype: self.dtype.parse::<DtypeChoice>()?,
            show_progress,
            expert_budget: self
                .expert_budget
                .as_deref()
                .map(str::parse::<ExpertBudget>)
                .transpose()?,
            expert_policy: self.expert_policy.parse::<PolicyKind>()?,
            host_budget: self
                .host_budget
                .as_deref()
                .map(str::parse::<ExpertBudget>)
                .transpose()?,
            expert_page_cache: if self.keep_page_cache {
                PageCache::Keep
            } else {
                PageCache::Drop
            },
        };
        let engine = Engine::load(&options)?;
        keep_freed_pages();
        Ok(engine)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "token_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids (used verbatim).
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate (default: generation_config.json, else 128).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy (default: generation_config.json, else greedy).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Top-k filter (0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Top-p (nucleus) filter (1 = off).
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Min-p filter (0 = off).
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
    /// Random seed (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Print the expert cache's statistics on stderr (with --expert-budget).
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(long, conflicts_with = "token_ids")]
    file: Option<PathBuf>,
    /// Token ids to score, comma-separated.
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Write all `[n_tokens, vocab]` f32 logits to this safetensors file (tensor `logits`).
    #[arg(long)]
    dump_logits: Option<PathBuf>,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    return_freed_pages_while_loading();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Perplexity(args) => perplexity(args),
        Command::Inspect(args) => inspect(args),
        Command::Bench(args) => bench::bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `moe-infer inspect | head` closes the pipe early: that is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes as one line: causes whose text the message already contains are
/// skipped (library errors print their source themselves), line breaks are folded.
fn one_line(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(text.trim()) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn generate(args: GenerateArgs) -> Result<()> {
    let prompt = match (&args.prompt, &args.token_ids) {
        (_, Some(ids)) if args.chat => bail!(
            "--chat takes --prompt text, not --token-ids ({} ids given)",
            ids.len()
        ),
        (_, Some(ids)) => Prompt::TokenIds(ids.clone()),
        (Some(text), None) if args.chat => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: system.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: text.clone(),
            });
            Prompt::Chat(messages)
        }
        (Some(text), None) => Prompt::Text(text.clone()),
        (None, None) => bail!("give a prompt with --prompt TEXT or --token-ids 1,2,3"),
    };
    let engine = args.model.load(!args.json)?;
    let mut sampling: SamplingParams = engine.default_sampling().clone();
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    if let Some(k) = args.top_k {
        sampling.top_k = k;
    }
    if let Some(p) = args.top_p {
        sampling.top_p = p;
    }
    if let Some(p) = args.min_p {
        sampling.min_p = p;
    }
    if let Some(r) = args.repetition_penalty {
        sampling.repetition_penalty = r;
    }
    sampling.seed = args.seed;
    let request = GenerateRequest {
        prompt: prompt.clone(),
        max_new_tokens: args
            .max_new_tokens
            .or(engine.default_max_new_tokens())
            .unwrap_or(128),
        sampling,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    if args.json {
        let response = engine.generate(&request, &mut |_| {})?;
        let mut value = serde_json::to_value(&response)?;
        value["model"] = serde_json::json!(engine.model_dir().display().to_string());
        value["load_seconds"] = serde_json::json!(engine.load_seconds());
        if let Some(stats) = engine.expert_cache_stats() {
            value["expert_cache"] = serde_json::to_value(&stats)?;
            if args.stats {
                eprintln!("{stats}");
            }
        }
        if let Some(stats) = engine.host_cache_stats() {
            value["expert_cache_host"] = serde_json::to_value(&stats)?;
            if args.stats {
                eprintln!("host tier: {stats}");
            }
        }
        writeln!(std::io::stdout(), "{}", serde_json::to_string(&value)?)?;
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    if let Prompt::Text(text) = &prompt {
        write!(stdout, "{text}")?;
        stdout.flush()?;
    }
    let response = engine.generate(&request, &mut |piece| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    writeln!(stdout)?;
    let t = &response.timings;
    eprintln!(
        "prompt: {} tokens, prefill {:.1} tok/s | generated: {} tokens, decode {:.1} tok/s | finish: {} | load {:.2} s | seed {}",
        t.prompt_tokens,
        t.prefill_tokens_per_second,
        t.generated_tokens,
        t.decode_tokens_per_second,
        serde_json::to_value(response.finish_reason)?.as_str().unwrap_or("?"),
        engine.load_seconds(),
        response.seed,
    );
    if args.stats {
        match engine.expert_cache_stats() {
            Some(stats) => eprintln!("{stats}"),
            None => eprintln!("expert cache: off (every expert resident; set --expert-budget)"),
        }
        if let Some(stats) = engine.host_cache_stats() {
            eprintln!("host tier: {stats}");
        }
    }
    Ok(())
}

fn perplexity(args: PerplexityArgs) -> Result<()> {
    let engine = args.model.load(!args.json)?;
    let tokens = match (&args.file, &args.token_ids) {
        (Some(path), None) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
            engine.tokenizer().encode(&text, true)?
        }
        (None, Some(ids)) => ids.clone(),
        _ => bail!("give the text with --file PATH or --token-ids 1,2,3"),
    };
    let vocab = engine.model().hparams().vocab_size;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    let report = engine.perplexity(&tokens, args.dump_logits.is_some())?;
    if let (Some(path), Some(logits)) = (&args.dump_logits, &report.logits) {
        write_logits(path, logits)?;
    }
    if args.json {
        writeln!(std::io::stdout(), "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(std::io::stdout(),
            "perplexity {:.4} (mean NLL {:.4} nats over {} predicted tokens of {}, window {}, {:.2} s)",
            report.perplexity, report.mean_nll, report.n_predicted, report.n_tokens, report.window, report.seconds
        )?;
    }
    Ok(())
}

fn write_logits(path: &std::path::Path, logits: &candle_core::Tensor) -> Result<()> {
    let shape = logits.dims().to_vec();
    let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)?;
    safetensors::tensor::serialize_to_file([("logits", view)], None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<()> {
    let engine = args.model.load(!args.json)?;
    let s = engine.summary();
    if args.json {
        let mut value = serde_json::to_value(s)?;
        value["model"] = serde_json::json!(engine.model_dir().display().to_string());
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&value)?
        )?;
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    writeln!(
        std::io::stdout(),
        "model         {}",
        engine.model_dir().display()
    )?;
    writeln!(std::io::stdout(), "architecture  {}", s.architecture)?;
    writeln!(
        std::io::stdout(),
        "layers        {} ({} with MoE: {:?})",
        s.n_layers,
        s.moe_layers.len(),
        s.moe_layers
    )?;
    if s.moe_layers.is_empty() {
        writeln!(std::io::stdout(), "experts       none (dense model)")?;
    } else {
        writeln!(
            std::io::stdout(),
            "experts       {} routed, top-{}, {} shared, norm_topk_prob {}",
            s.n_experts,
            s.top_k,
            s.n_shared_experts,
            s.norm_topk_prob
        )?;
    }
    for (name, value) in &s.facts {
        writeln!(std::io::stdout(), "  {name}: {value}")?;
    }
    writeln!(
        std::io::stdout(),
        "attention     {} heads, {} kv heads, head dim {}",
        s.heads.0,
        s.heads.1,
        s.heads.2
    )?;
    writeln!(
        std::io::stdout(),
        "hidden        {}   vocab {}   context {}",
        s.hidden_size,
        s.vocab_size,
        s.context_length
    )?;
    writeln!(
        std::io::stdout(),
        "parameters    {} total, {} active per token ({:.1} %)",
        human(s.params_total),
        human(s.params_active),
        100.0 * s.params_active as f64 / s.params_total.max(1) as f64
    )?;
    let dtypes: Vec<String> = s
        .checkpoint_bytes_by_dtype
        .iter()
        .map(|(d, b)| format!("{d} {:.3} GB", gb(*b)))
        .collect();
    writeln!(std::io::stdout(), "checkpoint    {}", dtypes.join(", "))?;
    writeln!(
        std::io::stdout(),
        "experts bytes {:.3} GB routed",
        gb(s.routed_expert_bytes)
    )?;
    writeln!(std::io::stdout(), "compute dtype {}", s.compute_dtype)?;
    writeln!(std::io::stdout(), "expert dtype  {}", s.expert_dtype)?;
    writeln!(std::io::stdout(), "dense dtype   {}", s.dense_dtype)?;
    Ok(())
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
