//! The plain-data request and response types every client (CLI, server, ensembles) uses.

use serde::{Deserialize, Serialize};

use crate::sampling::SamplingParams;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized as is (BOS added when the tokenizer config asks for it).
    Text(String),
    /// Chat messages, rendered with the model's own chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids, used verbatim.
    TokenIds(Vec<u32>),
}

impl Default for Prompt {
    fn default() -> Self {
        Prompt::Text(String::new())
    }
}

/// A generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Generation ends when the text contains any of these (the stop string is not returned).
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: Prompt::default(),
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was sampled.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` or the context window was reached.
    Length,
}

/// Wall-clock timings of one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Time of the prefill forward pass (to the first sampled token).
    pub prefill_seconds: f64,
    /// Prompt tokens per second of prefill.
    pub prefill_tokens_per_second: f64,
    /// Time of all decode steps after the first token.
    pub decode_seconds: f64,
    /// Decode steps per second.
    pub decode_tokens_per_second: f64,
}

/// The result of a generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    /// The prompt as token ids (after templating and BOS).
    pub prompt_token_ids: Vec<u32>,
    /// Generated token ids (including a final eos token, if any).
    pub generated_token_ids: Vec<u32>,
    /// Generated text (without a matched stop string, without special tokens).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The seed sampling used.
    pub seed: u64,
    /// Timings.
    pub timings: Timings,
}
