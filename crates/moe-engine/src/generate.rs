//! The generation loop: prefill every request's prompt in one batched forward pass, then
//! decode all unfinished sequences together, one token each per step, streaming text.

use std::time::Instant;

use moe_core::{Error, Result};
use moe_models::{ForwardContext, KvCache, LogitsWanted, SequenceInput};

use crate::engine::Engine;
use crate::request::{FinishReason, GenerateRequest, GenerateResponse, Timings};
use crate::sampling::Sampler;

/// Where one request stands during the loop.
struct Sequence<'a> {
    request: &'a GenerateRequest,
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    text: TextTracker,
    finish: Option<FinishReason>,
    decode_started: Option<Instant>,
    decode_seconds: f64,
}

/// The generated text so far and how much of it was already streamed.
struct TextTracker {
    text: String,
    streamed: usize,
}

impl Engine {
    /// Generates for one request, calling `on_text` with each new piece of text as soon as it
    /// is final (held back while it could still be the start of a stop string).
    pub fn generate(
        &self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerateResponse> {
        let mut responses = self.run(std::slice::from_ref(request), &mut |_, piece| {
            on_text(piece)
        })?;
        Ok(responses.pop().expect("one response per request"))
    }

    /// Generates for several requests at once (one batched prefill, then batched decode steps).
    pub fn generate_batch(&self, requests: &[GenerateRequest]) -> Result<Vec<GenerateResponse>> {
        self.run(requests, &mut |_, _| {})
    }

    fn run(
        &self,
        requests: &[GenerateRequest],
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<GenerateResponse>> {
        let ctx_len = self.context_length();
        let mut seqs = Vec::with_capacity(requests.len());
        for request in requests {
            if request.max_new_tokens == 0 {
                return Err(Error::InvalidRequest(
                    "invalid max_new_tokens 0: must be at least 1".into(),
                ));
            }
            if let Some(i) = request.stop.iter().position(String::is_empty) {
                return Err(Error::InvalidRequest(format!(
                    "invalid stop string #{} \"\": stop strings must not be empty",
                    i + 1
                )));
            }
            seqs.push(Sequence {
                request,
                prompt_ids: self.tokenize_prompt(&request.prompt)?,
                generated: Vec::new(),
                cache: self.model.new_cache(),
                sampler: Sampler::new(request.sampling.clone())?,
                text: TextTracker {
                    text: String::new(),
                    streamed: 0,
                },
                finish: None,
                decode_started: None,
                decode_seconds: 0.0,
            });
        }

        // Prefill: all prompts in one forward pass.
        let prefill_start = Instant::now();
        let logits = {
            // Stage timers (`bench --stage-times`) measure decode steps.
            let _paused = moe_models::stage_times::pause();
            let mut batch: Vec<SequenceInput> = seqs
                .iter_mut()
                .map(|s| SequenceInput {
                    tokens: &s.prompt_ids,
                    cache: &mut s.cache,
                    logits: LogitsWanted::Last,
                })
                .collect();
            self.model.forward(&mut batch, ForwardContext::default())?
        };
        let prefill_seconds = prefill_start.elapsed().as_secs_f64();
        for (i, (seq, logits)) in seqs.iter_mut().zip(logits).enumerate() {
            self.accept_token(i, seq, logits, ctx_len, on_text)?;
        }

        // Decode: every unfinished sequence advances by one token per step.
        loop {
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].finish.is_none())
                .collect();
            if active.is_empty() {
                break;
            }
            let step_start = Instant::now();
            let last_tokens: Vec<[u32; 1]> = active
                .iter()
                .map(|&i| [*seqs[i].generated.last().expect("prefill sampled one")])
                .collect();
            let logits = {
                let mut batch = Vec::with_capacity(active.len());
                let mut remaining: &mut [Sequence] = &mut seqs;
                let mut offset = 0;
                for (&i, token) in active.iter().zip(&last_tokens) {
                    let (_, rest) = remaining.split_at_mut(i - offset);
                    let (this, rest) = rest.split_first_mut().expect("index in range");
                    batch.push(SequenceInput {
                        tokens: token,
                        cache: &mut this.cache,
                        logits: LogitsWanted::Last,
                    });
                    remaining = rest;
                    offset = i + 1;
                }
                self.model.forward(&mut batch, ForwardContext::default())?
            };
            for (&i, logits) in active.iter().zip(logits) {
                let seq = &mut seqs[i];
                seq.decode_started.get_or_insert(step_start);
                self.accept_token(i, seq, logits, ctx_len, on_text)?;
                seq.decode_seconds = seq
                    .decode_started
                    .map(|s| s.elapsed().as_secs_f64())
                    .unwrap_or(0.0);
            }
        }

        Ok(seqs
            .into_iter()
            .map(|s| {
                let generated_tokens = s.generated.len();
                let decode_steps = generated_tokens.saturating_sub(1);
                GenerateResponse {
                    timings: Timings {
                        prompt_tokens: s.prompt_ids.len(),
                        generated_tokens,
                        prefill_seconds,
                        prefill_tokens_per_second: rate(s.prompt_ids.len(), prefill_seconds),
                        decode_seconds: s.decode_seconds,
                        decode_tokens_per_second: rate(decode_steps, s.decode_seconds),
                    },
                    seed: s.sampler.seed(),
                    prompt_token_ids: s.prompt_ids,
                    generated_token_ids: s.generated,
                    text: s.text.text,
                    finish_reason: s.finish.expect("loop ends when all finished"),
                }
            })
            .collect())
    }

    /// Samples from `logits`, appends the token, streams text, and decides whether to stop.
    fn accept_token(
        &self,
        i: usize,
        seq: &mut Sequence<'_>,
        logits: candle_core::Tensor,
        ctx_len: usize,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<()> {
        let mut logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let history: Vec<u32> = seq
            .prompt_ids
            .iter()
            .chain(&seq.generated)
            .copied()
            .collect();
        let token = seq.sampler.sample(&mut logits, &history);
        seq.generated.push(token);
        if !seq.request.ignore_eos && self.tokenizer.eos_ids().contains(&token) {
            seq.finish = Some(FinishReason::Eos);
        } else {
            let full = self.tokenizer.decode(&seq.generated)?;
            seq.text.text = full;
            if let Some(cut) = first_stop(&seq.text.text, &seq.request.stop) {
                seq.text.text.truncate(cut);
                seq.finish = Some(FinishReason::StopString);
            }
        }
        if seq.finish.is_none()
            && (seq.generated.len() >= seq.request.max_new_tokens || seq.cache.len() + 1 >= ctx_len)
        {
            seq.finish = Some(FinishReason::Length);
        }
        // Stream what is final: everything when finished; otherwise hold back an incomplete
        // UTF-8 tail and any suffix that could begin a stop string.
        let text = &seq.text.text;
        let end = if seq.finish.is_some() {
            text.len()
        } else {
            safe_stream_end(text, &seq.request.stop)
        };
        if end > seq.text.streamed {
            on_text(i, &text[seq.text.streamed..end]);
            seq.text.streamed = end;
        }
        Ok(())
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How far `text` may be streamed: not into a trailing replacement character (an incomplete
/// multi-byte character) nor into a suffix that is a prefix of a stop string.
fn safe_stream_end(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for stop in stops {
        for (k, _) in stop.char_indices().skip(1) {
            if text[..end].ends_with(&stop[..k]) {
                end = end.min(text[..end].len() - k);
            }
        }
    }
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_holds_back_possible_stop_prefixes() {
        let stops = vec!["THE END".to_string()];
        assert_eq!(safe_stream_end("and so THE E", &stops), "and so ".len());
        assert_eq!(safe_stream_end("and so", &stops), "and so".len());
        assert_eq!(first_stop("happy. THE END more", &stops), Some(7));
    }
}
