//! The NVRTC fallback, without a GPU: every embedded kernel source (`KERNEL_FILES[..].source`,
//! common.cuh inlined; embedded by every build, with or without nvcc) compiles with
//! libnvrtc, through the runtime's own function (`nvrtc_compile_source`, hence its options
//! `nvrtc_options` and its library loading), for the architectures the runtime picks on an
//! H100/H200 (cc 9.0: compute_90a) and on an A100 (cc 8.0: compute_80). Each PTX must
//! declare every entry point of its file, and, where the pinned nvcc's ptxas is installed
//! too (scripts/install-nvcc.sh, as .ci/run does), assemble for sm_90a / sm_80.
//!
//! libnvrtc and the CUDA headers come from the pinned CUDA 13.0 PyPI wheels that
//! scripts/install-nvrtc.sh puts in .cuda-toolchain/ (nvidia/cu13: lib/libnvrtc.so.13,
//! include/cuda_bf16.h), or from the toolkit root in CHECKERGEN_CUDA_ROOT. Without either the
//! test says SKIPPED loudly, and fails under CI (`CI=true`, as .ci/run's NVRTC stage runs it).
//! What it cannot see: the driver loading the PTX (its JIT, which ptxas stands in for) and
//! the kernels running (a GPU's job).
#![cfg(feature = "cuda")]

use checkergen::cuda::device::nvrtc_compile_source;
use checkergen::cuda::{KERNEL_FILES, KERNELS};
use std::path::PathBuf;
use std::time::Instant;

/// The CUDA root holding lib/libnvrtc.so.13 and include/cuda_bf16.h: CHECKERGEN_CUDA_ROOT,
/// else the wheel's nvidia/cu13 in .cuda-toolchain/.
fn cuda_root() -> Option<PathBuf> {
    let usable = |r: &PathBuf| {
        ["lib/libnvrtc.so.13", "lib64/libnvrtc.so.13"]
            .iter()
            .any(|l| r.join(l).is_file())
            && r.join("include/cuda_bf16.h").is_file()
    };
    if let Some(r) = std::env::var_os("CHECKERGEN_CUDA_ROOT") {
        let r = PathBuf::from(r);
        assert!(
            usable(&r),
            "CHECKERGEN_CUDA_ROOT={} has no lib/libnvrtc.so.13 and include/cuda_bf16.h",
            r.display()
        );
        return Some(r);
    }
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cuda-toolchain/lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("site-packages/nvidia/cu13")))
        .filter(usable)
        .collect();
    found.sort();
    found.pop()
}

/// The CUDA root, or None after saying SKIPPED (a failure under CI).
fn cuda_root_or_skip() -> Option<PathBuf> {
    let root = cuda_root();
    if root.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "CI=true but libnvrtc was not found: run scripts/install-nvrtc.sh (or set \
                 CHECKERGEN_CUDA_ROOT); the NVRTC fallback would go unchecked"
            );
        }
        eprintln!(
            "\n!!!!!!!! SKIPPED: no libnvrtc (run scripts/install-nvrtc.sh or set \
             CHECKERGEN_CUDA_ROOT); the NVRTC fallback is NOT checked !!!!!!!!\n"
        );
    }
    root
}

/// ptxas of the pinned nvcc (the wheel's bin/ beside the NVRTC library, as
/// scripts/install-nvcc.sh installs it into the same .cuda-toolchain/, or beside $NVCC), to
/// assemble NVRTC's PTX as the driver's JIT would on a GPU: it catches PTX that parses but
/// cannot be assembled (an unsupported instruction, more shared memory than the target has).
fn ptxas(root: &std::path::Path) -> Option<PathBuf> {
    let beside_nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .and_then(|n| n.parent().map(|d| d.join("ptxas")));
    [Some(root.join("bin/ptxas")), beside_nvcc]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

/// Assembles `ptx` for `target` with `ptxas`; the time taken, or ptxas's messages.
fn assemble(ptxas: &std::path::Path, ptx: &str, target: &str, name: &str) -> f64 {
    let dir = std::env::temp_dir().join(format!("cg-kernels-nvrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.{target}.ptx"));
    std::fs::write(&src, ptx).unwrap();
    let t = Instant::now();
    let out = std::process::Command::new(ptxas)
        .arg(format!("-arch={target}"))
        .arg("-o")
        .arg(dir.join(format!("{name}.{target}.cubin")))
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        out.status.success(),
        "ptxas -arch={target} rejects NVRTC's PTX of kernels/{name}.cu:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
    ms
}

#[test]
fn every_kernel_file_compiles_with_nvrtc() {
    let Some(root) = cuda_root_or_skip() else {
        return;
    };
    println!("CUDA root: {}", root.display());
    // The sources are embedded by every build; say which kind of build this is.
    let aot = KERNEL_FILES.iter().all(|f| f.sm90a.is_some());
    println!(
        "this build embeds: kernel sources{}",
        if aot {
            " + nvcc's cubins and PTX"
        } else {
            " only (built without nvcc: NVRTC is the GPU path)"
        }
    );
    let ptxas = ptxas(&root);
    match &ptxas {
        Some(p) => println!("assembling each PTX with {}", p.display()),
        None => println!(
            "no ptxas (scripts/install-nvcc.sh): PTX not assembled (a GPU driver's JIT would)"
        ),
    }
    let mut compiled = 0;
    for (cc, target) in [((9, 0), "sm_90a"), ((8, 0), "sm_80")] {
        for f in KERNEL_FILES {
            let t = Instant::now();
            let ptx = nvrtc_compile_source(f.name, f.source, cc, std::slice::from_ref(&root))
                .unwrap_or_else(|e| panic!("cc {}.{}: {e:#}", cc.0, cc.1));
            let ms = t.elapsed().as_secs_f64() * 1e3;
            assert!(
                ptx.lines().any(|l| l.trim() == format!(".target {target}")),
                "kernels/{}.cu: the PTX for cc {}.{} is not for {target}",
                f.name,
                cc.0,
                cc.1
            );
            let kernels: Vec<&str> = KERNELS
                .iter()
                .filter(|k| k.file == f.name)
                .map(|k| k.name)
                .collect();
            assert!(
                !kernels.is_empty(),
                "kernels/{}.cu declares no kernel",
                f.name
            );
            for k in &kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "kernels/{}.cu: entry point {k} missing from the NVRTC PTX for {target}",
                    f.name
                );
            }
            let assembled = match &ptxas {
                Some(p) => format!("  ptxas {:>5.0} ms", assemble(p, &ptx, target, f.name)),
                None => String::new(),
            };
            println!(
                "  cc {}.{} -> {:<14} kernels/{:<13} NVRTC {:>5.0} ms  PTX {:>7} bytes  {:>2} entry points{assembled}",
                cc.0,
                cc.1,
                format!(".target {target}"),
                format!("{}.cu", f.name),
                ms,
                ptx.len(),
                kernels.len()
            );
            compiled += 1;
        }
    }
    // The library the runtime loaded (through cudarc, by the soname of the one loaded by path).
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is loaded (the compilations above went through it); two out-pointers.
    let st = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    assert_eq!(st, cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS);
    println!("libnvrtc {major}.{minor}: {compiled} compilations");
    assert_eq!(
        (major, minor),
        (13, 0),
        "expected the pinned CUDA 13.0 NVRTC"
    );
    assert_eq!(compiled, 2 * KERNEL_FILES.len());
    assert!(
        KERNEL_FILES.len() >= 5,
        "expected every kernels/*.cu embedded"
    );
}

/// What broke the fallback before (kernels/common.cuh included <stdint.h>, which NVRTC does
/// not have): a source NVRTC rejects is a one-line error naming the file and NVRTC's first
/// error, which `--device auto` prints as its warning and `--device cuda` as its error.
#[test]
fn a_libc_include_fails_with_one_line_naming_it() {
    let Some(root) = cuda_root_or_skip() else {
        return;
    };
    let src = "#include <stdint.h>\nextern \"C\" __global__ void k_f32(uint32_t* p) { *p = 1; }\n";
    let e = nvrtc_compile_source("libc", src, (9, 0), &[root])
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("NVRTC (compute_90a) failed on kernels/libc.cu: "),
        "{e}"
    );
    assert!(e.contains("stdint.h"), "{e}");
}
