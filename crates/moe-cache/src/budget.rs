//! `--expert-budget`: bytes (`12GiB`, `512MB`, `1000000`) or a share of all routed-expert bytes
//! (`40%`).

use std::fmt;
use std::str::FromStr;

use moe_core::Error;

/// How much host RAM routed experts may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertBudget {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A percentage (0 < p ≤ 100) of the bytes of all routed experts as held in RAM (the
    /// compute dtype, or int8 with `--expert-dtype q8`).
    Percent(f64),
}

impl ExpertBudget {
    /// The budget in bytes for a model whose routed experts take `total_expert_bytes` in RAM
    /// (a percentage rounds down).
    pub fn resolve(&self, total_expert_bytes: u64) -> u64 {
        match *self {
            ExpertBudget::Bytes(b) => b,
            ExpertBudget::Percent(p) => ((total_expert_bytes as f64) * p / 100.0).floor() as u64,
        }
    }
}

impl fmt::Display for ExpertBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpertBudget::Bytes(b) => write!(f, "{b} bytes"),
            ExpertBudget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for ExpertBudget {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let s = text.trim();
        let bad = |why: &str| {
            Error::InvalidRequest(format!(
                "--expert-budget `{text}`: {why} (write e.g. 12GiB, 512MB, 1000000 or 40%)"
            ))
        };
        if let Some(number) = s.strip_suffix('%') {
            let p: f64 = number.trim().parse().map_err(|_| bad("not a number"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad("a percentage must be above 0 and at most 100"));
            }
            return Ok(ExpertBudget::Percent(p));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "m" | "mb" => 1000_u64.pow(2),
            "g" | "gb" => 1000_u64.pow(3),
            "t" | "tb" => 1000_u64.pow(4),
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(bad("unknown unit")),
        };
        let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
        let bytes = value * multiplier as f64;
        if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(bad("the budget must be at least one byte"));
        }
        Ok(ExpertBudget::Bytes(bytes.floor() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bytes_and_units() {
        let b = |s: &str| s.parse::<ExpertBudget>().unwrap();
        assert_eq!(b("12GiB"), ExpertBudget::Bytes(12 << 30));
        assert_eq!(b("12 gib"), ExpertBudget::Bytes(12 << 30));
        assert_eq!(b("512MB"), ExpertBudget::Bytes(512_000_000));
        assert_eq!(b("1.5KiB"), ExpertBudget::Bytes(1536));
        assert_eq!(b("1000000"), ExpertBudget::Bytes(1_000_000));
        assert_eq!(b("64B"), ExpertBudget::Bytes(64));
        assert_eq!(b("2T"), ExpertBudget::Bytes(2_000_000_000_000));
    }

    #[test]
    fn parses_percent() {
        let b = |s: &str| s.parse::<ExpertBudget>().unwrap();
        assert_eq!(b("40%"), ExpertBudget::Percent(40.0));
        assert_eq!(b(" 12.5 %"), ExpertBudget::Percent(12.5));
        assert_eq!(b("100%"), ExpertBudget::Percent(100.0));
        assert_eq!(ExpertBudget::Percent(40.0).resolve(1000), 400);
        assert_eq!(ExpertBudget::Percent(33.3).resolve(10), 3);
        assert_eq!(ExpertBudget::Bytes(7).resolve(1000), 7);
    }

    #[test]
    fn rejects_nonsense() {
        for s in [
            "", "%", "0%", "101%", "-5%", "abc", "12XB", "0", "0.1", "GiB", "1e3", "-1GiB",
        ] {
            let err = s.parse::<ExpertBudget>().unwrap_err().to_string();
            assert!(err.contains("--expert-budget"), "{s}: {err}");
            assert!(!err.contains('\n'), "{s}: one line: {err}");
        }
    }
}
