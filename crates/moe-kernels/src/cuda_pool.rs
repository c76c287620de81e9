//! A device expert pool (`cuda` feature): one device buffer per weight kind
//! (`[n_slots, intermediate, hidden]` for gate and up, `[n_slots, hidden, intermediate]` for
//! down, and `[n_slots, ..]` biases when the model has them), in the model's dtype; which expert
//! sits in which slot is decided by [`SlotTable`]. Uploads of an expert's host weights go
//! through a ring of pinned (page-locked) host staging buffers (`CudaContext::alloc_pinned`,
//! which cudarc 0.19 offers) and asynchronous host→device copies on a dedicated copy stream;
//! an event is recorded after each upload and the compute stream waits on it before the
//! kernel launch ([`DeviceExpertPool::wait_on_compute`]), so the next layer's uploads can be
//! issued while this layer computes. Before a slot is overwritten, the copy stream waits on
//! the event recorded on the compute stream when the slot was last released.
//!
//! Compiled (`cargo build -p moe-kernels --features cuda`), **never executed on a GPU**.

use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result, CudaEvent, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, Device, Result, Storage, Tensor, WithDType};

use crate::expert_ffn::ExpertWeights;
use crate::fused::StackedExperts;
use crate::slot_pool::SlotTable;

/// The shape of one expert of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertDims {
    /// Model width.
    pub hidden: usize,
    /// Expert FFN width.
    pub intermediate: usize,
    /// Whether experts carry gate/up/down biases (GPT-OSS).
    pub biases: bool,
}

impl ExpertDims {
    /// Per-slot shape of each weight kind: gate, up, down, then the biases if any.
    fn kinds(&self) -> Vec<Vec<usize>> {
        let (h, i) = (self.hidden, self.intermediate);
        let mut k = vec![vec![i, h], vec![i, h], vec![h, i]];
        if self.biases {
            k.extend([vec![i], vec![i], vec![h]]);
        }
        k
    }

    /// Elements of one expert, all kinds together.
    fn expert_elems(&self) -> usize {
        self.kinds()
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

/// One pinned host staging buffer (a whole expert) and the event of the last copy out of it.
struct Staging<T> {
    host: PinnedHostSlice<T>,
    copied: Option<Arc<CudaEvent>>,
}

/// Expert slots in device memory, filled by asynchronous uploads on a copy stream. `K` names
/// an expert (e.g. `(layer, expert)`: one pool can serve every layer); `T` is the model dtype.
pub struct DeviceExpertPool<K, T> {
    dev: CudaDevice,
    copy: Arc<CudaStream>,
    dims: ExpertDims,
    kinds: Vec<Vec<usize>>,
    table: SlotTable<K>,
    /// One `[n_slots, ..kind]` tensor per weight kind.
    buffers: Vec<Tensor>,
    staging: Vec<Staging<T>>,
    next_staging: usize,
    /// Recorded on the copy stream after each slot's last upload.
    uploaded: Vec<Option<Arc<CudaEvent>>>,
    /// Recorded on the compute stream when each slot was last released.
    released: Vec<Option<Arc<CudaEvent>>>,
    _dtype: PhantomData<T>,
}

impl<K, T> DeviceExpertPool<K, T>
where
    K: Eq + Hash + Clone,
    T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType,
{
    /// A pool of `n_slots` experts of shape `dims` on `dev`, with `n_staging` (≥ 1) pinned
    /// staging buffers; allocates `n_slots` experts of device memory and `n_staging` of
    /// pinned host memory.
    pub fn new(
        dev: &CudaDevice,
        dims: ExpertDims,
        n_slots: usize,
        n_staging: usize,
    ) -> Result<Self> {
        if n_staging == 0 {
            bail!("expert pool: needs at least one staging buffer")
        }
        let kinds = dims.kinds();
        let device = Device::Cuda(dev.clone());
        let buffers = kinds
            .iter()
            .map(|k| {
                let shape: Vec<usize> = std::iter::once(n_slots).chain(k.iter().copied()).collect();
                Tensor::zeros(shape, T::DTYPE, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        let compute = dev.cuda_stream();
        let ctx = compute.context().clone();
        let copy = ctx.new_stream().w()?;
        // the zeroing above runs on the compute stream: uploads come after it
        copy.join(&compute).w()?;
        let staging = (0..n_staging)
            .map(|_| {
                // SAFETY: the buffer is only written (whole experts) before being read
                let host = unsafe { ctx.alloc_pinned::<T>(dims.expert_elems()) }.w()?;
                Ok(Staging { host, copied: None })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dev: dev.clone(),
            copy,
            dims,
            kinds,
            table: SlotTable::new(n_slots),
            buffers,
            staging,
            next_staging: 0,
            uploaded: vec![None; n_slots],
            released: vec![None; n_slots],
            _dtype: PhantomData,
        })
    }

    /// The slot table (read-only).
    pub fn table(&self) -> &SlotTable<K> {
        &self.table
    }

    /// The copy stream.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy
    }

    /// Pins `key` for the current step; when it is not in the pool yet, takes a slot (LRU,
    /// never a pinned one) and issues the upload of `weights()` into it on the copy stream.
    /// Returns the slot. Errors when every slot is pinned.
    pub fn pin(
        &mut self,
        key: K,
        weights: impl FnOnce() -> Result<ExpertWeights>,
    ) -> Result<usize> {
        let (slot, needs_upload) = self
            .table
            .lookup_or_assign(key.clone())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if needs_upload {
            let uploaded = weights().and_then(|w| self.upload(slot, &w));
            if let Err(e) = uploaded {
                self.table.forget(&key);
                return Err(e);
            }
        }
        Ok(slot)
    }

    /// Issues the asynchronous copies of `w` into `slot` on the copy stream.
    fn upload(&mut self, slot: usize, w: &ExpertWeights) -> Result<()> {
        let mut parts: Vec<&Tensor> = vec![&w.gate, &w.up, &w.down];
        if self.dims.biases {
            match (&w.gate_bias, &w.up_bias, &w.down_bias) {
                (Some(a), Some(b), Some(c)) => parts.extend([a, b, c]),
                _ => bail!("expert pool: the pool holds biases but the expert has none"),
            }
        }
        // host values, in the pool's dtype, before touching any staging buffer
        let mut host_parts = Vec::with_capacity(parts.len());
        for (t, kind) in parts.iter().zip(&self.kinds) {
            if t.dims() != kind.as_slice() {
                bail!(
                    "expert pool: expert weight of shape {:?}, the pool holds {:?}",
                    t.dims(),
                    kind
                )
            }
            let t = t.to_device(&Device::Cpu)?.to_dtype(T::DTYPE)?;
            host_parts.push(t.flatten_all()?.to_vec1::<T>()?);
        }
        let n_staging = self.staging.len();
        let staging = &mut self.staging[self.next_staging];
        self.next_staging = (self.next_staging + 1) % n_staging;
        // the host waits until the last copy out of this staging buffer is done
        if let Some(ev) = staging.copied.take() {
            ev.synchronize().w()?;
        }
        let host = staging.host.as_mut_slice().w()?;
        let mut at = 0;
        for p in &host_parts {
            host[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        // the copy stream waits until the compute stream is done reading the slot's old expert
        if let Some(ev) = &self.released[slot] {
            self.copy.wait(ev).w()?;
        }
        let host: &[T] = staging.host.as_slice().w()?;
        let mut at = 0;
        for (buf, p) in self.buffers.iter().zip(&host_parts) {
            let n = p.len();
            let (st, layout) = buf.storage_and_layout();
            let Storage::Cuda(cs) = &*st else {
                bail!("expert pool: a pool buffer is not on the GPU")
            };
            let slice = cs.as_cuda_slice::<T>()?;
            let (base, _sync) = slice.device_ptr(&self.copy);
            let offset = (layout.start_offset() + slot * n) * std::mem::size_of::<T>();
            // SAFETY: `slot * n .. (slot + 1) * n` lies in the `[n_slots, ..]` buffer (checked
            // shapes, slot < n_slots); the source is pinned host memory kept alive (and not
            // rewritten) until `copied` below has completed; no kernel reads the slot meanwhile
            // (it is unpinned, and the copy stream waited for its release above).
            unsafe {
                result::memcpy_htod_async(
                    base + offset as u64,
                    &host[at..at + n],
                    self.copy.cu_stream(),
                )
            }
            .w()?;
            at += n;
        }
        let done = Arc::new(self.copy.record_event(None).w()?);
        staging.copied = Some(done.clone());
        self.uploaded[slot] = Some(done);
        Ok(())
    }

    /// Makes the compute stream (candle's stream of the device) wait for the uploads of
    /// `slots`; call before launching the kernels that read them.
    pub fn wait_on_compute(&self, slots: &[usize]) -> Result<()> {
        let compute = self.dev.cuda_stream();
        for &s in slots {
            if let Some(ev) = &self.uploaded[s] {
                compute.wait(ev).w()?;
            }
        }
        Ok(())
    }

    /// The pool as stacked experts for [`crate::fused::MoeExperts`]: `expert_slot[e]` is the
    /// slot of expert id `e` of the layer (ids no token chose may map anywhere).
    pub fn stacked(&self, expert_slot: Vec<u32>) -> StackedExperts {
        let b = &self.buffers;
        StackedExperts {
            gate: b[0].clone(),
            up: b[1].clone(),
            down: b[2].clone(),
            biases: self
                .dims
                .biases
                .then(|| (b[3].clone(), b[4].clone(), b[5].clone())),
            expert_slot: Some(expert_slot),
        }
    }

    /// Unpins `keys` once the kernels reading them have been launched: an event recorded
    /// now on the compute stream guards their slots against being overwritten too early.
    pub fn release(&mut self, keys: &[K]) -> Result<()> {
        let ev = Arc::new(self.dev.cuda_stream().record_event(None).w()?);
        for k in keys {
            if let Some(slot) = self.table.release(k) {
                self.released[slot] = Some(ev.clone());
            }
        }
        Ok(())
    }
}
