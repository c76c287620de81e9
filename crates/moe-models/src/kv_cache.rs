//! The key/value cache of one sequence: per layer, keys and values of every past position.
//!
//! Each layer's keys and values live in tensors with room to grow (`[heads, capacity, dim]`),
//! written in place as positions arrive, so a decode step copies its own new rows only; the
//! capacity grows by a quarter (at least 64 positions) when it runs out.

use candle_core::Tensor;
use moe_core::Result;

/// Positions a layer's buffers grow by at least.
const MIN_GROWTH: usize = 64;

/// One layer's buffers and how many of their positions hold values.
#[derive(Debug)]
struct LayerKv {
    /// `[n_kv_heads, capacity, head_dim]`
    k: Tensor,
    /// `[n_kv_heads, capacity, v_head_dim]`
    v: Tensor,
    len: usize,
}

/// A layer's keys and values in place: `[heads, capacity, dim]` buffers whose first `n_keys`
/// positions are the sequence's ([`KvCache::append_in_place`]).
#[derive(Debug, Clone)]
pub struct CachedKv {
    /// Keys, `[n_kv_heads, capacity, head_dim]`, contiguous.
    pub k: Tensor,
    /// Values, `[n_kv_heads, capacity, v_head_dim]`, contiguous.
    pub v: Tensor,
    /// Positions held.
    pub n_keys: usize,
}

/// Keys and values of one sequence across all layers.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    n_past: usize,
}

impl KvCache {
    /// An empty cache for a model with `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
            n_past: 0,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.n_past
    }

    /// Nothing cached yet?
    pub fn is_empty(&self) -> bool {
        self.n_past == 0
    }

    /// Appends `k`, `v` (`[n_kv_heads, n_new, head_dim]`) for `layer` and returns the full
    /// keys and values including them, as contiguous `[n_kv_heads, n_keys, head_dim]` tensors.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let held = self.append_in_place(layer, &k, &v)?;
        let valid = |t: &Tensor| t.narrow(1, 0, held.n_keys)?.contiguous();
        Ok((valid(&held.k)?, valid(&held.v)?))
    }

    /// Appends `k`, `v` (`[n_kv_heads, n_new, head_dim]`, any layout) for `layer` into its
    /// buffers and returns those buffers (shared, not copied) with the number of positions
    /// they now hold.
    pub fn append_in_place(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<CachedKv> {
        let n_new = k.dim(1)?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let slot = &mut self.layers[layer];
        let len = slot.as_ref().map_or(0, |l| l.len);
        let needed = len + n_new;
        let capacity = slot.as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if needed > capacity {
            let grown = (needed + (needed / 4).max(MIN_GROWTH)).div_ceil(MIN_GROWTH) * MIN_GROWTH;
            let buffer = |new: &Tensor, old: Option<&Tensor>| -> Result<Tensor> {
                let (heads, _, dim) = new.dims3()?;
                let t = Tensor::zeros((heads, grown, dim), new.dtype(), new.device())?;
                if let Some(old) = old {
                    if len > 0 {
                        t.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    }
                }
                Ok(t)
            };
            let old = slot.take();
            *slot = Some(LayerKv {
                k: buffer(&k, old.as_ref().map(|l| &l.k))?,
                v: buffer(&v, old.as_ref().map(|l| &l.v))?,
                len,
            });
        }
        let held = slot.as_mut().expect("allocated above");
        held.k.slice_set(&k, 1, len)?;
        held.v.slice_set(&v, 1, len)?;
        held.len = needed;
        Ok(CachedKv {
            k: held.k.clone(),
            v: held.v.clone(),
            n_keys: needed,
        })
    }

    /// Records that `n_new` positions were added by a completed forward pass.
    pub fn advance(&mut self, n_new: usize) {
        self.n_past += n_new;
    }

    /// Bytes held by the cache's buffers (their whole capacity).
    pub fn n_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rows(n_heads: usize, n: usize, dim: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..n_heads * n * dim)
            .map(|i| i as f32 + seed * 1000.0)
            .collect();
        Tensor::from_vec(v, (n_heads, n, dim), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Appends across a growth keep every earlier position.
    #[test]
    fn appends_grow_in_place_and_keep_earlier_positions() {
        let mut cache = KvCache::new(2);
        let (first_k, first_v) = (rows(2, 60, 3, 1.0), rows(2, 60, 5, 2.0));
        let (k, v) = cache.append(1, first_k.clone(), first_v.clone()).unwrap();
        assert_eq!((k.dims(), v.dims()), (&[2, 60, 3][..], &[2, 60, 5][..]));
        // 60 + 70 positions: past the first capacity.
        let (k2, v2) = (rows(2, 70, 3, 3.0), rows(2, 70, 5, 4.0));
        let (k, v) = cache.append(1, k2.clone(), v2.clone()).unwrap();
        let want_k = Tensor::cat(&[&first_k, &k2], 1).unwrap();
        let want_v = Tensor::cat(&[&first_v, &v2], 1).unwrap();
        assert_eq!(values(&k), values(&want_k));
        assert_eq!(values(&v), values(&want_v));
        let held = cache
            .append_in_place(1, &rows(2, 1, 3, 5.0), &rows(2, 1, 5, 6.0))
            .unwrap();
        assert_eq!(held.n_keys, 131);
        assert!(held.k.dim(1).unwrap() >= 131);
        assert!(cache.n_bytes() >= 131 * 2 * (3 + 5) * DType::F32.size_in_bytes());
    }
}
