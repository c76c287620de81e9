//! Glue between candle tensors and the slice kernels of this module: borrow a contiguous CPU
//! tensor's elements without copying, and the tensor-level entry points the model blocks
//! call ([`fast_matmul_nt`], [`fast_matmul_nt_panels`], [`fast_grouped_experts`]).

use std::borrow::Borrow;

use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use half::bf16;
use moe_core::{Error, Result};

use super::bf16_round::to_bf16_vec;
use super::gemm::{matmul_nt_into, PreparedRows, StoreSink};
use super::gemm_panels::{matmul_nt_panels, Bf16Panels};
use super::moe_ffn::{grouped_expert_ffn, ExpertSlices};
use super::q8::ScaledSink;
use super::shared::SharedMut;
use super::weights::WeightElem;
use crate::expert_ffn::{ExpertActivation, ExpertWeights};
use crate::expert_q8::as_i8;
use crate::grouping::ExpertGroups;

/// The elements of a contiguous CPU tensor, borrowed from its storage guard.
pub(crate) fn slice_of<'g, T: WithDType>(storage: &'g Storage, layout: &Layout) -> Option<&'g [T]> {
    let Storage::Cpu(cpu) = storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    cpu.as_slice::<T>().ok().map(|s| &s[start..end])
}

/// A tensor's values as an f32 vector (a copy; activations are small). Contiguous bf16/f32
/// CPU tensors are widened here on the calling thread (candle's conversion would start a
/// parallel op for a few thousand elements).
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    {
        let (storage, layout) = t.storage_and_layout();
        match t.dtype() {
            DType::BF16 => {
                if let Some(s) = slice_of::<bf16>(&storage, layout) {
                    return Ok(s.iter().map(|v| WeightElem::to_f32(*v)).collect());
                }
            }
            DType::F32 => {
                if let Some(s) = slice_of::<f32>(&storage, layout) {
                    return Ok(s.to_vec());
                }
            }
            _ => {}
        }
    }
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// An f32 result as a CPU tensor of `dtype` (bf16 rounded here, once per element).
pub fn from_f32_vec(v: Vec<f32>, dims: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(match dtype {
        DType::BF16 => {
            let v: Vec<bf16> = to_bf16_vec(&v);
            Tensor::from_vec(v, dims, device)?
        }
        _ => Tensor::from_vec(v, dims, device)?.to_dtype(dtype)?,
    })
}

/// `a · bᵀ (+ bias)` for bf16 or f32 `b` (`[n, k]`, or `[.., n, k]` with `a`'s leading dims)
/// on the CPU with the fast kernels; the result has `a`'s dtype, rounded once.
pub fn fast_matmul_nt(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match b.dtype() {
        DType::BF16 => matmul_nt_typed::<bf16>(a, b, bias),
        DType::F32 => matmul_nt_typed::<f32>(a, b, bias),
        dt => Err(Error::InvalidRequest(format!(
            "fast matmul: weights in {dt:?}"
        ))),
    }
}

fn matmul_nt_typed<W: WeightElem + WithDType>(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let b = b.contiguous()?;
    let (storage, layout) = b.storage_and_layout();
    let w: &[W] = slice_of(&storage, layout)
        .ok_or_else(|| Error::InvalidRequest("fast matmul: weights not on the CPU".into()))?;
    matmul_nt_slice(a, w, b.dims(), None, bias)
}

/// `a · (diag(scales) · q)ᵀ (+ bias)` for int8 weights `q` `[n, k]` (the bit patterns in a
/// `U8` CPU tensor) with one f32 scale per row: each finished dot product is scaled, then the
/// bias is added, then the result is rounded once to `a`'s dtype.
pub fn fast_matmul_nt_q8(
    a: &Tensor,
    q: &Tensor,
    scales: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, _) = q.dims2()?;
    let scales = to_f32_vec(scales)?;
    if scales.len() != n {
        return Err(Error::InvalidRequest(format!(
            "int8 matmul: {} scales for {n} rows",
            scales.len()
        )));
    }
    let q = q.contiguous()?;
    let (storage, layout) = q.storage_and_layout();
    let bits: &[u8] = slice_of(&storage, layout).ok_or_else(|| {
        Error::InvalidRequest("int8 matmul: weights are not U8 values on the CPU".into())
    })?;
    matmul_nt_slice(a, as_i8(bits), q.dims(), Some(&scales), bias)
}

/// `a · Wᵀ (+ bias)` for a bf16 matrix `W` stored as panels ([`Bf16Panels`]): every leading
/// dim of `a` (`[.., k]`) is a row; the result has `a`'s dtype, rounded once.
pub fn fast_matmul_nt_panels(a: &Tensor, w: &Bf16Panels, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims();
    let mut dims = a.dims().to_vec();
    if dims.last() != Some(&k) {
        return Err(Error::InvalidRequest(format!(
            "matmul: shapes {dims:?} and [{n}, {k}] (transposed) do not multiply"
        )));
    }
    let m = a.elem_count() / k;
    let av = to_f32_vec(a)?;
    let bias = bias.map(to_f32_vec).transpose()?;
    let mut out = vec![0f32; m * n];
    {
        let shared = SharedMut::new(&mut out);
        let sink = StoreSink::new(&shared, n, 0, bias.as_deref());
        matmul_nt_panels(&PreparedRows::new(&av, m, k), w, &sink);
    }
    *dims.last_mut().expect("checked above") = n;
    from_f32_vec(out, &dims, a.dtype(), a.device())
}

/// The shared body of the fast products: `w` holds the elements of a `b_dims`-shaped weight
/// tensor (`[n, k]`, or `[.., n, k]` with `a`'s leading dims), `scales` one factor per weight
/// row when the weights are scaled int8.
fn matmul_nt_slice<W: WeightElem>(
    a: &Tensor,
    w: &[W],
    b_dims: &[usize],
    scales: Option<&[f32]>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let a_dims = a.dims().to_vec();
    let (ar, br) = (a_dims.len(), b_dims.len());
    if ar < 2 || br < 2 || a_dims[ar - 1] != b_dims[br - 1] {
        return Err(Error::InvalidRequest(format!(
            "matmul: shapes {a_dims:?} and {b_dims:?} (transposed) do not multiply"
        )));
    }
    let (m, k, n) = (a_dims[ar - 2], a_dims[ar - 1], b_dims[br - 2]);
    let batch: usize = a_dims[..ar - 2].iter().product();
    let shared_b = br == 2;
    if !shared_b && b_dims[..br - 2] != a_dims[..ar - 2] {
        return Err(Error::InvalidRequest(format!(
            "matmul: batch dims of {a_dims:?} and {b_dims:?} differ"
        )));
    }
    let av = to_f32_vec(a)?;
    let bias = bias.map(to_f32_vec).transpose()?;
    let mut out = vec![0f32; batch * m * n];
    {
        let shared = SharedMut::new(&mut out);
        for i in 0..batch {
            let wi = if shared_b {
                w
            } else {
                &w[i * n * k..(i + 1) * n * k]
            };
            let sink = StoreSink::new(&shared, n, i * m, bias.as_deref());
            let x = &av[i * m * k..(i + 1) * m * k];
            match scales {
                None => matmul_nt_into(x, m, k, wi, n, &sink),
                Some(scales) => {
                    let sink = ScaledSink {
                        inner: &sink,
                        scales,
                    };
                    matmul_nt_into(x, m, k, wi, n, &sink)
                }
            }
        }
    }
    let mut dims = a_dims;
    dims[ar - 1] = n;
    from_f32_vec(out, &dims, a.dtype(), a.device())
}

/// The routed experts of a layer with the grouped CPU kernel ([`grouped_expert_ffn`]):
/// `x` `[n_tokens, hidden]`, `experts[i]` the weights of the i-th active expert of `groups`.
/// Returns the weighted sum `[n_tokens, hidden]` in `x`'s dtype, or `None` when the kernel
/// does not apply (not the CPU, weights neither bf16, f32 nor int8, or not contiguous).
pub fn fast_grouped_experts<E: Borrow<ExpertWeights>>(
    x: &Tensor,
    groups: &ExpertGroups,
    experts: &[E],
    activation: ExpertActivation,
) -> Result<Option<Tensor>> {
    let active: Vec<usize> = groups.active_experts().collect();
    assert_eq!(
        experts.len(),
        active.len(),
        "one weight set per active expert"
    );
    fast_grouped_experts_in_waves(x, groups, &active, active.len(), activation, |_| {
        Ok(experts
            .iter()
            .map(Borrow::borrow)
            .collect::<Vec<&ExpertWeights>>())
    })
}

/// [`fast_grouped_experts`] for an expert store that lets a caller hold only `wave` experts
/// at a time (a budgeted expert cache): the active experts (`active`, increasing ids) are
/// fetched with `fetch`, a wave of up to `wave` consecutive ids per call (it returns their
/// weights in the same order), and computed a wave at a time, every wave adding into one f32 output
/// that is rounded to `x`'s dtype once at the end — the same sums, in the same expert order,
/// as one call with every expert. A wave's weights are dropped before the next is fetched.
pub fn fast_grouped_experts_in_waves<W: Borrow<ExpertWeights>>(
    x: &Tensor,
    groups: &ExpertGroups,
    active: &[usize],
    wave: usize,
    activation: ExpertActivation,
    mut fetch: impl FnMut(&[usize]) -> Result<Vec<W>>,
) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || active.is_empty() {
        return Ok(None);
    }
    let (n_tokens, hidden) = x.dims2()?;
    let xv = to_f32_vec(x)?;
    let mut out = vec![0f32; n_tokens * hidden];
    for experts in active.chunks(wave.max(1)) {
        let weights = fetch(experts)?;
        if weights.len() != experts.len() {
            return Err(Error::InvalidRequest(format!(
                "grouped experts: asked for {} experts, got {}",
                experts.len(),
                weights.len()
            )));
        }
        let wave_groups;
        let groups = if experts.len() == active.len() {
            groups
        } else {
            wave_groups = groups.restricted_to(experts[0]..experts[experts.len() - 1] + 1);
            &wave_groups
        };
        let (x, out) = (&xv[..], &mut out[..]);
        let applied = match weights[0].borrow().gate.dtype() {
            DType::BF16 => {
                grouped_typed::<bf16, _, _>(x, hidden, groups, &weights, activation, out, |w| w)?
            }
            DType::F32 => {
                grouped_typed::<f32, _, _>(x, hidden, groups, &weights, activation, out, |w| w)?
            }
            // int8 experts: the bit patterns of a U8 tensor, with per-row scales.
            DType::U8 => {
                grouped_typed::<u8, _, _>(x, hidden, groups, &weights, activation, out, as_i8)?
            }
            _ => false,
        };
        if !applied {
            return Ok(None);
        }
    }
    Ok(Some(from_f32_vec(
        out,
        &[n_tokens, hidden],
        x.dtype(),
        x.device(),
    )?))
}

/// Adds the weighted outputs of `experts` (the active experts of `groups`) into `out`; false
/// when their weights are not contiguous CPU tensors of `T` with the expected sizes, or int8
/// experts and float experts are mixed. `view` reads a tensor's elements as the kernel's weight
/// type (the identity for floats, bit patterns as `i8` for int8 experts).
fn grouped_typed<T: WithDType, W: WeightElem, E: Borrow<ExpertWeights>>(
    xv: &[f32],
    hidden: usize,
    groups: &ExpertGroups,
    experts: &[E],
    activation: ExpertActivation,
    out: &mut [f32],
    view: fn(&[T]) -> &[W],
) -> Result<bool> {
    let experts: Vec<&ExpertWeights> = experts.iter().map(|e| e.borrow()).collect();
    let intermediate = experts[0].gate.dim(0)?;
    let bias = |b: &Option<Tensor>| b.as_ref().map(to_f32_vec).transpose();
    let biases = experts
        .iter()
        .map(|e| Ok((bias(&e.gate_bias)?, bias(&e.up_bias)?, bias(&e.down_bias)?)))
        .collect::<Result<Vec<_>>>()?;
    let int8 = T::DTYPE == DType::U8;
    if experts.iter().any(|e| e.is_q8() != int8) {
        return Ok(false);
    }
    let guards: Vec<_> = experts
        .iter()
        .map(|e| [&e.gate, &e.up, &e.down].map(|t| t.storage_and_layout()))
        .collect();
    let scale_guards: Vec<_> = experts
        .iter()
        .map(|e| {
            e.q8_scales
                .as_ref()
                .map(|s| [&s.gate, &s.up, &s.down].map(|t| t.storage_and_layout()))
        })
        .collect();
    let mut slices = Vec::with_capacity(experts.len());
    for ((g, sg), b) in guards.iter().zip(&scale_guards).zip(&biases) {
        let [gate, up, down] = [0, 1, 2].map(|i| slice_of::<T>(&g[i].0, g[i].1).map(view));
        let (Some(gate), Some(up), Some(down)) = (gate, up, down) else {
            return Ok(false);
        };
        if gate.len() != intermediate * hidden || up.len() != gate.len() || down.len() != gate.len()
        {
            return Ok(false);
        }
        let scales = match sg {
            None => None,
            Some(sg) => {
                let [gs, us, ds] = [0, 1, 2].map(|i| slice_of::<f32>(&sg[i].0, sg[i].1));
                match (gs, us, ds) {
                    (Some(gs), Some(us), Some(ds))
                        if gs.len() == intermediate
                            && us.len() == intermediate
                            && ds.len() == hidden =>
                    {
                        Some([gs, us, ds])
                    }
                    _ => return Ok(false),
                }
            }
        };
        slices.push(ExpertSlices {
            gate,
            up,
            down,
            gate_bias: b.0.as_deref(),
            up_bias: b.1.as_deref(),
            down_bias: b.2.as_deref(),
            scales,
        });
    }
    grouped_expert_ffn(xv, hidden, intermediate, groups, &slices, activation, out);
    Ok(true)
}
