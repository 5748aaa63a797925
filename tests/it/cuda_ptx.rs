//! Every CUDA kernel compiles to PTX for sm_90 (H100/H200) through the code path the GPU run
//! uses (`compile_kernels`), on a machine without a GPU: a kernel that does not compile fails
//! here, not on the GPU. Needs NVRTC (`scripts/gpu/cuda-toolkit.sh nvrtc`, then the folder it
//! prints in LD_LIBRARY_PATH); without it the test fails with that advice (CI installs it).
#![cfg(any(feature = "cuda", feature = "cuda-kernels"))]

use source_tda::backend::cuda::nvrtc::{
    compile_kernels, compile_source, nvrtc_available, NVRTC_HELP,
};
use source_tda::backend::cuda::KERNEL_NAMES;

fn require_nvrtc() {
    assert!(nvrtc_available(), "{NVRTC_HELP}");
}

#[test]
fn every_kernel_compiles_to_ptx_for_sm_90() {
    require_nvrtc();
    let ptx = compile_kernels("sm_90").unwrap_or_else(|e| panic!("{e}"));
    let text = ptx.to_src();
    assert!(text.contains(".target sm_90"), "PTX is not for sm_90");
    for name in KERNEL_NAMES {
        assert!(
            text.contains(&format!(".entry {name}(")),
            "kernel {name} missing from the PTX"
        );
    }
    // The TF32 mode's rounding instruction made it into the code.
    assert!(text.contains("cvt.rna.tf32.f32"));
    eprintln!(
        "cuda_ptx: {} kernels compiled to {} bytes of sm_90 PTX",
        KERNEL_NAMES.len(),
        text.len()
    );
}

#[test]
fn kernels_compile_for_the_other_supported_architectures() {
    require_nvrtc();
    for arch in ["sm_80", "sm_89", "sm_100"] {
        compile_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
    }
}

#[test]
fn a_kernel_that_does_not_compile_is_reported_with_its_line() {
    require_nvrtc();
    let bad = "extern \"C\" __global__ void k(float* x) {\n  x[0] = undefined_name;\n}\n";
    let err = compile_source(bad, "bad.cu", "sm_90")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.cu") && err.contains("(2)") && err.contains("undefined_name"),
        "error does not name the file and line: {err}"
    );
}
