//! Effective bandwidth of the fast bf16 projection against a plain read of the same bytes:
//! `cargo run --release -p moe-kernels --example gemv_speed -- [ROWS] [COLS] [M] [COPIES]`;
//! COPIES distinct copies of the matrix are read in turn (enough of them and a small matrix
//! comes from DRAM, as a layer's attention projections do in a decode step).
//! Both are measured back to back in one run, so their ratio survives a loaded machine.

use std::time::Instant;

use half::bf16;
use moe_kernels::cpu::{
    matmul_nt_into, matmul_nt_panels, pool, Bf16Panels, PreparedRows, SharedMut, StoreSink,
};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (n, k, m) = (
        *args.first().unwrap_or(&151936),
        *args.get(1).unwrap_or(&1024),
        *args.get(2).unwrap_or(&1),
    );
    let copies = (*args.get(3).unwrap_or(&1)).max(1);
    let ws: Vec<Vec<bf16>> = (0..copies)
        .map(|_| {
            (0..n * k)
                .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) * 1e-3))
                .collect()
        })
        .collect();
    let w = &ws[0];
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut out = vec![0f32; m * n];
    let q8 = moe_kernels::cpu::q8::Q8Matrix::quantize(w, k);
    // The matrix stored as bf16 panels (where the bf16 dot kernels run).
    let panels: Vec<_> = ws.iter().map(|w| Bf16Panels::pack(w, n, k)).collect();
    let bytes = (n * k * 2) as f64;
    // Enough repetitions that each timing reads ≥ 2 GB (small matrices would time wake-ups).
    let reps = ((2e9 / bytes) as usize).max(10);
    for round in 0..3 {
        let t = Instant::now();
        for r in 0..reps {
            let s = SharedMut::new(&mut out);
            matmul_nt_into(
                &x,
                m,
                k,
                &ws[r % copies],
                n,
                &StoreSink::new(&s, n, 0, None),
            );
        }
        let gemv = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            let s = SharedMut::new(&mut out);
            let store = StoreSink::new(&s, n, 0, None);
            let sink = moe_kernels::cpu::q8::ScaledSink {
                inner: &store,
                scales: &q8.scales,
            };
            matmul_nt_into(&x, m, k, &q8.values, n, &sink);
        }
        let q8_time = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for r in 0..reps {
            if let Some(panels) = &panels[r % copies] {
                let s = SharedMut::new(&mut out);
                matmul_nt_panels(
                    &PreparedRows::new(&x, m, k),
                    panels,
                    &StoreSink::new(&s, n, 0, None),
                );
            }
        }
        let panel_time = t.elapsed().as_secs_f64() / reps as f64;
        // A plain parallel read of the same bytes (summed as f32 into 4 × 8 lanes, the
        // bandwidth probe of bench-model.md).
        let t = Instant::now();
        let mut sink = 0u64;
        for r in 0..reps {
            let w = &ws[r % copies];
            let chunk = n * k / pool::n_threads().max(1) / 64 * 64;
            let sums = std::sync::Mutex::new(0f32);
            pool::for_each_task(pool::n_threads(), |i| {
                let part = &w[i * chunk..(i + 1) * chunk];
                // SAFETY: bf16 and u32 pairs share the bytes; len/2 u32 fit in the slice
                // (chunk is a multiple of 64), and bf16's alignment (2) is checked below.
                let f: &[f32] = unsafe {
                    assert_eq!(part.as_ptr() as usize % 4, 0);
                    std::slice::from_raw_parts(part.as_ptr() as *const f32, part.len() / 2)
                };
                let mut acc = [[0f32; 8]; 4];
                for c in f.chunks_exact(32) {
                    for a in 0..4 {
                        for l in 0..8 {
                            acc[a][l] += c[a * 8 + l];
                        }
                    }
                }
                *sums.lock().unwrap() += acc.iter().flatten().sum::<f32>();
            });
            sink = sink.wrapping_add(sums.lock().unwrap().to_bits() as u64);
        }
        let read = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "round {round}: {n}x{k} bf16, m={m}: gemm {:.2} ms = {:.1} GB/s; stored panels {:.2} ms; q8 {:.2} ms; plain read {:.2} ms = {:.1} GB/s; ratio {:.2} (sink {})",
            gemv * 1e3,
            bytes / gemv / 1e9,
            panel_time * 1e3,
            q8_time * 1e3,
            read * 1e3,
            bytes / read / 1e9,
            read / gemv,
            sink % 7 + out[0] as u64 % 2
        );
    }
}
