//! bf16 dense projections stored at load in the panel layout of the CPU's `vdpbf16ps`
//! microkernel ([`crate::cpu::gemm_panels`]): the same bytes as the `[out, in]` matrix, read
//! by one kernel at every row count, so a decode step of 4–31 sequences runs at the
//! microkernel's rate instead of the few-rows tiles' (the bf16 lm head at 16 rows: 2.3× faster
//! on a 2-core Zen 4).
//!
//! Made only where it pays and can run: a bf16 CPU matrix of at least [`MIN_PANEL_COLUMNS`]
//! outputs (in practice the lm head), fast numerics, and a CPU whose `vdpbf16ps` issues as
//! fast as an FMA ([`PanelDense::pack`] returns `None` elsewhere and the caller keeps the
//! matrix as it was; `MOE_INFER_NO_PANELS=1` turns them off). A call the panel kernel cannot
//! serve (torch-exact numerics chosen after load, a non-CPU input) unpacks the matrix per use,
//! and stderr says so once.

use std::sync::Once;

use candle_core::{DType, Tensor};
use half::bf16;
use moe_core::Result;

use crate::cpu::{fast_matmul_nt_panels, numerics, Bf16Panels, Numerics};
use crate::matmul::{matmul_nt, SumOrder};

/// Whether the user set `MOE_INFER_NO_PANELS` (the matrices then stay row-major, on the
/// few-rows tiles and the per-call packing; said once on stderr).
fn panels_turned_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        let off = std::env::var_os("MOE_INFER_NO_PANELS").is_some_and(|v| v != "0");
        if off {
            eprintln!("moe-kernels: MOE_INFER_NO_PANELS is set; bf16 projections stay row-major");
        }
        off
    })
}

/// A bf16 `[out, in]` projection matrix held as panels.
#[derive(Debug, Clone)]
pub struct PanelDense {
    panels: Bf16Panels,
}

/// The fewest output columns a projection needs to be stored as panels. Below it (attention
/// projections of 256–4096 columns) the panel kernel read one decode row 5–7 % slower than the
/// row-major tiles in back-to-back runs on a 2-core Zen 4, which cost more at batch 1 than the
/// panels won at 4–16 sequences; an lm head of 151 936 columns reads one row as fast either way
/// and 16 rows 2.3× faster as panels.
pub const MIN_PANEL_COLUMNS: usize = 16_384;

/// [`MIN_PANEL_COLUMNS`], or the number in `MOE_INFER_PANEL_MIN_COLUMNS` (for measuring
/// other thresholds; read once).
fn min_panel_columns() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("MOE_INFER_PANEL_MIN_COLUMNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MIN_PANEL_COLUMNS)
    })
}

impl PanelDense {
    /// The panels of a bf16 `[out, in]` CPU matrix, or `None` where they would not be used
    /// (another dtype or device, torch-exact numerics, a CPU without a fast `vdpbf16ps`, an
    /// odd `in`, fewer than [`MIN_PANEL_COLUMNS`] outputs, or `MOE_INFER_PANEL_MIN_COLUMNS`).
    pub fn pack(weight: &Tensor) -> Result<Option<Self>> {
        if weight.rank() != 2 || weight.dim(0)? < min_panel_columns() {
            return Ok(None);
        }
        Self::pack_any_size(weight)
    }

    /// [`Self::pack`] without the size rule.
    fn pack_any_size(weight: &Tensor) -> Result<Option<Self>> {
        if weight.dtype() != DType::BF16
            || !weight.device().is_cpu()
            || weight.rank() != 2
            || numerics() != Numerics::Fast
            || panels_turned_off()
        {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        let w = weight.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let values = &cpu.as_slice::<bf16>()?[start..end];
        Ok(Bf16Panels::pack(values, n, k).map(|panels| Self { panels }))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.panels.dims()
    }

    /// `x · Wᵀ (+ bias)` for `x` `[.., in]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if x.device().is_cpu() && numerics() == Numerics::Fast {
            return fast_matmul_nt_panels(x, &self.panels, bias);
        }
        static SAID: Once = Once::new();
        SAID.call_once(|| {
            eprintln!(
                "moe-kernels: bf16 projections stored as panels are unpacked per use here (the \
                 panel kernel runs on the CPU with fast numerics only): slower, same values"
            )
        });
        let w = self.unpacked()?.to_device(x.device())?;
        matmul_nt(x, &w, bias, SumOrder::Blocked)
    }

    /// The `[out, in]` bf16 matrix, unpacked.
    pub fn unpacked(&self) -> Result<Tensor> {
        let (n, k) = self.dims();
        Ok(Tensor::from_vec(
            self.panels.unpack(),
            (n, k),
            &candle_core::Device::Cpu,
        )?)
    }

    /// Bytes held (the matrix, the last panel's padding rows included).
    pub fn n_bytes(&self) -> usize {
        self.panels.n_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The panel product equals candle's product of the same bf16 matrix (f32 sums in another
    /// order, one rounding) for one row, a few and many, with a bias and 3-d input; where the
    /// panels are not made (no fast `vdpbf16ps` here) `pack` says so with `None`.
    #[test]
    fn panel_product_matches_the_matrix() {
        let dev = Device::Cpu;
        let (out, inp) = (70, 96);
        let w = Tensor::randn(0f32, 0.5, (out, inp), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bias = Tensor::randn(0f32, 1.0, out, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert!(PanelDense::pack_any_size(&w.to_dtype(DType::F32).unwrap())
            .unwrap()
            .is_none());
        assert!(
            PanelDense::pack(&w).unwrap().is_none(),
            "70 columns is under MIN_PANEL_COLUMNS"
        );
        let Some(p) = PanelDense::pack_any_size(&w).unwrap() else {
            eprintln!("skipped: no panels on this CPU");
            return;
        };
        assert_eq!(p.dims(), (out, inp));
        assert_eq!(p.n_bytes(), 96 * inp * 2, "three panels of 32 rows");
        let back = p.unpacked().unwrap();
        let same = back.eq(&w).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(
            same.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            (out * inp) as f32
        );
        let wf = w.to_dtype(DType::F32).unwrap();
        let bf = bias.to_dtype(DType::F32).unwrap();
        for rows in [1, 5, 40] {
            let x = Tensor::randn(0f32, 1.0, (2, rows, inp), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let got = p.forward(&x, Some(&bias)).unwrap();
            assert_eq!(got.dims(), &[2, rows, out]);
            assert_eq!(got.dtype(), DType::BF16);
            let want = x
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_matmul(&wf.t().unwrap())
                .unwrap()
                .broadcast_add(&bf)
                .unwrap();
            let diff = (got.to_dtype(DType::F32).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            // one bf16 rounding of values of magnitude up to ~30
            assert!(diff.to_scalar::<f32>().unwrap() < 0.15, "{rows} rows");
        }
    }
}
