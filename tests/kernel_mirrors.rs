//! The kernel parameter mirrors are checked field by field: build.rs lays out every C
//! `struct *Params` of kernels/*.cu (build/c_params.rs) and `kernel_params!`
//! (src/cuda/params.rs) asserts each Rust mirror's size, field count, and every field's offset
//! and type by name. This test compiles the crate's real mirrors (every `kernel_params!`
//! invocation under src/cuda/) with rustc against layouts computed from the kernel sources:
//! unchanged sources compile; two fields swapped in any C struct, or in a Rust mirror, or a
//! field renamed, fail to compile with the assertion that names the field. The same check runs
//! in every `cargo build`, with or without nvcc (build.rs computes the layouts either way).

#[path = "../build/c_params.rs"]
#[allow(dead_code)]
mod c_params;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every kernels/*.cu as (stem, text), sorted.
fn kernel_sources() -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            (
                f.file_stem().unwrap().to_str().unwrap().to_string(),
                std::fs::read_to_string(f).unwrap(),
            )
        })
        .collect()
}

/// The Rust text build.rs generates for these sources (c_layout and c_defines).
fn layout_code(sources: &[(String, String)]) -> String {
    let files: Vec<_> = sources
        .iter()
        .map(|(stem, src)| {
            let structs = c_params::param_structs(stem, src).unwrap();
            (stem.clone(), structs, c_params::int_defines(src))
        })
        .collect();
    c_params::layout_module(&files)
}

/// The `kernel_params! { ... }` invocations of every .rs file under `dir`.
fn invocations(dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            invocations(&p, out);
            continue;
        }
        if p.extension().is_none_or(|x| x != "rs") || p.ends_with("params.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("\nkernel_params! {") {
            let body = &rest[at + 1..];
            let mut depth = 0;
            let mut end = 0;
            for (i, c) in body.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            assert!(end > 0, "{}: unbalanced kernel_params!", p.display());
            out.push(body[..end].to_string());
            rest = &body[end..];
        }
    }
}

/// Compiles (rustc, metadata only) the macro, the layouts and the mirrors as one crate;
/// returns rustc's stderr on failure.
fn compile(layout: &str, mirrors: &[String], tag: &str) -> Result<(), String> {
    let macro_text: String = std::fs::read_to_string(root().join("src/cuda/params.rs"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("//!"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut src = String::from("#![allow(dead_code, unused_imports)]\n");
    src.push_str(&macro_text);
    src.push_str("mod cudarc { pub mod driver { pub unsafe trait DeviceRepr {} } }\n");
    src.push_str(&format!("pub mod cuda {{\n{layout}\n}}\n"));
    for (i, m) in mirrors.iter().enumerate() {
        src.push_str(&format!(
            "mod mirror{i} {{\n    use crate::cudarc;\n{m}\n}}\n"
        ));
    }
    let dir = std::env::temp_dir().join(format!("checkergen-mirrors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{tag}.rs"));
    std::fs::write(&file, &src).unwrap();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "lib",
            "--emit",
            "metadata",
        ])
        .arg("--crate-name")
        .arg(format!("mirrors_{tag}"))
        .arg("-o")
        .arg(dir.join(format!("{tag}.rmeta")))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc} (set RUSTC): {e}"));
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(dir.join(format!("{tag}.rmeta")));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `body` with whole-word `a` and `b` exchanged.
fn swap_words(body: &str, a: &str, b: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(if word == a {
            b
        } else if word == b {
            a
        } else {
            word
        });
        word.clear();
    };
    for c in body.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// `source` with fields `a` and `b` of struct `name` exchanged (in its body only).
fn swap_c_fields(source: &str, name: &str, a: &str, b: &str) -> String {
    let start = source.find(&format!("struct {name} {{")).unwrap();
    let end = start + source[start..].find("};").unwrap();
    format!(
        "{}{}{}",
        &source[..start],
        swap_words(&source[start..end], a, b),
        &source[end..]
    )
}

fn mirrors() -> Vec<String> {
    let mut m = Vec::new();
    invocations(&root().join("src/cuda"), &mut m);
    m
}

#[test]
fn mirrors_compile_against_the_kernel_sources() {
    let sources = kernel_sources();
    let structs: usize = sources
        .iter()
        .map(|(s, t)| c_params::param_structs(s, t).unwrap().len())
        .sum();
    let mirrors = mirrors();
    println!(
        "{structs} C parameter structs, {} Rust mirrors",
        mirrors.len()
    );
    assert_eq!(mirrors.len(), structs, "one Rust mirror per C struct");
    compile(&layout_code(&sources), &mirrors, "unchanged").unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn swapping_two_c_fields_of_any_struct_fails() {
    let sources = kernel_sources();
    let mirrors = mirrors();
    let mut cases = 0;
    for (i, (stem, src)) in sources.iter().enumerate() {
        for st in c_params::param_structs(stem, src).unwrap() {
            let n = st.fields.len();
            // The first two fields (pointers) and the last two (mostly int: only the offsets
            // tell them apart).
            for (a, b) in [(0, 1), (n - 2, n - 1)] {
                let (fa, fb) = (&st.fields[a].name, &st.fields[b].name);
                let mut changed = sources.clone();
                changed[i].1 = swap_c_fields(src, &st.name, fa, fb);
                let tag = format!("{}_{fa}_{fb}", st.name);
                let err = compile(&layout_code(&changed), &mirrors, &tag).err();
                let err = err.unwrap_or_else(|| {
                    panic!(
                        "{}: swapping C fields {fa} and {fb} still compiles",
                        st.name
                    )
                });
                // Fields of one type: an offset assertion names them; of two types, the
                // mirror's types no longer match (a type error, before any assertion runs).
                let retyped = st.fields[a].rust != st.fields[b].rust;
                assert!(
                    err.contains(&format!("{}.{fa}: offset differs", st.name))
                        || err.contains(&format!("{}.{fb}: offset differs", st.name))
                        || (retyped && err.contains("mismatched types")),
                    "{}: swapping {fa} and {fb} failed without naming them:\n{err}",
                    st.name
                );
                cases += 1;
            }
        }
    }
    println!("{cases} swaps of two C fields, each one a compile error naming the field");
}

#[test]
fn swapping_or_renaming_rust_fields_fails() {
    let layout = layout_code(&kernel_sources());
    let mirrors = mirrors();
    for (i, m) in mirrors.iter().enumerate() {
        let name = m
            .split("struct ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap()
            .to_string();
        let fields: Vec<&str> = m
            .lines()
            .filter_map(|l| {
                let l = l
                    .trim()
                    .trim_start_matches("pub(super) ")
                    .trim_start_matches("pub ");
                let (f, ty) = l.split_once(':')?;
                ty.trim().ends_with(',').then_some(f.trim())
            })
            .collect();
        let (fa, fb) = (fields[fields.len() - 2], fields[fields.len() - 1]);
        let mut swapped = mirrors.clone();
        swapped[i] = swap_words(m, fa, fb);
        let err = compile(&layout, &swapped, &format!("rs_{name}")).expect_err(&name);
        assert!(
            err.contains(&format!("{name}.{fa}: offset differs"))
                || err.contains(&format!("{name}.{fb}: offset differs"))
                || err.contains("mismatched types"),
            "{name}: swapping Rust fields {fa} and {fb}:\n{err}"
        );
        let mut renamed = mirrors.clone();
        renamed[i] = swap_words(m, fa, "renamed_field");
        compile(&layout, &renamed, &format!("rn_{name}")).expect_err(&name);
    }
    println!(
        "{} Rust mirrors: a swap of their last two fields and a rename each fail to compile",
        mirrors.len()
    );
}
