//! The one place that checks the paths a command reads and writes, and writes them.
//!
//! Inputs must be regular files (checked before they are opened: opening a FIFO blocks, a
//! device reads forever). Outputs must be a new path or an existing regular file; a device,
//! FIFO, directory or socket is never written through or replaced, and an output that is the
//! same file as one of the command's inputs is refused, so nothing a user gave as input is
//! ever modified.
//!
//! Three rules hold for every command of the CLI:
//! - **Inputs are never overwritten.** With [`guard_inputs`] on (the CLI turns it on first
//!   thing), every input that [`check_input`] passes is remembered, and every output
//!   ([`check_output`], and so every [`AtomicFile`] and every file of an [`OutputDir`]) that
//!   is the same file as one of them (same device and inode: a hard link or symlink counts)
//!   is refused, including files inside an output directory.
//! - **Every file is written to a temporary name and renamed** ([`AtomicFile`]:
//!   `NAME.partial` beside it, synced, renamed over `NAME`; removed on every failure), so a
//!   full disk or a kill never leaves a truncated file under a final name.
//! - **One overwrite rule** ([`claim_output_file`], [`OutputDir::plan`]): an existing output
//!   (a file, or a directory holding another run's files) is refused unless `--overwrite`;
//!   the files of an earlier run are removed only once the new run has been validated, and a
//!   failed run removes what it wrote (and the directory, if it made it).

use anyhow::{Context, Result, anyhow, bail};
use std::fs::Metadata;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// The inputs seen so far, (device, inode, path), when [`guard_inputs`] is on.
static INPUTS: Mutex<Option<Vec<(u64, u64, PathBuf)>>> = Mutex::new(None);

/// From now on, remember every input [`check_input`] passes and refuse any output that is
/// one of them. The CLI turns this on (a process runs one command); an embedding program
/// that reads and writes the same files over its life leaves it off.
pub fn guard_inputs() {
    let mut g = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(Vec::new());
    }
}

fn remember(path: &Path, m: &Metadata) {
    let mut g = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = g.as_mut()
        && !v.iter().any(|(d, i, _)| *d == m.dev() && *i == m.ino())
    {
        v.push((m.dev(), m.ino(), path.to_path_buf()));
    }
}

/// The input (remembered, or one of `inputs`) that is the same file as `m`, if any.
fn input_of(m: &Metadata, inputs: &[&Path]) -> Option<PathBuf> {
    for input in inputs {
        if let Ok(i) = std::fs::metadata(input)
            && i.dev() == m.dev()
            && i.ino() == m.ino()
        {
            return Some(input.to_path_buf());
        }
    }
    let g = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref()?
        .iter()
        .find(|(d, i, _)| *d == m.dev() && *i == m.ino())
        .map(|(_, _, p)| p.clone())
}

/// Check that `path` is an existing regular file (symlinks followed) before it is opened;
/// with [`guard_inputs`] on, remember it as an input.
pub fn check_input(path: &Path) -> Result<Metadata> {
    let shown = path.display();
    let m = std::fs::metadata(path).map_err(|e| anyhow!("{shown}: cannot read ({e})"))?;
    if !m.is_file() {
        bail!("{shown}: is {}, not a regular file", kind(&m));
    }
    remember(path, &m);
    Ok(m)
}

/// Check that `path` may be written: it does not exist yet or is a regular file, and it is
/// not the same file as any of `inputs` or any remembered input.
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
    if let Some(input) = input_of(&m, inputs) {
        bail!(
            "{shown}: the output is the same file as the input {}; refusing to overwrite it",
            input.display()
        );
    }
    Ok(())
}

/// The one overwrite rule for a single output file: it may be written when it is new, or
/// when it exists and `overwrite` (the `--overwrite` flag) says to replace it; never when it
/// is not a regular file or is an input ([`check_output`]). No side effect.
pub fn claim_output_file(path: &Path, overwrite: bool, inputs: &[&Path]) -> Result<()> {
    check_output(path, inputs)?;
    if !overwrite && std::fs::symlink_metadata(path).is_ok() {
        bail!(
            "{} exists: refusing to replace it (--overwrite replaces it)",
            path.display()
        );
    }
    Ok(())
}

/// `NAME.partial` beside `path`.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    PathBuf::from(tmp)
}

/// Create `path`'s temporary `NAME.partial`, new, mode 0666 less the umask. A stale
/// temporary of a killed run is a regular file and may go; anything else there (a
/// directory, FIFO, symlink) is not ours to touch.
pub fn fresh_temp(path: &Path) -> Result<(PathBuf, std::fs::File)> {
    let shown = path.display();
    let tmp = partial_path(path);
    match std::fs::symlink_metadata(&tmp) {
        Ok(m) if m.is_file() => std::fs::remove_file(&tmp)
            .with_context(|| format!("{shown}: cannot remove stale {}", tmp.display()))?,
        Ok(_) => bail!(
            "{shown}: {} exists and is not a regular file; remove it first",
            tmp.display()
        ),
        Err(_) => {}
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(&tmp)
        .with_context(|| format!("{shown}: cannot create {}", tmp.display()))?;
    Ok((tmp, f))
}

/// Move a finished temporary over `path`: checked once more right before (the target may
/// have changed meanwhile), then renamed.
pub fn commit_temp(tmp: &Path, path: &Path) -> Result<()> {
    check_output(path, &[])?;
    std::fs::rename(tmp, path).with_context(|| {
        format!(
            "{}: cannot move {} into place",
            path.display(),
            tmp.display()
        )
    })
}

/// An output file written to `NAME.partial` and renamed over `NAME` by
/// [`commit`](Self::commit) after an fsync; dropped uncommitted (an error, a full disk), the
/// temporary is removed, so no truncated file is ever left under either name.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    /// Start writing `path` (after [`check_output`]).
    pub fn create(path: &Path) -> Result<AtomicFile> {
        check_output(path, &[])?;
        let (tmp, f) = fresh_temp(path)?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: Some(std::io::BufWriter::with_capacity(1 << 16, f)),
        })
    }

    /// Flush, fsync and rename into place.
    pub fn commit(mut self) -> Result<()> {
        let shown = self.path.display().to_string();
        let out = self.out.take().context("already committed")?;
        let result = (|| {
            let f = out
                .into_inner()
                .map_err(|e| anyhow!("{shown}: cannot write ({})", e.error()))?;
            f.sync_all()
                .map_err(|e| anyhow!("{shown}: cannot write ({e})"))?;
            drop(f);
            commit_temp(&self.tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("already committed"))?
            .write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `bytes` to `path` atomically ([`AtomicFile`]).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)
        .map_err(|e| anyhow!("{}: cannot write ({e})", path.display()))?;
    f.commit()
}

/// An output directory of one run, planned and checked before anything is touched
/// ([`plan`](OutputDir::plan): no side effect), then opened ([`open`](DirPlan::open): made
/// if missing, an earlier run's files removed under `--overwrite`). Its files are the names
/// `ours` accepts; while the run has not [`finish`](OutputDir::finish)ed, dropping it
/// removes every such file (and its temporary) and the directory if the run made it.
pub struct OutputDir {
    dir: PathBuf,
    ours: Names,
    /// The outermost directory this run made (None: the directory was there).
    created: Option<PathBuf>,
    finished: bool,
}

/// Which names in an output directory are the run's files.
pub type Names = Box<dyn Fn(&str) -> bool>;

/// A checked plan for an [`OutputDir`]: what exists and what `--overwrite` will remove.
pub struct DirPlan {
    dir: PathBuf,
    ours: Names,
    old: Vec<PathBuf>,
    exists: bool,
}

/// The entries of `dir` whose names `ours` accepts (and their temporaries), each checked to
/// be a regular file that is no input when `inputs` is given.
fn our_files(
    dir: &Path,
    ours: &dyn Fn(&str) -> bool,
    inputs: Option<&[&Path]>,
) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut old = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let base = name.strip_suffix(".partial").unwrap_or(&name);
        if ours(base) {
            let p = e.path();
            if name.ends_with(".partial") {
                // A temporary of a killed run: ours to remove if it is a plain file.
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    old.push(p);
                }
                continue;
            }
            if let Some(inputs) = inputs {
                check_output(&p, inputs)?;
            }
            old.push(p);
        }
    }
    old.sort();
    Ok(old)
}

impl OutputDir {
    /// Check `dir` for a run whose files are the names `ours` accepts: it must be missing or
    /// a directory; files of an earlier run there are refused unless `overwrite` (and never
    /// removed when one of them is an input). Nothing is created or removed.
    pub fn plan(
        dir: &Path,
        ours: impl Fn(&str) -> bool + 'static,
        overwrite: bool,
        inputs: &[&Path],
    ) -> Result<DirPlan> {
        let ours: Names = Box::new(ours);
        let shown = dir.display();
        let (exists, old) = match std::fs::metadata(dir) {
            Err(_) => (false, Vec::new()),
            Ok(m) if m.is_dir() => (true, our_files(dir, &*ours, Some(inputs))?),
            Ok(m) => bail!(
                "{shown}: the output directory exists and is {}; refusing to write into it",
                kind(&m)
            ),
        };
        let finals: Vec<&PathBuf> = old
            .iter()
            .filter(|p| p.extension().is_none_or(|e| e != "partial"))
            .collect();
        if !finals.is_empty() && !overwrite {
            bail!(
                "{shown} holds the outputs of another run ({} files such as {}): choose \
                 another --out, or --overwrite to remove them first",
                finals.len(),
                finals[0].file_name().unwrap_or_default().to_string_lossy()
            );
        }
        Ok(DirPlan {
            dir: dir.to_path_buf(),
            ours,
            old,
            exists,
        })
    }
}

impl DirPlan {
    /// Make the directory if missing, check that it can be written, and remove the earlier
    /// run's files.
    pub fn open(self) -> Result<OutputDir> {
        let shown = self.dir.display();
        let created = if self.exists {
            None
        } else {
            // The outermost missing directory on the way.
            let root = self
                .dir
                .ancestors()
                .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
                .last()
                .map(Path::to_path_buf);
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("cannot create output directory {shown}"))?;
            root
        };
        let out = OutputDir {
            dir: self.dir.clone(),
            ours: self.ours,
            created,
            finished: false,
        };
        let probe = self.dir.join(".checkergen-write-test");
        std::fs::write(&probe, b"")
            .with_context(|| format!("output directory {shown} is not writable"))?;
        std::fs::remove_file(&probe).ok();
        for p in &self.old {
            std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
        // Nothing of the earlier run is left, so what a drop removes is this run's.
        Ok(out)
    }
}

impl OutputDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `dir/name`; `name` must be one of this run's names.
    pub fn join(&self, name: &str) -> PathBuf {
        debug_assert!(
            (self.ours)(name),
            "{name} is not an output name of this directory"
        );
        self.dir.join(name)
    }

    /// The run is complete: its files stay.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for OutputDir {
    /// A run that did not finish leaves no partial output: its files go, and the directory
    /// if it made it (and nothing else is in it).
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Ok(files) = our_files(&self.dir, &*self.ours, None) {
            for p in files {
                let _ = std::fs::remove_file(p);
            }
        }
        // The directories this run made, innermost first (each only if empty).
        if let Some(root) = &self.created {
            for d in self.dir.ancestors() {
                if std::fs::remove_dir(d).is_err() || d == root.as_path() {
                    break;
                }
            }
        }
    }
}
