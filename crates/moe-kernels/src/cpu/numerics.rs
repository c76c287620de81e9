//! Which CPU kernels compute bf16 projections: the fast ones of [`crate::cpu`] or the
//! torch-exact ones of [`crate::matmul`].
//!
//! The choice is process-wide: [`Numerics::Fast`] unless the environment variable
//! `MOE_NUMERICS=torch-exact` is set or a program calls [`set_numerics`] (the bf16 parity
//! tests do, so their bit-exact fixtures keep their meaning).

use std::sync::atomic::{AtomicU8, Ordering};

/// How bf16 (and the grouped f32 MoE) projections are computed on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numerics {
    /// The fast kernels: f32 products and sums in a SIMD-friendly order, bf16 weights widened
    /// on the fly, one rounding per output. Close to torch, not bit-equal.
    Fast,
    /// torch's CPU summation orders and roundings, bit-for-bit (slow).
    TorchExact,
}

/// 0 = not yet decided (read the environment), 1 = fast, 2 = torch-exact.
static MODE: AtomicU8 = AtomicU8::new(0);

/// The current mode (reads `MOE_NUMERICS` the first time).
pub fn numerics() -> Numerics {
    match MODE.load(Ordering::Relaxed) {
        1 => Numerics::Fast,
        2 => Numerics::TorchExact,
        _ => {
            let mode = match std::env::var("MOE_NUMERICS").as_deref() {
                Ok("torch-exact") | Ok("exact") => Numerics::TorchExact,
                _ => Numerics::Fast,
            };
            set_numerics(mode);
            mode
        }
    }
}

/// Chooses the mode for the whole process.
pub fn set_numerics(mode: Numerics) {
    let v = match mode {
        Numerics::Fast => 1,
        Numerics::TorchExact => 2,
    };
    MODE.store(v, Ordering::Relaxed);
}

impl std::str::FromStr for Numerics {
    type Err = moe_core::Error;

    /// `fast` or `torch-exact` (also `exact`), as `--numerics` and `MOE_NUMERICS` spell them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fast" => Ok(Self::Fast),
            "torch-exact" | "exact" => Ok(Self::TorchExact),
            other => Err(moe_core::Error::InvalidRequest(format!(
                "unknown numerics '{other}': expected fast or torch-exact"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_spellings() {
        assert_eq!("fast".parse::<Numerics>().unwrap(), Numerics::Fast);
        assert_eq!(
            "torch-exact".parse::<Numerics>().unwrap(),
            Numerics::TorchExact
        );
        assert!("quick"
            .parse::<Numerics>()
            .unwrap_err()
            .to_string()
            .contains("torch-exact"));
    }
}
