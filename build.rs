//! Build script: compiles every kernels/*.cu ahead of time with nvcc (cubin for sm_90a and
//! sm_80, PTX for compute_80) and embeds the results; without nvcc it embeds the sources for
//! NVRTC at run time (no warning: `checkergen --version` says which, from the
//! `CHECKERGEN_KERNELS` variable set here). Generates `$OUT_DIR/kernels.rs`: the embedded
//! images (`KERNEL_FILES`) and the kernel registry (`k::*` constants and `KERNELS`), one
//! constant per `extern "C" __global__` entry point, so a misspelt kernel is a compile error.
//!
//! nvcc is looked up as: $NVCC, `nvcc` on PATH, $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc.
//! `scripts/install-nvcc.sh` installs the pinned CUDA 13.0 nvcc from PyPI wheels.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/c_params.rs"]
mod c_params;

use c_params::FileLayout;

/// Every kernel file's parameter structs and defines (and common.cuh's defines, as `common`).
/// A struct the parser cannot read, or whose computed size differs from the size its file's
/// `static_assert(sizeof(...))` states, fails the build.
fn layouts(files: &[PathBuf], common: &str) -> Vec<FileLayout> {
    let mut out = vec![(
        "common".to_string(),
        Vec::new(),
        c_params::int_defines(common),
    )];
    for f in files {
        let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
        let src = std::fs::read_to_string(f).unwrap();
        let structs = c_params::param_structs(&stem, &src).unwrap_or_else(|e| panic!("{e}"));
        for st in &structs {
            assert!(
                st.stated_size == Some(st.size),
                "kernels/{stem}.cu: struct {}: C layout rules give {} bytes, its \
                 static_assert(sizeof) states {:?} (every parameter struct states its size)",
                st.name,
                st.size,
                st.stated_size
            );
        }
        out.push((stem, structs, c_params::int_defines(&src)));
    }
    out
}

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

/// An entry point: its name and its `__launch_bounds__` maximum block size (threads).
type Entry = (String, u32);
/// A kernel file's stem and entry points.
type FileEntries = (String, Vec<Entry>);

/// The `extern "C" __global__` entry points of kernel file `file` (text `source`), one
/// declaration per line, `extern "C" __global__ void __launch_bounds__(MAX[, MIN]) NAME(const
/// Params p)`: the name and MAX. Every entry point must declare its bound, as an integer or as a
/// macro `#define`d to one in the file or in `common` (kernels/common.cuh): it is the largest
/// block its launcher may use (the registry's `Kernel::max_threads`, which `Gpu::launch`
/// enforces and scripts/kernel-resources.sh checks registers and shared memory against).
fn entry_points(file: &str, source: &str, common: &str) -> Vec<Entry> {
    let mut names = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.trim_start().strip_prefix("extern \"C\" __global__") else {
            continue;
        };
        // Drop `__launch_bounds__(...)` so the first '(' opens the parameter list.
        let (rest, bound) = match rest.find("__launch_bounds__(") {
            Some(i) => {
                let close = rest[i..].find(')').map(|c| i + c + 1).unwrap_or(rest.len());
                let args = &rest[i + "__launch_bounds__(".len()..close - 1];
                let max = args.split(',').next().unwrap_or("").trim();
                (
                    format!("{}{}", &rest[..i], &rest[close..]),
                    Some(max.to_string()),
                )
            }
            None => (rest.to_string(), None),
        };
        let name = rest
            .find('(')
            .and_then(|open| rest[..open].split_whitespace().last())
            .unwrap_or_else(|| panic!("cannot read the entry-point name in `{line}`"));
        let bound = bound.unwrap_or_else(|| {
            panic!(
                "kernels/{file}.cu: entry point `{name}` declares no __launch_bounds__(MAX): every \
                 entry point states the largest block its launcher uses (kernels/README.md)"
            )
        });
        let max = resolve_int(&bound, source, common).unwrap_or_else(|| {
            panic!(
                "kernels/{file}.cu: `{name}`: __launch_bounds__({bound}) is neither an integer nor \
                 a macro #define'd to one in the file or common.cuh"
            )
        });
        assert!(
            (1..=1024).contains(&max),
            "kernels/{file}.cu: `{name}`: __launch_bounds__({max}) is not a block size (1..=1024)"
        );
        names.push((name.to_string(), max));
    }
    names
}

/// `text` as an integer: a literal, or a macro `#define NAME INTEGER` of `source` or `common`.
fn resolve_int(text: &str, source: &str, common: &str) -> Option<u32> {
    if let Ok(v) = text.parse() {
        return Some(v);
    }
    source.lines().chain(common.lines()).find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("#define") && w.next() == Some(text))
            .then(|| w.next()?.parse().ok())
            .flatten()
    })
}

/// The nvcc flags every kernel file is compiled with (besides the target's), one per line of
/// kernels/nvcc-flags.txt, `#` comments; scripts/kernel-resources.sh reads the same file.
fn nvcc_flags() -> Vec<String> {
    std::fs::read_to_string("kernels/nvcc-flags.txt")
        .expect("kernels/nvcc-flags.txt missing")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// The registry part of kernels.rs: `pub mod k { pub const NAME: Kernel = ...; }` and
/// `KERNELS` (every entry point, index = `Kernel::id`). Enforces the naming rule
/// `<op>_<variant>_<dtype>` (dtype bf16, f16 or f32) and unique names. With `emu`, each
/// kernel's `emu` is its host entry point `cg_emu_NAME` (declared here), else `None`.
fn registry(files: &[FileEntries], emu: bool) -> String {
    let mut consts = String::new();
    let mut externs = String::new();
    let mut list = String::from("pub const KERNELS: &[Kernel] = &[\n");
    let mut seen = std::collections::BTreeSet::new();
    let mut id = 0usize;
    for (file, names) in files {
        for (name, max_threads) in names {
            assert!(
                ["_bf16", "_f16", "_f32"].iter().any(|d| name.ends_with(d))
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "kernels/{file}.cu: entry point `{name}` breaks the naming rule <op>_<variant>_<dtype> \
                 (lower case, dtype bf16, f16 or f32)"
            );
            assert!(
                seen.insert(name.clone()),
                "entry point `{name}` is defined twice"
            );
            let upper = name.to_ascii_uppercase();
            let emu_fn = if emu {
                externs.push_str(&format!(
                    "        pub fn cg_emu_{name}(grid: *const u32, block: *const u32, dyn_smem_bytes: u32, \
                     params: *const std::ffi::c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;\n"
                ));
                format!("Some(super::emu_abi::cg_emu_{name})")
            } else {
                "None".to_string()
            };
            consts.push_str(&format!(
                "    /// `{name}` in kernels/{file}.cu.\n    pub const {upper}: Kernel = Kernel {{ file: {file:?}, name: {name:?}, id: {id}, max_threads: {max_threads}, emu: {emu_fn} }};\n"
            ));
            list.push_str(&format!("    k::{upper},\n"));
            id += 1;
        }
    }
    list.push_str("];\n");
    let abi = if emu {
        format!(
            "/// The host-emulator entry points (kernels/emu.cuh, compiled by build.rs).\nmod emu_abi {{\n    unsafe extern \"C\" {{\n{externs}    }}\n}}\n"
        )
    } else {
        String::new()
    };
    format!(
        "{abi}/// Every `extern \"C\" __global__` entry point of kernels/*.cu (generated by build.rs).\npub mod k {{\n    use super::Kernel;\n{consts}}}\n{list}"
    )
}

/// Host emulation: compiles every kernels/*.cu with the system C++ compiler against
/// kernels/emu.cuh (`CHECKERGEN_HOST_EMU`) into one static library, with a generated
/// `extern "C" int cg_emu_NAME(grid, block, dyn_smem_bytes, params, err, err_len)` per entry
/// point (`emu_abi_launch` in emu.cuh). Returns false, with a warning, when there is no
/// usable C++ compiler; a compiler that rejects the kernels fails the build.
fn build_emu(
    files: &[PathBuf],
    entries: &[FileEntries],
    layouts: &[FileLayout],
    out: &Path,
) -> bool {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let mut build = cc::Build::new();
    build.cpp(true);
    let compiler = match build.try_get_compiler() {
        Ok(c) => c,
        Err(e) => {
            println!(
                "cargo:warning=no C++ compiler ({e}): the host emulator (Kernel::emu) is not built"
            );
            return false;
        }
    };
    let runs = Command::new(compiler.path())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        println!(
            "cargo:warning=the C++ compiler {} does not run: the host emulator (Kernel::emu) is not built",
            compiler.path().display()
        );
        return false;
    }
    let mut wrappers = Vec::new();
    for (f, (stem, names)) in files.iter().zip(entries) {
        // The layouts build.rs computed (and the Rust mirrors are checked against), checked by
        // the C++ compiler: offsetof of every field, sizeof of every parameter struct.
        let asserts = layouts
            .iter()
            .find(|(s, _, _)| s == stem)
            .map_or(String::new(), |(_, structs, _)| {
                c_params::emu_asserts(structs)
            });
        let mut src = format!(
            "// Generated by build.rs: the host entry points of kernels/{stem}.cu.\n#include <cstddef>\n#include {:?}\n\n{asserts}\n",
            manifest.join(f).display().to_string()
        );
        for (name, bound) in names {
            src.push_str(&format!(
                "extern \"C\" int cg_emu_{name}(const uint32_t grid[3], const uint32_t block[3], uint32_t dyn_smem_bytes,\n\
                 \x20                         const void* params, char* err, size_t err_len) {{\n\
                 \x20   return emu_abi_launch({name}, \"{name}\", (unsigned)({bound}), grid, block, dyn_smem_bytes, params, err, err_len);\n\
                 }}\n"
            ));
        }
        let path = out.join(format!("emu_{stem}.cpp"));
        std::fs::write(&path, src).unwrap();
        wrappers.push(path);
    }
    build
        .files(&wrappers)
        .include(manifest.join("kernels"))
        .std("c++20")
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .extra_warnings(false)
        .define("CHECKERGEN_HOST_EMU", None)
        // Single roundings like tools/emu/run.sh's build; the kernels type-pun through casts.
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas");
    // The emulator's thread-locals (threadIdx, __shared__) in the initial-exec TLS model: no
    // dynamic lookup per access, but about 170 KB of static TLS, which a library loaded with
    // dlopen cannot get. Feature `dynamic-tls` (the Python module) keeps the default model.
    if std::env::var_os("CARGO_FEATURE_DYNAMIC_TLS").is_none() {
        build.flag_if_supported("-ftls-model=initial-exec");
    }
    if let Err(e) = build.try_compile("checkergen_emu") {
        panic!("host compilation of kernels/*.cu (emulator) failed: {e}");
    }
    true
}

/// `CHECKERGEN_KERNELS`, what `checkergen --version` says of the embedded kernel images.
fn kernels_env(what: &str) {
    println!("cargo:rustc-env=CHECKERGEN_KERNELS={what}");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/c_params.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let generated = out.join("kernels.rs");
    let mut files: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ missing")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    let common = std::fs::read_to_string("kernels/common.cuh").unwrap_or_default();
    let entries: Vec<FileEntries> = files
        .iter()
        .map(|f| {
            let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
            let points = entry_points(&stem, &std::fs::read_to_string(f).unwrap(), &common);
            (stem, points)
        })
        .collect();
    let layouts = layouts(&files, &common);
    let layout_code = c_params::layout_module(&layouts);
    if std::env::var("CARGO_FEATURE_CUDA").is_err() {
        kernels_env("none (built without the `cuda` feature: CPU only)");
        let code = format!(
            "{}{layout_code}pub const KERNEL_FILES: &[KernelFile] = &[];\n",
            registry(&entries, false)
        );
        std::fs::write(&generated, code).unwrap();
        return;
    }
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    println!("cargo:rerun-if-changed=kernels/nvcc-flags.txt");
    let common_flags = nvcc_flags();
    let nvcc = find_nvcc();
    // No build warning without nvcc (cargo would replay it on every build, and NVRTC is a
    // supported path): `checkergen --version` says which images are embedded, and the
    // device line of `bench`, `steps` and `sample -v` which one a GPU loaded.
    kernels_env(if nvcc.is_some() {
        "sm_90a and sm_80 cubins, compute_80 PTX (nvcc at build time)"
    } else {
        "sources for NVRTC at run time (no nvcc at build time; docs/gpu.md says how to get \
         cubins)"
    });
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
                    .args(&common_flags)
                    .arg("-o")
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
    // The host emulator compiles while nvcc runs.
    let emu = build_emu(&files, &entries, &layouts, &out);
    let registry = registry(&entries, emu);
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
    let mut code = registry;
    code.push_str(&layout_code);
    code.push_str("pub const KERNEL_FILES: &[KernelFile] = &[\n");
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
