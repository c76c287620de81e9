//! Where routed experts' weights come from. Models ask an [`ExpertSource`] for an expert by
//! key and never learn whether it was resident, fetched from host RAM or read from disk: the
//! expert cache (a later crate) is just another implementation of this trait.

use std::sync::Arc;

use moe_core::{Error, ExpertKey, Result};
use moe_kernels::ExpertWeights;
use moe_loader::TensorLookup;

/// Checkpoint names of one expert's three projections, relative to the expert's prefix
/// (`w1`/`w3`/`w2` for Mixtral, `gate_proj`/`up_proj`/`down_proj` elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertNames {
    /// Gate projection (`[intermediate, hidden]`).
    pub gate: &'static str,
    /// Up projection (`[intermediate, hidden]`).
    pub up: &'static str,
    /// Down projection (`[hidden, intermediate]`).
    pub down: &'static str,
}

impl ExpertNames {
    /// The Llama/Qwen spelling.
    pub const GATE_UP_DOWN_PROJ: ExpertNames = ExpertNames {
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    };
    /// The Mixtral spelling.
    pub const MIXTRAL_W1_W3_W2: ExpertNames = ExpertNames {
        gate: "w1",
        up: "w3",
        down: "w2",
    };

    /// Loads the three matrices under `lookup`.
    pub fn load(
        &self,
        lookup: &TensorLookup,
        hidden: usize,
        intermediate: usize,
    ) -> Result<ExpertWeights> {
        Ok(ExpertWeights {
            gate: lookup.get(&format!("{}.weight", self.gate), &[intermediate, hidden])?,
            up: lookup.get(&format!("{}.weight", self.up), &[intermediate, hidden])?,
            down: lookup.get(&format!("{}.weight", self.down), &[hidden, intermediate])?,
        })
    }
}

/// Supplies routed experts' weights on the model's device.
pub trait ExpertSource: Send + Sync {
    /// The weights of one expert, ready to compute with.
    fn expert(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>>;

    /// A hint that these experts of `layer` will be needed soon. Sources that can prefetch
    /// start loading them; the default does nothing.
    fn prefetch(&self, _layer: usize, _experts: &[usize]) {}

    /// Bytes of expert weights this source keeps resident.
    fn resident_bytes(&self) -> usize;
}

/// Every expert loaded once into memory at start: the source used when no budget is set.
pub struct ResidentExperts {
    /// `layers[layer][expert]`; empty for dense layers.
    layers: Vec<Vec<Arc<ExpertWeights>>>,
}

/// Where one MoE layer's experts are in the checkpoint.
#[derive(Clone)]
pub struct ExpertLayerLayout {
    /// Decoder layer index.
    pub layer: usize,
    /// View whose prefix is the layer's experts container (`…mlp.experts`).
    pub experts: TensorLookup,
    /// Number of experts.
    pub n_experts: usize,
    /// Model width.
    pub hidden: usize,
    /// Expert intermediate size.
    pub intermediate: usize,
    /// Names of the projections.
    pub names: ExpertNames,
}

impl ResidentExperts {
    /// Loads every expert of the given layers (`n_layers` decoder layers in all).
    pub fn load(n_layers: usize, layouts: &[ExpertLayerLayout]) -> Result<Self> {
        let mut layers = vec![Vec::new(); n_layers];
        for layout in layouts {
            layers[layout.layer] = (0..layout.n_experts)
                .map(|e| {
                    layout
                        .names
                        .load(&layout.experts.pp(e), layout.hidden, layout.intermediate)
                        .map(Arc::new)
                })
                .collect::<Result<Vec<_>>>()?;
        }
        Ok(Self { layers })
    }
}

impl ExpertSource for ResidentExperts {
    fn expert(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>> {
        self.layers
            .get(key.layer)
            .and_then(|experts| experts.get(key.expert))
            .cloned()
            .ok_or_else(|| {
                Error::InvalidRequest(format!("layer {} has no expert {}", key.layer, key.expert))
            })
    }

    fn resident_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|w| w.n_bytes()).sum()
    }
}
