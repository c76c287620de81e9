//! Parity of the fast CPU kernels (`Numerics::Fast`, the default) with transformers.
//!
//! The fast kernels sum in a different order than torch and round once per projection, so in
//! bf16 they are not bit-exact: logits are held to a tolerance, and the greedy tokens and
//! routing to exact equality only where stated. Tolerances are a few bf16 ulps at the logits'
//! magnitude (4–8, ulp 0.03); they fail when a kernel is wrong (a wrong expert or a missing
//! bias moves logits by whole units).

use moe_kernels::cpu::{set_numerics, Numerics};
use moe_tests::parity_check::{check_fixture as check, Tolerance};

fn check_fixture(name: &str, tol: Tolerance) {
    set_numerics(Numerics::Fast);
    check(name, tol);
}

/// bf16 with the fast kernels: logits within 0.1 (≈3 ulps at magnitude 4–8).
const FAST_BF16: Tolerance = Tolerance {
    logits: 0.1,
    exact_routing: false,
};

/// f32 with the grouped expert kernel: only the summation order differs.
const FAST_F32: Tolerance = Tolerance {
    logits: 1e-4,
    exact_routing: true,
};

#[test]
fn qwen3_moe_bf16_fast() {
    check_fixture("qwen3_moe-bf16", FAST_BF16);
}

#[test]
fn mixtral_bf16_fast() {
    check_fixture("mixtral-bf16", FAST_BF16);
}

#[test]
fn qwen3_moe_f32_fast() {
    check_fixture("qwen3_moe", FAST_F32);
}

#[test]
fn gpt_oss_f32_fast() {
    check_fixture("gpt_oss", FAST_F32);
}
