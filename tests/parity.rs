//! Parity with Hugging Face transformers on every fixture of the supported architectures, with
//! the torch-exact numerics (bf16 reproduces torch bit-for-bit): logits at the first and last
//! prompt positions, 20 greedy tokens, the router's choices and weights per layer and token,
//! and the batched case. `parity_fast.rs` holds the fast kernels to stated tolerances.

use moe_kernels::cpu::{set_numerics, Numerics};
use moe_tests::parity_check::{check_fixture as check, Tolerance};

/// Every test here runs with the torch-exact kernels (the whole binary).
fn check_fixture(name: &str, tol: Tolerance) {
    set_numerics(Numerics::TorchExact);
    check(name, tol);
}

const F32: Tolerance = Tolerance {
    logits: 1e-4,
    exact_routing: true,
};
/// bf16 logits of magnitude 4–8 are 0.03 apart; the CPU kernels reproduce torch's rounding,
/// so routing and greedy tokens are held exactly too.
const BF16: Tolerance = Tolerance {
    logits: 2e-2,
    exact_routing: true,
};

#[test]
fn mixtral() {
    check_fixture("mixtral", F32);
}

#[test]
fn mixtral_bf16() {
    check_fixture("mixtral-bf16", BF16);
}

#[test]
fn qwen2_moe() {
    check_fixture("qwen2_moe", F32);
}

#[test]
fn qwen2_moe_normtopk() {
    check_fixture("qwen2_moe-normtopk", F32);
}

#[test]
fn qwen3_moe() {
    check_fixture("qwen3_moe", F32);
}

#[test]
fn qwen3_moe_bf16() {
    check_fixture("qwen3_moe-bf16", BF16);
}

#[test]
fn qwen3_moe_nonorm() {
    check_fixture("qwen3_moe-nonorm", F32);
}

#[test]
fn olmoe() {
    check_fixture("olmoe", F32);
}

#[test]
fn olmoe_normtopk() {
    check_fixture("olmoe-normtopk", F32);
}

#[test]
fn llama() {
    check_fixture("llama", F32);
}

#[test]
fn llama_tied() {
    check_fixture("llama-tied", F32);
}

#[test]
fn qwen3() {
    check_fixture("qwen3", F32);
}

#[test]
fn gpt_oss() {
    check_fixture("gpt_oss", F32);
}

#[test]
fn granitemoe() {
    check_fixture("granitemoe", F32);
}

#[test]
fn phimoe() {
    check_fixture("phimoe", F32);
}

#[test]
fn deepseek_v2() {
    check_fixture("deepseek_v2", F32);
}

#[test]
fn deepseek_v2_lite() {
    check_fixture("deepseek_v2-lite", F32);
}

#[test]
fn deepseek_v3() {
    check_fixture("deepseek_v3", F32);
}

#[test]
fn deepseek_v3_nonorm() {
    check_fixture("deepseek_v3-nonorm", F32);
}
