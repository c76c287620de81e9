//! Rotary position embedding of host rows in the half-split (`rotate_half`) layout:
//! `x₁·cos − x₂·sin` and `x₂·cos + x₁·sin`, each product and each sum rounded to the compute
//! dtype as candle's elementwise ops on that dtype round them (so the values are the ones the
//! tensor path gives, bit for bit).

use candle_core::{DType, Tensor, WithDType};
use half::bf16;
use moe_core::{Error, Result};

use super::tensors::slice_of;
use super::weights::WeightElem;

/// Rotates every head of the `n_rows` rows of `rows` (each a whole number of `head_dim`-wide
/// heads; row `i` sits at position `first_position + i`) by the tables `cos`, `sin`
/// (`[max_positions, head_dim / 2]`, contiguous CPU tensors, bf16 or f32), rounding each step
/// to the tables' dtype (the compute dtype).
pub fn rotate_half_rows_in_place(
    rows: &mut [f32],
    n_rows: usize,
    head_dim: usize,
    first_position: usize,
    (cos, sin): (&Tensor, &Tensor),
) -> Result<()> {
    let (max_positions, half) = cos.dims2()?;
    if head_dim != 2 * half
        || sin.dims2()? != (max_positions, half)
        || n_rows == 0
        || !rows.len().is_multiple_of(n_rows * head_dim)
        || first_position + n_rows > max_positions
    {
        return Err(Error::InvalidRequest(format!(
            "rope: {} values in {n_rows} rows of heads of {head_dim} from position \
             {first_position} against tables {:?}",
            rows.len(),
            cos.dims()
        )));
    }
    fn typed<W: WeightElem + WithDType>(
        rows: &mut [f32],
        n_rows: usize,
        half: usize,
        first_position: usize,
        (cos, sin): (&Tensor, &Tensor),
        round: impl Fn(f32) -> f32,
    ) -> Result<()> {
        let (cos_storage, cos_layout) = cos.storage_and_layout();
        let (sin_storage, sin_layout) = sin.storage_and_layout();
        let not_cpu = || Error::InvalidRequest("rope: tables not contiguous on the CPU".into());
        let cos_all: &[W] = slice_of(&cos_storage, cos_layout).ok_or_else(not_cpu)?;
        let sin_all: &[W] = slice_of(&sin_storage, sin_layout).ok_or_else(not_cpu)?;
        let row_len = rows.len() / n_rows;
        for (i, row) in rows.chunks_mut(row_len).enumerate() {
            let at = (first_position + i) * half;
            let (c, s) = (&cos_all[at..at + half], &sin_all[at..at + half]);
            for head in row.chunks_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for t in 0..half {
                    let (a, b) = (x1[t], x2[t]);
                    let (ct, st) = (c[t].to_f32(), s[t].to_f32());
                    x1[t] = round(round(a * ct) - round(b * st));
                    x2[t] = round(round(b * ct) + round(a * st));
                }
            }
        }
        Ok(())
    }
    let tables = (cos, sin);
    match cos.dtype() {
        DType::BF16 => typed::<bf16>(rows, n_rows, half, first_position, tables, |v| {
            bf16::from_f32(v).to_f32()
        }),
        DType::F32 => typed::<f32>(rows, n_rows, half, first_position, tables, |v| v),
        dt => Err(Error::InvalidRequest(format!("rope: tables in {dt:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Bit for bit what the same rotation gives with candle's ops on bf16 and f32 tensors.
    #[test]
    fn matches_candle_ops_bit_for_bit() {
        let dev = Device::Cpu;
        let (n_pos, half, n_heads, n_rows, start) = (12, 8, 3, 4, 5);
        for dtype in [DType::BF16, DType::F32] {
            let table = |phase: f32| {
                let v: Vec<f32> = (0..n_pos * half)
                    .map(|i| (i as f32 * 0.31 + phase).sin())
                    .collect();
                Tensor::from_vec(v, (n_pos, half), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (cos, sin) = (table(0.2), table(1.1));
            let xv: Vec<f32> = (0..n_heads * n_rows * 2 * half)
                .map(|i| (i as f32 * 0.77).cos() * 3.0)
                .collect();
            // [n_heads, n_rows, d] as the tensor path rotates it.
            let x = Tensor::from_vec(xv, (n_heads, n_rows, 2 * half), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let c = cos.narrow(0, start, n_rows).unwrap().unsqueeze(0).unwrap();
            let s = sin.narrow(0, start, n_rows).unwrap().unsqueeze(0).unwrap();
            let x1 = x.narrow(D::Minus1, 0, half).unwrap();
            let x2 = x.narrow(D::Minus1, half, half).unwrap();
            let first = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
            let second = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
            // [n_heads, n_rows, d] as host rows [n_rows, n_heads * d].
            let host_rows = |t: &Tensor| -> Vec<f32> {
                let t = t.transpose(0, 1).unwrap().flatten_all().unwrap();
                t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
            };
            let want = host_rows(&Tensor::cat(&[first, second], D::Minus1).unwrap());
            let mut rows = host_rows(&x);
            rotate_half_rows_in_place(&mut rows, n_rows, 2 * half, start, (&cos, &sin)).unwrap();
            for (i, (g, w)) in rows.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{dtype:?} element {i}: {g} vs {w}"
                );
            }
        }
    }

    /// A position past the tables is an error, not a panic.
    #[test]
    fn positions_past_the_table_are_an_error() {
        let dev = Device::Cpu;
        let t = Tensor::zeros((4, 2), DType::F32, &dev).unwrap();
        let mut rows = vec![0f32; 2 * 4];
        let err = rotate_half_rows_in_place(&mut rows, 2, 4, 3, (&t, &t)).unwrap_err();
        assert!(err.to_string().contains("position 3"), "{err}");
    }
}
