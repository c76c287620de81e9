//! Launchers of the CUDA kernels in `kernels/` (compiled by build.rs, embedded as PTX and
//! cubins) through cudarc. Only built with the `cuda` feature; [`crate::fused`] is the API
//! the rest of the workspace calls. Each launcher mirrors what `kernels/shim_tests/harness.cpp`
//! does on the CPU: same grids, same argument order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Result, Shape, Storage, Tensor};

use crate::fused::{decode_rows_per_block, gemm_tile_for, TopKParams, DECODE_MAX_TOKENS};

/// One compiled kernel file: its PTX (compute_80) and its cubins by SM version.
pub struct KernelModule {
    /// File stem, e.g. `moe_topk`.
    pub name: &'static str,
    /// Portable PTX, JIT-compiled where no cubin matches.
    pub ptx: &'static str,
    /// `(sm, cubin)` pairs, e.g. `(90, ..)`.
    pub cubins: &'static [(u32, &'static [u8])],
}

include!(concat!(env!("OUT_DIR"), "/moe_kernels_cuda.rs"));

type ModuleCache = Mutex<HashMap<(usize, &'static str), Arc<CudaModule>>>;

/// The kernel `name` of kernel file `module`, loaded once per device: the cubin of the
/// device's SM version when there is one, else the PTX.
fn function(dev: &CudaDevice, module: &str, name: &str) -> Result<CudaFunction> {
    static CACHE: std::sync::OnceLock<ModuleCache> = std::sync::OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let Some(m) = MODULES.iter().find(|m| m.name == module) else {
        bail!("moe-kernels: no kernel file {module}")
    };
    let key = (ctx.ordinal(), m.name);
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    let loaded = match cache.get(&key) {
        Some(l) => l.clone(),
        None => {
            let (major, minor) = ctx.compute_capability().w()?;
            let sm = (major * 10 + minor) as u32;
            let image = match m.cubins.iter().find(|(a, _)| *a == sm) {
                Some((_, cubin)) => Ptx::from_binary(cubin.to_vec()),
                None => Ptx::from_src(m.ptx),
            };
            let l = ctx.load_module(image).w()?;
            cache.insert(key, l.clone());
            l
        }
    };
    loaded.load_function(name).w()
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("moe-kernels: no CUDA kernel for {d:?}"),
    })
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => bail!("moe-kernels: expected a CUDA tensor, got one on {d:?}"),
    }
}

fn wrap<T: CudaDType + DeviceRepr>(
    s: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// A device pointer argument, or a null pointer for an absent optional input.
const NULL: u64 = 0;

/// Binds `$view` to a contiguous `CudaView<$ty>` of tensor `$t` (kept alive by `$guard`).
macro_rules! view {
    ($t:expr, $ty:ty, $guard:ident, $view:ident) => {
        let ($guard, layout) = $t.storage_and_layout();
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            bail!("moe-kernels: {} must be contiguous", stringify!($t))
        };
        let $view = match &*$guard {
            Storage::Cuda(cs) => cs.as_cuda_slice::<$ty>()?.slice(o1..o2),
            _ => bail!("moe-kernels: {} is not on the GPU", stringify!($t)),
        };
    };
}

/// Top-k gating on the GPU: `(ids [n, k] u32, weights [n, k] f32)`.
pub fn route(logits: &Tensor, bias: Option<&Tensor>, p: &TopKParams) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(logits)?;
    let logits = logits.contiguous()?;
    let (n_tokens, n_experts) = logits.dims2()?;
    let k = p.top_k;
    let ids = dev.alloc_zeros::<u32>(n_tokens * k)?;
    let weights = dev.alloc_zeros::<f32>(n_tokens * k)?;
    if n_tokens > 0 {
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.contiguous())
            .transpose()?;
        let func = function(
            &dev,
            "moe_topk",
            &format!("moe_topk_{}", suffix(logits.dtype())?),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (n_tokens as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: p.smem_bytes(n_experts) as u32,
        };
        fn go<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
            dev: &CudaDevice,
            func: &CudaFunction,
            cfg: LaunchConfig,
            logits: &Tensor,
            bias: Option<&Tensor>,
            out: (&CudaSlice<f32>, &CudaSlice<u32>),
            n_experts: usize,
            p: &TopKParams,
        ) -> Result<()> {
            view!(logits, T, lg, x);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&x);
            let bias_guard;
            let bias_view;
            match bias {
                Some(t) => {
                    bias_guard = t.storage_and_layout();
                    let Some((o1, o2)) = bias_guard.1.contiguous_offsets() else {
                        bail!("moe-kernels: the routing bias must be contiguous")
                    };
                    bias_view = match &*bias_guard.0 {
                        Storage::Cuda(cs) => cs.as_cuda_slice::<f32>()?.slice(o1..o2),
                        _ => bail!("moe-kernels: the routing bias is not on the GPU"),
                    };
                    b.arg(&bias_view);
                }
                None => {
                    b.arg(&NULL);
                }
            }
            let ints = [
                n_experts as i32,
                p.top_k as i32,
                p.scoring,
                p.renormalize as i32,
            ];
            b.arg(out.0).arg(out.1);
            for v in &ints {
                b.arg(v);
            }
            b.arg(&p.renorm_eps).arg(&p.scale);
            b.arg(&p.n_group).arg(&p.topk_group).arg(&p.group_score);
            unsafe { b.launch(cfg) }.w()?;
            drop(lg);
            Ok(())
        }
        let out = (&weights, &ids);
        let bias = bias.as_ref();
        match logits.dtype() {
            DType::F32 => go::<f32>(&dev, &func, cfg, &logits, bias, out, n_experts, p)?,
            DType::F16 => go::<half::f16>(&dev, &func, cfg, &logits, bias, out, n_experts, p)?,
            _ => go::<half::bf16>(&dev, &func, cfg, &logits, bias, out, n_experts, p)?,
        }
    }
    Ok((
        wrap(ids, &dev, (n_tokens, k)),
        wrap(weights, &dev, (n_tokens, k)),
    ))
}

/// Device buffers of `moe_align` (see `kernels/moe_align.cu` and [`crate::AlignedGroups`]).
struct Aligned {
    sorted_pairs: CudaSlice<u32>,
    tile_expert: CudaSlice<i32>,
    pair_slot: CudaSlice<i32>,
    capacity: usize,
}

fn align(
    dev: &CudaDevice,
    ids: &CudaSlice<u32>,
    n_pairs: usize,
    n_experts: usize,
    tile: usize,
) -> Result<Aligned> {
    let capacity = crate::align_capacity(n_pairs, n_experts, tile);
    let offsets = dev.alloc_zeros::<i32>(n_experts + 1)?;
    let a = Aligned {
        sorted_pairs: dev.alloc_zeros::<u32>(capacity)?,
        tile_expert: dev.alloc_zeros::<i32>(capacity / tile)?,
        pair_slot: dev.alloc_zeros::<i32>(n_pairs)?,
        capacity,
    };
    let func = function(dev, "moe_align", "moe_align")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    let (np, ne, t) = (n_pairs as i32, n_experts as i32, tile as i32);
    b.arg(ids).arg(&np).arg(&ne).arg(&t);
    b.arg(&offsets)
        .arg(&a.sorted_pairs)
        .arg(&a.tile_expert)
        .arg(&a.pair_slot);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: ((2 * n_experts + 2) * 4) as u32,
    };
    unsafe { b.launch(cfg) }.w()?;
    Ok(a)
}

/// Stacked expert weights as device views, in the order the kernels take them.
pub struct ExpertTensors<'a> {
    /// `[slots, inter, hidden]`
    pub gate: &'a Tensor,
    /// `[slots, inter, hidden]`
    pub up: &'a Tensor,
    /// `[slots, hidden, inter]`
    pub down: &'a Tensor,
    /// `[slots, inter]`, `[slots, inter]`, `[slots, hidden]`, all or none.
    pub biases: Option<(&'a Tensor, &'a Tensor, &'a Tensor)>,
    /// `[n_experts]` i32 slot of each expert, or `None` for the identity.
    pub expert_slot: Option<&'a Tensor>,
    /// 0: SiLU-GLU, 1: GPT-OSS's clamped SwiGLU.
    pub act: i32,
    /// `(alpha, limit)` of the clamped activation.
    pub act_params: (f32, f32),
}

/// The routed experts of a layer plus the weighted combine on the GPU: decode kernels for
/// up to [`DECODE_MAX_TOKENS`] tokens (and for f32, chunk by chunk), else the grouped
/// tensor-core GEMM with the combine fused into its epilogue. `x` `[n, hidden]`,
/// `ids`/`weights` `[n, k]`; returns `[n, hidden]` in `x`'s dtype.
pub fn moe_experts(
    x: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    e: &ExpertTensors,
    n_experts: usize,
) -> Result<Tensor> {
    let (n_tokens, hidden) = x.dims2()?;
    let (_, top_k) = ids.dims2()?;
    let inter = e.gate.dim(1)?;
    if n_tokens == 0 {
        return Tensor::zeros((0, hidden), x.dtype(), x.device());
    }
    if n_tokens <= DECODE_MAX_TOKENS {
        return decode(x, ids, weights, e, hidden, inter, top_k);
    }
    if x.dtype() == DType::F32 {
        // no f32 tensor-core path: stream the experts once per chunk of tokens
        let mut parts = Vec::new();
        for start in (0..n_tokens).step_by(DECODE_MAX_TOKENS) {
            let len = DECODE_MAX_TOKENS.min(n_tokens - start);
            parts.push(decode(
                &x.narrow(0, start, len)?,
                &ids.narrow(0, start, len)?,
                &weights.narrow(0, start, len)?,
                e,
                hidden,
                inter,
                top_k,
            )?);
        }
        return Tensor::cat(&parts, 0);
    }
    grouped(x, ids, weights, e, n_experts, hidden, inter, top_k)
}

/// Pushes the optional pointer `$opt` (a `Option<&Tensor>` of element type `$ty`).
macro_rules! opt_arg {
    ($b:ident, $opt:expr, $ty:ty, $guard:ident, $view:ident) => {
        let $guard = $opt.map(|t| t.storage_and_layout());
        let $view = match &$guard {
            Some((s, l)) => match &**s {
                Storage::Cuda(cs) => {
                    let (o1, o2) = l
                        .contiguous_offsets()
                        .expect("contiguous (checked by the caller)");
                    Some(cs.as_cuda_slice::<$ty>()?.slice(o1..o2))
                }
                _ => bail!("moe-kernels: an expert tensor is not on the GPU"),
            },
            None => None,
        };
        match &$view {
            Some(v) => {
                $b.arg(v);
            }
            None => {
                $b.arg(&NULL);
            }
        }
    };
}

fn decode(
    x: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    e: &ExpertTensors,
    hidden: usize,
    inter: usize,
    top_k: usize,
) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (x, ids, weights) = (x.contiguous()?, ids.contiguous()?, weights.contiguous()?);
    let n_tokens = x.dim(0)?;
    let n_pairs = n_tokens * top_k;
    let sfx = suffix(x.dtype())?;
    let rows = decode_rows_per_block();
    fn go<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        dev: &CudaDevice,
        sfx: &str,
        x: &Tensor,
        ids: &Tensor,
        weights: &Tensor,
        e: &ExpertTensors,
        dims: (usize, usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let (n_tokens, top_k, hidden, inter, rows) = dims;
        let n_pairs = n_tokens * top_k;
        let inter_buf = dev.alloc_zeros::<T>(n_pairs * inter)?;
        let y = dev.alloc_zeros::<T>(n_pairs * hidden)?;
        let out = dev.alloc_zeros::<T>(n_tokens * hidden)?;
        let stream = dev.cuda_stream();
        view!(x, T, xg, xv);
        view!(ids, u32, ig, idv);
        view!(weights, f32, wg, wv);
        view!(e.gate, T, gg, gv);
        view!(e.up, T, ug, uv);
        view!(e.down, T, dg, dv);
        let (np, k, ni, nh, rpb) = (
            n_pairs as i32,
            top_k as i32,
            inter as i32,
            hidden as i32,
            rows as i32,
        );
        let (act, (alpha, limit)) = (e.act, e.act_params);
        {
            let f = function(dev, "moe_decode", &format!("moe_decode_gate_up_{sfx}"))?;
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&gv).arg(&uv);
            opt_arg!(b, e.biases.map(|b| b.0), T, bg_g, bg_v);
            opt_arg!(b, e.biases.map(|b| b.1), T, bu_g, bu_v);
            opt_arg!(b, e.expert_slot, i32, s_g, s_v);
            b.arg(&idv).arg(&np).arg(&k).arg(&ni).arg(&nh).arg(&rpb);
            b.arg(&act).arg(&alpha).arg(&limit).arg(&inter_buf);
            let cfg = LaunchConfig {
                grid_dim: (inter.div_ceil(rows) as u32, n_pairs as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
        }
        {
            let f = function(dev, "moe_decode", &format!("moe_decode_down_{sfx}"))?;
            let mut b = stream.launch_builder(&f);
            b.arg(&inter_buf).arg(&dv);
            opt_arg!(b, e.biases.map(|b| b.2), T, bd_g, bd_v);
            opt_arg!(b, e.expert_slot, i32, s_g, s_v);
            b.arg(&idv).arg(&np).arg(&nh).arg(&ni).arg(&rpb).arg(&y);
            let cfg = LaunchConfig {
                grid_dim: (hidden.div_ceil(rows) as u32, n_pairs as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
        }
        combine_launch::<T>(dev, sfx, &y, None, &idv, &wv, n_tokens, top_k, hidden, &out)?;
        drop((xg, ig, wg, gg, ug, dg));
        Ok(wrap(out, dev, (n_tokens, hidden)))
    }
    let dims = (n_tokens, top_k, hidden, inter, rows);
    let _ = n_pairs;
    match x.dtype() {
        DType::F32 => go::<f32>(&dev, sfx, &x, &ids, &weights, e, dims),
        DType::F16 => go::<half::f16>(&dev, sfx, &x, &ids, &weights, e, dims),
        _ => go::<half::bf16>(&dev, sfx, &x, &ids, &weights, e, dims),
    }
}

#[allow(clippy::too_many_arguments)]
fn combine_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    sfx: &str,
    y: &CudaSlice<T>,
    pair_row: Option<&CudaSlice<i32>>,
    ids: &candle_core::cuda_backend::cudarc::driver::CudaView<u32>,
    weights: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
    n_tokens: usize,
    top_k: usize,
    hidden: usize,
    out: &CudaSlice<T>,
) -> Result<()> {
    let f = function(dev, "moe_combine", &format!("moe_combine_{sfx}"))?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(y);
    match pair_row {
        Some(p) => b.arg(p),
        None => b.arg(&NULL),
    };
    let (k, h) = (top_k as i32, hidden as i32);
    b.arg(ids).arg(weights).arg(&k).arg(&h).arg(out);
    let cfg = LaunchConfig {
        grid_dim: (n_tokens as u32, 1, 1),
        block_dim: (hidden.clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn grouped(
    x: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    e: &ExpertTensors,
    n_experts: usize,
    hidden: usize,
    inter: usize,
    top_k: usize,
) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (x, ids, weights) = (x.contiguous()?, ids.contiguous()?, weights.contiguous()?);
    let n_tokens = x.dim(0)?;
    let n_pairs = n_tokens * top_k;
    let tile = gemm_tile_for(n_pairs, n_experts);
    let sfx = suffix(x.dtype())?;
    let name = |stage: &str| {
        format!(
            "moe_gemm_{stage}_{sfx}_m{}n{}k{}",
            tile.bm, tile.bn, tile.bk
        )
    };
    let ids_flat = {
        view!(ids, u32, ig, idv);
        let mut copy = dev.alloc_zeros::<u32>(n_pairs)?;
        dev.cuda_stream().memcpy_dtod(&idv, &mut copy).w()?;
        drop(ig);
        copy
    };
    let a = align(&dev, &ids_flat, n_pairs, n_experts, tile.bm)?;
    let acc = dev.alloc_zeros::<f32>(n_tokens * hidden)?;
    fn go<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        dev: &CudaDevice,
        names: (String, String),
        x: &Tensor,
        weights: &Tensor,
        e: &ExpertTensors,
        a: &Aligned,
        acc: &CudaSlice<f32>,
        dims: (usize, usize, usize, usize, crate::fused::GemmTile),
    ) -> Result<()> {
        let (n_pairs, top_k, hidden, inter, tile) = dims;
        let inter_buf = dev.alloc_zeros::<T>(a.capacity * inter)?;
        let stream = dev.cuda_stream();
        view!(x, T, xg, xv);
        view!(weights, f32, wg, wv);
        view!(e.gate, T, gg, gv);
        view!(e.up, T, ug, uv);
        view!(e.down, T, dg, dv);
        let (np, k, ni, nh) = (n_pairs as i32, top_k as i32, inter as i32, hidden as i32);
        let (act, (alpha, limit)) = (e.act, e.act_params);
        let threads = (tile.warps_m * tile.warps_n * 32) as u32;
        let m_tiles = (a.capacity / tile.bm) as u32;
        {
            let f = function(dev, "moe_expert_gemm", &names.0)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&gv).arg(&uv);
            opt_arg!(b, e.biases.map(|b| b.0), T, bg_g, bg_v);
            opt_arg!(b, e.biases.map(|b| b.1), T, bu_g, bu_v);
            opt_arg!(b, e.expert_slot, i32, s_g, s_v);
            b.arg(&a.sorted_pairs)
                .arg(&a.tile_expert)
                .arg(&np)
                .arg(&k)
                .arg(&ni)
                .arg(&nh);
            b.arg(&act).arg(&alpha).arg(&limit).arg(&inter_buf);
            let cfg = LaunchConfig {
                grid_dim: (inter.div_ceil(tile.bn) as u32, m_tiles, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
        }
        {
            let f = function(dev, "moe_expert_gemm", &names.1)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&inter_buf).arg(&dv);
            opt_arg!(b, e.biases.map(|b| b.2), T, bd_g, bd_v);
            opt_arg!(b, e.expert_slot, i32, s_g, s_v);
            b.arg(&a.sorted_pairs)
                .arg(&a.tile_expert)
                .arg(&wv)
                .arg(&np)
                .arg(&k)
                .arg(&nh)
                .arg(&ni);
            b.arg(acc).arg(&NULL);
            let cfg = LaunchConfig {
                grid_dim: (hidden.div_ceil(tile.bn) as u32, m_tiles, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
        }
        drop((xg, wg, gg, ug, dg));
        Ok(())
    }
    let names = (name("gate_up"), name("down"));
    let dims = (n_pairs, top_k, hidden, inter, tile);
    match x.dtype() {
        DType::F16 => go::<half::f16>(&dev, names, &x, &weights, e, &a, &acc, dims)?,
        DType::BF16 => go::<half::bf16>(&dev, names, &x, &weights, e, &a, &acc, dims)?,
        d => bail!("moe-kernels: the grouped GEMM takes bf16/f16, not {d:?}"),
    }
    let _ = &a.pair_slot; // used by the unfused path (GPU test)
    wrap(acc, &dev, (n_tokens, hidden)).to_dtype(x.dtype())
}
