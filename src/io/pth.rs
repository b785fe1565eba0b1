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
//! The unpickler below implements the opcodes of protocols 0-5 that such files use and models
//! only what a state dict needs: dicts (incl. `collections.OrderedDict`), lists, tuples,
//! scalars, strings, tensors and storages. Any other class or function (`argparse.Namespace`
//! holding the training arguments, `pathlib.PosixPath`, numpy scalars, ...) becomes an opaque
//! object, so a checkpoint that carries such entries next to its weights still loads.
//!
//! Tensors are parsed as descriptions (dtype, shape, stride, offset, storage key); their bytes
//! are read from the archive only when asked for, so selecting the model from a multi-GB
//! checkpoint with optimizer state reads only the model's storages. Views (non-zero offset,
//! transposed strides, several tensors sharing one storage) are materialized as dense
//! row-major data.
//!
//! The zip reader is written here rather than taken from the `zip` crate: torch writes only
//! stored entries, this module needs random access to a few entries of a file that can be
//! several GB, and the format subset (end-of-central-directory, ZIP64 records, central
//! directory, local header) is about a hundred lines with no dependencies to build.

use anyhow::{Context, Result, anyhow, bail};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

// ------------------------------------------------------------------------------------------
// Dtypes and tensors
// ------------------------------------------------------------------------------------------

/// Element type of a checkpoint tensor, from its storage class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PthDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl PthDtype {
    /// From a storage class name (`FloatStorage`, `BFloat16Storage`, ...).
    fn from_storage_class(name: &str) -> Option<PthDtype> {
        Some(match name {
            "DoubleStorage" => PthDtype::F64,
            "FloatStorage" => PthDtype::F32,
            "HalfStorage" => PthDtype::F16,
            "BFloat16Storage" => PthDtype::BF16,
            "LongStorage" => PthDtype::I64,
            "IntStorage" => PthDtype::I32,
            "ShortStorage" => PthDtype::I16,
            "CharStorage" => PthDtype::I8,
            "ByteStorage" => PthDtype::U8,
            "BoolStorage" => PthDtype::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PthDtype::F64 | PthDtype::I64 => 8,
            PthDtype::F32 | PthDtype::I32 => 4,
            PthDtype::F16 | PthDtype::BF16 | PthDtype::I16 => 2,
            PthDtype::I8 | PthDtype::U8 | PthDtype::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            PthDtype::F64 | PthDtype::F32 | PthDtype::F16 | PthDtype::BF16
        )
    }

    /// The torch name (`float32`, `bfloat16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PthDtype::F64 => "float64",
            PthDtype::F32 => "float32",
            PthDtype::F16 => "float16",
            PthDtype::BF16 => "bfloat16",
            PthDtype::I64 => "int64",
            PthDtype::I32 => "int32",
            PthDtype::I16 => "int16",
            PthDtype::I8 => "int8",
            PthDtype::U8 => "uint8",
            PthDtype::Bool => "bool",
        }
    }

    /// The matching safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self {
            PthDtype::F64 => D::F64,
            PthDtype::F32 => D::F32,
            PthDtype::F16 => D::F16,
            PthDtype::BF16 => D::BF16,
            PthDtype::I64 => D::I64,
            PthDtype::I32 => D::I32,
            PthDtype::I16 => D::I16,
            PthDtype::I8 => D::I8,
            PthDtype::U8 => D::U8,
            PthDtype::Bool => D::BOOL,
        }
    }
}

impl fmt::Display for PthDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a tensor's elements live: parsed from the pickle, no data read yet.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: PthDtype,
    pub shape: Vec<usize>,
    /// Strides in elements (torch's `stride()`).
    pub stride: Vec<usize>,
    /// Offset in elements into the storage (torch's `storage_offset()`).
    pub offset: usize,
    /// Storage key: the archive entry is `<prefix>/data/<key>`.
    pub storage_key: String,
    /// Element count of the whole storage, as recorded in the persistent id.
    pub storage_numel: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major dense layout (dimensions of size 1 may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(n);
        }
        true
    }
}

/// A materialized tensor: dtype, shape and dense row-major little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct PthTensor {
    pub dtype: PthDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl PthTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements widened (or, for int64/float64, narrowed) to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
            c.try_into().unwrap()
        }
        let n = self.dtype.size();
        let chunks = self.data.chunks_exact(n);
        match self.dtype {
            PthDtype::F64 => chunks.map(|c| f64::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::F32 => chunks.map(|c| f32::from_le_bytes(arr(c))).collect(),
            PthDtype::F16 => chunks
                .map(|c| half::f16::from_le_bytes(arr(c)).to_f32())
                .collect(),
            PthDtype::BF16 => chunks
                .map(|c| half::bf16::from_le_bytes(arr(c)).to_f32())
                .collect(),
            PthDtype::I64 => chunks.map(|c| i64::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::I32 => chunks.map(|c| i32::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::I16 => chunks.map(|c| i16::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::I8 => self.data.iter().map(|&b| b as i8 as f32).collect(),
            PthDtype::U8 => self.data.iter().map(|&b| b as f32).collect(),
            PthDtype::Bool => self.data.iter().map(|&b| (b != 0) as u8 as f32).collect(),
        }
    }
}

/// A state dict's tensors by name (parsed, not yet read).
pub type StateDict = BTreeMap<String, TensorInfo>;

// ------------------------------------------------------------------------------------------
// Checkpoint
// ------------------------------------------------------------------------------------------

/// An open checkpoint: the zip index and the unpickled object tree. Tensor data stays on disk
/// until [`PthCheckpoint::read_tensor`] asks for it.
pub struct PthCheckpoint {
    path: PathBuf,
    file: File,
    entries: HashMap<String, ZipEntry>,
    /// Archive folder with its trailing slash (`"checkpoint-last/"`), or empty.
    prefix: String,
    big_endian: bool,
    root: Value,
}

impl fmt::Debug for PthCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PthCheckpoint")
            .field("path", &self.path)
            .field("prefix", &self.prefix)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl PthCheckpoint {
    /// Open a checkpoint, index its zip and unpickle `data.pkl` (no tensor data is read).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let file = File::open(&path).with_context(|| format!("{shown}: cannot open"))?;
        let entries = read_zip_index(&file).with_context(|| shown.clone())?;
        let pkl_name = find_data_pkl(&entries).with_context(|| shown.clone())?;
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();

        let big_endian = match entries.get(&format!("{prefix}byteorder")) {
            Some(e) => {
                let raw = read_entry(&file, e, 0, e.size).with_context(|| shown.clone())?;
                match String::from_utf8_lossy(&raw).trim() {
                    "little" => false,
                    "big" => true,
                    other => bail!("{shown}: unknown byteorder {other:?} in {prefix}byteorder"),
                }
            }
            None => false,
        };

        let pkl_entry = &entries[&pkl_name];
        let pkl = read_entry(&file, pkl_entry, 0, pkl_entry.size).with_context(|| shown.clone())?;
        let root = Unpickler::new(&pkl)
            .run()
            .with_context(|| format!("{shown}: cannot read {pkl_name}"))?;
        Ok(PthCheckpoint {
            path,
            file,
            entries,
            prefix,
            big_endian,
            root,
        })
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
        match &self.root {
            Value::Dict(d) => d.borrow().get_str(key),
            _ => None,
        }
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
                collect_state_dict(&v).with_context(|| format!("{shown}: '{key}'"))
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
                    keys.join(", ")
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
        collect_state_dict(&self.root).with_context(|| self.path.display().to_string())
    }

    /// True when the top-level dict maps strings to tensors (at least one tensor).
    pub fn root_is_state_dict(&self) -> bool {
        match &self.root {
            Value::Dict(d) => {
                let d = d.borrow();
                d.entries.iter().any(|(_, v)| matches!(v, Value::Tensor(_)))
                    && d.entries.iter().all(|(k, _)| k.as_str().is_some())
            }
            _ => false,
        }
    }

    /// Read one tensor's elements (only the bytes its view covers) as dense row-major data.
    pub fn read_tensor(&self, name: &str, t: &TensorInfo) -> Result<PthTensor> {
        self.read_tensor_inner(t)
            .with_context(|| format!("{}: tensor '{name}'", self.path.display()))
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
        let entry_name = format!("{}data/{}", self.prefix, t.storage_key);
        let entry = self
            .entries
            .get(&entry_name)
            .ok_or_else(|| anyhow!("its storage {entry_name} is missing from the archive"))?;
        let end = t
            .offset
            .checked_add(span)
            .ok_or_else(|| anyhow!("storage offset overflows"))?;
        let end_bytes = (end as u64)
            .checked_mul(es as u64)
            .ok_or_else(|| anyhow!("view overflows"))?;
        if end > t.storage_numel || end_bytes > entry.size {
            bail!(
                "view (offset {}, shape {:?}, stride {:?}) needs {end} elements but storage {entry_name} \
                 holds {} ({} bytes of {})",
                t.offset,
                t.shape,
                t.stride,
                t.storage_numel,
                entry.size,
                t.dtype
            );
        }
        let start_bytes = t.offset as u64 * es as u64;
        let raw = read_entry(&self.file, entry, start_bytes, end_bytes - start_bytes)?;
        let mut data = if t.is_contiguous() {
            raw
        } else {
            gather_strided(&raw, es, &t.shape, &t.stride, numel)
        };
        if self.big_endian && es > 1 {
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

fn collect_state_dict(v: &Value) -> Result<StateDict> {
    let Value::Dict(d) = v else {
        bail!("not a dict")
    };
    let mut out = StateDict::new();
    for (k, v) in &d.borrow().entries {
        let (Some(name), Value::Tensor(t)) = (k.as_str(), v) else {
            continue;
        };
        let dtype = t.storage.dtype.ok_or_else(|| {
            anyhow!(
                "tensor '{name}' has unsupported storage type torch.{}",
                t.storage.class
            )
        })?;
        out.insert(
            name.to_string(),
            TensorInfo {
                dtype,
                shape: t.shape.clone(),
                stride: t.stride.clone(),
                offset: t.offset,
                storage_key: t.storage.key.clone(),
                storage_numel: t.storage.numel,
            },
        );
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Zip
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ZipEntry {
    name: String,
    method: u16,
    size: u64,
    compressed_size: u64,
    local_header_offset: u64,
}

const NOT_TORCH_ZIP: &str = "not a PyTorch zip checkpoint";

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn read_at(mut file: &File, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut buf)
        .with_context(|| format!("truncated file: cannot read {len} bytes at offset {offset}"))?;
    Ok(buf)
}

/// Read the central directory (with ZIP64 support) into name -> entry.
fn read_zip_index(file: &File) -> Result<HashMap<String, ZipEntry>> {
    let len = file.metadata()?.len();
    let head = read_at(file, 0, len.min(4) as usize)?;
    let legacy = head.first() == Some(&0x80);
    let not_zip = || {
        if legacy {
            anyhow!(
                "{NOT_TORCH_ZIP}: this looks like the legacy (torch < 1.6) pickle format; \
                 load it in Python and re-save it with a recent torch.save"
            )
        } else {
            anyhow!("{NOT_TORCH_ZIP} (no zip end-of-central-directory record)")
        }
    };
    if len < 22 {
        return Err(not_zip());
    }
    // End of central directory: 22 bytes plus a comment of up to 65535 bytes, at the end.
    let tail_len = len.min(22 + 65535);
    let tail_start = len - tail_len;
    let tail = read_at(file, tail_start, tail_len as usize)?;
    let eocd = (0..=tail.len() - 22)
        .rev()
        .find(|&i| {
            le32(&tail, i) == 0x0605_4b50 && i + 22 + le16(&tail, i + 20) as usize <= tail.len()
        })
        .ok_or_else(not_zip)?;
    let mut count = le16(&tail, eocd + 10) as u64;
    let mut cd_size = le32(&tail, eocd + 12) as u64;
    let mut cd_offset = le32(&tail, eocd + 16) as u64;
    // ZIP64: a locator just before the EOCD points at the ZIP64 end record.
    if eocd >= 20 && le32(&tail, eocd - 20) == 0x0706_4b50 {
        let z64_offset = le64(&tail, eocd - 20 + 8);
        let rec = read_at(file, z64_offset, 56).context("bad ZIP64 end record offset")?;
        if le32(&rec, 0) != 0x0606_4b50 {
            bail!("{NOT_TORCH_ZIP} (bad ZIP64 end-of-central-directory record)");
        }
        count = le64(&rec, 32);
        cd_size = le64(&rec, 40);
        cd_offset = le64(&rec, 48);
    } else if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
        bail!("{NOT_TORCH_ZIP} (ZIP64 archive without a ZIP64 locator)");
    }
    if cd_offset.checked_add(cd_size).is_none_or(|e| e > len) {
        bail!("{NOT_TORCH_ZIP} (central directory outside the file; truncated download?)");
    }
    let cd = read_at(file, cd_offset, cd_size as usize)?;
    let mut entries = HashMap::new();
    let mut p = 0usize;
    for _ in 0..count {
        if p + 46 > cd.len() || le32(&cd, p) != 0x0201_4b50 {
            bail!("{NOT_TORCH_ZIP} (corrupt central directory)");
        }
        let method = le16(&cd, p + 10);
        let mut compressed_size = le32(&cd, p + 20) as u64;
        let mut size = le32(&cd, p + 24) as u64;
        let name_len = le16(&cd, p + 28) as usize;
        let extra_len = le16(&cd, p + 30) as usize;
        let comment_len = le16(&cd, p + 32) as usize;
        let mut local_header_offset = le32(&cd, p + 42) as u64;
        let end = p + 46 + name_len + extra_len + comment_len;
        if end > cd.len() {
            bail!("{NOT_TORCH_ZIP} (corrupt central directory)");
        }
        let name = String::from_utf8_lossy(&cd[p + 46..p + 46 + name_len]).into_owned();
        // ZIP64 extended information: the 64-bit values of the fields saturated at 0xFFFFFFFF.
        let extra = &cd[p + 46 + name_len..p + 46 + name_len + extra_len];
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = le16(extra, e);
            let n = le16(extra, e + 2) as usize;
            let body = &extra[e + 4..(e + 4 + n).min(extra.len())];
            if id == 0x0001 {
                let mut q = 0;
                let mut next = |field: &mut u64| {
                    if *field == 0xFFFF_FFFF && q + 8 <= body.len() {
                        *field = le64(body, q);
                        q += 8;
                    }
                };
                next(&mut size);
                next(&mut compressed_size);
                next(&mut local_header_offset);
            }
            e += 4 + n;
        }
        entries.insert(
            name.clone(),
            ZipEntry {
                name,
                method,
                size,
                compressed_size,
                local_header_offset,
            },
        );
        p = end;
    }
    Ok(entries)
}

/// The `data.pkl` entry: `<archive>/data.pkl` (one folder level) or a bare `data.pkl`.
fn find_data_pkl(entries: &HashMap<String, ZipEntry>) -> Result<String> {
    let mut found: Vec<&String> = entries
        .keys()
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

/// Read `len` bytes at `offset` inside a stored entry.
fn read_entry(file: &File, e: &ZipEntry, offset: u64, len: u64) -> Result<Vec<u8>> {
    if e.method != 0 || e.compressed_size != e.size {
        bail!(
            "zip entry {} is compressed (method {}); torch.save writes stored entries only",
            e.name,
            e.method
        );
    }
    if offset.checked_add(len).is_none_or(|end| end > e.size) {
        bail!("read past the end of zip entry {}", e.name);
    }
    let header = read_at(file, e.local_header_offset, 30)
        .with_context(|| format!("zip entry {}: bad local header offset", e.name))?;
    if le32(&header, 0) != 0x0403_4b50 {
        bail!("zip entry {}: corrupt local header", e.name);
    }
    let data_start =
        e.local_header_offset + 30 + le16(&header, 26) as u64 + le16(&header, 28) as u64;
    let len = usize::try_from(len).map_err(|_| anyhow!("zip entry {} too large", e.name))?;
    read_at(file, data_start + offset, len).with_context(|| format!("zip entry {}", e.name))
}

// ------------------------------------------------------------------------------------------
// Pickle
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Storage {
    /// Storage class name without the module (`FloatStorage`).
    class: String,
    dtype: Option<PthDtype>,
    key: String,
    numel: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<Storage>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Default)]
struct DictData {
    entries: Vec<(Value, Value)>,
    /// Index of string and integer keys (the ones state dicts and optimizer states use).
    index: HashMap<HashKey, usize>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
enum HashKey {
    Str(Rc<str>),
    Int(i64),
}

impl DictData {
    fn set(&mut self, k: Value, v: Value) {
        let hk = match &k {
            Value::Str(s) => Some(HashKey::Str(s.clone())),
            Value::Int(i) => Some(HashKey::Int(*i)),
            _ => None,
        };
        match hk {
            Some(hk) => match self.index.get(&hk) {
                Some(&i) => self.entries[i].1 = v,
                None => {
                    self.index.insert(hk, self.entries.len());
                    self.entries.push((k, v));
                }
            },
            None => self.entries.push((k, v)),
        }
    }

    fn get_str(&self, key: &str) -> Option<Value> {
        self.index
            .get(&HashKey::Str(Rc::from(key)))
            .map(|&i| self.entries[i].1.clone())
    }
}

/// The unpickled object model: only what state dicts need, everything else opaque.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64 (kept opaque).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<DictData>>),
    /// A class or function reference (`GLOBAL module name`).
    Global(Rc<(String, String)>),
    /// An instance of a class this reader does not model, by class name.
    Object(Rc<str>),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::BigInt => "a large int".into(),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(s) => format!("the string {s:?}"),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("the class {}.{}", g.0, g.1),
            Value::Object(c) => format!("a {c} object"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }

    fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
}

fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                anyhow!(
                    "pickle truncated: {n} bytes wanted at offset {} of {}",
                    self.pos,
                    self.data.len()
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len64(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| anyhow!("pickle: length too large"))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("pickle truncated: unterminated line at offset {}", self.pos))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("pickle: line is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            bail!("pickle: stack underflow (at a MARK) at offset {}", self.pos);
        }
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("pickle: stack underflow at offset {}", self.pos))
    }

    fn top(&self) -> Result<&Value> {
        self.stack
            .last()
            .ok_or_else(|| anyhow!("pickle: empty stack at offset {}", self.pos))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("pickle: MARK missing at offset {}", self.pos))?;
        if m > self.stack.len() {
            bail!("pickle: corrupt MARK at offset {}", self.pos);
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, idx: u64) -> Result<Value> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| anyhow!("pickle: memo entry {idx} missing at offset {}", self.pos))
    }

    fn memo_put(&mut self, idx: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op_pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("pickle protocol {proto} is not supported (at most 5)");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: length of the next frame; frames are just a hint
                }
                b'.' => return self.pop(),
                // Containers.
                b'}' => self.stack.push(Value::Dict(Default::default())),
                b']' | 0x8f => self.stack.push(Value::List(Default::default())),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b'(' => self.marks.push(self.stack.len()),
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.dict_set(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        bail!("pickle: SETITEMS with an odd item count at offset {op_pos}");
                    }
                    self.dict_set(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.list_extend(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.list_extend(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        bail!("pickle: stack underflow at offset {op_pos}");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        bail!("pickle: DICT with an odd item count at offset {op_pos}");
                    }
                    let mut d = DictData::default();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.set(k, v);
                    }
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(d))));
                }
                // Scalars.
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    self.stack.push(long_from_le(bytes));
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let bytes = self.take(n)?;
                    self.stack.push(long_from_le(bytes));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => s.parse::<i64>().map(Value::Int).unwrap_or(Value::BigInt),
                    };
                    self.stack.push(v);
                }
                b'L' => {
                    let line = self.line()?;
                    let v = line
                        .trim_end_matches('L')
                        .parse::<i64>()
                        .map(Value::Int)
                        .unwrap_or(Value::BigInt);
                    self.stack.push(v);
                }
                b'F' => {
                    let line = self.line()?;
                    let v = line
                        .parse::<f64>()
                        .map_err(|_| anyhow!("pickle: bad FLOAT {line:?} at offset {op_pos}"))?;
                    self.stack.push(Value::Float(v));
                }
                // Strings and bytes.
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8(n, op_pos)?;
                    self.stack.push(s);
                }
                0x8d => {
                    let n = self.len64()?;
                    let s = self.utf8(n, op_pos)?;
                    self.stack.push(s);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.utf8(n, op_pos)?;
                    self.stack.push(s);
                }
                b'V' => {
                    let line = self.line()?;
                    self.stack.push(Value::Str(Rc::from(line)));
                }
                b'S' => {
                    // Protocol 0 STRING: a quoted Python 2 str literal.
                    let line = self.line()?;
                    let inner = line
                        .strip_prefix(['\'', '"'])
                        .and_then(|s| s.strip_suffix(['\'', '"']))
                        .unwrap_or(line);
                    self.stack.push(Value::Str(Rc::from(inner)));
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                0x8e | 0x96 => {
                    let n = self.len64()?;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                // Memo.
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let line = self.line()?;
                    let i = line
                        .parse::<u64>()
                        .map_err(|_| anyhow!("pickle: bad PUT index at offset {op_pos}"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let i = self.u32()? as u64;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'g' => {
                    let line = self.line()?;
                    let i = line
                        .parse::<u64>()
                        .map_err(|_| anyhow!("pickle: bad GET index at offset {op_pos}"))?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                // Stack manipulation.
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                // Classes, calls, objects.
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.stack.push(Value::Global(Rc::new((module, name))));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        bail!("pickle: STACK_GLOBAL needs two strings at offset {op_pos}");
                    };
                    self.stack
                        .push(Value::Global(Rc::new((m.to_string(), n.to_string()))));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = reduce(&func, &args)
                        .with_context(|| format!("pickle REDUCE at offset {op_pos}"))?;
                    self.stack.push(v);
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(new_object(&cls));
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(new_object(&cls));
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        bail!("pickle: OBJ without a class at offset {op_pos}");
                    }
                    let cls = items.remove(0);
                    self.stack.push(new_object(&cls));
                }
                b'i' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.pop_mark()?;
                    self.stack
                        .push(new_object(&Value::Global(Rc::new((module, name)))));
                }
                b'b' => {
                    // BUILD: set the state of the object below. Modeled objects (dicts such as
                    // an OrderedDict with `_metadata`) and opaque ones both ignore it.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(&pid)
                        .with_context(|| format!("pickle BINPERSID at offset {op_pos}"))?;
                    self.stack.push(v);
                }
                b'P' => {
                    let line = self.line()?;
                    bail!(
                        "pickle: text persistent id {line:?} at offset {op_pos} is not a torch storage"
                    );
                }
                _ => match opcode_name(op) {
                    Some(name) => bail!(
                        "unsupported pickle opcode 0x{op:02x} ({name}) at byte offset {op_pos}"
                    ),
                    None => bail!("unknown pickle opcode 0x{op:02x} at byte offset {op_pos}"),
                },
            }
        }
    }

    fn utf8(&mut self, n: usize, op_pos: usize) -> Result<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| anyhow!("pickle: string at offset {op_pos} is not UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn dict_set(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.set(k, v);
                }
                Ok(())
            }
            // Items set on an opaque object (a dict subclass we do not model): drop them.
            Value::Object(_) => Ok(()),
            other => bail!("pickle: SETITEM on {} at offset {}", other.kind(), self.pos),
        }
    }

    fn list_extend(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Value::Object(_) => Ok(()),
            other => bail!("pickle: APPEND on {} at offset {}", other.kind(), self.pos),
        }
    }
}

/// Python `int.from_bytes(b, 'little', signed=True)`, or `BigInt` past 64 bits.
fn long_from_le(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        let sign_fill = if bytes[bytes.len() - 1] & 0x80 != 0 {
            0xFF
        } else {
            0
        };
        if bytes[8..].iter().any(|&b| b != sign_fill)
            || (bytes[7] & 0x80 != 0) != (sign_fill == 0xFF)
        {
            return Value::BigInt;
        }
    }
    let n = bytes.len().min(8);
    let fill = if bytes[n - 1] & 0x80 != 0 { 0xFF } else { 0 };
    let mut buf = [fill; 8];
    buf[..n].copy_from_slice(&bytes[..n]);
    Value::Int(i64::from_le_bytes(buf))
}

fn is_builtins(module: &str) -> bool {
    module == "builtins" || module == "__builtin__"
}

/// `NEWOBJ` / `OBJ` / `INST`: an `OrderedDict` becomes a dict, anything else is opaque.
fn new_object(cls: &Value) -> Value {
    match cls {
        Value::Global(g)
            if (g.0 == "collections" && g.1 == "OrderedDict")
                || (is_builtins(&g.0) && g.1 == "dict") =>
        {
            Value::Dict(Default::default())
        }
        Value::Global(g) => Value::Object(Rc::from(format!("{}.{}", g.0, g.1))),
        _ => Value::Object(Rc::from("<object>")),
    }
}

/// `REDUCE`: call `func(*args)` for the callables torch checkpoints use; others are opaque.
fn reduce(func: &Value, args: &Value) -> Result<Value> {
    let Value::Global(g) = func else {
        return Ok(Value::Object(Rc::from("<call result>")));
    };
    let (module, name) = (g.0.as_str(), g.1.as_str());
    let argv = args.items().unwrap_or_default();
    Ok(match (module, name) {
        ("collections", "OrderedDict") => {
            let mut d = DictData::default();
            if let Some(pairs) = argv.first().and_then(Value::items) {
                for pair in pairs {
                    if let Some([k, v]) = pair.items().as_deref() {
                        d.set(k.clone(), v.clone());
                    }
                }
            }
            Value::Dict(Rc::new(RefCell::new(d)))
        }
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            rebuild_tensor(&argv)?
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => match argv.first() {
            Some(t @ Value::Tensor(_)) => t.clone(),
            _ => bail!("torch._utils.{name} expects a tensor as its first argument"),
        },
        ("torch._tensor", "_rebuild_from_type_v2") => {
            // (func, new_type, args, state): rebuild with func(*args); the subclass is dropped.
            match argv.as_slice() {
                [f, _ty, inner, ..] => reduce(f, inner)?,
                _ => bail!("torch._tensor._rebuild_from_type_v2 expects 4 arguments"),
            }
        }
        ("torch", "Size") => Value::Tuple(Rc::new(
            argv.first().and_then(Value::items).unwrap_or_default(),
        )),
        (m, "tuple") if is_builtins(m) => Value::Tuple(Rc::new(
            argv.first().and_then(Value::items).unwrap_or_default(),
        )),
        (m, "list" | "set" | "frozenset") if is_builtins(m) => Value::List(Rc::new(RefCell::new(
            argv.first().and_then(Value::items).unwrap_or_default(),
        ))),
        _ => Value::Object(Rc::from(format!("{module}.{name}"))),
    })
}

/// `('storage', torch.<Type>Storage, key, location, numel)` -> a storage reference.
fn persistent_load(pid: &Value) -> Result<Value> {
    let items = pid
        .items()
        .ok_or_else(|| anyhow!("persistent id is {}, not a tuple", pid.kind()))?;
    match items.as_slice() {
        [tag, Value::Global(cls), key, _location, numel] if tag.as_str() == Some("storage") => {
            let key = match key {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                other => bail!("storage key is {}", other.kind()),
            };
            let numel = match numel {
                Value::Int(n) if *n >= 0 => *n as usize,
                other => bail!("storage element count is {}", other.kind()),
            };
            let class = cls.1.clone();
            let dtype = if cls.0 == "torch" {
                PthDtype::from_storage_class(&class)
            } else {
                None
            };
            Ok(Value::Storage(Rc::new(Storage {
                class,
                dtype,
                key,
                numel,
            })))
        }
        _ => bail!("unsupported persistent id (expected ('storage', class, key, location, numel))"),
    }
}

fn usize_list(v: &Value, what: &str) -> Result<Vec<usize>> {
    let items = v
        .items()
        .ok_or_else(|| anyhow!("tensor {what} is {}, not a tuple", v.kind()))?;
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => bail!("tensor {what} has an element that is {}", other.kind()),
        })
        .collect()
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, meta])`.
fn rebuild_tensor(argv: &[Value]) -> Result<Value> {
    let [Value::Storage(storage), offset, size, stride, ..] = argv else {
        bail!("torch._utils._rebuild_tensor_v2: expected (storage, offset, size, stride, ...)");
    };
    let offset = match offset {
        Value::Int(i) if *i >= 0 => *i as usize,
        other => bail!("tensor storage offset is {}", other.kind()),
    };
    let shape = usize_list(size, "size")?;
    let stride = usize_list(stride, "stride")?;
    if shape.len() != stride.len() {
        bail!("tensor size {shape:?} and stride {stride:?} differ in rank");
    }
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: storage.clone(),
        offset,
        shape,
        stride,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpickle(bytes: &[u8]) -> Result<Value> {
        Unpickler::new(bytes).run()
    }

    #[test]
    fn protocol2_dict_of_scalars() {
        // pickle.dumps({'a': 1, 'b': [1.5, None, True], 'c': (300, -2, 70000)}, protocol=2)
        let bytes: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G?\xf8\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00cq\x04M,\x01J\xfe\xff\xff\xffJp\x11\x01\x00\x87q\x05u.";
        let v = unpickle(bytes).unwrap();
        let Value::Dict(d) = v else { panic!() };
        let d = d.borrow();
        assert!(matches!(d.get_str("a"), Some(Value::Int(1))));
        let b = d.get_str("b").unwrap().items().unwrap();
        assert!(
            matches!(b.as_slice(), [Value::Float(f), Value::None, Value::Bool(true)] if *f == 1.5)
        );
        let c = d.get_str("c").unwrap().items().unwrap();
        assert!(matches!(
            c.as_slice(),
            [Value::Int(300), Value::Int(-2), Value::Int(70000)]
        ));
    }

    #[test]
    fn protocol4_frames_memoize_and_stack_global() {
        // pickle.dumps({'k': collections.OrderedDict(), 'n': 2**40, 'big': 2**70}, protocol=4)
        let bytes: &[u8] = b"\x80\x04\x95G\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01k\x94\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94\x8c\x01n\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x03big\x94\x8a\t\x00\x00\x00\x00\x00\x00\x00\x00@u.";
        let v = unpickle(bytes).unwrap();
        let Value::Dict(d) = v else { panic!() };
        let d = d.borrow();
        assert!(matches!(d.get_str("k"), Some(Value::Dict(_))));
        assert!(matches!(d.get_str("n"), Some(Value::Int(n)) if n == 1 << 40));
        assert!(matches!(d.get_str("big"), Some(Value::BigInt)));
    }

    #[test]
    fn long1_sign_handling() {
        assert!(matches!(long_from_le(&[0xff]), Value::Int(-1)));
        assert!(matches!(long_from_le(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(long_from_le(&[0xff, 0x00]), Value::Int(255)));
        let max = i64::MAX.to_le_bytes();
        assert!(matches!(long_from_le(&max), Value::Int(i64::MAX)));
        let mut nine = i64::MIN.to_le_bytes().to_vec();
        nine.push(0xff);
        assert!(matches!(long_from_le(&nine), Value::Int(i64::MIN)));
        let mut pos_overflow = u64::MAX.to_le_bytes().to_vec();
        pos_overflow.push(0);
        assert!(matches!(long_from_le(&pos_overflow), Value::BigInt));
    }

    #[test]
    fn unknown_opcode_is_named_with_its_offset() {
        let err = unpickle(b"\x80\x02}q\x00\xff.").unwrap_err().to_string();
        assert!(
            err.contains("unknown pickle opcode 0xff at byte offset 5"),
            "{err}"
        );
        let err = unpickle(b"\x80\x02\x82\x01.").unwrap_err().to_string();
        assert!(err.contains("0x82 (EXT1) at byte offset 2"), "{err}");
        let err = unpickle(b"\x80\x02}q\x00X\xff\x00\x00\x00ab")
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn opaque_objects_do_not_fail() {
        // argparse.Namespace(lr=0.1, p=PosixPath('x')) pickled at protocol 2.
        let bytes: &[u8] = b"\x80\x02cargparse\nNamespace\nq\x00)\x81q\x01}q\x02(X\x02\x00\x00\x00lrq\x03G?\xb9\x99\x99\x99\x99\x99\x9aX\x01\x00\x00\x00pq\x04cpathlib\nPosixPath\nq\x05X\x01\x00\x00\x00xq\x06\x85q\x07Rq\x08ub.";
        let v = unpickle(bytes).unwrap();
        assert!(matches!(v, Value::Object(ref c) if &**c == "argparse.Namespace"));
    }

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

    /// Build a stored zip in memory; `zip64` writes ZIP64 central records and end records.
    fn build_zip(files: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in files {
            let offset = out.len() as u64;
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&3u16.to_le_bytes()); // 3 bytes of padding extra
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&[0, 0, 0]);
            out.extend_from_slice(data);
            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            let (size32, off32) = if zip64 {
                (0xFFFF_FFFFu32, 0xFFFF_FFFFu32)
            } else {
                (data.len() as u32, offset as u32)
            };
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(if zip64 { 28u16 } else { 0 }).to_le_bytes());
            central.extend_from_slice(&[0u8; 10]);
            central.extend_from_slice(&off32.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            if zip64 {
                central.extend_from_slice(&1u16.to_le_bytes());
                central.extend_from_slice(&24u16.to_le_bytes());
                central.extend_from_slice(&(data.len() as u64).to_le_bytes());
                central.extend_from_slice(&(data.len() as u64).to_le_bytes());
                central.extend_from_slice(&offset.to_le_bytes());
            }
        }
        let cd_offset = out.len() as u64;
        out.extend_from_slice(&central);
        let n = files.len() as u64;
        if zip64 {
            let z64 = out.len() as u64;
            out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&(central.len() as u64).to_le_bytes());
            out.extend_from_slice(&cd_offset.to_le_bytes());
            out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&z64.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        let n16 = if zip64 { 0xFFFF } else { n as u16 };
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        let off32 = if zip64 { 0xFFFF_FFFF } else { cd_offset as u32 };
        out.extend_from_slice(&off32.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
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
    fn bare_state_dict_and_tensor_wrappers() {
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

        // Parameter and tensor-subclass wrappers unwrap to the tensor.
        let global = |m: &str, n: &str| Value::Global(Rc::new((m.to_string(), n.to_string())));
        let storage = Value::Storage(Rc::new(Storage {
            class: "HalfStorage".into(),
            dtype: Some(PthDtype::F16),
            key: "3".into(),
            numel: 6,
        }));
        let tuple = |v: Vec<Value>| Value::Tuple(Rc::new(v));
        let args = tuple(vec![
            storage,
            Value::Int(2),
            tuple(vec![Value::Int(2), Value::Int(2)]),
            tuple(vec![Value::Int(2), Value::Int(1)]),
            Value::Bool(false),
            Value::Dict(Default::default()),
        ]);
        let t = reduce(&global("torch._utils", "_rebuild_tensor_v2"), &args).unwrap();
        let Value::Tensor(inner) = &t else {
            panic!("not a tensor")
        };
        assert_eq!((inner.offset, inner.shape.clone()), (2, vec![2, 2]));
        let state = Value::Dict(Default::default());
        let p = reduce(
            &global("torch._utils", "_rebuild_parameter_with_state"),
            &tuple(vec![
                t.clone(),
                Value::Bool(true),
                Value::Dict(Default::default()),
                state.clone(),
            ]),
        )
        .unwrap();
        assert!(matches!(&p, Value::Tensor(x) if Rc::ptr_eq(x, inner)));
        let sub = reduce(
            &global("torch._tensor", "_rebuild_from_type_v2"),
            &tuple(vec![
                global("torch._utils", "_rebuild_tensor_v2"),
                global("torch", "Tensor"),
                args,
                state,
            ]),
        )
        .unwrap();
        assert!(matches!(&sub, Value::Tensor(x) if x.offset == 2));
        assert!(matches!(
            reduce(&global("torch", "device"), &tuple(vec![])).unwrap(),
            Value::Object(_)
        ));
    }

    #[test]
    fn not_a_zip() {
        let path = write_temp(
            "garbage.pth",
            b"this is not a zip file at all, just some text bytes",
        );
        let err = format!("{:#}", PthCheckpoint::open(&path).unwrap_err());
        assert!(err.contains("not a PyTorch zip checkpoint"), "{err}");
        let path = write_temp(
            "legacy.pth",
            b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.",
        );
        let err = format!("{:#}", PthCheckpoint::open(&path).unwrap_err());
        assert!(
            err.contains("not a PyTorch zip checkpoint") && err.contains("legacy"),
            "{err}"
        );
        let files: [(&str, &[u8]); 1] = [("x/readme.txt", b"hi")];
        let path = write_temp("nopkl.pth", &build_zip(&files, false));
        let err = format!("{:#}", PthCheckpoint::open(&path).unwrap_err());
        assert!(err.contains("without a data.pkl"), "{err}");
    }
}
