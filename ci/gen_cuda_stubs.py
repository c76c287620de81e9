#!/usr/bin/env python3
"""No-GPU stand-ins for the CUDA libraries that candle 0.11 links (cudarc `dynamic-linking`).

Every C function declared in cudarc's `sys/mod.rs` of driver, cublas, cublasLt, curand and nvrtc
gets a stub that returns an error status, so a cuda-featured binary starts on a machine without
CUDA and `Device::new_cuda(0)` returns CUDA_ERROR_NO_DEVICE. The SONAMEs are CUDA 13's, so on a
GPU machine the same binary loads the real libraries instead.

usage: gen_cuda_stubs.py OUT_DIR [CUDARC_SRC_DIR]   (default: found through `cargo metadata`)
"""
import json
import os
import re
import subprocess
import sys

STUB_LIBS = {  # cudarc module -> (SONAME, error status the stubs return)
    "driver": ("libcuda.so.1", 100),  # CUDA_ERROR_NO_DEVICE
    "cublas": ("libcublas.so.13", 1),  # CUBLAS_STATUS_NOT_INITIALIZED
    "cublaslt": ("libcublasLt.so.13", 1),
    "curand": ("libcurand.so.10", 203),  # CURAND_STATUS_INITIALIZATION_FAILED
    "nvrtc": ("libnvrtc.so.13", 1),  # NVRTC_ERROR_OUT_OF_MEMORY: any non-zero will do
}
DECL = re.compile(r"pub unsafe fn (\w+)\s*\([^)]*\)\s*(?:->\s*([^{;]+?))?\s*[{;]", re.S)


def cudarc_src():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked"]))
    for pkg in meta["packages"]:
        if pkg["name"] == "cudarc":
            return os.path.join(os.path.dirname(pkg["manifest_path"]), "src")
    sys.exit("cudarc is not in the dependency graph")


def c_stub(name, ret, status):
    ret = (ret or "").strip()
    if name in ("cuGetErrorString", "cuGetErrorName"):
        return f"int {name}(int e, const char **s) {{ (void)e; *s = MSG; return 0; }}"
    if ret.startswith("*"):
        return f"const void *{name}(void) {{ return MSG; }}"
    if ret == "usize":
        return f"unsigned long {name}(void) {{ return 0; }}"
    if ret in ("", "()"):
        return f"void {name}(void) {{}}"
    return f"int {name}(void) {{ return {status}; }}"


def main():
    out = os.path.abspath(sys.argv[1])
    src = sys.argv[2] if len(sys.argv) > 2 else cudarc_src()
    os.makedirs(out, exist_ok=True)
    for module, (soname, status) in STUB_LIBS.items():
        text = open(os.path.join(src, module, "sys", "mod.rs")).read()
        body, names = ['static const char MSG[] = "CUDA stub library (no GPU)";'], set()
        for name, ret in DECL.findall(text):
            # lib()/culib() and is_*_present() are Rust-side helpers, not C symbols
            if name in names or name.endswith("lib") or name.startswith("is_"):
                continue
            names.add(name)
            body.append(c_stub(name, ret, status))
        c_file = os.path.join(out, soname + ".c")
        with open(c_file, "w") as f:
            f.write("\n".join(body) + "\n")
        so = os.path.join(out, soname)
        subprocess.check_call(["cc", "-shared", "-fPIC", "-w", f"-Wl,-soname,{soname}", "-o", so, c_file])
        os.remove(c_file)
        link = os.path.join(out, soname.split(".so")[0] + ".so")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(soname, link)
        print(f"stub {soname}: {len(names)} functions")


if __name__ == "__main__":
    main()
