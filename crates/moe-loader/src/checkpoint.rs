//! A whole checkpoint: one `model.safetensors` or the shards named by
//! `model.safetensors.index.json`, with typed, shape-checked tensor lookup by name.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_core::{Error, Result};

use crate::safetensors_file::{SafetensorsFile, TensorEntry};

/// The element type a checkpoint tensor is stored in, as far as the engine can read it.
pub type WeightDtype = DType;

/// All safetensors files of a checkpoint and which file holds which tensor.
pub struct Checkpoint {
    location: PathBuf,
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, usize>,
    progress: Option<indicatif::ProgressBar>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: the shard index when present, else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_paths = if index.exists() {
            shards_from_index(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::ModelNotFound {
                spec: dir.display().to_string(),
                message: "no model.safetensors or model.safetensors.index.json in this folder"
                    .into(),
            });
        };
        Self::open_files(dir, &shard_paths)
    }

    /// Opens an explicit list of safetensors files (later files may not repeat a tensor).
    pub fn open_files(location: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut by_name = HashMap::new();
        for (file_idx, path) in paths.iter().enumerate() {
            let file = SafetensorsFile::open(path)?;
            for name in file.tensors().keys() {
                if by_name.insert(name.clone(), file_idx).is_some() {
                    return Err(Error::checkpoint(
                        path,
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
            }
            files.push(file);
        }
        Ok(Self {
            location: location.to_path_buf(),
            files,
            by_name,
            progress: None,
        })
    }

    /// Shows a byte-counting progress bar on stderr while tensors are read (hidden when
    /// stderr is not a terminal).
    pub fn show_progress(&mut self, label: &str) {
        let total: usize = self
            .files
            .iter()
            .flat_map(|f| f.tensors().values())
            .map(|e| e.data_offsets.1 - e.data_offsets.0)
            .sum();
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        self.progress = Some(bar);
    }

    /// Ends the progress bar, if any.
    pub fn finish_progress(&self) {
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
    }

    /// Where the checkpoint was opened from (for messages).
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// The safetensors files, in shard order.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> BTreeSet<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    /// Does any file hold `name`?
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The file and header entry of `name`.
    pub fn entry(&self, name: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        let file = &self.files[*self.by_name.get(name)?];
        Some((file, file.tensors().get(name)?))
    }

    /// Reads tensor `name`, checks its shape against `expected`, converts it to `dtype` on
    /// `device`.
    pub fn tensor(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let file_idx = *self.by_name.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.location.display().to_string(),
        })?;
        let file = &self.files[file_idx];
        let (entry, bytes) = file.bytes(name).expect("indexed tensor exists in its file");
        if entry.shape != expected {
            return Err(Error::TensorShape {
                name: name.to_string(),
                path: file.path().to_path_buf(),
                expected: expected.to_vec(),
                got: entry.shape.clone(),
            });
        }
        let stored = float_dtype(name, file.path(), &entry.dtype)?;
        let tensor = Tensor::from_raw_buffer(bytes, stored, &entry.shape, &Device::Cpu)?;
        if let Some(bar) = &self.progress {
            bar.inc(bytes.len() as u64);
        }
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    /// Where tensor `name` lies on disk (file, absolute byte offset, dtype, shape), without
    /// reading it: for readers that fetch bytes on demand instead of through the mmap.
    pub fn tensor_location(&self, name: &str) -> Result<TensorLocation> {
        let (file, entry) = self.entry(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.location.display().to_string(),
        })?;
        Ok(TensorLocation {
            name: name.to_string(),
            path: file.path().to_path_buf(),
            offset: (file.data_start() + entry.data_offsets.0) as u64,
            len: entry.data_offsets.1 - entry.data_offsets.0,
            dtype: entry.dtype.clone(),
            shape: entry.shape.clone(),
        })
    }

    /// The dtype most bytes of the checkpoint are stored in (what `--dtype auto` picks).
    pub fn dominant_dtype(&self) -> Option<String> {
        let mut bytes_by_dtype: HashMap<&str, usize> = HashMap::new();
        for entry in self.files.iter().flat_map(|f| f.tensors().values()) {
            *bytes_by_dtype.entry(entry.dtype.as_str()).or_default() +=
                entry.data_offsets.1 - entry.data_offsets.0;
        }
        bytes_by_dtype
            .into_iter()
            .max_by_key(|&(_, b)| b)
            .map(|(d, _)| d.to_string())
    }
}

/// The candle dtype of a float safetensors dtype string; other dtypes are an error naming the
/// tensor.
fn float_dtype(name: &str, path: &Path, dtype: &str) -> Result<DType> {
    Ok(match dtype {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        other => {
            return Err(Error::TensorDtype {
                name: name.to_string(),
                path: path.to_path_buf(),
                dtype: other.to_string(),
            })
        }
    })
}

/// Where one tensor's bytes are on disk: everything needed to read and decode it later with a
/// plain positioned read, without the mmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// The full checkpoint name.
    pub name: String,
    /// The safetensors file holding it.
    pub path: PathBuf,
    /// Absolute byte offset of the tensor's first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
    /// The stored dtype string (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape as stored.
    pub shape: Vec<usize>,
}

impl TensorLocation {
    /// Errors unless the stored shape is `expected` (the same error [`Checkpoint::tensor`]
    /// gives).
    pub fn check_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::TensorShape {
                name: self.name.clone(),
                path: self.path.clone(),
                expected: expected.to_vec(),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// The location of entry `index` along the first dimension, which must be `count` long
    /// (one expert of a stacked `[n_experts, ...]` tensor): contiguous bytes, shape without
    /// the first dimension.
    pub fn slice_first(&self, index: usize, count: usize) -> Result<TensorLocation> {
        if self.shape.first() != Some(&count) || index >= count {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor `{}` of shape {:?}: no entry {index} of {count} along its first dimension",
                    self.name, self.shape
                ),
            ));
        }
        let stride = self.len / count;
        Ok(TensorLocation {
            name: format!("{}[{index}]", self.name),
            path: self.path.clone(),
            offset: self.offset + (index * stride) as u64,
            len: stride,
            dtype: self.dtype.clone(),
            shape: self.shape[1..].to_vec(),
        })
    }

    /// Checks that the stored dtype is a float type the engine reads.
    pub fn check_dtype(&self) -> Result<()> {
        float_dtype(&self.name, &self.path, &self.dtype).map(|_| ())
    }

    /// Decodes `bytes` (this tensor's `len` bytes, read from the file) exactly as
    /// [`Checkpoint::tensor`] decodes the mapped bytes: stored dtype → `dtype` on `device`.
    pub fn to_tensor(&self, bytes: &[u8], dtype: DType, device: &Device) -> Result<Tensor> {
        if bytes.len() != self.len {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor `{}`: got {} bytes, expected {}",
                    self.name,
                    bytes.len(),
                    self.len
                ),
            ));
        }
        let stored = float_dtype(&self.name, &self.path, &self.dtype)?;
        let tensor = Tensor::from_raw_buffer(bytes, stored, &self.shape, &Device::Cpu)?;
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The shard files named by a `model.safetensors.index.json`, in first-appearance order.
fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::checkpoint(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut seen = BTreeSet::new();
    let mut shards = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| Error::checkpoint(index, "`weight_map` values must be file names"))?;
        if seen.insert(file.to_string()) {
            let path = dir.join(file);
            if !path.exists() {
                return Err(Error::checkpoint(
                    index,
                    format!("shard `{file}` named in the index does not exist"),
                ));
            }
            shards.push(path);
        }
    }
    Ok(shards)
}

/// A prefixed view of a checkpoint that reads tensors in one dtype onto one device:
/// `lookup.pp("model.layers.3").get("input_layernorm.weight", &[h])`.
#[derive(Clone)]
pub struct TensorLookup {
    checkpoint: Arc<Checkpoint>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl TensorLookup {
    /// A view of the whole checkpoint.
    pub fn new(checkpoint: Arc<Checkpoint>, dtype: DType, device: Device) -> Self {
        Self {
            checkpoint,
            prefix: String::new(),
            dtype,
            device,
        }
    }

    /// The same view reading onto `device`.
    pub fn on_device(&self, device: Device) -> Self {
        Self {
            device,
            ..self.clone()
        }
    }

    /// The view under `prefix` (joined with a `.`).
    pub fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}.{prefix}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// The full checkpoint name of `name` in this view.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Reads `name` with the given shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checkpoint
            .tensor(&self.full_name(name), shape, self.dtype, &self.device)
    }

    /// Reads `name` in f32 regardless of the view's dtype (router biases, sinks).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checkpoint
            .tensor(&self.full_name(name), shape, DType::F32, &self.device)
    }

    /// Reads `name` when present, `None` when absent (a wrong shape is still an error).
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Is `name` in the checkpoint?
    pub fn contains(&self, name: &str) -> bool {
        self.checkpoint.contains(&self.full_name(name))
    }

    /// Where `name` lies on disk, shape-checked, in whatever dtype it is stored (packed
    /// formats such as MXFP4's `U8` blocks), without reading it.
    pub fn byte_location(&self, name: &str, shape: &[usize]) -> Result<TensorLocation> {
        let location = self.checkpoint.tensor_location(&self.full_name(name))?;
        location.check_shape(shape)?;
        Ok(location)
    }

    /// Where `name` lies on disk, shape- and dtype-checked like [`TensorLookup::get`], without
    /// reading it.
    pub fn location(&self, name: &str, shape: &[usize]) -> Result<TensorLocation> {
        let location = self.checkpoint.tensor_location(&self.full_name(name))?;
        location.check_shape(shape)?;
        location.check_dtype()?;
        Ok(location)
    }

    /// The compute dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The underlying checkpoint.
    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.checkpoint
    }
}

#[cfg(test)]
mod location_tests {
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A location read with a plain positioned read decodes to what the mmap path reads, and
    /// `slice_first` finds one entry of a stacked tensor.
    #[test]
    fn locations_read_like_the_mmap() {
        let dir = std::env::temp_dir().join(format!("moe-loader-loc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stacked = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 2, 4))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let other = Tensor::ones((5,), DType::F32, &Device::Cpu).unwrap();
        let tensors = HashMap::from([("a.stacked".to_string(), stacked), ("b".to_string(), other)]);
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        let checkpoint = Arc::new(Checkpoint::open_dir(&dir).unwrap());
        let lookup = TensorLookup::new(checkpoint.clone(), DType::F32, Device::Cpu);
        let read = |location: &TensorLocation| -> Vec<u8> {
            let mut bytes = vec![0u8; location.len];
            std::fs::File::open(&location.path)
                .unwrap()
                .read_exact_at(&mut bytes, location.offset)
                .unwrap();
            bytes
        };
        let location = lookup.pp("a").location("stacked", &[3, 2, 4]).unwrap();
        assert_eq!((location.dtype.as_str(), location.len), ("BF16", 48));
        let whole = location
            .to_tensor(&read(&location), DType::F32, &Device::Cpu)
            .unwrap();
        let mapped = lookup.get("a.stacked", &[3, 2, 4]).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&whole), flat(&mapped));
        let second = location.slice_first(1, 3).unwrap();
        assert_eq!(second.shape, vec![2, 4]);
        let second = second
            .to_tensor(&read(&second), DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(flat(&second), (8..16).map(|v| v as f32).collect::<Vec<_>>());
        // Wrong shapes, counts and lengths are errors, not panics.
        assert!(lookup.location("b", &[4]).is_err());
        assert!(location.slice_first(3, 3).is_err());
        assert!(location.slice_first(0, 2).is_err());
        assert!(location
            .to_tensor(&[0u8; 4], DType::F32, &Device::Cpu)
            .is_err());
        assert!(lookup.location("missing", &[1]).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
