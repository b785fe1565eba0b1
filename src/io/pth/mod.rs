//! Reading PyTorch checkpoints (`torch.save` files) without Python.
//!
//! Since torch 1.6 a `.pth` file is a zip archive (entries stored, not compressed, data
//! aligned to 64 bytes, ZIP64 records once the file passes 4 GiB) holding:
//!
//! * `<prefix>/data.pkl`: the pickled object (protocol 2 by default). Every tensor in it is
//!   `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[,
//!   metadata])`, and every storage is a *persistent id*
//!   `('storage', torch.<Type>Storage, key, location, numel)` that points at the entry
//!   `<prefix>/data/<key>` holding the raw little-endian elements;
//! * `<prefix>/byteorder` (`little` or `big`; absent in old files, meaning little);
//! * bookkeeping entries (`version`, `.format_version`, ...) this reader ignores.
//!
//! Files written by torch < 1.6 (or with `_use_new_zipfile_serialization=False`, as the FID
//! Inception weights are) use the LEGACY format instead: five pickles (magic number,
//! protocol version, sys_info, the object, the storage key list) followed by the raw
//! storages. [`PthCheckpoint::open`] tells the two apart by content (a pickle starts with
//! the `PROTO` byte 0x80, a zip with `PK`), not by the file's name; both give the same
//! tensors through the same allowlist.
//!
//! Layers, one module each:
//! * `tensor`: the dtypes, tensor descriptions and materialized tensors every layer shares
//!   (below all of them; re-exported here);
//! * `zip`: the archive (end-of-central-directory and ZIP64 records, central directory,
//!   stored entries read by byte range);
//! * `legacy`: the legacy format (its pickles, then one checked scan that locates every
//!   storage; storage bytes read by range);
//! * `pickle`: the pickle VM (protocols 0-5, an `OpCode` enum), which
//!   builds Python's built-in values and never resolves a global itself;
//! * `torch`: the globals it interprets (one allowlist: `OrderedDict`, `_rebuild_tensor_v2`,
//!   `_rebuild_parameter`, the storage classes, ...) and the persistent ids of storages;
//!   every other class or function (`argparse.Namespace`, `pathlib.PosixPath`, numpy
//!   scalars, ...) is an opaque value, so a checkpoint that carries such entries next to its
//!   weights still loads, and nothing in a pickle is ever executed;
//! * this module: the checkpoint (`data.pkl`, `byteorder`, `data/<key>`, or the legacy
//!   storages) and its tensors.
//!
//! Tensors are parsed as descriptions (dtype, shape, stride, offset, storage key); their bytes
//! are read from the archive only when asked for, so selecting the model from a multi-GB
//! checkpoint with optimizer state reads only the model's storages. Views (non-zero offset,
//! transposed strides, several tensors sharing one storage) are materialized as dense
//! row-major data.

mod legacy;
mod pickle;
mod tensor;
mod torch;
mod zip;

use legacy::Legacy;
use pickle::{Value, esc};
pub use tensor::{PthDtype, PthTensor, StateDict, TensorInfo};
use zip::{Archive, NOT_TORCH_ZIP};
pub use zip::{StoredEntry, stored_zip};

use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------------------------------
// Checkpoint
// ------------------------------------------------------------------------------------------

/// An open checkpoint: where its storages are and the unpickled object tree. Tensor data stays
/// on disk until [`PthCheckpoint::read_tensor`] asks for it.
pub struct PthCheckpoint {
    path: PathBuf,
    source: Storages,
    root: Value,
}

/// Where a checkpoint's storages are: the two `torch.save` formats.
enum Storages {
    /// torch >= 1.6: entries `<prefix>data/<key>` of a zip archive.
    Zip {
        archive: Archive,
        /// Archive folder with its trailing slash (`"checkpoint-last/"`), or empty.
        prefix: String,
        big_endian: bool,
    },
    /// torch < 1.6: raw storages after the pickles (`legacy.rs`).
    Legacy(Legacy),
}

impl fmt::Debug for PthCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PthCheckpoint");
        d.field("path", &self.path);
        match &self.source {
            Storages::Zip {
                archive, prefix, ..
            } => d
                .field("format", &"zip")
                .field("prefix", prefix)
                .field("entries", &archive.len()),
            Storages::Legacy(l) => d.field("format", &"legacy").field("storages", &l.len()),
        };
        d.finish()
    }
}

impl PthCheckpoint {
    /// Open a checkpoint in either `torch.save` format, told apart by content (a zip, or
    /// pickles followed by raw storages), and unpickle it (no tensor data is read).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        crate::paths::check_input(&path)?;
        let file = File::open(&path).with_context(|| format!("{shown}: cannot open"))?;
        let len = file
            .metadata()
            .with_context(|| format!("{shown}: cannot open"))?
            .len();
        let head = zip::read_at(&file, len, 0, len.min(4)).with_context(|| shown.clone())?;
        if legacy::looks_legacy(&head) {
            let (legacy, root) = Legacy::open(file).with_context(|| shown.clone())?;
            return Ok(PthCheckpoint {
                path,
                source: Storages::Legacy(legacy),
                root,
            });
        }
        let archive = Archive::new(file).with_context(|| shown.clone())?;
        let pkl_name = find_data_pkl(&archive).with_context(|| shown.clone())?;
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();

        let big_endian = match archive.get(&format!("{prefix}byteorder")) {
            Some(e) => {
                let raw = archive.read_all(e).with_context(|| shown.clone())?;
                match String::from_utf8_lossy(&raw).trim() {
                    "little" => false,
                    "big" => true,
                    other => bail!("{shown}: unknown byteorder {other:?} in {prefix}byteorder"),
                }
            }
            None => false,
        };

        let pkl_entry = archive
            .get(&pkl_name)
            .ok_or_else(|| anyhow!("{shown}: {pkl_name} vanished from the index"))?;
        let pkl = archive.read_all(pkl_entry).with_context(|| shown.clone())?;
        let root =
            torch::unpickle(&pkl).with_context(|| format!("{shown}: cannot read {pkl_name}"))?;
        Ok(PthCheckpoint {
            path,
            source: Storages::Zip {
                archive,
                prefix,
                big_endian,
            },
            root,
        })
    }

    /// `"zip"` (torch >= 1.6) or `"legacy"` (torch < 1.6).
    pub fn format(&self) -> &'static str {
        match self.source {
            Storages::Zip { .. } => "zip",
            Storages::Legacy(_) => "legacy",
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The string keys of the top-level dict (empty if the top level is not a dict).
    pub fn top_level_keys(&self) -> Vec<String> {
        match &self.root {
            Value::Dict(d) => d
                .borrow()
                .entries
                .iter()
                .filter_map(|(k, _)| k.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the top-level dict has `key` (with any value, `None` included).
    pub fn has_entry(&self, key: &str) -> bool {
        self.root_entry(key).is_some()
    }

    fn root_entry(&self, key: &str) -> Option<Value> {
        self.root.entry(key)
    }

    /// The state dict stored under top-level `key` (`"model"`, `"model_ema"`, `"state_dict"`).
    ///
    /// If the top-level object is itself a state dict (a dict of tensors) and has no such
    /// entry, `"model"` selects the top level. Entries that are not tensors are skipped.
    pub fn state_dict(&self, key: &str) -> Result<StateDict> {
        let shown = self.path.display();
        match self.root_entry(key) {
            Some(Value::None) => bail!(
                "{shown}: '{key}' is None{}",
                if key == "model_ema" {
                    " (this checkpoint was saved without EMA weights; convert without --ema)"
                } else {
                    ""
                }
            ),
            Some(v @ Value::Dict(_)) => {
                torch::collect_state_dict(&v).with_context(|| format!("{shown}: '{key}'"))
            }
            Some(other) => bail!("{shown}: '{key}' is {}, not a state dict", other.kind()),
            None => {
                if key == "model" && self.root_is_state_dict() {
                    return self.root_state_dict();
                }
                let keys = self.top_level_keys();
                if keys.is_empty() {
                    bail!(
                        "{shown}: no '{key}' entry: the top-level object is {}",
                        self.root.kind()
                    );
                }
                bail!(
                    "{shown}: no '{key}' entry (top-level keys: {})",
                    esc(&keys.join(", "))
                )
            }
        }
    }

    /// The top-level object read as a state dict (a bare `torch.save(model.state_dict())`).
    pub fn root_state_dict(&self) -> Result<StateDict> {
        if !matches!(self.root, Value::Dict(_)) {
            bail!(
                "{}: the top-level object is {}, not a state dict",
                self.path.display(),
                self.root.kind()
            );
        }
        torch::collect_state_dict(&self.root).with_context(|| self.path.display().to_string())
    }

    /// True when the top-level dict maps strings to tensors (at least one tensor).
    pub fn root_is_state_dict(&self) -> bool {
        match &self.root {
            Value::Dict(d) => {
                let d = d.borrow();
                d.entries
                    .iter()
                    .any(|(_, v)| v.ext::<torch::TensorRef>().is_some())
                    && d.entries.iter().all(|(k, _)| k.as_str().is_some())
            }
            _ => false,
        }
    }

    /// Read one tensor's elements (only the bytes its view covers) as dense row-major data.
    pub fn read_tensor(&self, name: &str, t: &TensorInfo) -> Result<PthTensor> {
        self.read_tensor_inner(t)
            .with_context(|| format!("{}: tensor '{}'", self.path.display(), esc(name)))
    }

    fn read_tensor_inner(&self, t: &TensorInfo) -> Result<PthTensor> {
        if t.shape.len() != t.stride.len() {
            bail!(
                "shape {:?} and stride {:?} differ in rank",
                t.shape,
                t.stride
            );
        }
        let es = t.dtype.size();
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &n| a.checked_mul(n))
            .ok_or_else(|| anyhow!("shape {:?} overflows", t.shape))?;
        if numel == 0 {
            return Ok(PthTensor {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: Vec::new(),
            });
        }
        // Elements spanned by the view, starting at its offset.
        let mut span = 1usize;
        for (&n, &s) in t.shape.iter().zip(&t.stride) {
            span = (n - 1)
                .checked_mul(s)
                .and_then(|x| span.checked_add(x))
                .ok_or_else(|| {
                    anyhow!("shape {:?} with stride {:?} overflows", t.shape, t.stride)
                })?;
        }
        let (storage_name, storage_bytes) = match &self.source {
            Storages::Zip {
                archive, prefix, ..
            } => {
                let name = format!("{prefix}data/{}", t.storage_key);
                let entry = archive.get(&name).ok_or_else(|| {
                    anyhow!("its storage {} is missing from the archive", esc(&name))
                })?;
                (name, entry.size)
            }
            Storages::Legacy(l) => (
                format!("storage {}", esc(&t.storage_key)),
                l.storage_bytes(&t.storage_key)?,
            ),
        };
        let end = t
            .offset
            .checked_add(span)
            .ok_or_else(|| anyhow!("storage offset overflows"))?;
        let end_bytes = (end as u64)
            .checked_mul(es as u64)
            .ok_or_else(|| anyhow!("view overflows"))?;
        if end > t.storage_numel || end_bytes > storage_bytes {
            bail!(
                "view (offset {}, shape {:?}, stride {:?}) needs {end} elements but {} \
                 holds {} {} elements ({storage_bytes} bytes)",
                t.offset,
                t.shape,
                t.stride,
                esc(&storage_name),
                (storage_bytes / es as u64).min(t.storage_numel as u64),
                t.dtype,
            );
        }
        let start_bytes = t.offset as u64 * es as u64;
        let (raw, big_endian) = match &self.source {
            Storages::Zip {
                archive,
                big_endian,
                ..
            } => {
                let entry = archive.get(&storage_name).ok_or_else(|| {
                    anyhow!(
                        "its storage {} is missing from the archive",
                        esc(&storage_name)
                    )
                })?;
                (
                    archive.read(entry, start_bytes, end_bytes - start_bytes)?,
                    *big_endian,
                )
            }
            Storages::Legacy(l) => (
                l.read(&t.storage_key, start_bytes, end_bytes - start_bytes)?,
                false,
            ),
        };
        let mut data = if t.is_contiguous() {
            raw
        } else {
            gather_strided(&raw, es, &t.shape, &t.stride, numel)
        };
        if big_endian && es > 1 {
            for c in data.chunks_exact_mut(es) {
                c.reverse();
            }
        }
        Ok(PthTensor {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
        })
    }
}

/// The bytes of the stored entry `name` of any zip file (an `.npz` from `np.savez`), through
/// the same checked reader as checkpoints (sizes against the file, CRC-32).
pub fn read_zip_entry(path: &Path, name: &str) -> Result<Vec<u8>> {
    let z = ZipReader::open(path)?;
    let size = z.size(name)?;
    z.read(name, 0, size)
}

/// Ranged reads of the stored entries of any zip file (e.g. to copy a large `.npz` entry in
/// chunks), through the checked reader: sizes against the file, each entry's CRC-32 on its
/// first read.
pub struct ZipReader {
    path: PathBuf,
    archive: Archive,
}

impl ZipReader {
    pub fn open(path: &Path) -> Result<ZipReader> {
        let shown = path.display();
        crate::paths::check_input(path)?;
        let file = File::open(path).with_context(|| format!("{shown}: cannot open"))?;
        let archive = Archive::new(file)
            .map_err(|e| anyhow!("{shown}: not a readable zip archive ({e:#})"))?;
        Ok(ZipReader {
            path: path.to_path_buf(),
            archive,
        })
    }

    /// Size in bytes of entry `name`.
    pub fn size(&self, name: &str) -> Result<u64> {
        Ok(self.entry(name)?.size)
    }

    /// `len` bytes at `offset` of entry `name`.
    pub fn read(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let e = self.entry(name)?;
        self.archive
            .read(e, offset, len)
            .with_context(|| self.path.display().to_string())
    }

    fn entry(&self, name: &str) -> Result<&zip::Entry> {
        self.archive
            .get(name)
            .ok_or_else(|| anyhow!("{}: no entry `{name}` in the archive", self.path.display()))
    }
}

/// Read the state dict under `key` (see [`PthCheckpoint::state_dict`]) with all its tensors.
pub fn read_state_dict(path: impl AsRef<Path>, key: &str) -> Result<BTreeMap<String, PthTensor>> {
    let ckpt = PthCheckpoint::open(path)?;
    let sd = ckpt.state_dict(key)?;
    sd.iter()
        .map(|(name, info)| Ok((name.clone(), ckpt.read_tensor(name, info)?)))
        .collect()
}

/// Copy a strided view (relative to its first element) into dense row-major order.
fn gather_strided(
    raw: &[u8],
    es: usize,
    shape: &[usize],
    stride: &[usize],
    numel: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(numel * es);
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    for _ in 0..numel {
        let off: usize = idx.iter().zip(stride).map(|(i, s)| i * s).sum();
        out.extend_from_slice(&raw[off * es..(off + 1) * es]);
        for d in (0..rank).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// The `data.pkl` entry: `<archive>/data.pkl` (one folder level) or a bare `data.pkl`.
fn find_data_pkl(archive: &Archive) -> Result<String> {
    let mut found: Vec<&String> = archive
        .names()
        .filter(|n| *n == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1))
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("{NOT_TORCH_ZIP} (a zip archive without a data.pkl entry)"),
        many => bail!(
            "{NOT_TORCH_ZIP} (several data.pkl entries: {})",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_gather() {
        // A 2x3 view of a 3x2 row-major storage, transposed: stride (1, 2).
        let raw: Vec<u8> = (0u8..6).collect();
        assert_eq!(
            gather_strided(&raw, 1, &[2, 3], &[1, 2], 6),
            vec![0, 2, 4, 1, 3, 5]
        );
        let t = TensorInfo {
            dtype: PthDtype::U8,
            shape: vec![2, 1, 3],
            stride: vec![3, 99, 1],
            offset: 0,
            storage_key: "0".into(),
            storage_numel: 6,
        };
        assert!(t.is_contiguous());
    }

    /// A stored zip in memory (see [`zip::stored_zip`]).
    fn build_zip(files: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let entries: Vec<StoredEntry> = files
            .iter()
            .map(|&(name, data)| StoredEntry {
                name,
                data,
                claimed_size: None,
            })
            .collect();
        stored_zip(&entries, zip64)
    }

    /// `{'model': {'w': tensor}}` where w is a 2x2 float32 view at offset 1 of storage '0'
    /// with strides (1, 2) (a transposed view), pickled like torch.save.
    fn tiny_pickle() -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(
            b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01ccollections\nOrderedDict\nq\x02)Rq\x03",
        );
        p.extend_from_slice(b"X\x01\x00\x00\x00wq\x04ctorch._utils\n_rebuild_tensor_v2\nq\x05(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storageq\x06ctorch\nFloatStorage\nq\x07X\x01\x00\x00\x000q\x08X\x03\x00\x00\x00cpuq\tK\x05tq\nQ");
        p.extend_from_slice(
            b"K\x01K\x02K\x02\x86q\x0bK\x01K\x02\x86q\x0c\x89h\x02)Rq\rtq\x0eRq\x0fss.",
        );
        p
    }

    fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("checkergen-pth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_plain_and_zip64_archives() {
        let storage: Vec<u8> = [0.0f32, 1.0, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let pkl = tiny_pickle();
        for zip64 in [false, true] {
            let files: [(&str, &[u8]); 3] = [
                ("ck/data.pkl", &pkl),
                ("ck/byteorder", b"little"),
                ("ck/data/0", &storage),
            ];
            let path = write_temp(&format!("z{zip64}.pth"), &build_zip(&files, zip64));
            let sd = read_state_dict(&path, "model").unwrap();
            let w = &sd["w"];
            assert_eq!(w.shape, vec![2, 2]);
            // Elements at offset 1 + i*1 + j*2: [[1, 3], [2, 4]].
            assert_eq!(w.to_f32(), vec![1.0, 3.0, 2.0, 4.0], "zip64={zip64}");
        }
        // Big-endian archives are byte-swapped.
        let be: Vec<u8> = [0.0f32, 1.0, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let files: [(&str, &[u8]); 3] = [
            ("ck/data.pkl", &pkl),
            ("ck/byteorder", b"big"),
            ("ck/data/0", &be),
        ];
        let path = write_temp("be.pth", &build_zip(&files, false));
        assert_eq!(
            read_state_dict(&path, "model").unwrap()["w"].to_f32(),
            vec![1.0, 3.0, 2.0, 4.0]
        );
        // A storage too small for the view is a clear error.
        let files: [(&str, &[u8]); 2] = [("ck/data.pkl", &pkl), ("ck/data/0", &storage[..16])];
        let path = write_temp("short.pth", &build_zip(&files, false));
        let err = format!("{:#}", read_state_dict(&path, "model").unwrap_err());
        assert!(
            err.contains("tensor 'w'") && err.contains("needs 5 elements"),
            "{err}"
        );
    }

    #[test]
    fn bare_state_dict() {
        // torch.save(OrderedDict(w=tensor)): the top level is the state dict itself.
        let pkl: &[u8] = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x05tq\x08QK\x01K\x02K\x02\x86q\tK\x01K\x02\x86q\n\x89h\x00)Rq\x0btq\x0cRq\x0ds.";
        let storage: Vec<u8> = [0.0f32, 1.0, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let files: [(&str, &[u8]); 2] = [("bare/data.pkl", pkl), ("bare/data/0", &storage)];
        let path = write_temp("bare.pth", &build_zip(&files, false));
        let ck = PthCheckpoint::open(&path).unwrap();
        assert!(ck.root_is_state_dict());
        assert_eq!(
            read_state_dict(&path, "model").unwrap()["w"].to_f32(),
            vec![1.0, 3.0, 2.0, 4.0]
        );
        let err = format!("{:#}", ck.state_dict("model_ema").unwrap_err());
        assert!(
            err.contains("no 'model_ema' entry (top-level keys: w)"),
            "{err}"
        );
    }

    #[test]
    fn not_a_zip() {
        let path = write_temp(
            "garbage.pth",
            b"this is not a zip file at all, just some text bytes",
        );
        let err = format!("{:#}", PthCheckpoint::open(&path).unwrap_err());
        assert!(err.contains("not a readable zip archive"), "{err}");
        let path = write_temp(
            "legacy.pth",
            b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.",
        );
        // A legacy file (told apart by content) that ends after its second pickle.
        let err = format!("{:#}", PthCheckpoint::open(&path).unwrap_err());
        assert!(
            err.contains("legacy torch.save format: sys_info") && err.contains("truncated"),
            "{err}"
        );
        // The zip-only reader (.npz input) names a pickle as such.
        let err = match ZipReader::open(&path) {
            Ok(_) => panic!("a pickle opened as a zip"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("not a readable zip archive") && err.contains("this is a pickle"),
            "{err}"
        );
        let files: [(&str, &[u8]); 1] = [("x/readme.txt", b"hi")];
        let path = write_temp("nopkl.pth", &build_zip(&files, false));
        let err = format!("{:#}", PthCheckpoint::open(&path).unwrap_err());
        assert!(err.contains("without a data.pkl"), "{err}");
    }
}
