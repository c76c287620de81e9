//! bf16 weight matrices stored once, at load, in the panel layout of the `vdpbf16ps`
//! microkernel ([`super::gemm_bf16dot`]): 32 weight rows per panel as `[k/2][32]` bf16
//! pairs, panels one after the other ([`Bf16Panels`]).
//!
//! The few-rows tiles read a weight row once per group of up to 8 rows of `x` and load one
//! vector of `x` per `vdpbf16ps`; at 8–31 rows (a decode step of several sequences) that load
//! port, not memory, bounds them (about 1.1 loads per dot product). The microkernel broadcasts
//! one pair of `x` per 2 dot products (0.6 loads per dot product at 8 rows) but needs its
//! panels; packing them per call costs more than it saves below about 32 rows. Stored packed,
//! the same bytes serve every row count: a panel is 64 KiB of contiguous bytes (k = 1024), so
//! one row (decode of one sequence) still streams the matrix front to back, and more rows
//! reuse each group of panels from L2 for every 8-row block of `x`.
//!
//! Only where the dot kernels run ([`super::gemm_bf16dot::use_bf16_dot`]): [`Bf16Panels::pack`]
//! returns `None` elsewhere, so holding panels means the CPU can multiply them.

use half::bf16;

use super::gemm::{PreparedRows, Sink, PARALLEL_MIN_WEIGHTS};
use super::gemm_bf16dot::{pack_panel_pairs, use_bf16_dot, NR, PANEL_GROUP_BYTES};
use super::pool;

/// A bf16 `[n, k]` matrix (`k` even) as panels of 32 rows, `[k/2][32]` pairs each (the rows
/// past `n` in the last panel are zero).
#[derive(Debug, Clone)]
pub struct Bf16Panels {
    n: usize,
    k: usize,
    data: Vec<u32>,
}

impl Bf16Panels {
    /// Packs the row-major `[n, k]` matrix `w`, or `None` when the panel kernel does not run
    /// here (no fast `vdpbf16ps`, `k` odd or zero, `n` zero).
    pub fn pack(w: &[bf16], n: usize, k: usize) -> Option<Self> {
        assert!(w.len() >= n * k, "Bf16Panels::pack: short matrix");
        if n == 0 || k == 0 || !k.is_multiple_of(2) || !use_bf16_dot() {
            return None;
        }
        let panel = k / 2 * NR;
        let mut data = vec![0u32; n.div_ceil(NR) * panel];
        let mut panels: Vec<(usize, &mut [u32])> =
            data.chunks_exact_mut(panel).enumerate().collect();
        pool::map_each_mut(&mut panels, |(p, out)| {
            let c0 = *p * NR;
            pack_panel_pairs(w, k, c0, (n - c0).min(NR), out);
        });
        Some(Self { n, k, data })
    }

    /// `(n, k)`: output columns and the reduced dimension.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (the last panel's padding included).
    pub fn n_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<u32>()
    }

    /// The matrix back in row-major `[n, k]` order (for paths that do not read panels).
    pub fn unpack(&self) -> Vec<bf16> {
        let (n, k, kp) = (self.n, self.k, self.k / 2);
        let mut w = vec![bf16::ZERO; n * k];
        for (c, row) in w.chunks_exact_mut(k).enumerate() {
            let panel = &self.data[c / NR * kp * NR..][..kp * NR];
            for (p, two) in row.chunks_exact_mut(2).enumerate() {
                let v = panel[p * NR + c % NR];
                two[0] = bf16::from_bits(v as u16);
                two[1] = bf16::from_bits((v >> 16) as u16);
            }
        }
        w
    }
}

/// `sink ← x · Wᵀ` for the rows of `rows` (`[m, k]`) and the stored panels of `W`, panels
/// split over the thread pool.
pub fn matmul_nt_panels<S: Sink>(rows: &PreparedRows<'_>, w: &Bf16Panels, sink: &S) {
    assert_eq!(rows.k, w.k, "matmul_nt_panels: k of x and W differ");
    if rows.m == 0 {
        return;
    }
    let n_panels = w.n.div_ceil(NR);
    if w.n * w.k < PARALLEL_MIN_WEIGHTS {
        panels_on_this_thread(rows, w, 0..n_panels, sink);
        return;
    }
    let chunk = pool::chunk_size(n_panels, 1, 1, 4);
    pool::for_each_task(n_panels.div_ceil(chunk), |t| {
        let panels = t * chunk..((t + 1) * chunk).min(n_panels);
        panels_on_this_thread(rows, w, panels, sink);
    });
}

/// Panels `panels` of `w` against every row of `rows`, in groups of panels that stay in L2
/// while each 8-row block of `x` passes over them.
fn panels_on_this_thread<S: Sink>(
    rows: &PreparedRows<'_>,
    w: &Bf16Panels,
    panels: std::ops::Range<usize>,
    sink: &S,
) {
    let (m, kp) = (rows.m, w.k / 2);
    let panel_len = kp * NR;
    let group = (PANEL_GROUP_BYTES / (panel_len * 4)).max(1);
    #[cfg(target_arch = "x86_64")]
    {
        let x_blocks = rows.bf16_pairs();
        let mut g0 = panels.start;
        while g0 < panels.end {
            let g1 = (g0 + group).min(panels.end);
            let cols = g0 * NR..(g1 * NR).min(w.n);
            let group_panels = &w.data[g0 * panel_len..g1 * panel_len];
            // SAFETY: panels exist only where the CPU runs `vdpbf16ps` (Bf16Panels::pack);
            // the rows are packed for it and this task owns the columns of its panels.
            unsafe {
                super::gemm_bf16dot::blocks_against_panels(
                    x_blocks,
                    m,
                    kp,
                    group_panels,
                    cols,
                    sink,
                )
            };
            g0 = g1;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Bf16Panels::pack returns None off x86-64: no panels exist here.
        let _ = (m, group, panels, sink);
        unreachable!("bf16 panels are only made on x86-64");
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::gemm::{matmul_nt_cols_avx2, StoreSink};
    use super::super::shared::SharedMut;
    use super::super::test_util::{lcg, FEW_ROWS_SHAPES};
    use super::*;

    /// Stored panels give the AVX2 tiles' products (the CPU twin) on bf16-exact `x`, for one
    /// row and many, off the 8-row block and the 32-row panel, and in parallel; unpacking
    /// gives back the matrix.
    #[test]
    fn stored_panels_match_avx2() {
        let shapes = FEW_ROWS_SHAPES
            .iter()
            .copied()
            .filter(|(_, k, _)| k % 2 == 0)
            .chain([(1, 1024, 2000), (20, 512, 333), (64, 256, 96)]);
        for (m, k, n) in shapes {
            let mut seed = (m * 131 + k * 17 + n) as u64;
            let x: Vec<f32> = (0..m * k)
                .map(|_| bf16::from_f32(lcg(&mut seed)).to_f32())
                .collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            let Some(panels) = Bf16Panels::pack(&w, n, k) else {
                eprintln!("skipped: the bf16 dot kernels do not run here");
                return;
            };
            assert_eq!(panels.dims(), (n, k));
            assert_eq!(panels.unpack(), w, "{m}x{k}x{n}: unpack");
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
            let rows = PreparedRows::new(&x, m, k);
            matmul_nt_panels(&rows, &panels, &StoreSink::new(&sa, n, 0, None));
            matmul_nt_cols_avx2(&x, m, k, &w, 0..n, &StoreSink::new(&sb, n, 0, None));
            drop((sa, sb));
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                let tol = 1e-5 * (k as f32).sqrt() * (1.0 + q.abs());
                assert!((p - q).abs() <= tol, "{m}x{k}x{n} [{i}]: {p} vs {q}");
            }
        }
    }

    /// No panels for an odd `k` (the pairs need an even one) or an empty matrix.
    #[test]
    fn odd_or_empty_matrices_are_not_packed() {
        let w = vec![bf16::ONE; 3 * 5];
        assert!(Bf16Panels::pack(&w, 3, 5).is_none());
        assert!(Bf16Panels::pack(&w, 0, 4).is_none());
    }
}
