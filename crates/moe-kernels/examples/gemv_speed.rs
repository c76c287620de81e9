//! Effective bandwidth of the fast bf16 projection against a plain read of the same bytes:
//! `cargo run --release -p moe-kernels --example gemv_speed -- [ROWS] [COLS] [M]`.
//! Both are measured back to back in one run, so their ratio survives a loaded machine.

use std::time::Instant;

use half::bf16;
use moe_kernels::cpu::{matmul_nt_into, pool, SharedMut, StoreSink};

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
    let w: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) * 1e-3))
        .collect();
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut out = vec![0f32; m * n];
    let bytes = (n * k * 2) as f64;
    let reps = 10;
    for round in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            let s = SharedMut::new(&mut out);
            matmul_nt_into(&x, m, k, &w, n, &StoreSink::new(&s, n, 0, None));
        }
        let gemv = t.elapsed().as_secs_f64() / reps as f64;
        // A plain parallel read of the same buffer (sum of the raw u16s).
        let t = Instant::now();
        let mut sink = 0u64;
        for _ in 0..reps {
            let chunk = n * k / pool::n_threads().max(1);
            let sums = std::sync::Mutex::new(0u64);
            pool::for_each_task(pool::n_threads(), |i| {
                let s: u64 = w[i * chunk..(i + 1) * chunk]
                    .iter()
                    .fold(0u64, |a, v| a.wrapping_add(v.to_bits() as u64));
                *sums.lock().unwrap() += s;
            });
            sink = sink.wrapping_add(*sums.lock().unwrap());
        }
        let read = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "round {round}: {n}x{k} bf16, m={m}: gemm {:.2} ms = {:.1} GB/s; plain read {:.2} ms = {:.1} GB/s; ratio {:.2} (sink {})",
            gemv * 1e3,
            bytes / gemv / 1e9,
            read * 1e3,
            bytes / read / 1e9,
            read / gemv,
            sink % 7 + out[0] as u64 % 2
        );
    }
}
