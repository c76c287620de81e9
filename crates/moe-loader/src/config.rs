//! A JSON config file (config.json, generation_config.json, tokenizer_config.json) with typed
//! getters whose errors name the file and the field. `null` counts as absent, as in transformers.

use std::path::{Path, PathBuf};

use moe_core::{Error, Result};
use serde_json::Value;

/// A parsed JSON config file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
    json: Value,
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(path, format!("invalid JSON: {e}")))?;
        if !json.is_object() {
            return Err(Error::checkpoint(path, "not a JSON object"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            json,
        })
    }

    /// Reads `path` when it exists, `None` when it does not.
    pub fn read_optional(path: &Path) -> Result<Option<Self>> {
        if path.exists() {
            Self::read(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Wraps an in-memory JSON object (tests, nested configs).
    pub fn from_value(path: impl Into<PathBuf>, json: Value) -> Self {
        Self {
            path: path.into(),
            json,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw JSON.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// An error about `field` of this file.
    pub fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::config(&self.path, field, message)
    }

    /// The value of `field`, `None` when absent or null.
    pub fn raw(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    /// Is `field` present and not null?
    pub fn has(&self, field: &str) -> bool {
        self.raw(field).is_some()
    }

    /// A required non-negative integer.
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.error(field, "missing"))
    }

    /// An optional non-negative integer.
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.raw(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.error(field, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    /// The first of several spellings of an integer field that is present.
    pub fn usize_any(&self, fields: &[&str]) -> Result<usize> {
        for field in fields {
            if let Some(n) = self.opt_usize(field)? {
                return Ok(n);
            }
        }
        Err(self.error(&fields.join("` or `"), "missing"))
    }

    /// A required number.
    pub fn f64(&self, field: &str) -> Result<f64> {
        self.opt_f64(field)?
            .ok_or_else(|| self.error(field, "missing"))
    }

    /// An optional number.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.raw(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("expected a number, found {v}"))),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.raw(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("expected true or false, found {v}"))),
        }
    }

    /// A boolean with a default.
    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        Ok(self.opt_bool(field)?.unwrap_or(default))
    }

    /// An optional string.
    pub fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match self.raw(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("expected a string, found {v}"))),
        }
    }

    /// An optional list of non-negative integers.
    pub fn opt_usize_list(&self, field: &str) -> Result<Option<Vec<usize>>> {
        match self.raw(field) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .map(|i| i.as_u64().map(|n| n as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .map(Some)
                .ok_or_else(|| {
                    self.error(field, format!("expected a list of integers, found {v}"))
                }),
        }
    }

    /// Token ids written either as one integer or as a list (`eos_token_id`).
    pub fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.raw(field) {
            None => Ok(Vec::new()),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.error(field, format!("expected a token id, found {n}"))),
            Some(_) => Ok(self
                .opt_usize_list(field)?
                .unwrap_or_default()
                .into_iter()
                .map(|n| n as u32)
                .collect()),
        }
    }

    /// A nested object as its own config (same file path for messages).
    pub fn object(&self, field: &str) -> Result<Option<ConfigFile>> {
        match self.raw(field) {
            None => Ok(None),
            Some(v) if v.is_object() => Ok(Some(Self {
                path: self.path.clone(),
                json: v.clone(),
            })),
            Some(v) => Err(self.error(field, format!("expected an object, found {v}"))),
        }
    }
}
