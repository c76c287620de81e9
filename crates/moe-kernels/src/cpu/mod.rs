//! Fast CPU kernels for the dense and MoE projections, tuned for decode (a few rows per
//! weight matrix) but correct for any shape.
//!
//! * [`numerics`]: the process-wide choice between these fast kernels and the torch-exact
//!   bf16 kernels of [`crate::matmul`] (kept for the bit-exact parity tests).
//! * [`weights`]: weight element types the kernels read (f32, bf16 widened on the fly).
//! * [`q8`]: int8 weights with per-row scales, the storage of `--expert-dtype q8` experts.
//! * [`pool`]: the persistent thread pool the kernels split their work over.
//! * [`gemm`]: `x · Wᵀ` with `x` f32 and `W` `[out, in]` in any weight type, AVX2/FMA tiles
//!   with a scalar fallback, and an output "sink" so callers can store or scatter-accumulate.
//! * [`gemm_avx512`]: the few-rows (decode) case on AVX-512 CPUs: 32 weights per load widened
//!   without shuffles, the next tile prefetched.
//! * [`gemm_packed`]: the many-rows case: weights widened once into panels, a 6×16 AVX2 or
//!   8×32 AVX-512 microkernel.
//! * [`gemm_bf16dot`]: bf16 weights with `vdpbf16ps` where it issues as fast as an FMA.
//! * [`gemm_panels`]: bf16 matrices stored at load as the `vdpbf16ps` microkernel's panels,
//!   so decode steps of several sequences use the microkernel without packing per call.
//! * [`gemm_vnni`]: the few-rows case for int8 weights: `x` quantized to int16, `vpdpwssd`.
//! * [`gemm_amx`]: the many-rows case for bf16 weights on CPUs with AMX: the weights read
//!   as stored into tiles, `x` rounded to bf16 and pair-interleaved.
//! * [`attention`]: causal attention of one sequence, scores kept in f32 through the masked
//!   softmax, both products on the GEMM kernels.
//! * [`bf16_round`]: f32 results rounded to bf16 in one vectorized pass.
//! * [`residual`]: the residual stream's `x + sublayer(x)`, one vectorized pass.
//! * [`moe_ffn`]: the grouped expert FFN: gate and up in one task with the activation fused,
//!   the down projection accumulating `weight × output` straight into each token's row.
//!
//! Numerics: products and sums in f32, one rounding to the activation dtype per output.
//! The sum order differs from torch's, so bf16 results are close to, not bit-equal with,
//! transformers'.

pub mod attention;
pub mod bf16_round;
pub mod gemm;
pub mod gemm_amx;
pub mod gemm_avx512;
pub mod gemm_bf16dot;
pub mod gemm_packed;
pub mod gemm_panels;
pub mod gemm_vnni;
pub mod moe_ffn;
pub mod numerics;
pub mod pool;
pub mod q8;
pub mod residual;
pub mod rope;
pub mod shared;
pub mod tensors;
#[cfg(test)]
mod test_util;
pub mod weights;

pub use attention::{
    fast_attention_applies, fast_attention_over_cache, fast_causal_attention, CausalMask,
};
pub use gemm::{
    has_avx2_fma, matmul_nt_cols, matmul_nt_cols_avx2, matmul_nt_cols_prepared, matmul_nt_into,
    PreparedRows, Sink, StoreSink,
};
pub use gemm_panels::{matmul_nt_panels, Bf16Panels};
pub use moe_ffn::{grouped_expert_ffn, ExpertSlices};
pub use numerics::{numerics, set_numerics, Numerics};
pub use rope::rotate_half_rows_in_place;
pub use shared::SharedMut;
pub use tensors::{
    fast_grouped_experts, fast_grouped_experts_in_waves, fast_matmul_nt, fast_matmul_nt_panels,
    fast_matmul_nt_q8, from_f32_vec, to_f32_vec,
};
pub use weights::WeightElem;
