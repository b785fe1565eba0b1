//! The commands in README.md and docs/*.md run as written (issue 23 item 6).
//!
//! Every fenced block tagged `sh` is a shell block. It either runs, or the line just before
//! its opening fence is `<!-- not run: REASON -->` with a reason (a checkpoint, a GPU, the
//! network, a long run, the test suite itself). A block that runs goes through
//! `bash -eu -o pipefail` in a fresh temporary directory per document (so a document's blocks
//! see what its earlier blocks wrote, in order), with the built binary
//! (`CARGO_BIN_EXE_checkergen`) first on PATH as `checkergen`; a line that starts with
//! `cargo run --release -- ` runs as `checkergen ` (the README's main job). It must exit 0
//! within `BLOCK_TIMEOUT_S`.
//!
//! Also checked, since a command that no one runs rots the same way: no shell command hides
//! outside an `sh` block (an indented code block, or a fence with another tag than `usage`,
//! the tag of a synopsis such as `checkergen order --size N [--json]`); every
//! relative link between the documents names a file that exists and, with `#anchor`, a
//! heading in it; README's test command is the one `.ci/run` runs.
//!
//! Prints each block's file, line and time (or its reason), and the totals.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Wall-clock limit of one block (each is meant to take seconds in release).
const BLOCK_TIMEOUT_S: u32 = 120;
/// What a skipped block's marker line looks like.
const SKIP_OPEN: &str = "<!-- not run:";
const SKIP_CLOSE: &str = "-->";
/// Fence tags of shell blocks.
const SHELL_TAGS: &[&str] = &["sh", "bash", "shell"];
/// Fence tag of a synopsis (placeholders, `[optional]`, `a|b`): not run, not a command.
const USAGE_TAG: &str = "usage";

/// One fenced shell block of a document.
struct Block {
    doc: String,
    /// 1-based line of the opening fence.
    line: usize,
    script: String,
    /// `Some(reason)` when marked as not run.
    skip: Option<String>,
}

/// What reading the documents found: the shell blocks, the headings' anchors, the relative
/// links, and the problems (commands outside shell blocks, markers without a reason).
#[derive(Default)]
struct Docs {
    blocks: Vec<Block>,
    /// (doc, anchor) for every heading.
    anchors: BTreeSet<(String, String)>,
    /// (doc, line, target) for every relative link.
    links: Vec<(String, usize, String)>,
    problems: Vec<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and docs/*.md, as paths relative to the root, sorted.
fn documents() -> Vec<String> {
    let mut docs = vec!["README.md".to_string()];
    let mut more: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// GitHub's anchor of a heading: lower case, spaces to hyphens, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Does this line look like a shell command (what a shell block would hold)?
fn looks_like_command(line: &str) -> bool {
    let t = line.trim_start();
    ["checkergen ", "cargo ", "bash scripts/", "scripts/", "$ "]
        .iter()
        .any(|p| t.starts_with(p))
}

/// Relative link targets in one line of Markdown: `](target)` not starting with a scheme.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        if !target.contains("://") && !target.starts_with("mailto:") {
            out.push(target.to_string());
        }
        rest = &rest[end..];
    }
    out
}

fn read_docs(base: &Path, names: &[String]) -> Docs {
    let mut docs = Docs::default();
    for doc in names {
        let text = std::fs::read_to_string(base.join(doc))
            .unwrap_or_else(|e| panic!("{doc}: cannot read: {e}"));
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if let Some(tag) = trimmed.strip_prefix("```") {
                let tag = tag.trim().to_string();
                let open = i;
                let mut body = Vec::new();
                i += 1;
                while i < lines.len() && lines[i].trim() != "```" {
                    // Strip the fence's indentation (a block inside a list item).
                    let l = lines[i];
                    let cut = l.len() - l.trim_start().len();
                    body.push(&l[cut.min(indent)..]);
                    i += 1;
                }
                if i == lines.len() {
                    docs.problems
                        .push(format!("{doc}:{}: unclosed ``` fence", open + 1));
                }
                i += 1;
                if SHELL_TAGS.contains(&tag.as_str()) {
                    let before = if open > 0 { lines[open - 1].trim() } else { "" };
                    let skip = before
                        .strip_prefix(SKIP_OPEN)
                        .and_then(|r| r.strip_suffix(SKIP_CLOSE))
                        .map(|r| r.trim().to_string());
                    if skip.as_deref() == Some("") {
                        docs.problems.push(format!(
                            "{doc}:{}: `{SKIP_OPEN} -->` needs a reason",
                            open + 1
                        ));
                    }
                    docs.blocks.push(Block {
                        doc: doc.clone(),
                        line: open + 1,
                        script: body.join("\n") + "\n",
                        skip,
                    });
                } else if tag == USAGE_TAG {
                    // A synopsis: placeholders, not a command.
                } else if let Some(l) = body.iter().find(|l| looks_like_command(l)) {
                    docs.problems.push(format!(
                        "{doc}:{}: a ```{tag} block holds the shell command `{}`: tag it ```sh",
                        open + 1,
                        l.trim()
                    ));
                }
                continue;
            }
            if trimmed.starts_with('#') {
                docs.anchors
                    .insert((doc.clone(), anchor(trimmed.trim_start_matches('#'))));
            }
            // An indented code block (4 spaces beyond any list item's 2) holding a command.
            if indent >= 4 && looks_like_command(line) {
                docs.problems.push(format!(
                    "{doc}:{}: shell command outside a ```sh block: `{}`",
                    i + 1,
                    trimmed
                ));
            }
            for target in link_targets(line) {
                docs.links.push((doc.clone(), i + 1, target));
            }
            i += 1;
        }
    }
    docs
}

/// Runs one block in `dir` with `bin` first on PATH; returns an error text on failure.
fn run_block(block: &Block, dir: &Path, bin: &Path) -> Result<(), String> {
    let script: String = block
        .script
        .lines()
        .map(|l| match l.strip_prefix("cargo run --release -- ") {
            Some(rest) => format!("checkergen {rest}\n"),
            None => format!("{l}\n"),
        })
        .collect();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .arg(BLOCK_TIMEOUT_S.to_string())
        .args(["bash", "-eu", "-o", "pipefail", "-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "exit {:?}{}\n--- script\n{script}--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        if out.status.code() == Some(124) {
            format!(" (timed out after {BLOCK_TIMEOUT_S} s)")
        } else {
            String::new()
        },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
fn documented_commands_run() {
    let names = documents();
    let docs = read_docs(&root(), &names);
    let mut problems = docs.problems.clone();

    // Links between the documents.
    for (doc, line, target) in &docs.links {
        let (file, frag) = match target.split_once('#') {
            Some((f, a)) => (f, Some(a)),
            None => (target.as_str(), None),
        };
        let base = Path::new(doc).parent().unwrap();
        let resolved = if file.is_empty() {
            PathBuf::from(doc)
        } else {
            base.join(file)
        };
        // Normalize `docs/../X` to `X`, as the anchors are keyed.
        let norm: PathBuf = resolved.components().fold(PathBuf::new(), |mut p, c| {
            match c {
                std::path::Component::ParentDir => {
                    p.pop();
                }
                c => p.push(c),
            }
            p
        });
        if !root().join(&norm).exists() {
            problems.push(format!("{doc}:{line}: link to {target}: no such file"));
            continue;
        }
        if let Some(a) = frag {
            let key = (norm.to_string_lossy().into_owned(), a.to_string());
            if names.contains(&key.0) && !docs.anchors.contains(&key) {
                problems.push(format!("{doc}:{line}: link to {target}: no such heading"));
            }
        }
    }

    // README's test command is what .ci/run runs.
    let readme_test: Vec<&str> = docs
        .blocks
        .iter()
        .filter(|b| b.doc == "README.md")
        .flat_map(|b| b.script.lines())
        .filter(|l| l.starts_with("cargo test"))
        .collect();
    let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    match readme_test.as_slice() {
        [cmd] if ci.lines().any(|l| l.starts_with(&format!("{cmd} 2>&1"))) => {}
        [cmd] => problems.push(format!(
            "README's test command `{cmd}` is not what .ci/run runs"
        )),
        other => problems.push(format!(
            "README.md must hold exactly one `cargo test` line in its sh blocks, has {}",
            other.len()
        )),
    }

    // The blocks themselves.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("docs_commands");
    let _ = std::fs::remove_dir_all(&tmp);
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_checkergen"), bin.join("checkergen")).unwrap();
    // One thread per document (its blocks in order, in its own directory); the lines are
    // printed per document once it is done, so they do not interleave.
    let start = Instant::now();
    let results: Vec<(usize, usize, Vec<String>, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|doc| {
                let (docs, tmp, bin) = (&docs, &tmp, &bin);
                s.spawn(move || {
                    let dir = tmp.join(doc.replace('/', "_"));
                    std::fs::create_dir_all(&dir).unwrap();
                    let (mut ran, mut skipped, mut lines, mut failures) = (0, 0, vec![], vec![]);
                    for b in docs.blocks.iter().filter(|b| &b.doc == doc) {
                        if let Some(reason) = &b.skip {
                            lines.push(format!("skip {}:{}: {reason}", b.doc, b.line));
                            skipped += 1;
                            continue;
                        }
                        let t = Instant::now();
                        let result = run_block(b, &dir, bin);
                        lines.push(format!(
                            "ran  {}:{} ({:.1} s){}",
                            b.doc,
                            b.line,
                            t.elapsed().as_secs_f64(),
                            if result.is_ok() { "" } else { " FAILED" }
                        ));
                        ran += 1;
                        if let Err(e) = result {
                            failures.push(format!("{}:{}: {e}", b.doc, b.line));
                        }
                    }
                    (ran, skipped, lines, failures)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut ran, mut skipped) = (0, 0);
    for (r, s, lines, failures) in results {
        ran += r;
        skipped += s;
        for l in lines {
            println!("{l}");
        }
        problems.extend(failures);
    }
    println!(
        "docs commands: {ran} blocks run, {skipped} skipped (each with its reason), {} documents, \
         {:.1} s",
        names.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(ran > 0, "no shell block ran");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn the_parser_sees_blocks_markers_and_stray_commands() {
    // The checks above rest on the parser: a document it misreads would pass vacuously.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("docs_parser");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("docs")).unwrap();
    let text = "# T\n\n```sh\ncheckergen order --size 2\n```\n\n<!-- not run: why -->\n\
                ```sh\nexit 1\n```\n\n<!-- not run: -->\n```sh\ntrue\n```\n\n    \
                checkergen stray\n\n```text\ncargo build\n```\n\n```usage\ncheckergen order \
                --size N\n```\n\n- item\n  ```sh\n  \
                checkergen schedule --scale-ratio 2\n  ```\n";
    std::fs::write(dir.join("docs/t.md"), text).unwrap();
    let parsed = read_docs(&dir, &["docs/t.md".to_string()]);
    let b = &parsed.blocks;
    assert_eq!(b.len(), 4, "blocks");
    assert_eq!(b[0].script, "checkergen order --size 2\n");
    assert_eq!(b[0].skip, None);
    assert_eq!(b[1].skip.as_deref(), Some("why"));
    assert_eq!(b[2].skip.as_deref(), Some(""));
    assert_eq!(b[3].script, "checkergen schedule --scale-ratio 2\n");
    let p = parsed.problems.join("\n");
    assert!(p.contains("needs a reason"), "{p}");
    assert!(
        p.contains("outside a ```sh block: `checkergen stray`"),
        "{p}"
    );
    assert!(
        p.contains("```text block holds the shell command `cargo build`"),
        "{p}"
    );
    assert_eq!(parsed.problems.len(), 3, "{p}");
    assert!(parsed.anchors.contains(&("docs/t.md".into(), "t".into())));
    assert_eq!(anchor("`sample` and `generate`"), "sample-and-generate");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The options `checkergen SUB --help` lists (long names, first on their line; not --help
/// and --version).
fn help_options(bin: &str, sub: &str) -> Vec<String> {
    let out = Command::new(bin).args([sub, "--help"]).output().unwrap();
    assert!(out.status.success(), "checkergen {sub} --help failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let t = match t.strip_prefix('-') {
                Some(r) if !r.starts_with('-') => r.split_once(", ").map(|(_, rest)| rest)?,
                _ => t,
            };
            let name: String = t
                .strip_prefix("--")?
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty() && name != "help" && name != "version").then(|| format!("--{name}"))
        })
        .collect()
}

/// Is `opt` in `text` as a whole option name (not the prefix of a longer one)?
fn mentions(text: &str, opt: &str) -> bool {
    text.match_indices(opt).any(|(i, _)| {
        !text[i + opt.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn cli_md_documents_every_subcommand_and_option() {
    let bin = env!("CARGO_BIN_EXE_checkergen");
    let top = Command::new(bin).arg("--help").output().unwrap();
    let top = String::from_utf8(top.stdout).unwrap();
    let subs: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|s| s != "help")
        .collect();
    assert!(subs.len() >= 10, "subcommands parsed from --help: {subs:?}");
    let text = std::fs::read_to_string(root().join("docs/cli.md")).unwrap();
    // `## ` sections: the subcommand's own, and the shared conventions.
    let mut sections = std::collections::BTreeMap::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            name = h.trim().trim_matches('`').to_string();
        }
        sections
            .entry(name.clone())
            .or_insert_with(String::new)
            .push_str(line);
        sections.get_mut(&name).unwrap().push('\n');
    }
    let shared = sections.get("Conventions").cloned().unwrap_or_default();
    let mut missing = Vec::new();
    let mut options = 0;
    for sub in &subs {
        let Some(own) = sections.get(sub) else {
            missing.push(format!("no `## \\`{sub}\\`` section"));
            continue;
        };
        for opt in help_options(bin, sub) {
            options += 1;
            if !mentions(own, &opt) && !mentions(&shared, &opt) {
                missing.push(format!("{sub} {opt}"));
            }
        }
    }
    println!(
        "docs/cli.md: {} subcommands, {options} options from --help, {} missing",
        subs.len(),
        missing.len()
    );
    assert!(options > 50, "options parsed from --help: {options}");
    assert!(
        missing.is_empty(),
        "docs/cli.md lacks:\n{}",
        missing.join("\n")
    );
}
