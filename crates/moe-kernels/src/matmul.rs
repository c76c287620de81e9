//! Matrix products that round like torch's CPU kernels in bfloat16.
//!
//! torch multiplies bf16 matrices on the CPU with f32 products and f32 sums, rounding each
//! output once; the order of the sums depends on the kernel torch picks. bf16 outputs of
//! magnitude 4–8 are 0.03 apart, so a different order flips roundings that then spread
//! through the layers. For bf16 on the CPU these functions reproduce torch's orders
//! ([`SumOrder`]) when [`crate::cpu::numerics`] is `TorchExact`; in the default `Fast` mode
//! bf16 goes to the fast kernels of [`crate::cpu`] instead (close to torch, not bit-equal).
//! Every other dtype or device uses candle's matmul.
//!
//! Contract: `matmul_nt(a, b)` is `a · bᵀ` for `a` `[.., m, k]` and `b` `[n, k]` (shared) or
//! `[.., n, k]` (same leading dims), plus an optional `[n]` bias added before the rounding
//! (torch's `addmm`); `matmul_nn(a, b)` is `a · b` for `b` `[.., k, n]`.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use moe_core::{Error, Result};

use crate::cpu::{fast_matmul_nt, numerics, Numerics};

/// The order in which torch's CPU kernels add the f32 products of one dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumOrder {
    /// torch's vectorised bf16 dot (AVX2 build), used when the reduced dimension is
    /// contiguous in both operands (`linear`, `q·kᵀ`): 64-element blocks accumulate in 8×8
    /// lanes reduced as a tree, 16-element blocks in 8 lanes, then a scalar tail.
    Blocked,
    /// torch's generic gemm loop (`p·v`, where the reduced dimension is strided in `v`):
    /// four interleaved partial sums, the remainder added to the first, then summed in order.
    Interleaved4,
    /// One running sum: torch's batched matmul when `m·n·k < 400`.
    Sequential,
}

impl SumOrder {
    /// The order torch's batched matmul (`torch.matmul` on 3-d or 4-d tensors) uses for
    /// per-matrix sizes `m × k` · `k × n`: `large` unless the product is tiny.
    pub fn batched(m: usize, n: usize, k: usize, large: SumOrder) -> SumOrder {
        if m * n * k < 400 {
            SumOrder::Sequential
        } else {
            large
        }
    }
}

/// `a · bᵀ (+ bias)`; see the module contract.
pub fn matmul_nt(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, order: SumOrder) -> Result<Tensor> {
    if !uses_torch_order(a, b) {
        let y = if b.rank() == 2 && a.rank() > 2 {
            a.broadcast_matmul(&b.t()?)?
        } else {
            a.matmul(&b.t()?)?
        };
        return Ok(match bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        });
    }
    if numerics() == Numerics::Fast {
        return fast_matmul_nt(a, b, bias);
    }
    bf16_matmul_nt(a, &b.contiguous()?, bias, order)
}

/// `a · b`; see the module contract.
pub fn matmul_nn(a: &Tensor, b: &Tensor, order: SumOrder) -> Result<Tensor> {
    if !uses_torch_order(a, b) {
        return Ok(a.matmul(b)?);
    }
    let rank = b.rank();
    if numerics() == Numerics::Fast {
        return fast_matmul_nt(a, &b.transpose(rank - 2, rank - 1)?.contiguous()?, None);
    }
    bf16_matmul_nt(
        a,
        &b.transpose(rank - 2, rank - 1)?.contiguous()?,
        None,
        order,
    )
}

fn uses_torch_order(a: &Tensor, b: &Tensor) -> bool {
    matches!(a.device(), Device::Cpu) && a.dtype() == DType::BF16 && b.dtype() == DType::BF16
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// Runs `f` on the elements of a contiguous bf16 CPU tensor, without copying them.
fn with_bf16_slice<R>(t: &Tensor, f: impl FnOnce(&[bf16]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::InvalidRequest(
            "matmul: expected a CPU tensor".into(),
        ));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::InvalidRequest("matmul: expected a contiguous tensor".into()))?;
    Ok(f(&cpu.as_slice::<bf16>()?[start..end]))
}

/// A dot product of an f32 row with a bf16 row, in one of the [`SumOrder`]s.
type Dot = fn(&[f32], &[bf16]) -> f32;

fn bf16_matmul_nt(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    order: SumOrder,
) -> Result<Tensor> {
    let a_dims = a.dims();
    let b_dims = b.dims();
    if a_dims.len() < 2 || b_dims.len() < 2 {
        return Err(Error::InvalidRequest(format!(
            "matmul: operands need two dims, got {a_dims:?} and {b_dims:?}"
        )));
    }
    let (m, k) = (a_dims[a_dims.len() - 2], a_dims[a_dims.len() - 1]);
    let (n, kb) = (b_dims[b_dims.len() - 2], b_dims[b_dims.len() - 1]);
    let lead = &a_dims[..a_dims.len() - 2];
    let batch: usize = lead.iter().product();
    let shared_b = b_dims.len() == 2;
    if kb != k || !(shared_b || &b_dims[..b_dims.len() - 2] == lead) {
        return Err(Error::InvalidRequest(format!(
            "matmul: shapes {a_dims:?} and {b_dims:?} (transposed) do not multiply"
        )));
    }
    let av = to_f32(a)?;
    let bias = bias.map(to_f32).transpose()?;
    let dot: Dot = match order {
        SumOrder::Blocked => dot_blocked_fn(),
        SumOrder::Interleaved4 => dot_interleaved4,
        SumOrder::Sequential => dot_sequential,
    };
    let mut out = vec![bf16::ZERO; batch * m * n];
    with_bf16_slice(b, |bv| {
        for (i, out) in out.chunks_mut((m * n).max(1)).enumerate() {
            let w = if shared_b {
                bv
            } else {
                &bv[i * n * k..(i + 1) * n * k]
            };
            let problem = Problem {
                a: &av[i * m * k..(i + 1) * m * k],
                b: w,
                bias: bias.as_deref(),
                m,
                k,
                dot,
            };
            problem.run(n, out);
        }
    })?;
    let mut shape = lead.to_vec();
    shape.extend([m, n]);
    Ok(Tensor::from_vec(out, shape, a.device())?)
}

/// One `[m, k] · [n, k]ᵀ` product.
struct Problem<'a> {
    a: &'a [f32],
    b: &'a [bf16],
    bias: Option<&'a [f32]>,
    m: usize,
    k: usize,
    dot: Dot,
}

impl Problem<'_> {
    /// Fills `out` (`[m, n]`), splitting the columns over threads when the product is large.
    fn run(&self, n: usize, out: &mut [bf16]) {
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        if self.m * n * self.k < (1 << 20) || threads < 2 || n < 2 * threads {
            return self.columns(0..n, n, out);
        }
        let per_thread = n.div_ceil(threads);
        let parts: Vec<Vec<bf16>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .step_by(per_thread)
                .map(|start| {
                    let cols = start..(start + per_thread).min(n);
                    s.spawn(move || {
                        let mut part = vec![bf16::ZERO; self.m * cols.len()];
                        let width = cols.len();
                        self.columns(cols, width, &mut part);
                        part
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("matmul thread"))
                .collect()
        });
        for (t, part) in parts.iter().enumerate() {
            let start = t * per_thread;
            let width = part.len() / self.m;
            for (r, row) in part.chunks(width).enumerate() {
                out[r * n + start..r * n + start + width].copy_from_slice(row);
            }
        }
    }

    /// Columns `cols` of every row into `out` (`[m, width]`, column `cols.start` first). Rows
    /// go in blocks so that a block of `a` stays in cache while each row of `b` is reused.
    fn columns(&self, cols: std::ops::Range<usize>, width: usize, out: &mut [bf16]) {
        const ROW_BLOCK: usize = 32;
        let k = self.k;
        for rows in (0..self.m).step_by(ROW_BLOCK) {
            let rows = rows..(rows + ROW_BLOCK).min(self.m);
            for (c, j) in cols.clone().enumerate() {
                let w = &self.b[j * k..(j + 1) * k];
                for r in rows.clone() {
                    let y = (self.dot)(&self.a[r * k..(r + 1) * k], w);
                    let y = match self.bias {
                        Some(bias) => bias[j] + y,
                        None => y,
                    };
                    out[r * width + c] = bf16::from_f32(y);
                }
            }
        }
    }
}

#[inline(always)]
fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// AVX2 `vec_reduce_all` of one 8-lane register: halves, then quarters, then pairs.
#[inline(always)]
fn reduce_lanes(v: &[f32; 8]) -> f32 {
    let w = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (w[0] + w[2]) + (w[1] + w[3])
}

/// [`SumOrder::Blocked`]. Products of bf16 values are exact in f32, so torch's fused
/// multiply-adds equal a multiply then an add; `FMA` only picks the faster instruction.
#[inline(always)]
fn dot_blocked_impl<const FMA: bool>(a: &[f32], b: &[bf16]) -> f32 {
    let madd = |x: f32, y: bf16, acc: f32| {
        if FMA {
            x.mul_add(widen(y), acc)
        } else {
            acc + x * widen(y)
        }
    };
    let k = a.len().min(b.len());
    let main = k & !63;
    // 8 registers of 8 lanes: element i of a 64-block goes to register i / 8, lane i % 8.
    let mut regs = [0f32; 64];
    for (ab, bb) in a[..main].chunks_exact(64).zip(b[..main].chunks_exact(64)) {
        for i in 0..64 {
            regs[i] = madd(ab[i], bb[i], regs[i]);
        }
    }
    for half in [4, 2, 1] {
        for r in 0..half {
            for l in 0..8 {
                regs[r * 8 + l] += regs[(r + half) * 8 + l];
            }
        }
    }
    let mut sum = reduce_lanes(regs[..8].try_into().expect("8 lanes"));
    let vec_end = k & !15;
    let mut tail = [0f32; 8];
    for (ab, bb) in a[main..vec_end]
        .chunks_exact(16)
        .zip(b[main..vec_end].chunks_exact(16))
    {
        for l in 0..8 {
            tail[l] = madd(ab[l], bb[l], tail[l]);
        }
        for l in 0..8 {
            tail[l] = madd(ab[8 + l], bb[8 + l], tail[l]);
        }
    }
    sum += reduce_lanes(&tail);
    for j in vec_end..k {
        sum += a[j] * widen(b[j]);
    }
    sum
}

fn dot_blocked(a: &[f32], b: &[bf16]) -> f32 {
    dot_blocked_impl::<false>(a, b)
}

/// [`dot_blocked`] compiled for AVX2 with FMA (same results, several times faster).
#[cfg(target_arch = "x86_64")]
fn dot_blocked_avx2(a: &[f32], b: &[bf16]) -> f32 {
    #[target_feature(enable = "avx2,fma")]
    fn inner(a: &[f32], b: &[bf16]) -> f32 {
        dot_blocked_impl::<true>(a, b)
    }
    // SAFETY: only selected by `dot_blocked_fn` after detecting AVX2 and FMA.
    unsafe { inner(a, b) }
}

fn dot_blocked_fn() -> Dot {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return dot_blocked_avx2;
    }
    dot_blocked
}

/// [`SumOrder::Interleaved4`].
fn dot_interleaved4(a: &[f32], b: &[bf16]) -> f32 {
    let k = a.len().min(b.len());
    let k4 = k - k % 4;
    let mut partial = [0f32; 4];
    for (ab, bb) in a[..k4].chunks_exact(4).zip(b[..k4].chunks_exact(4)) {
        for l in 0..4 {
            partial[l] += ab[l] * widen(bb[l]);
        }
    }
    for j in k4..k {
        partial[0] += a[j] * widen(b[j]);
    }
    ((partial[0] + partial[1]) + partial[2]) + partial[3]
}

/// [`SumOrder::Sequential`].
fn dot_sequential(a: &[f32], b: &[bf16]) -> f32 {
    a.iter().zip(b).fold(0f32, |s, (x, &y)| s + x * widen(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    #[test]
    fn agrees_with_candle_up_to_one_rounding() {
        for order in [
            SumOrder::Blocked,
            SumOrder::Interleaved4,
            SumOrder::Sequential,
        ] {
            for (m, n, k) in [(1, 5, 3), (7, 9, 30), (3, 4, 64), (2, 3, 100), (5, 6, 150)] {
                let a = bf16_tensor(&[2, m, k], 1);
                let b = bf16_tensor(&[2, n, k], 2);
                let ours = matmul_nt(&a, &b, None, order).unwrap();
                let exact = a
                    .to_dtype(DType::F32)
                    .unwrap()
                    .matmul(&b.to_dtype(DType::F32).unwrap().t().unwrap())
                    .unwrap();
                assert_eq!(ours.dims(), &[2, m, n]);
                let ours = ours.to_dtype(DType::F32).unwrap();
                let err: f32 = (ours - &exact)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let scale: f32 = exact.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(err <= scale / 128.0, "{order:?} {m}x{n}x{k}: {err}");
                let nn = matmul_nn(&a, &b.transpose(1, 2).unwrap(), order).unwrap();
                let same: f32 = (nn.to_dtype(DType::F32).unwrap()
                    - matmul_nt(&a, &b, None, order)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
                assert_eq!(same, 0.0);
            }
        }
    }

    #[test]
    fn orders_sum_as_torch_does() {
        // 1 + 2^-24 + ... : the order decides whether the tiny terms survive.
        let tiny = f32::EPSILON / 4.0;
        let mut a = vec![tiny; 70];
        a[0] = 1.0;
        let ones = vec![bf16::ONE; 70];
        // Sequential: every tiny term is lost against 1.
        assert_eq!(dot_sequential(&a, &ones), 1.0);
        // Blocked: the 63 other lanes of the first block sum among themselves first.
        assert!(dot_blocked(&a, &ones) > 1.0);
        assert_eq!(dot_blocked(&a, &ones), dot_blocked_fn()(&a, &ones));
        // Interleaved4: partial sums 1–3 hold 17 tiny terms each, added to 1 in turn.
        assert!(dot_interleaved4(&a, &ones) > 1.0);
    }
}
