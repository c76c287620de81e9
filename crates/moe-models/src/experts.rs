//! Where routed experts' weights come from. Models ask an [`ExpertSource`] for an expert by
//! key and never learn whether it was resident, fetched from host RAM or read from disk: the
//! expert cache (a later crate) is just another implementation of this trait.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_core::{Error, ExpertKey, Result};
use moe_kernels::{ExpertGroups, ExpertWeights, WeightDtype};
use moe_loader::{TensorLocation, TensorLookup};

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
        Ok(ExpertWeights::new(
            lookup.get(&format!("{}.weight", self.gate), &[intermediate, hidden])?,
            lookup.get(&format!("{}.weight", self.up), &[intermediate, hidden])?,
            lookup.get(&format!("{}.weight", self.down), &[hidden, intermediate])?,
        ))
    }
}

/// How a block's routed experts are stored in the checkpoint. Applied once at load: every
/// layout yields the same per-expert [`ExpertWeights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One prefix per expert, `{block}.experts.{e}.{name}.weight` (Mixtral, Qwen, OLMoE).
    PerExpert(ExpertNames),
    /// All experts of a layer in a few stacked tensors under the block (GPT-OSS, Granite).
    Stacked(StackedExperts),
}

/// How the gate and up projections share the output dimension of a fused tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUpSplit {
    /// Gate first half, up second half (Granite `input_linear`).
    Halves,
    /// Gate at even, up at odd indices (GPT-OSS `gate_up_proj`).
    Interleaved,
}

/// Which way a stacked matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// `[n_experts, out, in]`, HF's `nn.Linear` convention (Granite).
    OutIn,
    /// `[n_experts, in, out]` (GPT-OSS, whose experts compute `x @ W`).
    InOut,
}

/// How stacked tensors are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackedEncoding {
    /// Plain float tensors named as given, in this orientation.
    Dense(Orientation),
    /// MXFP4: `{name}_blocks` + `{name}_scales`, `[n_experts, out, in]` once dequantized
    /// (see [`crate::mxfp4`]); dequantized at load.
    Mxfp4,
}

/// Names and rules of stacked expert tensors, relative to the MoE block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackedExperts {
    /// The fused gate/up matrix (`2 × intermediate` outputs).
    pub gate_up: &'static str,
    /// How gate and up are laid out in it.
    pub split: GateUpSplit,
    /// `[n_experts, 2 × intermediate]` bias, split like the matrix.
    pub gate_up_bias: Option<&'static str>,
    /// The down matrix.
    pub down: &'static str,
    /// `[n_experts, hidden]` bias.
    pub down_bias: Option<&'static str>,
    /// Storage of the two matrices.
    pub encoding: StackedEncoding,
}

impl StackedExperts {
    /// GPT-OSS in float: `experts.gate_up_proj [E, H, 2I]` (interleaved) +
    /// `gate_up_proj_bias [E, 2I]`, `experts.down_proj [E, I, H]` + `down_proj_bias [E, H]`.
    pub const GPT_OSS: StackedExperts = StackedExperts {
        gate_up: "experts.gate_up_proj",
        split: GateUpSplit::Interleaved,
        gate_up_bias: Some("experts.gate_up_proj_bias"),
        down: "experts.down_proj",
        down_bias: Some("experts.down_proj_bias"),
        encoding: StackedEncoding::Dense(Orientation::InOut),
    };
    /// GPT-OSS as released: the same tensors in MXFP4 (`*_blocks`/`*_scales`), biases in float.
    pub const GPT_OSS_MXFP4: StackedExperts = StackedExperts {
        encoding: StackedEncoding::Mxfp4,
        ..Self::GPT_OSS
    };
    /// Granite-MoE: `input_linear.weight [E, 2I, H]` (gate; up), `output_linear.weight
    /// [E, H, I]`, no biases.
    pub const GRANITE: StackedExperts = StackedExperts {
        gate_up: "input_linear.weight",
        split: GateUpSplit::Halves,
        gate_up_bias: None,
        down: "output_linear.weight",
        down_bias: None,
        encoding: StackedEncoding::Dense(Orientation::OutIn),
    };

    /// Reads the stacked tensors under `block` and cuts them into per-expert weights.
    pub fn load(
        &self,
        block: &TensorLookup,
        n_experts: usize,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Vec<ExpertWeights>> {
        let (e, h, i) = (n_experts, hidden, intermediate);
        // Both matrices as [E, out, in].
        let (gate_up, down) = match self.encoding {
            StackedEncoding::Dense(Orientation::OutIn) => (
                block.get(self.gate_up, &[e, 2 * i, h])?,
                block.get(self.down, &[e, h, i])?,
            ),
            StackedEncoding::Dense(Orientation::InOut) => (
                block.get(self.gate_up, &[e, h, 2 * i])?.transpose(1, 2)?,
                block.get(self.down, &[e, i, h])?.transpose(1, 2)?,
            ),
            StackedEncoding::Mxfp4 => (
                crate::mxfp4::load_packed(block, self.gate_up, e, 2 * i, h)?,
                crate::mxfp4::load_packed(block, self.down, e, h, i)?,
            ),
        };
        let gate_up_bias = self
            .gate_up_bias
            .map(|b| block.get(b, &[e, 2 * i]))
            .transpose()?;
        let down_bias = self.down_bias.map(|b| block.get(b, &[e, h])).transpose()?;
        self.cut(
            &gate_up,
            &down,
            gate_up_bias.as_ref(),
            down_bias.as_ref(),
            e,
            i,
        )
    }

    /// Cuts `[E, 2I, H]` gate/up and `[E, H, I]` down matrices (and `[E, 2I]`, `[E, H]`
    /// biases) into per-expert weights.
    fn cut(
        &self,
        gate_up: &Tensor,
        down: &Tensor,
        gate_up_bias: Option<&Tensor>,
        down_bias: Option<&Tensor>,
        e: usize,
        i: usize,
    ) -> Result<Vec<ExpertWeights>> {
        // Splits the leading `2I` dimension of `t` ([2I, ..]) into gate and up.
        let split = |t: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            let rest = &t.dims()[1..];
            Ok(match self.split {
                GateUpSplit::Halves => (t.narrow(0, 0, i)?, t.narrow(0, i, i)?),
                GateUpSplit::Interleaved => {
                    let mut shape = vec![i, 2];
                    shape.extend_from_slice(rest);
                    let pairs = t.reshape(shape)?;
                    (
                        pairs.narrow(1, 0, 1)?.squeeze(1)?,
                        pairs.narrow(1, 1, 1)?.squeeze(1)?,
                    )
                }
            })
        };
        (0..e)
            .map(|x| {
                let (gate, up) = split(&gate_up.get(x)?.contiguous()?)?;
                let (gate_bias, up_bias) = match gate_up_bias {
                    Some(b) => {
                        let (g, u) = split(&b.get(x)?)?;
                        (Some(g.contiguous()?), Some(u.contiguous()?))
                    }
                    None => (None, None),
                };
                Ok(ExpertWeights {
                    gate: gate.contiguous()?,
                    up: up.contiguous()?,
                    down: down.get(x)?.contiguous()?,
                    gate_bias,
                    up_bias,
                    down_bias: down_bias.map(|b| b.get(x)?.contiguous()).transpose()?,
                    q8_scales: None,
                })
            })
            .collect()
    }
}

impl ExpertLayout {
    /// Every expert of one layer, read under the MoE block `block`.
    pub fn load(
        &self,
        block: &TensorLookup,
        n_experts: usize,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Vec<ExpertWeights>> {
        match self {
            ExpertLayout::PerExpert(names) => (0..n_experts)
                .map(|e| names.load(&block.pp("experts").pp(e), hidden, intermediate))
                .collect(),
            ExpertLayout::Stacked(stacked) => stacked.load(block, n_experts, hidden, intermediate),
        }
    }
}

/// Where one routed expert lies on disk and how its bytes become [`ExpertWeights`]: what a
/// source that reads experts on demand (the tiered expert cache) needs, without knowing
/// checkpoint names or layouts. Decoding gives exactly what [`ExpertLayerLayout::load`] gives
/// (int8-quantized the same way with `--expert-dtype q8`).
#[derive(Debug, Clone)]
pub struct ExpertOnDisk {
    /// The byte ranges to read, in the order [`ExpertOnDisk::decode`] takes them.
    pub tensors: Vec<TensorLocation>,
    /// Bytes of the decoded weights ([`ExpertWeights::n_bytes`]), in their final storage.
    pub ram_bytes: usize,
    /// Bytes the decoded weights take in the compute dtype, before any int8 quantization
    /// (equal to `ram_bytes` without it): decoding holds them transiently.
    pub float_bytes: usize,
    /// How the decoded matrices are stored.
    pub expert_dtype: WeightDtype,
    layout: ExpertLayout,
    hidden: usize,
    intermediate: usize,
    dtype: DType,
    device: Device,
}

impl ExpertOnDisk {
    /// `(hidden, intermediate)`: the expert's gated FFN shape.
    pub fn shape(&self) -> (usize, usize) {
        (self.hidden, self.intermediate)
    }

    /// The compute dtype the expert decodes to (before any int8 quantization): its
    /// activations' dtype too.
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// Whether int8 quantization reads the decoded float matrices in place (bf16 and f32
    /// compute dtypes) rather than widening a copy to f32 first.
    pub fn quantizes_in_place(&self) -> bool {
        matches!(self.dtype, DType::BF16 | DType::F32)
    }

    /// Decodes the expert from the bytes of [`ExpertOnDisk::tensors`], read in that order,
    /// into its final storage ([`ExpertOnDisk::expert_dtype`]).
    pub fn decode<B: AsRef<[u8]>>(&self, bytes: &[B]) -> Result<ExpertWeights> {
        self.expert_dtype.apply(self.decode_float(bytes)?)
    }

    /// The decoded expert in the compute dtype.
    fn decode_float<B: AsRef<[u8]>>(&self, bytes: &[B]) -> Result<ExpertWeights> {
        if bytes.len() != self.tensors.len() {
            return Err(Error::InvalidRequest(format!(
                "expert decode: {} buffers for {} tensors",
                bytes.len(),
                self.tensors.len()
            )));
        }
        let (dtype, device, h, i) = (self.dtype, &self.device, self.hidden, self.intermediate);
        let mut parts = self.tensors.iter().zip(bytes);
        let mut float = || -> Result<Tensor> {
            let (location, bytes) = parts.next().expect("counted above");
            location.to_tensor(bytes.as_ref(), dtype, device)
        };
        match self.layout {
            ExpertLayout::PerExpert(_) => Ok(ExpertWeights::new(float()?, float()?, float()?)),
            ExpertLayout::Stacked(stacked) => {
                let packed = |at: usize, out: usize, inp: usize| -> Result<Tensor> {
                    crate::mxfp4::from_bytes(
                        bytes[at].as_ref(),
                        bytes[at + 1].as_ref(),
                        (1, out, inp),
                        dtype,
                        device,
                    )
                };
                // As in `StackedExperts::load`, with a leading expert dimension of 1.
                let (gate_up, down, next) = match stacked.encoding {
                    StackedEncoding::Dense(Orientation::OutIn) => {
                        (float()?.unsqueeze(0)?, float()?.unsqueeze(0)?, 2)
                    }
                    StackedEncoding::Dense(Orientation::InOut) => (
                        float()?.unsqueeze(0)?.transpose(1, 2)?,
                        float()?.unsqueeze(0)?.transpose(1, 2)?,
                        2,
                    ),
                    StackedEncoding::Mxfp4 => (packed(0, 2 * i, h)?, packed(2, h, i)?, 4),
                };
                let mut rest = self.tensors[next..].iter().zip(&bytes[next..]);
                let mut bias = |present: bool| -> Result<Option<Tensor>> {
                    if !present {
                        return Ok(None);
                    }
                    let (location, bytes) = rest.next().expect("counted above");
                    Ok(Some(
                        location
                            .to_tensor(bytes.as_ref(), dtype, device)?
                            .unsqueeze(0)?,
                    ))
                };
                let gate_up_bias = bias(stacked.gate_up_bias.is_some())?;
                let down_bias = bias(stacked.down_bias.is_some())?;
                let mut experts = stacked.cut(
                    &gate_up,
                    &down,
                    gate_up_bias.as_ref(),
                    down_bias.as_ref(),
                    1,
                    i,
                )?;
                Ok(experts.remove(0))
            }
        }
    }
}

impl ExpertLayerLayout {
    /// Every expert of this layer, read and converted to [`ExpertLayerLayout::expert_dtype`]
    /// (what [`ExpertOnDisk::decode`] gives for each of them). With int8 experts one layer's
    /// float copies are held while it is quantized, then dropped.
    pub fn load(&self) -> Result<Vec<ExpertWeights>> {
        self.layout
            .load(&self.block, self.n_experts, self.hidden, self.intermediate)?
            .into_iter()
            .map(|w| self.expert_dtype.apply(w))
            .collect()
    }

    /// Where each expert of this layer lies on disk (shape-checked; nothing is read).
    pub fn experts_on_disk(&self) -> Result<Vec<ExpertOnDisk>> {
        let (e, h, i) = (self.n_experts, self.hidden, self.intermediate);
        let block = &self.block;
        let (dtype, elem) = (block.dtype(), block.dtype().size_in_bytes());
        // The three matrices in their final storage, the biases (never quantized) as loaded.
        let matrices =
            |x: WeightDtype| 2 * x.matrix_bytes(i, h, dtype) + x.matrix_bytes(h, i, dtype);
        let on_disk = |tensors: Vec<TensorLocation>, bias_elems: usize| ExpertOnDisk {
            tensors,
            ram_bytes: matrices(self.expert_dtype) + bias_elems * elem,
            float_bytes: matrices(WeightDtype::Compute) + bias_elems * elem,
            expert_dtype: self.expert_dtype,
            layout: self.layout,
            hidden: h,
            intermediate: i,
            dtype: block.dtype(),
            device: block.device().clone(),
        };
        match self.layout {
            ExpertLayout::PerExpert(names) => (0..e)
                .map(|x| {
                    let lookup = block.pp("experts").pp(x);
                    Ok(on_disk(
                        vec![
                            lookup.location(&format!("{}.weight", names.gate), &[i, h])?,
                            lookup.location(&format!("{}.weight", names.up), &[i, h])?,
                            lookup.location(&format!("{}.weight", names.down), &[h, i])?,
                        ],
                        0,
                    ))
                })
                .collect(),
            ExpertLayout::Stacked(stacked) => {
                let u8_location = |name: String, shape: &[usize]| -> Result<TensorLocation> {
                    let location = block.byte_location(&name, shape)?;
                    if location.dtype != "U8" {
                        return Err(Error::TensorDtype {
                            name: location.name,
                            path: location.path,
                            dtype: location.dtype,
                        });
                    }
                    Ok(location)
                };
                let mut whole = match stacked.encoding {
                    StackedEncoding::Dense(Orientation::OutIn) => vec![
                        block.location(stacked.gate_up, &[e, 2 * i, h])?,
                        block.location(stacked.down, &[e, h, i])?,
                    ],
                    StackedEncoding::Dense(Orientation::InOut) => vec![
                        block.location(stacked.gate_up, &[e, h, 2 * i])?,
                        block.location(stacked.down, &[e, i, h])?,
                    ],
                    StackedEncoding::Mxfp4 => {
                        let packed =
                            |name: &str, out: usize, inp: usize| -> Result<[TensorLocation; 2]> {
                                if !inp.is_multiple_of(crate::mxfp4::BLOCK) {
                                    return Err(Error::InvalidRequest(format!(
                                        "MXFP4 tensor {}: input size {inp} is not a multiple of {}",
                                        block.full_name(name),
                                        crate::mxfp4::BLOCK
                                    )));
                                }
                                let groups = inp / crate::mxfp4::BLOCK;
                                Ok([
                                    u8_location(
                                        format!("{name}_blocks"),
                                        &[e, out, groups, crate::mxfp4::BLOCK / 2],
                                    )?,
                                    u8_location(format!("{name}_scales"), &[e, out, groups])?,
                                ])
                            };
                        let mut v = Vec::from(packed(stacked.gate_up, 2 * i, h)?);
                        v.extend(packed(stacked.down, h, i)?);
                        v
                    }
                };
                let mut bias_elems = 0;
                if let Some(b) = stacked.gate_up_bias {
                    whole.push(block.location(b, &[e, 2 * i])?);
                    bias_elems += 2 * i;
                }
                if let Some(b) = stacked.down_bias {
                    whole.push(block.location(b, &[e, h])?);
                    bias_elems += h;
                }
                (0..e)
                    .map(|x| {
                        let tensors = whole
                            .iter()
                            .map(|t| t.slice_first(x, e))
                            .collect::<Result<Vec<_>>>()?;
                        Ok(on_disk(tensors, bias_elems))
                    })
                    .collect()
            }
        }
    }
}

/// An expert a layer's router is expected to pick (routing-aware prefetch), and how strongly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertGuess {
    /// Expert id within the layer.
    pub expert: usize,
    /// The share of each row's routing weight the guess gave this expert, summed over the
    /// rows that picked it: at most 1 per row, so between 0 and the number of rows.
    pub strength: f32,
}

/// Supplies routed experts' weights on the model's device.
pub trait ExpertSource: Send + Sync {
    /// The weights of one expert, ready to compute with.
    fn expert(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>>;

    /// A hint that these experts of `layer` (distinct, ascending ids) will probably be needed
    /// soon. Sources that can prefetch may start loading them; the default does nothing.
    fn prefetch(&self, _layer: usize, _guesses: &[ExpertGuess]) {}

    /// Whether the model should guess each MoE layer's experts early (the next layer's router
    /// applied to the hidden state after this layer's attention) and pass the guess to
    /// [`ExpertSource::prefetch`]. The default is no: guessing costs a router matmul per layer.
    fn wants_prefetch(&self) -> bool {
        false
    }

    /// `layer` routed `n_tokens` rows to `experts` (distinct ids, ascending) and is about to
    /// look them up: for statistics (tokens, guess accuracy); the default does nothing.
    fn routed(&self, _layer: usize, _n_tokens: usize, _experts: &[usize]) {}

    /// Several experts of `layer` (distinct ids) that the caller will compute with together:
    /// a wave of the MoE block, at most [`ExpertSource::max_held_experts`] of them. Weights come
    /// back in the order asked. A source with a budget hands out all of them or, while it
    /// cannot, holds none of them for the caller (so callers waiting on each other cannot
    /// deadlock). The default looks them up one by one.
    fn experts(&self, layer: usize, experts: &[usize]) -> Result<Vec<Arc<ExpertWeights>>> {
        experts
            .iter()
            .map(|&expert| self.expert(ExpertKey { layer, expert }))
            .collect()
    }

    /// Fiddler's choice for the experts of `layer` this source does not hold in its fast tier:
    /// those of `experts` (active in `groups`, which says how many token rows each has) whose
    /// rows are cheaper to compute where the weights live than to bring the weights up, each
    /// with those weights (on the lower tier's device, held for the caller). The caller
    /// computes them there and leaves them out of [`ExpertSource::experts`]. The default, and
    /// any source whose lower tier cannot compute (disk): none.
    fn compute_in_place(
        &self,
        _layer: usize,
        _groups: &ExpertGroups,
        _experts: &[usize],
    ) -> Result<Vec<(usize, Arc<ExpertWeights>)>> {
        Ok(Vec::new())
    }

    /// How many experts one caller may hold at once through [`ExpertSource::experts`]
    /// (`None`: no limit). The MoE block computes a layer's experts in waves of at most this
    /// many.
    fn max_held_experts(&self) -> Option<usize> {
        None
    }

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
    /// View whose prefix is the layer's MoE block (`…mlp`, `…block_sparse_moe`).
    pub block: TensorLookup,
    /// Number of experts.
    pub n_experts: usize,
    /// Model width.
    pub hidden: usize,
    /// Expert intermediate size.
    pub intermediate: usize,
    /// How the experts are stored.
    pub layout: ExpertLayout,
    /// Experts each token is routed to (the layer's per-token working set).
    pub top_k: usize,
    /// How the experts are held once loaded (`--expert-dtype`).
    pub expert_dtype: WeightDtype,
}

/// Builds the [`ExpertSource`] of a model at load, from where each MoE layer's experts are.
/// [`crate::LoadOptions::expert_source`] carries one when experts should not all be resident
/// (the tiered expert cache); without one, [`ResidentExperts`] is used.
pub trait ExpertSourceFactory: Send + Sync + std::fmt::Debug {
    /// The source for a model of `n_layers` decoder layers whose MoE layers are `layouts`.
    fn build(
        &self,
        n_layers: usize,
        layouts: &[ExpertLayerLayout],
    ) -> Result<Arc<dyn ExpertSource>>;
}

impl ResidentExperts {
    /// Loads every expert of the given layers (`n_layers` decoder layers in all).
    pub fn load(n_layers: usize, layouts: &[ExpertLayerLayout]) -> Result<Self> {
        let mut layers = vec![Vec::new(); n_layers];
        for layout in layouts {
            layers[layout.layer] = layout.load()?.into_iter().map(Arc::new).collect();
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

#[cfg(test)]
mod stacked_tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor};
    use moe_loader::{Checkpoint, TensorLookup};

    use super::*;

    fn lookup_of(tensors: HashMap<String, Tensor>, tag: &str) -> TensorLookup {
        let dir = std::env::temp_dir().join(format!("moe-models-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let checkpoint = Checkpoint::open_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        TensorLookup::new(Arc::new(checkpoint), DType::F32, Device::Cpu)
    }

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect()
    }

    fn same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }

    /// An MXFP4 GPT-OSS layer loads to exactly the experts of the same values stored as
    /// transformers' dequantized float tensors (`[E, in, out]`, gate/up interleaved): packed
    /// tensors are `[E, out, in]`, and row 2r of gate_up is gate row r, row 2r + 1 up row r.
    #[test]
    fn mxfp4_gpt_oss_matches_float_layout() {
        let (e, h, i) = (2usize, 32usize, 32usize);
        let dev = Device::Cpu;
        let gu_blocks = bytes(e * 2 * i * 16, 1);
        // Scales near 127 keep every value finite and exact in f32.
        let gu_scales: Vec<u8> = bytes(e * 2 * i, 2).iter().map(|b| 120 + b % 16).collect();
        let dn_blocks = bytes(e * h * 16, 3);
        let dn_scales: Vec<u8> = bytes(e * h, 4).iter().map(|b| 120 + b % 16).collect();
        let gu_bias = Tensor::randn(0f32, 1.0, (e, 2 * i), &dev).unwrap();
        let dn_bias = Tensor::randn(0f32, 1.0, (e, h), &dev).unwrap();
        let u8s = |v: &[u8], shape: &[usize]| Tensor::from_slice(v, shape, &dev).unwrap();
        let p = "mlp.experts";
        let packed = HashMap::from([
            (
                format!("{p}.gate_up_proj_blocks"),
                u8s(&gu_blocks, &[e, 2 * i, 1, 16]),
            ),
            (
                format!("{p}.gate_up_proj_scales"),
                u8s(&gu_scales, &[e, 2 * i, 1]),
            ),
            (
                format!("{p}.down_proj_blocks"),
                u8s(&dn_blocks, &[e, h, 1, 16]),
            ),
            (format!("{p}.down_proj_scales"), u8s(&dn_scales, &[e, h, 1])),
            (format!("{p}.gate_up_proj_bias"), gu_bias.clone()),
            (format!("{p}.down_proj_bias"), dn_bias.clone()),
        ]);
        // The float reference: dequantize by definition, then transpose to [E, in, out].
        let gu = Tensor::from_vec(
            crate::mxfp4::dequantize(&gu_blocks, &gu_scales),
            (e, 2 * i, h),
            &dev,
        )
        .unwrap();
        let dn = Tensor::from_vec(
            crate::mxfp4::dequantize(&dn_blocks, &dn_scales),
            (e, h, i),
            &dev,
        )
        .unwrap();
        let dense = HashMap::from([
            (
                format!("{p}.gate_up_proj"),
                gu.transpose(1, 2).unwrap().contiguous().unwrap(),
            ),
            (
                format!("{p}.down_proj"),
                dn.transpose(1, 2).unwrap().contiguous().unwrap(),
            ),
            (format!("{p}.gate_up_proj_bias"), gu_bias.clone()),
            (format!("{p}.down_proj_bias"), dn_bias.clone()),
        ]);
        let from_packed = StackedExperts::GPT_OSS_MXFP4
            .load(&lookup_of(packed, "mxfp4").pp("mlp"), e, h, i)
            .unwrap();
        let from_dense = StackedExperts::GPT_OSS
            .load(&lookup_of(dense, "dense").pp("mlp"), e, h, i)
            .unwrap();
        for x in 0..e {
            let (a, b) = (&from_packed[x], &from_dense[x]);
            same(&a.gate, &b.gate);
            same(&a.up, &b.up);
            same(&a.down, &b.down);
            same(a.gate_bias.as_ref().unwrap(), b.gate_bias.as_ref().unwrap());
            same(a.up_bias.as_ref().unwrap(), b.up_bias.as_ref().unwrap());
            same(a.down_bias.as_ref().unwrap(), b.down_bias.as_ref().unwrap());
            // Interleaving: gate row r is packed row 2r, up row r is packed row 2r + 1.
            let rows = gu.get(x).unwrap();
            for r in [0, 5, i - 1] {
                same(&a.gate.get(r).unwrap(), &rows.get(2 * r).unwrap());
                same(&a.up.get(r).unwrap(), &rows.get(2 * r + 1).unwrap());
            }
            same(&a.down, &dn.get(x).unwrap());
            let bias: Vec<f32> = gu_bias.get(x).unwrap().to_vec1().unwrap();
            let gate_bias: Vec<f32> = a.gate_bias.as_ref().unwrap().to_vec1().unwrap();
            assert_eq!(gate_bias[3], bias[6]);
        }
    }

    /// Granite's halves: gate is the first `I` rows, up the last.
    #[test]
    fn granite_halves() {
        let (e, h, i) = (3usize, 8usize, 4usize);
        let dev = Device::Cpu;
        let gu = Tensor::randn(0f32, 1.0, (e, 2 * i, h), &dev).unwrap();
        let dn = Tensor::randn(0f32, 1.0, (e, h, i), &dev).unwrap();
        let tensors = HashMap::from([
            ("b.input_linear.weight".to_string(), gu.clone()),
            ("b.output_linear.weight".to_string(), dn.clone()),
        ]);
        let experts = ExpertLayout::Stacked(StackedExperts::GRANITE)
            .load(&lookup_of(tensors, "granite").pp("b"), e, h, i)
            .unwrap();
        for (x, w) in experts.iter().enumerate() {
            same(&w.gate, &gu.get(x).unwrap().narrow(0, 0, i).unwrap());
            same(&w.up, &gu.get(x).unwrap().narrow(0, i, i).unwrap());
            same(&w.down, &dn.get(x).unwrap());
            assert!(w.gate_bias.is_none() && w.down_bias.is_none());
        }
    }
}
