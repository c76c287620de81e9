//! Turning what the user typed (`./dir` or `org/name[@revision]`) into a local folder that
//! holds config.json, tokenizer files and safetensors. Hub ids use the standard HF cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`); with
//! `HF_HUB_OFFLINE=1` they resolve from that cache only.

use std::path::{Path, PathBuf};

use moe_core::{Error, Result};

/// A local folder holding a Hugging Face checkpoint.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The folder (for hub models: the snapshot folder in the cache).
    pub path: PathBuf,
    /// What the user asked for, for messages.
    pub spec: String,
}

const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors.index.json",
];

/// Resolves a model spec to a local folder, downloading from the hub when needed.
pub fn resolve_model(spec: &str, show_progress: bool) -> Result<ModelDir> {
    let local = Path::new(spec);
    if local.is_dir() {
        return Ok(ModelDir {
            path: local.to_path_buf(),
            spec: spec.to_string(),
        });
    }
    if local.exists() {
        return Err(Error::ModelNotFound {
            spec: spec.into(),
            message: "not a folder (pass the folder that holds config.json)".into(),
        });
    }
    let looks_like_hub_id =
        !spec.starts_with('.') && !spec.starts_with('/') && spec.split('/').count() == 2;
    if !looks_like_hub_id {
        return Err(Error::ModelNotFound {
            spec: spec.into(),
            message: "no such folder".into(),
        });
    }
    let (repo_id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (spec.to_string(), "main".to_string()),
    };
    let repo = hf_hub::Repo::with_revision(repo_id, hf_hub::RepoType::Model, revision);
    if is_offline() {
        resolve_from_cache(spec, repo)
    } else {
        download(spec, repo, show_progress)
    }
}

fn is_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(path) => hf_hub::Cache::new(PathBuf::from(path)),
        None => hf_hub::Cache::from_env(),
    }
}

fn resolve_from_cache(spec: &str, repo: hf_hub::Repo) -> Result<ModelDir> {
    let cache = hub_cache();
    let cached = cache.repo(repo);
    let not_cached = |file: &str| Error::ModelNotFound {
        spec: spec.into(),
        message: format!(
            "HF_HUB_OFFLINE is set and `{file}` is not in the cache at {}",
            cache.path().display()
        ),
    };
    let config = cached
        .get("config.json")
        .ok_or_else(|| not_cached("config.json"))?;
    for file in REQUIRED_FILES {
        cached.get(file).ok_or_else(|| not_cached(file))?;
    }
    let dir = config
        .parent()
        .expect("cached file has a parent")
        .to_path_buf();
    for shard in weight_files(spec, &dir)? {
        cached.get(&shard).ok_or_else(|| not_cached(&shard))?;
    }
    Ok(ModelDir {
        path: dir,
        spec: spec.into(),
    })
}

fn download(spec: &str, repo: hf_hub::Repo, show_progress: bool) -> Result<ModelDir> {
    let failed = |file: &str, e: hf_hub::api::sync::ApiError| Error::ModelNotFound {
        spec: spec.into(),
        message: format!("downloading `{file}` failed: {e}"),
    };
    let mut builder =
        hf_hub::api::sync::ApiBuilder::from_cache(hub_cache()).with_progress(show_progress);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().map_err(|e| failed("<api>", e))?;
    let remote = api.repo(repo);
    let config = remote
        .get("config.json")
        .map_err(|e| failed("config.json", e))?;
    for file in REQUIRED_FILES {
        remote.get(file).map_err(|e| failed(file, e))?;
    }
    for file in OPTIONAL_FILES {
        // Absent optional files are normal (404); real failures show up when they are read.
        let _ = remote.get(file);
    }
    let dir = config
        .parent()
        .expect("downloaded file has a parent")
        .to_path_buf();
    for shard in weight_files(spec, &dir)? {
        remote.get(&shard).map_err(|e| failed(&shard, e))?;
    }
    Ok(ModelDir {
        path: dir,
        spec: spec.into(),
    })
}

/// The safetensors files a checkpoint folder needs: the shards of its index, else
/// `model.safetensors`.
fn weight_files(spec: &str, dir: &Path) -> Result<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Ok(vec!["model.safetensors".into()]);
    }
    let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
        path: index.clone(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::ModelNotFound {
            spec: spec.into(),
            message: format!("{}: invalid JSON: {e}", index.display()),
        })?;
    let mut shards: Vec<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    Ok(shards)
}
