//! Without a GPU: every `extern "C" __global__` kernel declared in an embedded kernels/*.cu
//! source is in each ahead-of-time image that build.rs embedded (cubin symbol names, PTX
//! `.entry`). Names come from the sources themselves, so renaming a kernel needs no change
//! here; whether each launcher's name is loaded is checked on a GPU (`Gpu::new` loads every
//! declared kernel and a launch of an unknown name fails).
#![cfg(feature = "cuda")]

use checkergen::cuda::KERNEL_FILES;

/// Names of the `extern "C" __global__` functions in a kernel source (`__launch_bounds__`
/// skipped), as `cuda::device` finds them at load time.
fn declared_kernels(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.trim_start().strip_prefix("extern \"C\" __global__") else {
            continue;
        };
        let rest = match rest.find("__launch_bounds__(") {
            Some(i) => {
                let close = rest[i..].find(')').map_or(rest.len(), |c| i + c + 1);
                format!("{}{}", &rest[..i], &rest[close..])
            }
            None => rest.to_string(),
        };
        if let Some(name) = rest
            .find('(')
            .and_then(|open| rest[..open].split_whitespace().last())
        {
            names.push(name.to_string());
        }
    }
    names
}

#[test]
fn every_kernel_file_is_embedded() {
    let names: Vec<&str> = KERNEL_FILES.iter().map(|f| f.name).collect();
    for want in ["norm", "ffn", "embed", "attention", "sampling", "decoder"] {
        assert!(
            names.contains(&want),
            "kernels/{want}.cu is not embedded: {names:?}"
        );
    }
}

#[test]
fn declared_kernels_are_in_every_embedded_image() {
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    let mut checked = 0;
    for f in KERNEL_FILES {
        let kernels = declared_kernels(f.source);
        assert!(
            !kernels.is_empty(),
            "kernels/{}.cu declares no kernel",
            f.name
        );
        for name in &kernels {
            for (kind, img) in [("sm_90a", f.sm90a), ("sm_80", f.sm80)] {
                if let Some(img) = img {
                    assert!(
                        contains(img, name),
                        "{name} missing from the {kind} cubin of kernels/{}.cu",
                        f.name
                    );
                }
            }
            if let Some(ptx) = f.ptx {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{name} missing from the PTX of kernels/{}.cu",
                    f.name
                );
            }
            checked += 1;
        }
        println!(
            "kernels/{}.cu: {} kernels (sm_90a {}, sm_80 {}, PTX {})",
            f.name,
            kernels.len(),
            f.sm90a.is_some(),
            f.sm80.is_some(),
            f.ptx.is_some()
        );
    }
    println!("{checked} kernels checked");
}
