//! Counting the lines of a command's error, shared by tests/common and tests/hostile_common.

/// Lines of a command's error, not counting what clap puts after a blank line (its tip and
/// the usage of the subcommand): a bad input must be one line.
pub fn error_lines(err: &str) -> usize {
    err.trim()
        .split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .count()
}
