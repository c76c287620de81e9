//! Choosing the device and compute dtype once, at load time. The only place that knows whether
//! this build has CUDA.

use candle_core::{DType, Device};
use moe_core::{Error, Result};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(Error::Device(format!(
                    "unknown device `{s}` (expected cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl DeviceChoice {
    /// The candle device, or a clear error when this build or machine cannot provide it.
    pub fn to_device(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => cuda_device(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| Error::Device(format!("cannot open CUDA device {ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(Error::Device(
        "this moe-infer was built without CUDA support; rebuild with `cargo build --release --features cuda`".into(),
    ))
}

/// The compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// f32 on the CPU (fastest and most exact there), the checkpoint's dtype on a GPU.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl std::str::FromStr for DtypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            _ => Err(Error::InvalidRequest(format!(
                "unknown dtype `{s}` (expected auto, f32, bf16 or f16)"
            ))),
        }
    }
}

impl DtypeChoice {
    /// Resolves `Auto` given the device and the checkpoint's dominant stored dtype.
    pub fn resolve(self, device: &Device, stored: Option<&str>) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto => match stored {
                Some("BF16") => DType::BF16,
                Some("F16") => DType::F16,
                _ => DType::F32,
            },
        }
    }
}
