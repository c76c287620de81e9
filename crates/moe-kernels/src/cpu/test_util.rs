//! Helpers the CPU kernels' unit tests share.

/// The next state of a 64-bit LCG (its high bits are the random ones).
pub fn lcg_bits(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed
}

/// The next value of a 64-bit LCG, mapped to `[-0.5, 0.5)`.
pub fn lcg(seed: &mut u64) -> f32 {
    ((lcg_bits(seed) >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// Asserts that two `m × n` products over `k`, computed for columns `1..n` only, agree within
/// f32 rounding (relative `1e-5 √k`) and both left column 0 untouched (NaN).
pub fn assert_agree_outside_column_0(got: &[f32], want: &[f32], m: usize, k: usize, n: usize) {
    for (i, (p, q)) in got.iter().zip(want).enumerate() {
        if i % n == 0 {
            assert!(p.is_nan() && q.is_nan(), "column 0 is outside the range");
            continue;
        }
        let tol = 1e-5 * (k as f32).sqrt() * (1.0 + q.abs());
        assert!((p - q).abs() <= tol, "{m}x{k}x{n} [{i}]: {p} vs {q}");
    }
}

/// `(m, k, n)` shapes for the few-rows kernels' tests against the AVX2 twin: off the 32-wide
/// step (`k`), the 4-column tile and the 8-row group (`m`, up to 40 rows), several 64-column
/// blocks (`n`), and a `k` below one step.
pub const FEW_ROWS_SHAPES: &[(usize, usize, usize)] = &[
    (1, 32, 8),
    (1, 1024, 300),
    (1, 33, 9),
    (2, 256, 13),
    (3, 100, 7),
    (4, 64, 17),
    (7, 1000, 41),
    (9, 64, 70),
    (1, 5, 3),
    (16, 160, 150),
    (31, 96, 200),
    (40, 1000, 41),
];
