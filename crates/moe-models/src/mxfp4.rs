//! MXFP4 expert tensors (GPT-OSS checkpoints), dequantized at load.
//!
//! Format (OCP Microscaling, as transformers' `convert_moe_packed_tensors` reads it): a matrix
//! `[.., out, in]` is stored as `{name}_blocks` (u8 `[.., out, in / 32, 16]`) and
//! `{name}_scales` (u8 `[.., out, in / 32]`). Each byte of a block holds two 4-bit e2m1 values,
//! the low nibble first; each block of 32 values shares one e8m0 scale `2^(s - 127)`.

use candle_core::Tensor;
use moe_core::{Error, Result};
use moe_loader::TensorLookup;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// The 16 e2m1 values by code: sign bit 3, exponent bits 2..1, mantissa bit 0.
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Dequantizes packed blocks to f32. `blocks` has `scales.len() * 16` bytes; the result has
/// `scales.len() * 32` values, row-major in the logical `[.., in]` order.
pub fn dequantize(blocks: &[u8], scales: &[u8]) -> Vec<f32> {
    assert_eq!(blocks.len(), scales.len() * BLOCK / 2, "blocks vs scales");
    let mut out = Vec::with_capacity(scales.len() * BLOCK);
    for (block, &scale) in blocks.chunks_exact(BLOCK / 2).zip(scales) {
        // torch.ldexp(value, s - 127): exact for every finite result.
        let factor = 2f32.powi(scale as i32 - 127);
        for &byte in block {
            out.push(E2M1[(byte & 0x0f) as usize] * factor);
            out.push(E2M1[(byte >> 4) as usize] * factor);
        }
    }
    out
}

/// Reads `{name}_blocks` and `{name}_scales` under `lookup` as the dequantized matrix
/// `[n_experts, out, in]`, in the lookup's dtype and on its device.
pub fn load_packed(
    lookup: &TensorLookup,
    name: &str,
    n_experts: usize,
    out_dim: usize,
    in_dim: usize,
) -> Result<Tensor> {
    if !in_dim.is_multiple_of(BLOCK) {
        return Err(Error::InvalidRequest(format!(
            "MXFP4 tensor {}: input size {in_dim} is not a multiple of {BLOCK}",
            lookup.full_name(name)
        )));
    }
    let groups = in_dim / BLOCK;
    let blocks = raw_u8(
        lookup,
        &format!("{name}_blocks"),
        &[n_experts, out_dim, groups, BLOCK / 2],
    )?;
    let scales = raw_u8(
        lookup,
        &format!("{name}_scales"),
        &[n_experts, out_dim, groups],
    )?;
    from_bytes(
        blocks,
        scales,
        (n_experts, out_dim, in_dim),
        lookup.dtype(),
        lookup.device(),
    )
}

/// Dequantizes packed `blocks` and `scales` (as stored) into a tensor of `shape` (its last
/// dimension the logical input size) in `dtype` on `device`.
pub fn from_bytes(
    blocks: &[u8],
    scales: &[u8],
    shape: (usize, usize, usize),
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    if blocks.len() != scales.len() * BLOCK / 2
        || scales.len() * BLOCK != shape.0 * shape.1 * shape.2
    {
        return Err(Error::InvalidRequest(format!(
            "MXFP4: {} block bytes and {} scales do not make a {shape:?} matrix",
            blocks.len(),
            scales.len()
        )));
    }
    let values = dequantize(blocks, scales);
    let tensor = Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?;
    Ok(tensor.to_dtype(dtype)?.to_device(device)?)
}

/// The bytes of a `U8` tensor, shape-checked.
fn raw_u8<'a>(lookup: &'a TensorLookup, name: &str, shape: &[usize]) -> Result<&'a [u8]> {
    let full = lookup.full_name(name);
    let checkpoint = lookup.checkpoint();
    let (file, _) = checkpoint
        .entry(&full)
        .ok_or_else(|| Error::MissingTensor {
            name: full.clone(),
            location: checkpoint.location().display().to_string(),
        })?;
    let (entry, bytes) = file
        .bytes(&full)
        .expect("indexed tensor exists in its file");
    if entry.shape != shape {
        return Err(Error::TensorShape {
            name: full,
            path: file.path().to_path_buf(),
            expected: shape.to_vec(),
            got: entry.shape.clone(),
        });
    }
    if entry.dtype != "U8" {
        return Err(Error::TensorDtype {
            name: full,
            path: file.path().to_path_buf(),
            dtype: entry.dtype.clone(),
        });
    }
    Ok(bytes)
}

/// Whether `lookup` holds `{name}_blocks` (the checkpoint stores `name` as MXFP4).
pub fn is_packed(lookup: &TensorLookup, name: &str) -> bool {
    lookup.contains(&format!("{name}_blocks"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An e2m1 decoder written from the format's definition (1 sign, 2 exponent bits with
    /// bias 1, 1 mantissa bit; exponent 0 is subnormal: 0.5 × mantissa), independent of
    /// the lookup table.
    fn e2m1_from_definition(code: u8) -> f32 {
        let sign = if code & 0b1000 != 0 { -1.0 } else { 1.0 };
        let exponent = ((code >> 1) & 0b11) as i32;
        let mantissa = (code & 1) as f32;
        let magnitude = if exponent == 0 {
            0.5 * mantissa
        } else {
            (1.0 + 0.5 * mantissa) * 2f32.powi(exponent - 1)
        };
        sign * magnitude
    }

    /// e8m0: an unsigned biased exponent, value 2^(s - 127).
    fn e8m0_from_definition(s: u8) -> f64 {
        2f64.powi(s as i32 - 127)
    }

    #[test]
    fn table_matches_definition() {
        for code in 0..16u8 {
            let a = E2M1[code as usize];
            let b = e2m1_from_definition(code);
            assert_eq!(a.to_bits(), b.to_bits(), "code {code}");
        }
    }

    /// Two rows of two blocks each, every nibble value in both positions, scales spanning
    /// small, unit and large exponents.
    #[test]
    fn dequantizes_tiny_packed_tensor_exactly() {
        let (rows, groups) = (2, 2);
        let mut blocks = Vec::new();
        for r in 0..rows {
            for g in 0..groups {
                for i in 0..16u8 {
                    // low nibble i, high nibble a different code
                    let lo = i;
                    let hi = (i * 7 + (r * groups + g) as u8 * 3) % 16;
                    blocks.push(lo | (hi << 4));
                }
            }
        }
        let scales: Vec<u8> = vec![127, 120, 130, 200];
        let values = dequantize(&blocks, &scales);
        assert_eq!(values.len(), rows * groups * BLOCK);
        for (b, &s) in scales.iter().enumerate() {
            for i in 0..16 {
                let byte = blocks[b * 16 + i];
                // Logical order: value 2i is the low nibble, 2i+1 the high nibble.
                let lo = e2m1_from_definition(byte & 0xf) as f64 * e8m0_from_definition(s);
                let hi = e2m1_from_definition(byte >> 4) as f64 * e8m0_from_definition(s);
                assert_eq!(
                    values[b * BLOCK + 2 * i],
                    lo as f32,
                    "block {b} value {}",
                    2 * i
                );
                assert_eq!(
                    values[b * BLOCK + 2 * i + 1],
                    hi as f32,
                    "block {b} value {}",
                    2 * i + 1
                );
            }
        }
        // Spot checks written out by hand: byte 0x21 with scale 127 is [0.5, 1.0];
        // byte 0xF7 with scale 128 is [6.0 × 2, -6.0 × 2].
        assert_eq!(dequantize(&[0x21; 16], &[127])[..2], [0.5, 1.0]);
        assert_eq!(dequantize(&[0xF7; 16], &[128])[..2], [12.0, -12.0]);
    }
}
