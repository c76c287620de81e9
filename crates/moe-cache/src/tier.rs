//! Where a cache's misses come from: the tier below it. [`DiskTier`] reads the checkpoint's
//! safetensors files (RAM over disk); [`HostTier`] takes experts from a host-RAM
//! [`TieredExperts`] and copies them to a device (GPU over host). The cache, its budget
//! accounting and its policies are the same code over either.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use moe_core::{Error, ExpertKey, Result};
use moe_kernels::{ExpertWeights, WeightDtype};
use moe_models::{ExpertLayerLayout, ExpertOnDisk, ExpertSource};

use crate::direct_io::{open_direct, read_direct, AlignedRead, DIRECT_SLACK};
use crate::placement::ExpertCost;
use crate::tiered::TieredExperts;

/// One expert brought up from a lower tier.
pub struct Loaded {
    /// The weights, owned, on the upper tier's device.
    pub weights: ExpertWeights,
    /// Bytes moved from the lower tier.
    pub bytes_moved: u64,
    /// Time spent moving them (reads, copies).
    pub move_time: Duration,
}

/// The tier below a cache.
pub trait LowerTier: Send + Sync {
    /// Experts per decoder layer (0 for dense layers).
    fn experts_per_layer(&self) -> Vec<usize>;
    /// Bytes of `key`'s weights once loaded into the upper tier.
    fn ram_bytes(&self, key: ExpertKey) -> Result<u64>;
    /// Bytes the upper tier must reserve while `key` is being loaded into it.
    fn transient_bytes(&self, key: ExpertKey) -> Result<u64>;
    /// Loads an owned copy of `key` for the upper tier.
    fn load(&self, key: ExpertKey) -> Result<Loaded>;
    /// `key` as the fetch-or-compute cost model sees it.
    fn expert_cost(&self, key: ExpertKey) -> Result<ExpertCost>;
    /// `key`'s weights where this tier keeps them, for computing its rows here instead of
    /// copying it up (Fiddler); `None`: this tier cannot compute (the default: disk).
    fn weights_in_place(&self, _key: ExpertKey) -> Result<Option<Arc<ExpertWeights>>> {
        Ok(None)
    }
}

/// Bytes one expert may take while it is read and decoded. Three float tensors whose bytes
/// on disk equal the decoded size (per-expert layout, stored in the compute dtype) decode with
/// one copy each: raw buffers plus weights. Anything else (a dtype change, a stacked layout's
/// fused gate/up, MXFP4's dequantized values) may hold one more decoded-size copy. Int8
/// experts (`--expert-dtype q8`) are decoded to float that way first, then quantized into the
/// int8 result while the float copy is alive; a compute dtype other than bf16/f32 is widened
/// to f32 one matrix at a time (counted as one more float copy). A raw buffer read with
/// `O_DIRECT` covers the block-aligned window around its bytes: [`DIRECT_SLACK`] more each.
pub fn transient_bytes(on_disk: &ExpertOnDisk) -> u64 {
    let disk: u64 = on_disk.tensors.iter().map(|t| t.len as u64).sum();
    let slack = (on_disk.tensors.len() * DIRECT_SLACK) as u64;
    let (ram, float) = (on_disk.ram_bytes as u64, on_disk.float_bytes as u64);
    let decode = if on_disk.tensors.len() == 3 && disk == float {
        disk + float
    } else {
        disk + 2 * float
    };
    slack
        + match on_disk.expert_dtype {
            WeightDtype::Compute => decode,
            WeightDtype::Q8 if on_disk.quantizes_in_place() => decode + ram,
            WeightDtype::Q8 => decode + ram + float,
        }
}

/// Whether the routed experts' file pages may stay in the kernel's page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageCache {
    /// Kept out of it: experts are read with `O_DIRECT` (the disk's DMA lands in our buffer),
    /// or, where the file system has no direct reads, through the page cache with the pages
    /// dropped after every read (`POSIX_FADV_DONTNEED`); either way their pages are dropped
    /// when the tier opens. An expert outside the budget is on disk, not in RAM the budget
    /// does not count, and a miss costs a real read.
    #[default]
    Drop,
    /// Left to the kernel: misses of recently read experts may come from RAM outside the
    /// budget (faster when the files fit in memory).
    Keep,
}

/// Routed experts in the checkpoint files, read with positioned reads into owned buffers (not
/// the mmap) and decoded.
pub struct DiskTier {
    /// `experts[layer][expert]`; empty for dense layers.
    experts: Vec<Vec<ExpertOnDisk>>,
    files: HashMap<PathBuf, CheckpointFile>,
    page_cache: PageCache,
}

/// One safetensors file, open for buffered and, with [`PageCache::Drop`] where the file
/// system allows, direct reads.
struct CheckpointFile {
    buffered: File,
    direct: Option<File>,
    /// Set when a direct read failed with `EINVAL` (a device that wants larger alignment):
    /// this file is read through the page cache from then on.
    direct_failed: AtomicBool,
}

/// A raw tensor buffer as read.
enum RawBytes {
    Direct(AlignedRead),
    Buffered(Vec<u8>),
}

impl AsRef<[u8]> for RawBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            RawBytes::Direct(read) => read.as_ref(),
            RawBytes::Buffered(bytes) => bytes,
        }
    }
}

/// False when `MOE_INFER_NO_DIRECT_IO` is set (said once): expert reads then go through the
/// page cache, with their pages dropped after each read.
fn direct_reads_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let off = std::env::var_os("MOE_INFER_NO_DIRECT_IO").is_some_and(|v| !v.is_empty());
        if off {
            eprintln!(
                "moe-cache: MOE_INFER_NO_DIRECT_IO is set; experts are read through the page cache"
            );
        }
        !off
    })
}

impl CheckpointFile {
    fn open(path: &PathBuf, page_cache: PageCache) -> Result<Self> {
        let buffered = File::open(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let direct = match page_cache {
            PageCache::Drop if direct_reads_allowed() => open_direct(path),
            _ => None,
        };
        if page_cache == PageCache::Drop && direct.is_none() && direct_reads_allowed() {
            eprintln!(
                "moe-cache: {} does not allow direct (O_DIRECT) reads; experts are read \
                 through the page cache and their pages dropped after each read",
                path.display()
            );
        }
        Ok(Self {
            buffered,
            direct,
            direct_failed: AtomicBool::new(false),
        })
    }

    /// `len` bytes at `offset`: a direct read where possible, else a buffered one (whose
    /// pages are dropped afterwards with [`PageCache::Drop`]).
    fn read(
        &self,
        path: &PathBuf,
        offset: u64,
        len: usize,
        page_cache: PageCache,
    ) -> Result<RawBytes> {
        let io_error = |source| Error::Io {
            path: path.clone(),
            source,
        };
        if let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| !self.direct_failed.load(Ordering::Relaxed))
        {
            match read_direct(direct, offset, len) {
                Ok(read) => return Ok(RawBytes::Direct(read)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if !self.direct_failed.swap(true, Ordering::Relaxed) {
                        eprintln!(
                            "moe-cache: direct reads of {} failed ({e}); reading it through \
                             the page cache instead",
                            path.display()
                        );
                    }
                }
                Err(e) => return Err(io_error(e)),
            }
        }
        let mut buffer = vec![0u8; len];
        self.buffered
            .read_exact_at(&mut buffer, offset)
            .map_err(io_error)?;
        if page_cache == PageCache::Drop {
            drop_cached_pages(&self.buffered, offset, len);
        }
        Ok(RawBytes::Buffered(buffer))
    }
}

/// Asks the kernel to drop the cached pages of `len` bytes of `file` from `offset` (whole
/// pages only). Advice, not a guarantee: failures are ignored.
fn drop_cached_pages(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

impl DiskTier {
    /// Indexes where every routed expert of `layouts` lies and opens the files (nothing is
    /// read; every expert layout, per-expert or stacked, float or MXFP4, is supported). With
    /// [`PageCache::Drop`] the experts' pages are dropped from the page cache now, so the
    /// first read of each is a disk read too.
    pub fn open(
        n_layers: usize,
        layouts: &[ExpertLayerLayout],
        page_cache: PageCache,
    ) -> Result<Self> {
        let mut experts: Vec<Vec<ExpertOnDisk>> = (0..n_layers).map(|_| Vec::new()).collect();
        let mut files = HashMap::new();
        for l in layouts {
            let layer = l.experts_on_disk()?;
            for t in layer.iter().flat_map(|x| &x.tensors) {
                if !files.contains_key(&t.path) {
                    files.insert(t.path.clone(), CheckpointFile::open(&t.path, page_cache)?);
                }
            }
            experts[l.layer] = layer;
        }
        if page_cache == PageCache::Drop {
            for t in experts.iter().flatten().flat_map(|x| &x.tensors) {
                drop_cached_pages(&files[&t.path].buffered, t.offset, t.len);
            }
        }
        Ok(Self {
            experts,
            files,
            page_cache,
        })
    }

    fn on_disk(&self, key: ExpertKey) -> Result<&ExpertOnDisk> {
        self.experts
            .get(key.layer)
            .and_then(|layer| layer.get(key.expert))
            .ok_or_else(|| {
                Error::InvalidRequest(format!("layer {} has no expert {}", key.layer, key.expert))
            })
    }
}

impl LowerTier for DiskTier {
    fn experts_per_layer(&self) -> Vec<usize> {
        self.experts.iter().map(Vec::len).collect()
    }

    fn ram_bytes(&self, key: ExpertKey) -> Result<u64> {
        Ok(self.on_disk(key)?.ram_bytes as u64)
    }

    fn transient_bytes(&self, key: ExpertKey) -> Result<u64> {
        Ok(transient_bytes(self.on_disk(key)?))
    }

    fn load(&self, key: ExpertKey) -> Result<Loaded> {
        let on_disk = self.on_disk(key)?;
        let mut move_time = Duration::ZERO;
        let mut bytes_moved = 0u64;
        let mut buffers = Vec::with_capacity(on_disk.tensors.len());
        for t in &on_disk.tensors {
            let start = Instant::now();
            let buffer = self.files[&t.path].read(&t.path, t.offset, t.len, self.page_cache)?;
            move_time += start.elapsed();
            bytes_moved += t.len as u64;
            buffers.push(buffer);
        }
        Ok(Loaded {
            weights: on_disk.decode(&buffers)?,
            bytes_moved,
            move_time,
        })
    }

    fn expert_cost(&self, key: ExpertKey) -> Result<ExpertCost> {
        let on_disk = self.on_disk(key)?;
        let (hidden, intermediate) = on_disk.shape();
        Ok(ExpertCost::gated_ffn(
            hidden,
            intermediate,
            on_disk.ram_bytes as u64,
            on_disk.compute_dtype().size_in_bytes(),
        ))
    }
}

/// Experts from a host-RAM cache, copied to `device` (the GPU tier's lower tier). The host
/// copy stays pinned in the host cache only while it is being copied.
pub struct HostTier {
    host: Arc<TieredExperts>,
    device: Device,
}

impl HostTier {
    /// Copies experts of `host` to `device`.
    pub fn new(host: Arc<TieredExperts>, device: Device) -> Self {
        Self { host, device }
    }

    /// The host cache (for its statistics).
    pub fn host(&self) -> &Arc<TieredExperts> {
        &self.host
    }
}

impl LowerTier for HostTier {
    fn experts_per_layer(&self) -> Vec<usize> {
        self.host.lower().experts_per_layer()
    }

    fn ram_bytes(&self, key: ExpertKey) -> Result<u64> {
        self.host.lower().ram_bytes(key)
    }

    /// The device copy only: the host copy counts against the host budget.
    fn transient_bytes(&self, key: ExpertKey) -> Result<u64> {
        self.ram_bytes(key)
    }

    fn load(&self, key: ExpertKey) -> Result<Loaded> {
        let host = self.host.expert(key)?;
        let start = Instant::now();
        let weights: ExpertWeights = host.try_map(|t| {
            // `to_device` to the same device shares storage: force an owned copy so the upper
            // tier's bytes are its own.
            Ok(if t.device().same_device(&self.device) {
                t.copy()?
            } else {
                t.to_device(&self.device)?
            })
        })?;
        Ok(Loaded {
            bytes_moved: weights.n_bytes() as u64,
            weights,
            move_time: start.elapsed(),
        })
    }

    fn expert_cost(&self, key: ExpertKey) -> Result<ExpertCost> {
        self.host.lower().expert_cost(key)
    }

    /// The host cache's copy (read from disk first if the host tier misses too), computed on
    /// the host's CPU.
    fn weights_in_place(&self, key: ExpertKey) -> Result<Option<Arc<ExpertWeights>>> {
        Ok(Some(self.host.expert(key)?))
    }
}
