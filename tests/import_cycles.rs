//! Import cycles between source files: every path a file names (`use` trees and paths in code,
//! `crate::`, `super::`, `self::`, `$crate::`, and the binary's `checkergen::`, test modules
//! included) is resolved to the file of the deepest module it reaches, giving an edge from
//! file to file; a strongly connected set of two or more files is a cycle. The test prints
//! every cycle with its edges and fails on one not listed in `KNOWN` (the cycles that issue
//! 23 left, none today; an entry that no longer occurs is reported, to be deleted). A glob
//! (`use super::*`) is an edge to the module it names.
//! `cargo test --test import_cycles -- --nocapture` prints the whole report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles still present, as sorted file sets: each is to be removed, none may be added.
/// Empty since issue 23 item 2: a module file only declares and re-exports, or its children
/// take what they share from a leaf module below both.
const KNOWN: &[&[&str]] = &[];

/// The crate's modules: module path (e.g. ["model", "decoder"]) -> file, for one crate root.
fn modules(root_file: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
    out.insert(prefix.to_vec(), root_file.to_path_buf());
    let text = strip(&std::fs::read_to_string(root_file).unwrap());
    let name = root_file.file_stem().unwrap().to_str().unwrap();
    let dir = if ["mod", "lib", "main"].contains(&name) {
        root_file.parent().unwrap().to_path_buf()
    } else {
        root_file.with_extension("")
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    for w in words.windows(2) {
        if w[0] == "mod" && w[1].ends_with(';') {
            let child = w[1].trim_end_matches(';');
            let file = [
                dir.join(format!("{child}.rs")),
                dir.join(child).join("mod.rs"),
            ]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{}: no file for `mod {child};`", root_file.display()));
            let mut p = prefix.to_vec();
            p.push(child.to_string());
            modules(&file, &p, out);
        }
    }
}

/// `text` without comments, string and char literals (their contents blanked).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            i = end;
            out.push(' ');
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\''
            && i + 2 < b.len()
            && (b[i + 2] == b'\'' || (b[i + 1] == b'\\' && i + 3 < b.len()))
        {
            // A char literal ('x', '\n', '\''); lifetimes ('a) are left alone.
            let end = text[i + 2..].find('\'').map_or(b.len(), |e| i + 2 + e + 1);
            i = end;
            out.push_str("' '");
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, self}}`) into paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap().trim();
        return vec![path.to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand)
        .map(|p| {
            if p == "self" {
                prefix.to_string()
            } else if prefix.is_empty() {
                p
            } else {
                format!("{prefix}::{p}")
            }
        })
        .collect()
}

/// The module paths named in `text` (a file of module `module`), resolved to absolute module
/// paths (segments after the crate root, possibly ending in an item); `ext` is the name the
/// other crate root is reached by (`checkergen` from the binary).
/// A path relative to the current module (`use child::x` in a parent) comes with the length
/// of its first segment's module path, which must exist for it to count.
fn named_paths(
    text: &str,
    module: &[String],
    ext: Option<&str>,
) -> Vec<(bool, Vec<String>, Option<usize>)> {
    // Inline modules (`mod tests { ... }`) change what `super` and `self` mean inside them.
    let mut out = Vec::new();
    let mut stack: Vec<(Vec<String>, usize)> = vec![(module.to_vec(), 0)];
    let mut depth = 0usize;
    let b = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    let mut pending_mod: Option<String> = None;
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            depth += 1;
            if let Some(m) = pending_mod.take() {
                let mut p = stack.last().unwrap().0.clone();
                p.push(m);
                stack.push((p, depth));
            }
            i += 1;
            continue;
        }
        if c == b'}' {
            if stack.len() > 1 && stack.last().unwrap().1 == depth {
                stack.pop();
            }
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if c == b';' {
            pending_mod = None;
        }
        if !ident(c) || (i > 0 && (ident(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let word_end = (i..b.len()).find(|&j| !ident(b[j])).unwrap_or(b.len());
        let word = &text[i..word_end];
        let cur = stack.last().unwrap().0.clone();
        if word == "mod" {
            let rest = text[word_end..].trim_start();
            let name: String = rest
                .bytes()
                .take_while(|&c| ident(c))
                .map(char::from)
                .collect();
            pending_mod = Some(name);
            i = word_end;
            continue;
        }
        let tree_text = if word == "use" {
            let end = text[word_end..].find(';').map_or(b.len(), |e| word_end + e);
            let t = text[word_end..end].to_string();
            i = end;
            Some(t)
        } else if ["crate", "super", "self", "checkergen"].contains(&word)
            && text[word_end..].starts_with("::")
        {
            let mut end = word_end;
            while text[end..].starts_with("::")
                && b.get(end + 2).is_some_and(|&c| ident(c) || c == b'{')
            {
                if b[end + 2] == b'{' {
                    break;
                }
                end = (end + 2..b.len())
                    .find(|&j| !ident(b[j]))
                    .unwrap_or(b.len());
            }
            let dollar = i > 0 && b[i - 1] == b'$';
            let t = format!(
                "{}{}",
                if dollar { "crate" } else { word },
                &text[word_end..end]
            );
            i = end;
            Some(t)
        } else {
            i = word_end;
            None
        };
        let Some(tree) = tree_text else { continue };
        for p in expand(&tree) {
            let segs: Vec<&str> = p.split("::").map(str::trim).collect();
            let (mut abs, mut other, mut k, mut relative) = (Vec::new(), false, 0, None);
            match segs[0] {
                "crate" => k = 1,
                "self" => {
                    abs = cur.clone();
                    k = 1;
                }
                "super" => {
                    abs = cur.clone();
                    while segs.get(k) == Some(&"super") {
                        abs.pop();
                        k += 1;
                    }
                }
                s if Some(s) == ext => {
                    other = true;
                    k = 1;
                }
                // A child module of the current one, or else an external crate, std or a
                // name in scope (then dropped by `edges`).
                _ => {
                    abs = cur.clone();
                    relative = Some(cur.len() + 1);
                }
            }
            abs.extend(segs[k..].iter().map(|s| s.to_string()));
            out.push((other, abs, relative));
        }
    }
    out
}

/// The names module `module` re-exports (`pub use`, `pub(crate) use`, `pub(super) use` at its
/// top level): name (or alias) -> the absolute path it stands for.
fn reexports(text: &str, module: &[String], ext: Option<&str>) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for stmt in text.split(';') {
        let t = stmt.trim_start();
        let Some(tree) = ["pub use ", "pub(crate) use ", "pub(super) use "]
            .iter()
            .find_map(|p| t.strip_prefix(p))
        else {
            continue;
        };
        // Aliases: `x as y` re-exports x under the name y.
        let names: Vec<String> = expand_named(tree);
        for (paths, name) in named_paths(&format!("use {};", strip_aliases(tree)), module, ext)
            .into_iter()
            .zip(names)
        {
            if !paths.0 {
                out.insert(name, paths.1);
            }
        }
    }
    out
}

/// `tree` with every ` as NAME` removed.
fn strip_aliases(tree: &str) -> String {
    let mut out = String::new();
    let mut rest = tree;
    while let Some(at) = rest.find(" as ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 4..];
        let skip = after.find([',', '}']).unwrap_or(after.len());
        rest = &after[skip..];
    }
    out.push_str(rest);
    out
}

/// The name each path of a `use` tree is visible under (its alias, else its last segment).
fn expand_named(tree: &str) -> Vec<String> {
    let with_alias: Vec<String> = {
        // Keep aliases by marking them, then expand.
        expand(&tree.replace(" as ", "@"))
    };
    with_alias
        .into_iter()
        .map(|p| match p.split_once('@') {
            Some((_, alias)) => alias.trim().to_string(),
            None => p.rsplit("::").next().unwrap().trim().to_string(),
        })
        .collect()
}

/// The file that `path` (absolute) reaches in `table`, following re-exports.
fn resolve<'a>(
    mut path: Vec<String>,
    table: &'a BTreeMap<Vec<String>, PathBuf>,
    reexp: &BTreeMap<Vec<String>, BTreeMap<String, Vec<String>>>,
) -> &'a PathBuf {
    for _ in 0..8 {
        let n = (0..=path.len())
            .rev()
            .find(|&n| table.contains_key(&path[..n]))
            .unwrap();
        let target = path[..n].to_vec();
        // A glob (`use m::*`) depends on module m itself, whatever m re-exports.
        let item = path.get(n).filter(|item| *item != "*");
        match item.and_then(|item| reexp.get(&target)?.get(item)) {
            Some(to) if *to != path[..=n] => {
                let mut next = to.clone();
                next.extend(path[n + 1..].iter().cloned());
                path = next;
            }
            _ => return &table[&target],
        }
    }
    &table[&path[..(0..=path.len())
        .rev()
        .find(|&n| table.contains_key(&path[..n]))
        .unwrap()]]
}

/// Edges file -> file of one crate root (and, through `ext`, into the library's modules).
fn edges(
    mods: &BTreeMap<Vec<String>, PathBuf>,
    lib: &BTreeMap<Vec<String>, PathBuf>,
    ext: Option<&str>,
    out: &mut BTreeSet<(String, String)>,
) {
    let reexp_of = |table: &BTreeMap<Vec<String>, PathBuf>| {
        table
            .iter()
            .map(|(m, f)| {
                let text = strip(&std::fs::read_to_string(f).unwrap());
                (m.clone(), reexports(&text, m, None))
            })
            .collect::<BTreeMap<_, _>>()
    };
    let (own, lib_reexp) = (reexp_of(mods), reexp_of(lib));
    let rel = |p: &Path| {
        p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap()
            .display()
            .to_string()
    };
    for (module, file) in mods {
        let text = strip(&std::fs::read_to_string(file).unwrap());
        for (other, path, relative) in named_paths(&text, module, ext) {
            let (table, reexp) = if other {
                (lib, &lib_reexp)
            } else {
                (mods, &own)
            };
            if relative.is_some_and(|n| path.len() < n || !table.contains_key(&path[..n])) {
                continue;
            }
            let target = resolve(path, table, reexp);
            if target != file {
                out.insert((rel(file), rel(target)));
            }
        }
    }
}

/// Strongly connected components with two or more files (Tarjan).
fn cycles(edges: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let nodes: Vec<&String> = nodes.into_iter().collect();
    let idx: BTreeMap<&String, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut adj = vec![Vec::new(); nodes.len()];
    for (a, b) in edges {
        adj[idx[a]].push(idx[b]);
    }
    struct T {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(v: usize, adj: &[Vec<usize>], t: &mut T) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in &adj[v] {
            match t.index[w] {
                None => {
                    visit(w, adj, t);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on[w] = false;
                comp.push(w);
                if w == v {
                    break;
                }
            }
            t.out.push(comp);
        }
    }
    let n = nodes.len();
    let mut t = T {
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(v, &adj, &mut t);
        }
    }
    let mut out: Vec<Vec<String>> = t
        .out
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut c: Vec<String> = c.into_iter().map(|i| nodes[i].clone()).collect();
            c.sort();
            c
        })
        .collect();
    out.sort();
    out
}

fn all_edges() -> BTreeSet<(String, String)> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let (mut lib, mut bin) = (BTreeMap::new(), BTreeMap::new());
    modules(&src.join("lib.rs"), &[], &mut lib);
    modules(&src.join("cli").join("main.rs"), &[], &mut bin);
    let mut e = BTreeSet::new();
    edges(&lib, &lib, None, &mut e);
    edges(&bin, &lib, Some("checkergen"), &mut e);
    e
}

#[test]
fn no_import_cycle_between_source_files() {
    let edges = all_edges();
    let found = cycles(&edges);
    println!("{} import edges between source files", edges.len());
    let mut new = Vec::new();
    for c in &found {
        let known = KNOWN.iter().any(|k| k.iter().eq(c.iter()));
        println!(
            "cycle{}: {}",
            if known { " (known)" } else { "" },
            c.join(" ")
        );
        for (a, b) in edges.iter().filter(|(a, b)| c.contains(a) && c.contains(b)) {
            println!("    {a} -> {b}");
        }
        if !known {
            new.push(c.join(" "));
        }
    }
    for k in KNOWN {
        if !found.iter().any(|c| k.iter().eq(c.iter())) {
            println!(
                "known cycle no longer present (delete it from KNOWN): {}",
                k.join(" ")
            );
        }
    }
    println!("{} cycles ({} known)", found.len(), found.len() - new.len());
    assert!(
        new.is_empty(),
        "import cycles between source files: {new:?}"
    );
}

#[test]
fn the_checker_finds_a_cycle() {
    // Resolution of a use tree with `super`, `self` and groups, and a two-file cycle.
    let m = vec!["model".to_string(), "decoder".to_string()];
    let got = named_paths(
        "use super::{autoenc::{self, Conv}, weights::X};\nfn f() { crate::cpu::ops::g(); }",
        &m,
        None,
    );
    let got: Vec<String> = got.into_iter().map(|(_, p, _)| p.join("::")).collect();
    assert_eq!(
        got,
        [
            "model::autoenc",
            "model::autoenc::Conv",
            "model::weights::X",
            "cpu::ops::g"
        ]
    );
    let e: BTreeSet<(String, String)> = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(cycles(&e), vec![vec!["a", "b", "c"]]);
}

#[test]
fn a_glob_of_a_parent_is_an_edge_to_the_parent() {
    // `use super::*` in a child reaches the parent's file even when the parent re-exports a
    // glob of that child (`pub use child::*`): parent and child are then a cycle.
    let m = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let table: BTreeMap<Vec<String>, PathBuf> = [
        (m(&["p"]), PathBuf::from("p/mod.rs")),
        (m(&["p", "child"]), PathBuf::from("p/child.rs")),
    ]
    .into_iter()
    .collect();
    let text = "pub use child::*; pub use child::x;";
    let reexp = [(m(&["p"]), reexports(text, &m(&["p"]), None))]
        .into_iter()
        .collect();
    let glob = named_paths("use super::*;", &m(&["p", "child"]), None);
    assert_eq!(
        resolve(glob[0].1.clone(), &table, &reexp),
        &table[&m(&["p"])]
    );
    // A named item still follows the re-export to the file that defines it.
    let named = named_paths("use super::x;", &m(&["p", "child"]), None);
    assert_eq!(
        resolve(named[0].1.clone(), &table, &reexp),
        &table[&m(&["p", "child"])]
    );
}
