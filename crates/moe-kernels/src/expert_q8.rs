//! Int8 weights: the [`WeightDtype`] choice (`--expert-dtype`, `--dense-dtype`), quantizing an
//! [`ExpertWeights`] per output row at load, and dequantizing it where a candle path needs
//! float tensors (the dense projections' int8 form is [`crate::dense_q8`]). The int8 matrix
//! itself and the kernel-side scaling are [`crate::cpu::q8`].
//!
//! Storage: candle has no `i8` dtype, so the values live in `U8` tensors (same shape,
//! `[out, in]`) holding the `i8` bit patterns, and the per-row scales in `[out]` f32 tensors
//! ([`Q8Scales`]). Only the CPU's grouped expert kernel reads them as int8; everything else
//! goes through [`ExpertWeights::dequantized`].

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use moe_core::{Error, Result};

use crate::cpu::q8::Q8Matrix;
use crate::cpu::tensors::slice_of;
use crate::expert_ffn::ExpertWeights;

/// How a group of weight matrices is held in memory: the routed experts
/// (`--expert-dtype`) or the dense projections (`--dense-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// In the compute dtype.
    #[default]
    Compute,
    /// Int8 with one f32 scale per output row (`scale = max|w| / 127`), quantized at load;
    /// computed by the CPU's fast kernels (the grouped expert kernel, [`crate::Q8Dense`]).
    /// Biases stay unquantized.
    Q8,
}

impl std::str::FromStr for WeightDtype {
    type Err = Error;

    /// `auto` (the compute dtype) or `q8`, as `--expert-dtype` and `--dense-dtype` spell them.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" | "compute" => Ok(Self::Compute),
            "q8" | "int8" => Ok(Self::Q8),
            other => Err(Error::InvalidRequest(format!(
                "unknown weight dtype '{other}': expected auto or q8"
            ))),
        }
    }
}

impl WeightDtype {
    /// The name `inspect` and `bench` print: `q8`, or the compute dtype's.
    pub fn describe(self, compute: DType) -> String {
        match self {
            Self::Compute => format!("{compute:?}").to_lowercase(),
            Self::Q8 => "q8".into(),
        }
    }

    /// Converts freshly loaded experts to this storage (the one place experts are quantized:
    /// the resident source and the expert cache's decode both call it).
    pub fn apply(self, weights: ExpertWeights) -> Result<ExpertWeights> {
        match self {
            Self::Compute => Ok(weights),
            Self::Q8 => weights.quantize_q8(),
        }
    }

    /// Bytes one `[rows, cols]` expert matrix takes in this storage when the compute dtype is
    /// `compute`: `rows × cols` elements, plus `rows` f32 scales for int8.
    pub fn matrix_bytes(self, rows: usize, cols: usize, compute: DType) -> usize {
        match self {
            Self::Compute => rows * cols * compute.size_in_bytes(),
            Self::Q8 => rows * cols + rows * DType::F32.size_in_bytes(),
        }
    }
}

/// Per-output-row f32 scales of an int8 expert's three matrices.
#[derive(Debug, Clone)]
pub struct Q8Scales {
    /// `[intermediate]`
    pub gate: Tensor,
    /// `[intermediate]`
    pub up: Tensor,
    /// `[hidden]`
    pub down: Tensor,
}

impl ExpertWeights {
    /// Whether the matrices are int8 ([`ExpertWeights::q8_scales`] is set).
    pub fn is_q8(&self) -> bool {
        self.q8_scales.is_some()
    }

    /// The expert with its three matrices quantized to int8 per output row (biases kept as
    /// they are). CPU tensors only; an int8 expert is returned unchanged.
    pub fn quantize_q8(&self) -> Result<Self> {
        if self.is_q8() {
            return Ok(self.clone());
        }
        let (gate, gate_scales) = quantize_matrix(&self.gate)?;
        let (up, up_scales) = quantize_matrix(&self.up)?;
        let (down, down_scales) = quantize_matrix(&self.down)?;
        Ok(Self {
            gate,
            up,
            down,
            gate_bias: self.gate_bias.clone(),
            up_bias: self.up_bias.clone(),
            down_bias: self.down_bias.clone(),
            q8_scales: Some(Q8Scales {
                gate: gate_scales,
                up: up_scales,
                down: down_scales,
            }),
        })
    }

    /// Float matrices in `dtype` (`scale × value`, as the kernel computes): borrowed when the
    /// expert is not int8, a dequantized copy when it is (the candle paths: torch-exact
    /// numerics, other devices, references in tests).
    pub fn dequantized(&self, dtype: DType) -> Result<Cow<'_, Self>> {
        let Some(scales) = &self.q8_scales else {
            return Ok(Cow::Borrowed(self));
        };
        Ok(Cow::Owned(Self {
            gate: dequantize_matrix(&self.gate, &scales.gate, dtype)?,
            up: dequantize_matrix(&self.up, &scales.up, dtype)?,
            down: dequantize_matrix(&self.down, &scales.down, dtype)?,
            gate_bias: self.gate_bias.clone(),
            up_bias: self.up_bias.clone(),
            down_bias: self.down_bias.clone(),
            q8_scales: None,
        }))
    }
}

/// `scale × value` of an int8 `[rows, cols]` matrix (`U8` bit patterns, `[rows]` f32 scales)
/// as a float matrix in `dtype`, on the values' device.
pub(crate) fn dequantize_matrix(q: &Tensor, s: &Tensor, dtype: DType) -> Result<Tensor> {
    let (rows, cols) = q.dims2()?;
    let bits: Vec<u8> = q.flatten_all()?.to_vec1()?;
    let scales: Vec<f32> = s.to_vec1()?;
    let values: Vec<f32> = bits
        .chunks_exact(cols)
        .zip(&scales)
        .flat_map(|(row, &scale)| row.iter().map(move |&b| b as i8 as f32 * scale))
        .collect();
    Ok(Tensor::from_vec(values, (rows, cols), q.device())?.to_dtype(dtype)?)
}

/// Quantizes a `[rows, cols]` CPU matrix: the int8 values as a `U8` tensor of their bit
/// patterns, and the `[rows]` f32 scales. bf16 and f32 are read in place; other dtypes are
/// widened to f32 first.
pub(crate) fn quantize_matrix(t: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = t.dims2()?;
    if !t.device().is_cpu() {
        return Err(Error::InvalidRequest(
            "int8 weights (--expert-dtype q8, --dense-dtype q8) are quantized and computed on the CPU only".into(),
        ));
    }
    let t = t.contiguous()?;
    let in_place = {
        let (storage, layout) = t.storage_and_layout();
        match t.dtype() {
            DType::BF16 => slice_of::<bf16>(&storage, layout).map(|w| Q8Matrix::quantize(w, cols)),
            DType::F32 => slice_of::<f32>(&storage, layout).map(|w| Q8Matrix::quantize(w, cols)),
            _ => None,
        }
    };
    let q = match in_place {
        Some(q) => q,
        None => {
            let w: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Q8Matrix::quantize(&w, cols)
        }
    };
    let Q8Matrix { values, scales, .. } = q;
    Ok((
        Tensor::from_vec(i8_bits(values), (rows, cols), &Device::Cpu)?,
        Tensor::from_vec(scales, rows, &Device::Cpu)?,
    ))
}

/// The bytes of int8 values, without a copy.
fn i8_bits(values: Vec<i8>) -> Vec<u8> {
    let mut values = std::mem::ManuallyDrop::new(values);
    let (ptr, len, capacity) = (values.as_mut_ptr(), values.len(), values.capacity());
    // SAFETY: i8 and u8 have the same size and alignment and share every bit pattern; the
    // allocation is handed over whole (the original vector is never dropped).
    unsafe { Vec::from_raw_parts(ptr as *mut u8, len, capacity) }
}

/// Int8 values viewed from the bytes of a `U8` tensor that holds their bit patterns.
pub(crate) fn as_i8(bits: &[u8]) -> &[i8] {
    // SAFETY: same size, alignment and validity as above; the borrow is carried over.
    unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const i8, bits.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantize then dequantize: each element within half a step of its row's scale, the
    /// largest magnitude of each row exact up to f32 rounding, byte count as documented.
    #[test]
    fn round_trip_is_within_half_a_step() {
        let dev = Device::Cpu;
        let (i, h) = (6, 40);
        let w = ExpertWeights {
            down_bias: Some(Tensor::ones(h, DType::F32, &dev).unwrap()),
            ..ExpertWeights::new(
                Tensor::randn(0f32, 0.7, (i, h), &dev).unwrap(),
                Tensor::zeros((i, h), DType::F32, &dev).unwrap(),
                Tensor::randn(0f32, 2.0, (h, i), &dev).unwrap(),
            )
        };
        let q = w.quantize_q8().unwrap();
        assert!(q.is_q8() && q.gate.dtype() == DType::U8);
        let q8 = WeightDtype::Q8;
        let want =
            2 * q8.matrix_bytes(i, h, DType::F32) + q8.matrix_bytes(h, i, DType::F32) + 4 * h;
        assert_eq!(q.n_bytes(), want);
        let back = q.dequantized(DType::F32).unwrap();
        assert!(!back.is_q8());
        for (orig, deq, scales) in [
            (&w.gate, &back.gate, &q.q8_scales.as_ref().unwrap().gate),
            (&w.up, &back.up, &q.q8_scales.as_ref().unwrap().up),
            (&w.down, &back.down, &q.q8_scales.as_ref().unwrap().down),
        ] {
            let o: Vec<Vec<f32>> = orig.to_vec2().unwrap();
            let d: Vec<Vec<f32>> = deq.to_vec2().unwrap();
            let s: Vec<f32> = scales.to_vec1().unwrap();
            for ((o, d), s) in o.iter().zip(&d).zip(&s) {
                let max = o.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in o.iter().zip(d) {
                    assert!((a - b).abs() <= 0.5 * s * (1.0 + 1e-6), "{a} vs {b}");
                }
                if max > 0.0 {
                    assert!((s * 127.0 - max).abs() <= max * 1e-6);
                }
            }
        }
        // An all-zero row dequantizes to zeros.
        assert!(back
            .up
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .flatten()
            .all(|&v| v == 0.0));
        assert!(
            q.quantize_q8().unwrap().is_q8(),
            "quantizing twice is a no-op"
        );
    }

    #[test]
    fn parses_the_flag() {
        assert_eq!("auto".parse::<WeightDtype>().unwrap(), WeightDtype::Compute);
        assert_eq!("q8".parse::<WeightDtype>().unwrap(), WeightDtype::Q8);
        let err = "q4".parse::<WeightDtype>().unwrap_err().to_string();
        assert!(err.contains("expected auto or q8"), "{err}");
        assert_eq!(WeightDtype::Q8.describe(DType::BF16), "q8");
        assert_eq!(WeightDtype::Compute.describe(DType::BF16), "bf16");
    }
}
