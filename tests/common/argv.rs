//! Test command lines written as one string (shared by `tests/common` and
//! `tests/hostile_common`).

use std::path::Path;

/// A command line written as one string: its words, each `{}` replaced by the next of
/// `paths` (a path may hold spaces; the template's other words may not).
pub fn argv(template: &str, paths: &[&Path]) -> Vec<String> {
    let mut p = paths.iter();
    let v = template
        .split_whitespace()
        .map(|w| match w {
            "{}" => p.next().expect("a path for every {}").display().to_string(),
            _ => w.to_string(),
        })
        .collect();
    assert!(p.next().is_none(), "more paths than {{}} in {template:?}");
    v
}
