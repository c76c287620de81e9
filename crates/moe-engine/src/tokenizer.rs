//! Text ↔ token ids through `tokenizer.json`, with the BOS and EOS conventions read from
//! `tokenizer_config.json`, `generation_config.json` and `config.json`.

use std::path::Path;

use moe_core::{Error, Result};
use moe_loader::ConfigFile;

/// The model's tokenizer and its special-token conventions.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos_ids: Vec<u32>,
}

/// A special token written as `"<s>"` or `{"content": "<s>", ...}`.
pub(crate) fn special_token_text(cfg: &ConfigFile, field: &str) -> Option<String> {
    let v = cfg.raw(field)?;
    v.as_str()
        .map(String::from)
        .or_else(|| v.get("content").and_then(|c| c.as_str()).map(String::from))
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir` and the conventions from the config files.
    pub fn load(
        dir: &Path,
        model_config: &ConfigFile,
        tokenizer_config: Option<&ConfigFile>,
        generation_config: Option<&ConfigFile>,
    ) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer(format!("{}: not found", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let bos_from_text = tokenizer_config
            .and_then(|t| special_token_text(t, "bos_token"))
            .and_then(|s| inner.token_to_id(&s));
        let bos = match bos_from_text {
            Some(id) => Some(id),
            None => model_config.token_ids("bos_token_id")?.first().copied(),
        };
        let add_bos = match tokenizer_config {
            Some(t) => t.bool_or("add_bos_token", false)?,
            None => false,
        };
        let mut eos_ids = match generation_config {
            Some(g) => g.token_ids("eos_token_id")?,
            None => Vec::new(),
        };
        if eos_ids.is_empty() {
            eos_ids = model_config.token_ids("eos_token_id")?;
        }
        if eos_ids.is_empty() {
            if let Some(id) = tokenizer_config
                .and_then(|t| special_token_text(t, "eos_token"))
                .and_then(|s| inner.token_to_id(&s))
            {
                eos_ids.push(id);
            }
        }
        Ok(Self {
            inner,
            bos,
            add_bos,
            eos_ids,
        })
    }

    /// Tokenizes `text`; prepends BOS when the tokenizer config asks for it and the
    /// tokenizer's own post-processor did not.
    pub fn encode(&self, text: &str, allow_bos: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if allow_bos && self.add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The text of a token id (for templates).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}
