//! The legacy `torch.save` format (torch < 1.6, or `_use_new_zipfile_serialization=False`):
//! not an archive but pickles back to back, then the raw storages.
//!
//! ```text
//! pickle  magic number 0x1950a86a20f9469cfc6c
//! pickle  protocol version 1001
//! pickle  sys_info {'protocol_version', 'little_endian', 'type_sizes'}
//! pickle  the object; each storage a persistent id
//!         ('storage', torch.<Type>Storage, root_key, location, numel, view_metadata),
//!         view_metadata None or (view_key, offset, size) in elements of the root storage
//! pickle  the list of storage keys, in the order their bytes follow
//! for each key of that list: u64 element count (little-endian), then the elements
//! ```
//!
//! Each pickle has its own memo. Nothing says where a storage starts but the sizes of the
//! ones before it, so the storages are located by one scan over the counts, each checked
//! against the file's length and against the element count its persistent id gives, before
//! any tensor is read; a key listed twice or never, an unknown storage type (its element size
//! is needed to find the next one) or bytes after the last storage are errors. Tensor bytes
//! are then read lazily by range, as from the zip format's entries.

use super::pickle::{Truncated, Value, esc};
use super::tensor::PthDtype;
use super::torch::{Format, Storage, Torch};
use super::zip::read_at;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::rc::Rc;

/// The first pickle of every legacy file.
pub(super) const MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// The second pickle.
pub(super) const PROTOCOL_VERSION: i64 = 1001;

/// How much of the file is read first to parse the pickles (grown by 4x while a pickle runs
/// past the end of what was read).
const FIRST_READ: u64 = 1 << 20;

/// Whether a file is in the legacy format: it starts with a pickle (the `PROTO` opcode that
/// `torch.save`'s pickle protocol 2 writes first), where a zip starts with `PK`.
pub(super) fn looks_legacy(head: &[u8]) -> bool {
    head.first() == Some(&0x80)
}

/// Where one storage's elements are in the file.
#[derive(Clone, Copy, Debug)]
struct Located {
    /// Byte offset of the first element.
    start: u64,
    /// Length in bytes.
    bytes: u64,
}

/// An open legacy file: its storages located, their bytes still on disk.
pub(super) struct Legacy {
    file: File,
    len: u64,
    storages: HashMap<String, Located>,
}

/// The parsed pickles.
struct Head {
    root: Value,
    /// Every storage a persistent id names, by root key.
    storages: BTreeMap<String, Rc<Storage>>,
    /// The storage list, in file order.
    keys: Vec<String>,
    /// Byte offset just after the last pickle.
    end: usize,
}

impl Legacy {
    /// Parse the pickles of `file` and locate its storages; returns the unpickled object.
    pub(super) fn open(file: File) -> Result<(Legacy, Value)> {
        let len = file.metadata()?.len();
        let mut want = len.min(FIRST_READ);
        let head = loop {
            let buf = read_at(&file, len, 0, want)?;
            match parse_pickles(&buf) {
                Ok(h) => break h,
                Err(e) if want < len && e.downcast_ref::<Truncated>().is_some() => {
                    want = len.min(want.saturating_mul(4));
                }
                Err(e) => return Err(e.context("legacy torch.save format")),
            }
        };
        let storages = locate(&file, len, &head).context("legacy torch.save format")?;
        Ok((
            Legacy {
                file,
                len,
                storages,
            },
            head.root,
        ))
    }

    /// Byte length of storage `key`.
    pub(super) fn storage_bytes(&self, key: &str) -> Result<u64> {
        Ok(self.get(key)?.bytes)
    }

    /// `len` bytes at byte `offset` of storage `key`.
    pub(super) fn read(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let s = self.get(key)?;
        if offset.checked_add(len).is_none_or(|end| end > s.bytes) {
            bail!(
                "read of {len} bytes at offset {offset} past the end of storage {} ({} bytes)",
                esc(key),
                s.bytes
            );
        }
        read_at(&self.file, self.len, s.start + offset, len)
    }

    fn get(&self, key: &str) -> Result<Located> {
        self.storages
            .get(key)
            .copied()
            .ok_or_else(|| anyhow!("its storage {} is not in the file", esc(key)))
    }

    /// Number of storages.
    pub(super) fn len(&self) -> usize {
        self.storages.len()
    }
}

/// The five pickles at the start of `buf`.
fn parse_pickles(buf: &[u8]) -> Result<Head> {
    let mut pos = 0usize;
    let mut next = |what: &str, torch: &Torch| -> Result<Value> {
        let (v, n) = torch
            .unpickle(&buf[pos..])
            .with_context(|| format!("{what} (the pickle at byte {pos})"))?;
        pos += n;
        Ok(v)
    };
    let plain = Torch::new(Format::Legacy);
    match next("the magic number", &plain)? {
        Value::BigInt(Some(MAGIC)) => {}
        other => bail!(
            "not a torch.save file: its first pickle is {}, not torch's magic number \
             0x{MAGIC:x}",
            other.kind()
        ),
    }
    match next("the protocol version", &plain)? {
        Value::Int(PROTOCOL_VERSION) => {}
        other => bail!(
            "protocol version {}, expected {PROTOCOL_VERSION}",
            other.kind()
        ),
    }
    let sys_info = next("sys_info", &plain)?;
    if !matches!(sys_info, Value::Dict(_)) {
        bail!("sys_info is {}, not a dict", sys_info.kind());
    }
    if let Some(Value::Bool(false)) = sys_info.entry("little_endian") {
        bail!("written on a big-endian machine, which this reader does not support");
    }
    let torch = Torch::new(Format::Legacy);
    let root = next("the saved object", &torch)?;
    let list = next("the storage list", &plain)?;
    let keys = list
        .items()
        .ok_or_else(|| anyhow!("the storage list is {}, not a list", list.kind()))?
        .iter()
        .map(|k| match k {
            Value::Str(s) => Ok(s.to_string()),
            other => bail!("the storage list holds {}, not a key", other.kind()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Head {
        root,
        storages: torch.into_storages(),
        keys,
        end: pos,
    })
}

/// One pass over the storages in list order: each count checked against its persistent id
/// and the file's length.
fn locate(file: &File, len: u64, head: &Head) -> Result<HashMap<String, Located>> {
    let mut out: HashMap<String, Located> = HashMap::with_capacity(head.storages.len());
    let mut pos = head.end as u64;
    for key in &head.keys {
        let shown = esc(key);
        let s = head.storages.get(key).ok_or_else(|| {
            anyhow!(
                "the storage list names storage {shown}, which no persistent id in the pickle names"
            )
        })?;
        if out.contains_key(key) {
            bail!("storage {shown} is listed twice in the storage list");
        }
        let dtype: PthDtype = s.dtype.ok_or_else(|| {
            anyhow!(
                "storage {shown} has the unsupported type torch.{} (its element size is needed to \
                 find the storages after it)",
                esc(&s.class)
            )
        })?;
        if pos.checked_add(8).is_none_or(|e| e > len) {
            bail!(
                "the file ends at byte {len}, inside the element count of storage {shown} (at byte {pos})"
            );
        }
        let count = u64::from_le_bytes(read_at(file, len, pos, 8)?.try_into().unwrap());
        let start = pos + 8;
        let bytes = count.checked_mul(dtype.size() as u64);
        let end = bytes.and_then(|b| start.checked_add(b));
        let Some(end) = end.filter(|&e| e <= len) else {
            bail!(
                "storage {shown} claims {count} {dtype} elements at byte {start}, more than the \
                 {} bytes left in the file ({len} bytes)",
                len - start.min(len)
            );
        };
        if count != s.numel as u64 {
            bail!(
                "storage {shown} holds {count} {dtype} elements, but its persistent id says {}",
                s.numel
            );
        }
        out.insert(
            key.clone(),
            Located {
                start,
                bytes: end - start,
            },
        );
        pos = end;
    }
    if let Some(key) = head.storages.keys().find(|k| !out.contains_key(*k)) {
        bail!(
            "storage {} is named in the pickle but missing from the storage list",
            esc(key)
        );
    }
    if pos != len {
        bail!(
            "{} bytes of trailing data after the last storage (which ends at byte {pos} of {len})",
            len - pos
        );
    }
    Ok(out)
}
