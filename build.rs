//! Build script: compiles every kernels/*.cu ahead of time with nvcc (cubin for sm_90a and
//! sm_80, PTX for compute_80) and embeds the results; without nvcc it embeds the sources for
//! NVRTC at run time and prints one warning. Generates `$OUT_DIR/kernels.rs`.
//!
//! nvcc is looked up as: $NVCC, `nvcc` on PATH, $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc.
//! `scripts/install-nvcc.sh` installs the pinned CUDA 13.0 nvcc from PyPI wheels.

use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        println!(
            "cargo:warning=NVCC={} does not exist; looking elsewhere",
            p.display()
        );
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        let c = Path::new(&home).join("bin/nvcc");
        if c.is_file() {
            return Some(c);
        }
    }
    let c = PathBuf::from("/usr/local/cuda/bin/nvcc");
    c.is_file().then_some(c)
}

/// The source with `#include "common.cuh"` replaced by the header's text, so NVRTC needs no
/// include path for our own header.
fn inline_common(src: &str, common: &str) -> String {
    src.replace("#include \"common.cuh\"", common)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let generated = out.join("kernels.rs");
    if std::env::var("CARGO_FEATURE_CUDA").is_err() {
        std::fs::write(&generated, "pub const KERNEL_FILES: &[KernelFile] = &[];\n").unwrap();
        return;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ missing")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    let common = std::fs::read_to_string("kernels/common.cuh").unwrap_or_default();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    let nvcc = find_nvcc();
    if nvcc.is_none() {
        println!(
            "cargo:warning=nvcc not found (NVCC, PATH, CUDA_HOME, /usr/local/cuda): embedding kernel \
             sources for NVRTC at run time; run scripts/install-nvcc.sh for ahead-of-time cubins"
        );
    }
    // (file stem, Option<(sm90a cubin, sm80 cubin, ptx)>), compiled in parallel.
    let targets: [(&str, &[&str]); 3] = [
        (
            "sm90a.cubin",
            &["-cubin", "-gencode=arch=compute_90a,code=sm_90a"],
        ),
        (
            "sm80.cubin",
            &["-cubin", "-gencode=arch=compute_80,code=sm_80"],
        ),
        ("compute80.ptx", &["-ptx", "-arch=compute_80"]),
    ];
    let mut jobs = Vec::new();
    if let Some(nvcc) = &nvcc {
        for f in &files {
            for (suffix, flags) in targets {
                let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
                let dst = out.join(format!("{stem}.{suffix}"));
                let mut cmd = Command::new(nvcc);
                cmd.args(flags)
                    .args(["-O3", "-std=c++17", "-lineinfo", "-Ikernels", "-o"])
                    .arg(&dst)
                    .arg(f);
                jobs.push((f.clone(), cmd));
            }
        }
    }
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(f, mut cmd)| std::thread::spawn(move || (f, cmd.output())))
        .collect();
    for h in handles {
        let (f, res) = h.join().unwrap();
        match res {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "nvcc failed on {}:\n{}",
                f.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run nvcc for {}: {e}", f.display()),
        }
    }
    let mut code = String::from("pub const KERNEL_FILES: &[KernelFile] = &[\n");
    for f in &files {
        let stem = f.file_stem().unwrap().to_str().unwrap();
        let src = inline_common(&std::fs::read_to_string(f).unwrap(), &common);
        let src_path = out.join(format!("{stem}.nvrtc.cu"));
        std::fs::write(&src_path, src).unwrap();
        let bin = |suffix: &str, text: bool| -> String {
            if nvcc.is_none() {
                return "None".into();
            }
            let p = out.join(format!("{stem}.{suffix}"));
            if text {
                format!("Some(include_str!({:?}))", p.display().to_string())
            } else {
                format!("Some(include_bytes!({:?}))", p.display().to_string())
            }
        };
        code.push_str(&format!(
            "    KernelFile {{ name: {stem:?}, sm90a: {}, sm80: {}, ptx: {}, source: include_str!({:?}) }},\n",
            bin("sm90a.cubin", false),
            bin("sm80.cubin", false),
            bin("compute80.ptx", true),
            src_path.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(&generated, code).unwrap();
}
