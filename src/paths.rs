//! The one place that checks the paths a command reads and writes.
//!
//! Inputs must be regular files (checked before they are opened: opening a FIFO blocks, a
//! device reads forever). Outputs must be a new path or an existing regular file; a device,
//! FIFO, directory or socket is never written through or replaced, and an output that is the
//! same file as one of the command's inputs is refused, so nothing a user gave as input is
//! ever modified.

use anyhow::{Result, anyhow, bail};
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// What a non-regular file is, for messages.
fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Check that `path` is an existing regular file (symlinks followed) before it is opened.
pub fn check_input(path: &Path) -> Result<Metadata> {
    let shown = path.display();
    let m = std::fs::metadata(path).map_err(|e| anyhow!("{shown}: cannot read ({e})"))?;
    if !m.is_file() {
        bail!("{shown}: is {}, not a regular file", kind(&m));
    }
    Ok(m)
}

/// Check that `path` may be written: it does not exist yet or is a regular file, and it is
/// not the same file as any of `inputs`.
pub fn check_output(path: &Path, inputs: &[&Path]) -> Result<()> {
    let shown = path.display();
    let Ok(m) = std::fs::metadata(path) else {
        return Ok(());
    };
    if !m.is_file() {
        bail!(
            "{shown}: the output exists and is {}; refusing to write or replace it",
            kind(&m)
        );
    }
    for input in inputs {
        if let Ok(i) = std::fs::metadata(input)
            && i.dev() == m.dev()
            && i.ino() == m.ino()
        {
            bail!(
                "{shown}: the output is the same file as the input {}; refusing to overwrite it",
                input.display()
            );
        }
    }
    Ok(())
}

/// Create (or truncate) the output file `path` after [`check_output`]; mode 0666 less the
/// umask, like any file a shell creates.
pub fn create_output(path: &Path) -> Result<std::fs::File> {
    check_output(path, &[])?;
    std::fs::File::create(path).map_err(|e| anyhow!("{}: cannot create ({e})", path.display()))
}
