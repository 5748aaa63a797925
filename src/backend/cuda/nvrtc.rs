//! Owns compiling `KERNELS_CU` with NVRTC: `compile_kernels`, `compile_source`, `arch_name`.
//! Layer: backend — may import the ground, linalg and, in this folder, mod.rs (`KERNELS_CU`).
//!
//! Compiling [`KERNELS_CU`](super::KERNELS_CU) with NVRTC: at run time for the GPU found
//! ([`Gpu::new`](super::Gpu::new)), and to PTX for sm_90 on CPU-only machines (the test
//! tests/it/cuda_ptx.rs), through the same function, so a kernel that does not compile fails
//! before it reaches a GPU.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::error::{Error, Result};

/// What to tell a user whose NVRTC library cannot be loaded.
pub const NVRTC_HELP: &str = "the NVRTC library (libnvrtc.so.13 and libnvrtc-builtins.so.13) \
    was not found: run `scripts/gpu/cuda-toolkit.sh nvrtc` and add the folder it prints to \
    LD_LIBRARY_PATH (or point LD_LIBRARY_PATH at a CUDA 13 toolkit's lib64)";

/// Whether the NVRTC library can be loaded (always true when it is linked, feature `cuda`).
pub fn nvrtc_available() -> bool {
    #[cfg(not(feature = "cuda"))]
    {
        // SAFETY: only tries to dlopen the library by its candidate names.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }
    #[cfg(feature = "cuda")]
    {
        true
    }
}

/// The NVRTC virtual/real architecture name for a compute capability, e.g. (9, 0) → "sm_90".
pub fn arch_name(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (10, 3) => "sm_103",
        (12, 0) => "sm_120",
        (12, 1) => "sm_121",
        _ => {
            return Err(Error::Cuda(format!(
                "compute capability {major}.{minor} is not supported by the kernels \
                 (supported: 7.0 to 12.1; the TF32 mode needs 8.0 or newer)"
            )))
        }
    })
}

/// Compiles every kernel for `arch` (e.g. "sm_90") to PTX. The error carries NVRTC's log,
/// which names the line of kernels.cu that failed.
pub fn compile_kernels(arch: &'static str) -> Result<Ptx> {
    compile_source(super::KERNELS_CU, "kernels.cu", arch)
}

/// Compiles CUDA C `src` (named `name` in NVRTC's messages) for `arch` with the options the
/// kernels use.
pub fn compile_source(src: &str, name: &str, arch: &'static str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(Error::Cuda(NVRTC_HELP.into()));
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(name.into()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts).map_err(|e| {
        let detail = match &e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        Error::Cuda(format!("compiling {name} for {arch} failed:\n{detail}"))
    })
}
