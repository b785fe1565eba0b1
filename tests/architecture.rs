//! ARCHITECTURE.md names every source file, one line each (issue 23): each file under src/,
//! build/, kernels/, tools/, scripts/, examples/ and benches/ (and build.rs) starts a line of
//! its "## Files" block, by its path from the repository root or, under src/, from src/. A
//! file added without its line, or a line left behind for a deleted file, fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const DIRS: [&str; 7] = [
    "src", "build", "kernels", "tools", "scripts", "examples", "benches",
];
const EXTS: [&str; 9] = ["rs", "cu", "cuh", "cpp", "hpp", "py", "sh", "c", "txt"];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| EXTS.contains(&x))
        {
            out.push(p);
        }
    }
}

/// The first word of every line of the "## Files" code block.
fn named(arch: &str) -> BTreeSet<String> {
    let files = arch
        .split("## Files")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## Files\" section");
    let block = files
        .split("```")
        .nth(1)
        .expect("a code block under \"## Files\"");
    block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_source_file_has_its_line() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let arch = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let names = named(&arch);
    let mut files = vec![root.join("build.rs")];
    for d in DIRS {
        walk(&root.join(d), &mut files);
    }
    let mut missing = Vec::new();
    let mut wanted = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap().to_str().unwrap().to_string();
        let from_src = rel.strip_prefix("src/").map(str::to_string);
        if !names.contains(&rel) && !from_src.as_ref().is_some_and(|s| names.contains(s)) {
            missing.push(rel.clone());
        }
        wanted.insert(rel);
        wanted.extend(from_src);
    }
    // Lines naming a file that does not exist (a path with an extension we track).
    let stale: Vec<&String> = names
        .iter()
        .filter(|n| {
            Path::new(n.as_str())
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| EXTS.contains(&x))
                && n.contains('/')
                && !wanted.contains(n.as_str())
        })
        .collect();
    println!(
        "{} source files, {} lines naming files; missing {}, stale {}",
        files.len(),
        names.len(),
        missing.len(),
        stale.len()
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md has no line for: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md names files that do not exist: {stale:?}"
    );
}
