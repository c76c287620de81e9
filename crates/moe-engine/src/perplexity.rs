//! Perplexity of a token sequence: windows of at most the context length, each run from an
//! empty cache in chunks, negative log-likelihood of every next token.

use candle_core::{Tensor, D};
use moe_core::{Error, Result};
use moe_models::{ForwardContext, LogitsWanted, SequenceInput};
use serde::Serialize;

use crate::engine::Engine;

/// Result of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// Tokens in the input.
    pub n_tokens: usize,
    /// Tokens that were predicted (the first of each window has no prediction).
    pub n_predicted: usize,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: f64,
    /// exp(mean_nll).
    pub perplexity: f64,
    /// Window length used.
    pub window: usize,
    /// Seconds spent.
    pub seconds: f64,
    /// `[n_tokens, vocab]` f32 logits, when asked for.
    #[serde(skip)]
    pub logits: Option<Tensor>,
}

/// Positions per forward call inside a window (bounds the attention scratch memory).
const CHUNK: usize = 512;

impl Engine {
    /// Scores `tokens` (at least 2). `keep_logits` returns every position's logits.
    pub fn perplexity(&self, tokens: &[u32], keep_logits: bool) -> Result<PerplexityReport> {
        if tokens.len() < 2 {
            return Err(Error::InvalidRequest(format!(
                "perplexity needs at least 2 tokens, the input has {}",
                tokens.len()
            )));
        }
        let start = std::time::Instant::now();
        let window = self.context_length();
        let mut nll_sum = 0f64;
        let mut n_predicted = 0usize;
        let mut all_logits = Vec::new();
        for win in tokens.chunks(window) {
            let mut cache = self.model.new_cache();
            for (c, chunk) in win.chunks(CHUNK).enumerate() {
                let mut batch = [SequenceInput {
                    tokens: chunk,
                    cache: &mut cache,
                    logits: LogitsWanted::All,
                }];
                // [chunk, vocab]
                let logits = self
                    .model
                    .forward(&mut batch, ForwardContext::default())?
                    .remove(0);
                let log_probs = candle_nn_log_softmax(&logits)?.to_vec2::<f32>()?;
                let base = c * CHUNK;
                for (j, row) in log_probs.iter().enumerate() {
                    if let Some(&next) = win.get(base + j + 1) {
                        nll_sum -= row[next as usize] as f64;
                        n_predicted += 1;
                    }
                }
                if keep_logits {
                    all_logits.push(logits);
                }
            }
        }
        let mean_nll = nll_sum / n_predicted as f64;
        Ok(PerplexityReport {
            n_tokens: tokens.len(),
            n_predicted,
            mean_nll,
            perplexity: mean_nll.exp(),
            window,
            seconds: start.elapsed().as_secs_f64(),
            logits: if keep_logits {
                Some(Tensor::cat(&all_logits, 0)?)
            } else {
                None
            },
        })
    }
}

fn candle_nn_log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}
