//! Compiles `kernels/*.cu` with nvcc when the `cuda` feature is on: portable PTX for
//! `compute_80` (JIT-compiled by the driver on any sm_80+ GPU) plus cubins for the archs in
//! `MOE_CUDA_ARCHS` (default `80,86,89,90`; empty for PTX only), and writes
//! `$OUT_DIR/moe_kernels_cuda.rs`, the table `src/cuda.rs` embeds. Does nothing without the
//! feature, so CPU builds need no CUDA toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::{env, fs, thread};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "MOE_CUDA_ARCHS", "MOE_NVCC_THREADS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let nvcc = env::var("NVCC")
        .or_else(|_| env::var("CUDA_HOME").map(|h| format!("{h}/bin/nvcc")))
        .unwrap_or_else(|_| "nvcc".into());
    let archs: Vec<u32> = env::var("MOE_CUDA_ARCHS")
        .unwrap_or_else(|_| "80,86,89,90".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .expect("MOE_CUDA_ARCHS: comma-separated numbers like 80,90")
        })
        .collect();

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let units: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().unwrap() == "cu")
        .collect();

    // one job per (kernel file, target): None = PTX, Some(arch) = cubin
    let jobs: Vec<(&PathBuf, Option<u32>)> = units
        .iter()
        .flat_map(|src| {
            std::iter::once(None)
                .chain(archs.iter().map(|&a| Some(a)))
                .map(move |t| (*src, t))
        })
        .collect();
    let queue = Mutex::new(jobs.clone().into_iter());
    let n_threads: usize = env::var("MOE_NVCC_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    thread::scope(|scope| {
        for _ in 0..n_threads.max(1) {
            scope.spawn(|| loop {
                let Some((src, target)) = queue.lock().unwrap().next() else {
                    return;
                };
                compile(&nvcc, &kernels, src, target, &out);
            });
        }
    });

    let mut table = String::from(
        "/// Every kernel file of `kernels/`, compiled by build.rs.\npub const MODULES: &[KernelModule] = &[\n",
    );
    for src in &units {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        table += &format!(
            "    KernelModule {{ name: \"{stem}\", ptx: include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\")), cubins: &["
        );
        for a in &archs {
            table += &format!(
                "({a}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.sm_{a}.cubin\"))), "
            );
        }
        table += "] },\n";
    }
    table += "];\n";
    fs::write(out.join("moe_kernels_cuda.rs"), table).unwrap();
}

fn compile(nvcc: &str, include: &Path, src: &Path, target: Option<u32>, out: &Path) {
    let stem = src.file_stem().unwrap().to_str().unwrap();
    let (kind, arch, file) = match target {
        None => (
            "-ptx",
            "-arch=compute_80".to_string(),
            out.join(format!("{stem}.ptx")),
        ),
        Some(a) => (
            "-cubin",
            format!("-arch=sm_{a}"),
            out.join(format!("{stem}.sm_{a}.cubin")),
        ),
    };
    let output = Command::new(nvcc)
        .args([kind, &arch, "-O3", "-std=c++17", "-lineinfo"])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(&file)
        .arg(src)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{nvcc}` ({e}): put nvcc on PATH or set NVCC / CUDA_HOME")
        });
    if !output.status.success() {
        panic!(
            "nvcc {kind} {arch} failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
