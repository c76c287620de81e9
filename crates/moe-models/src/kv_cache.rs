//! The key/value cache of one sequence: per layer, keys and values of every past position.

use candle_core::Tensor;
use moe_core::Result;

/// Keys and values of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// `layers[i]` = (`[n_kv_heads, n_past, head_dim]` keys, same-shaped values).
    layers: Vec<Option<(Tensor, Tensor)>>,
    n_past: usize,
}

impl KvCache {
    /// An empty cache for a model with `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
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
    /// keys and values including them.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k_all, v_all) = match self.layers[layer].take() {
            None => (k, v),
            Some((k_old, v_old)) => (
                Tensor::cat(&[&k_old, &k], 1)?,
                Tensor::cat(&[&v_old, &v], 1)?,
            ),
        };
        self.layers[layer] = Some((k_all.clone(), v_all.clone()));
        Ok((k_all, v_all))
    }

    /// Records that `n_new` positions were added by a completed forward pass.
    pub fn advance(&mut self, n_new: usize) {
        self.n_past += n_new;
    }

    /// Bytes held by the cached tensors.
    pub fn n_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}
