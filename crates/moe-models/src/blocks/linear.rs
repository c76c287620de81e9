//! A dense projection `x · Wᵀ (+ b)` with HF's `[out, in]` weight layout, its matrix in the
//! compute dtype or, with `--dense-dtype q8`, in int8 with per-row scales ([`Q8Dense`]). A
//! wide bf16 matrix (the lm head) on a CPU whose bf16 dot kernel runs is stored as that
//! kernel's panels ([`PanelDense`]).

use candle_core::Tensor;
use moe_core::{Error, Result};
use moe_kernels::{matmul_nt, PanelDense, Q8Dense, SumOrder, WeightDtype};
use moe_loader::TensorLookup;

/// How a [`Linear`] holds its matrix.
#[derive(Debug, Clone)]
enum LinearWeight {
    /// `[out, in]` in the compute dtype.
    Float(Tensor),
    /// `[out, in]` int8 with per-row scales.
    Int8(Q8Dense),
    /// `[out, in]` bf16 as the CPU microkernel's panels.
    Panels(PanelDense),
}

/// A linear layer.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// `[out]`
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{name}.weight` (`[out, in]`) and, when `bias`, `{name}.bias`.
    pub fn load(
        lookup: &TensorLookup,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = lookup.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(lookup.get(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Self {
            weight: LinearWeight::Float(weight),
            bias,
        })
    }

    /// Wraps an existing matrix (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self {
            weight: LinearWeight::Float(weight),
            bias: None,
        }
    }

    /// The layer with its matrix held as `dtype` says: quantized to int8 for
    /// [`WeightDtype::Q8`]; in the compute dtype otherwise, as panels where [`PanelDense::pack`]
    /// makes them (a float matrix shared with another tensor, such as tied embeddings, is
    /// copied into the new form; the original stays).
    pub fn stored_as(self, dtype: WeightDtype) -> Result<Self> {
        let LinearWeight::Float(w) = &self.weight else {
            return Ok(self);
        };
        let weight = match dtype {
            WeightDtype::Q8 => LinearWeight::Int8(Q8Dense::quantize(w)?),
            WeightDtype::Compute => match PanelDense::pack(w)? {
                Some(panels) => LinearWeight::Panels(panels),
                None => return Ok(self),
            },
        };
        Ok(Self {
            weight,
            bias: self.bias,
        })
    }

    /// Applies the projection to `x` (`[n, in]` → `[n, out]`). In bf16 on the CPU the bias is
    /// added before the single rounding, as torch's `addmm` does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Float(w) => matmul_nt(x, w, self.bias.as_ref(), SumOrder::Blocked),
            LinearWeight::Int8(q) => q.forward(x, self.bias.as_ref()),
            LinearWeight::Panels(p) => p.forward(x, self.bias.as_ref()),
        }
    }

    /// The float weight matrix; an error for an int8 or panel layer (only layers that are
    /// never stored otherwise, such as routers, ask for it).
    pub fn weight(&self) -> Result<&Tensor> {
        match &self.weight {
            LinearWeight::Float(w) => Ok(w),
            LinearWeight::Int8(_) | LinearWeight::Panels(_) => Err(Error::InvalidRequest(
                "a projection stored as int8 or panels has no float weight matrix".into(),
            )),
        }
    }

    /// Bytes of the matrix and bias as held.
    pub fn n_bytes(&self) -> usize {
        let matrix = match &self.weight {
            LinearWeight::Float(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Int8(q) => q.n_bytes(),
            LinearWeight::Panels(p) => p.n_bytes(),
        };
        matrix
            + self
                .bias
                .as_ref()
                .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }
}
