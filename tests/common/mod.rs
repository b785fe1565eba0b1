//! Shared helpers for integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The golden folder `../shared/golden` beside the checkout.
///
/// Missing-golden rule: when it is absent, a test that needs it fails under CI (`CI=true`)
/// and otherwise skips with a loud message (the caller returns on `None`).
pub fn golden_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden");
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "CI=true but the golden folder {} is missing; CI must have ../shared beside the clone",
            dir.display()
        );
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED: {} not found; golden parity NOT checked !!!!!!!!\n",
        dir.display()
    );
    None
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
