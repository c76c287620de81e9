//! One `.safetensors` file, memory-mapped, with its header parsed and validated before any
//! tensor is read: offsets inside the file, no overlaps, byte sizes that match shape × dtype.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use moe_core::{Error, Result};

/// Where one tensor lives inside a safetensors file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The dtype string of the header (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Byte range inside the data section (after the header).
    pub data_offsets: (usize, usize),
}

/// A memory-mapped safetensors file whose header passed validation.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorEntry>,
}

/// Bytes per element of a safetensors dtype string, `None` when unknown.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Maps `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only; a concurrent writer truncating it is outside
        // what any mmap-based loader can guard against (candle and safetensors share this).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| Error::checkpoint(path, message);
        if mmap.len() < 8 {
            return Err(bad(format!(
                "truncated safetensors file ({} bytes, no header)",
                mmap.len()
            )));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        let data_start = 8usize
            .checked_add(header_len)
            .filter(|&end| end <= mmap.len())
            .ok_or_else(|| bad(format!("truncated safetensors file: header of {header_len} bytes runs past the end ({} bytes)", mmap.len())))?;
        let header: serde_json::Value = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
        let object = header
            .as_object()
            .ok_or_else(|| bad("corrupt safetensors header: not a JSON object".into()))?;
        let data_len = mmap.len() - data_start;
        let mut tensors = HashMap::new();
        for (name, value) in object {
            if name == "__metadata__" {
                continue;
            }
            let entry: TensorEntry = parse_entry(value).ok_or_else(|| {
                bad(format!(
                    "corrupt safetensors header: entry `{name}` lacks dtype/shape/data_offsets"
                ))
            })?;
            let (start, end) = entry.data_offsets;
            if start > end {
                return Err(bad(format!(
                    "tensor `{name}`: data offsets {start}..{end} are reversed"
                )));
            }
            if end > data_len {
                return Err(bad(format!(
                    "truncated or corrupt: tensor `{name}` ends at byte {end} of a {data_len}-byte data section"
                )));
            }
            let elem = dtype_size(&entry.dtype)
                .ok_or_else(|| bad(format!("tensor `{name}` has unknown dtype {}", entry.dtype)))?;
            let n_bytes = entry
                .shape
                .iter()
                .try_fold(elem, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}`: shape {:?} is too large to address",
                        entry.shape
                    ))
                })?;
            if n_bytes != end - start {
                return Err(bad(format!(
                    "tensor `{name}`: shape {:?} × {} needs {} bytes but its offsets span {}",
                    entry.shape,
                    entry.dtype,
                    n_bytes,
                    end - start
                )));
            }
            tensors.insert(name.clone(), entry);
        }
        let mut spans: Vec<(&str, usize, usize)> = tensors
            .iter()
            .map(|(n, e)| (n.as_str(), e.data_offsets.0, e.data_offsets.1))
            .collect();
        spans.sort_by_key(|&(_, start, end)| (start, end));
        for pair in spans.windows(2) {
            let ((a, _, a_end), (b, b_start, _)) = (pair[0], pair[1]);
            if b_start < a_end {
                return Err(bad(format!(
                    "tensors `{a}` and `{b}` overlap in the data section"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors in the file, by name.
    pub fn tensors(&self) -> &HashMap<String, TensorEntry> {
        &self.tensors
    }

    /// Byte offset of the data section (just after the header) inside the file: a tensor's
    /// bytes are at `data_start() + data_offsets.0 .. data_start() + data_offsets.1`.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// The raw bytes of a tensor, or `None` when the file has no tensor of that name.
    pub fn bytes(&self, name: &str) -> Option<(&TensorEntry, &[u8])> {
        let entry = self.tensors.get(name)?;
        let (start, end) = entry.data_offsets;
        Some((
            entry,
            &self.mmap[self.data_start + start..self.data_start + end],
        ))
    }
}

fn parse_entry(value: &serde_json::Value) -> Option<TensorEntry> {
    let dtype = value.get("dtype")?.as_str()?.to_string();
    let shape = value
        .get("shape")?
        .as_array()?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<Vec<_>>>()?;
    let offsets = value.get("data_offsets")?.as_array()?;
    if offsets.len() != 2 {
        return None;
    }
    let data_offsets = (offsets[0].as_u64()? as usize, offsets[1].as_u64()? as usize);
    Some(TensorEntry {
        dtype,
        shape,
        data_offsets,
    })
}
