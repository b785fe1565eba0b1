//! A minimal host tensor: a shape and f32 data, plus loading of safetensors files into a
//! name -> tensor map. Every dtype the engine accepts on disk (f32, bf16, f16, i64, i32, u8)
//! is widened to f32 here, so the CPU reference works in one precision.
//!
//! Writing: [`Dtype`] is the one storage-precision choice of `init`, `convert` and the CLI;
//! [`write_model`] / [`write_model_tensors`] are the one model-file writer (tensors plus the
//! configuration as metadata), and every safetensors file is written atomically
//! ([`write_safetensors`]: a temporary file next to the target, fsync, rename).

use crate::model::config::{CONFIG_METADATA_KEY, FORMAT, ModelConfig};
use crate::paths::check_output;
use anyhow::{Context, Result, bail, ensure};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Dense row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor shape/data mismatch"
        );
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Named tensors, sorted by name (deterministic iteration for writing and reporting).
pub type TensorMap = BTreeMap<String, Tensor>;

/// Decode one safetensors view into f32 values.
pub fn view_to_f32(name: &str, dtype: safetensors::Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| c.try_into().unwrap())
    }
    use safetensors::Dtype;
    let size = match dtype {
        Dtype::F64 | Dtype::I64 => 8,
        Dtype::F32 | Dtype::I32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        _ => 1,
    };
    let mut out = Vec::with_capacity(bytes.len() / size);
    match dtype {
        Dtype::F32 => out.extend(chunks::<4>(bytes).map(f32::from_le_bytes)),
        Dtype::F64 => out.extend(chunks::<8>(bytes).map(|c| f64::from_le_bytes(c) as f32)),
        Dtype::BF16 => {
            out.extend(chunks::<2>(bytes).map(|c| half::bf16::from_le_bytes(c).to_f32()))
        }
        Dtype::F16 => out.extend(chunks::<2>(bytes).map(|c| half::f16::from_le_bytes(c).to_f32())),
        Dtype::I64 => out.extend(chunks::<8>(bytes).map(|c| i64::from_le_bytes(c) as f32)),
        Dtype::I32 => out.extend(chunks::<4>(bytes).map(|c| i32::from_le_bytes(c) as f32)),
        Dtype::U8 => out.extend(bytes.iter().map(|&b| b as f32)),
        Dtype::BOOL => out.extend(bytes.iter().map(|&b| (b != 0) as u8 as f32)),
        other => bail!("tensor {name}: unsupported dtype {other:?}"),
    }
    Ok(out)
}

/// Read a whole safetensors file as f32 tensors, plus its metadata (if any). Any dtype is
/// widened (golden files hold integer tensors); model files go through [`load_model_file`].
pub fn load_safetensors(path: &Path) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let bytes = read_input(path)?;
    parse_safetensors(&bytes).with_context(|| format!("{}", path.display()))
}

/// Read a model file: like [`load_safetensors`], but every tensor must be a float dtype and
/// every value finite and within [`MAX_WEIGHT_ABS`] ([`parse_model_tensors`]).
///
/// The file is mapped read-only (memmap2), never read whole: each tensor is widened (or for
/// f32, copied) once into its owned buffer, checked in the same pass, and its pages of the map
/// are then released (`MADV_DONTNEED`: the kernel's page cache keeps them, this process stops
/// counting them), so the peak is one f32 copy of the weights, not the file plus the weights.
/// The map is dropped before this returns: the loaded model never reads the file again, so
/// a file changed or truncated after loading cannot affect it. The one window left is the
/// load itself: a file truncated by another process while it is being read would raise
/// SIGBUS (a crash, not a wrong result); a file shorter than its header says is refused with
/// the usual error, since the header's offsets are checked against the length mapped.
pub fn load_model_file(path: &Path) -> Result<(TensorMap, BTreeMap<String, String>)> {
    crate::paths::check_input(path)?;
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("{shown}: cannot read"))?;
    // SAFETY: a read-only (PROT_READ) view; the bytes are copied out before the map is dropped
    // (the truncation caveat is in the doc comment above).
    let map =
        unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{shown}: cannot map"))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    let release = |bytes: &[u8]| {
        let off = bytes.as_ptr() as usize - map.as_ptr() as usize;
        // SAFETY: DONTNEED on a read-only file mapping only drops this process's page-table
        // entries; a later access reads the same file pages again.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, bytes.len())
        };
    };
    parse_checked(&map, true, &release).with_context(|| format!("{shown}"))
}

fn read_input(path: &Path) -> Result<Vec<u8>> {
    crate::paths::check_input(path)?;
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Largest magnitude a model weight may have: the f16 maximum, since the GPU decoder stores
/// its weights and activations in 16 bits. Trained weights are orders of magnitude smaller;
/// a larger value (1e38, a corrupted exponent) is a broken file, not a model.
pub const MAX_WEIGHT_ABS: f32 = 65504.0;

/// Every value of weight `name` finite and at most [`MAX_WEIGHT_ABS`] in magnitude; else
/// the first bad value and its flat index. One compare per element.
pub fn check_weights(name: &str, data: &[f32]) -> Result<()> {
    // Branch-free over chunks (vectorizes), the index looked for only when a chunk fails.
    const CHUNK: usize = 4096;
    let ok = |v: &f32| v.abs() <= MAX_WEIGHT_ABS; // false for NaN
    let bad = data
        .chunks(CHUNK)
        .position(|c| !c.iter().fold(true, |all, v| all & ok(v)));
    if let Some(ci) = bad {
        let i = ci * CHUNK + data[ci * CHUNK..].iter().position(|v| !ok(v)).unwrap();
        bail!(
            "tensor `{name}` holds {} at flat index {i} (weights must be finite and at most \
             {MAX_WEIGHT_ABS} in magnitude)",
            data[i]
        );
    }
    Ok(())
}

/// Parse safetensors bytes into f32 tensors and metadata.
pub fn parse_safetensors(bytes: &[u8]) -> Result<(TensorMap, BTreeMap<String, String>)> {
    parse_checked(bytes, false, &|_| {})
}

/// Parse a model file's bytes: float dtypes only (an integer tensor where a weight belongs
/// would be widened into nonsense), each value checked in the same pass that widens it (one
/// compare per element; the cost on L-2x is in PERF.md, `inspect --verify`).
pub fn parse_model_tensors(bytes: &[u8]) -> Result<(TensorMap, BTreeMap<String, String>)> {
    parse_checked(bytes, true, &|_| {})
}

/// The header of safetensors `bytes` (tensor views, not yet read) and its metadata; for a
/// model file (`model`), every tensor must be a float dtype. Reads only the header: the
/// views' offsets are checked against `bytes.len()` (contiguous, each tensor's byte size
/// its shape times its dtype's size, the last ending at the end) without touching the data.
fn parse_header(bytes: &[u8], model: bool) -> Result<(SafeTensors<'_>, BTreeMap<String, String>)> {
    if model && let Some(what) = foreign_format(bytes) {
        bail!(
            "{what}, not a checkergen model file: make one with `checkergen convert` (the \
             released .pth checkpoints and their YAML configs) or `checkergen init`"
        );
    }
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    if model {
        use safetensors::Dtype as D;
        for (name, view) in st.iter() {
            if !matches!(view.dtype(), D::F32 | D::BF16 | D::F16 | D::F64) {
                bail!(
                    "tensor `{name}` has dtype {:?}; model weights must be f32, bf16, f16 or f64",
                    view.dtype()
                );
            }
        }
    }
    Ok((st, metadata))
}

/// What a file given as a model is when its first bytes say it is something else: a zip (a
/// PyTorch checkpoint, or an .npz) or an image.
fn foreign_format(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        Some("a zip archive (a PyTorch .pth checkpoint or an .npz)")
    } else if bytes.starts_with(b"\x80\x02") {
        Some("a pickle (a legacy PyTorch checkpoint)")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("a PNG image")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("a JPEG image")
    } else {
        None
    }
}

/// One tensor as a model file's header describes it.
#[derive(Clone, Debug)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
}

/// A model file's tensors (name, dtype, shape, in the header's order), its metadata and its
/// size in bytes, from the header alone (`checkergen inspect`): the file is mapped and only
/// the pages of its header are read; the checks of `parse_header` apply (float dtypes,
/// offsets within the file and consistent with the shapes). No value is read or checked
/// ([`load_model_file`] does that).
pub fn read_model_header(path: &Path) -> Result<(Vec<HeaderEntry>, BTreeMap<String, String>, u64)> {
    crate::paths::check_input(path)?;
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("{shown}: cannot read"))?;
    // SAFETY: a read-only (PROT_READ) view, dropped before this returns; only the header's
    // bytes are read (a truncation by another process meanwhile: see load_model_file).
    let map =
        unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{shown}: cannot map"))?;
    let (st, meta) = parse_header(&map, true).with_context(|| format!("{shown}"))?;
    let entries = st
        .iter()
        .map(|(name, view)| HeaderEntry {
            name: name.to_string(),
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
        })
        .collect();
    Ok((entries, meta, map.len() as u64))
}

/// `done` is called with each tensor's bytes once they are decoded (the mapped loader
/// releases them).
fn parse_checked(
    bytes: &[u8],
    model: bool,
    done: &(dyn Fn(&[u8]) + Sync),
) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let (st, metadata) = parse_header(bytes, model)?;
    let mut map = TensorMap::new();
    let tensors = st.tensors();
    // Decoded and checked on all cores; the first error in the file's tensor order is the
    // one reported, whatever the threads did.
    use rayon::prelude::*;
    let decoded: Vec<Result<Vec<f32>>> = tensors
        .par_iter()
        .map(|(name, view)| {
            let data = view_to_f32(name, view.dtype(), view.data())?;
            done(view.data());
            if model {
                check_weights(name, &data)?;
            }
            Ok(data)
        })
        .collect();
    for ((name, view), data) in tensors.into_iter().zip(decoded) {
        map.insert(name, Tensor::new(view.shape().to_vec(), data?));
    }
    Ok((map, metadata))
}

/// Integer tensors (token ids, positions, rank maps) read exactly as i64.
pub fn load_i64(st: &SafeTensors, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let v = st
        .tensor(name)
        .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
    use safetensors::Dtype;
    let data: Vec<i64> = match v.dtype() {
        Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::I32 => v
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        d => bail!("tensor {name}: expected an integer dtype, found {d:?}"),
    };
    Ok((v.shape().to_vec(), data))
}

// ------------------------------------------------------------------------------------------
// Writing
// ------------------------------------------------------------------------------------------

/// Storage precision of the floating-point tensors of a written model file (integer tensors
/// keep theirs). One enum for `init`, `convert` and the command line (`--dtype f32|bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    /// The safetensors dtype float tensors are stored in.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::Bf16 => safetensors::Dtype::BF16,
        }
    }

    /// Little-endian bytes of `values` in this precision (bf16: round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => bytemuck::cast_slice(values).to_vec(),
            Dtype::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl FromStr for Dtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => bail!("unknown dtype {s:?}: expected f32 or bf16"),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        })
    }
}

/// A tensor as it is written: on-disk dtype, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// An f32 tensor stored in `dtype`.
    pub fn encode(t: &Tensor, dtype: Dtype) -> Self {
        RawTensor {
            dtype: dtype.safetensors(),
            shape: t.shape.clone(),
            data: dtype.encode(&t.data),
        }
    }
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Write raw tensors `(name, dtype, shape, little-endian bytes)` and metadata as safetensors,
/// atomically: to `<path>.partial` beside it, fsync, rename (the temporary removed on failure).
pub fn write_safetensors(
    path: &Path,
    entries: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = entries
        .iter()
        .map(|(name, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    write_atomic(path, views, metadata)
}

/// Write a model file: `tensors` as they are, the configuration as `checkergen_config` JSON
/// metadata, `format`, and `extra_meta` (e.g. `source`). Returns the file's size in bytes.
pub fn write_model_tensors(
    path: &Path,
    cfg: &ModelConfig,
    tensors: &[(String, RawTensor)],
    extra_meta: &[(&str, String)],
) -> Result<u64> {
    let mut meta = HashMap::new();
    meta.insert(CONFIG_METADATA_KEY.to_string(), serde_json::to_string(cfg)?);
    meta.insert("format".to_string(), FORMAT.to_string());
    for (k, v) in extra_meta {
        meta.insert(k.to_string(), v.clone());
    }
    write_atomic(path, tensors.iter().map(|(n, t)| (n.as_str(), t)), meta)?;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read back", path.display()))?
        .len())
}

/// Write a model file of f32 tensors stored in `dtype` (see [`write_model_tensors`]).
pub fn write_model(
    path: &Path,
    cfg: &ModelConfig,
    map: &TensorMap,
    dtype: Dtype,
    extra_meta: &[(&str, String)],
) -> Result<()> {
    let tensors: Vec<(String, RawTensor)> = map
        .iter()
        .map(|(name, t)| (name.clone(), RawTensor::encode(t, dtype)))
        .collect();
    write_model_tensors(path, cfg, &tensors, extra_meta).map(|_| ())
}

/// Rewrite the JSON header of the safetensors file at `path` with its keys sorted, in place:
/// safetensors serializes the metadata from a `HashMap`, whose order changes from run to run,
/// so two writes of the same tensors and metadata would differ in bytes (and in CRC). The
/// sorted header has exactly the same length (the same keys and values), so the data offsets
/// stand; it is padded with spaces as the format allows.
fn sort_header(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    ensure!(n <= 100 << 20, "header of {n} bytes");
    let mut hdr = vec![0u8; n as usize];
    f.read_exact(&mut hdr)?;
    // serde_json's Map is a BTreeMap (no `preserve_order`): serializing sorts every level.
    let v: serde_json::Value = serde_json::from_slice(&hdr)?;
    let mut sorted = serde_json::to_vec(&v)?;
    ensure!(
        sorted.len() <= hdr.len(),
        "the sorted header is longer ({} > {} bytes)",
        sorted.len(),
        hdr.len()
    );
    sorted.resize(hdr.len(), b' ');
    f.seek(SeekFrom::Start(8))?;
    f.write_all(&sorted)?;
    Ok(())
}

/// Serialize to `<path>.partial` in the same directory, fsync it, then rename it over `path`,
/// so a reader never sees a half-written file and a failed write leaves none: the temporary
/// is removed on every failure path. `path` must be new or a regular file
/// ([`check_output`]); the file gets mode 0666 less the umask (safetensors' own temporary is
/// 0600, so the mode of a placeholder created with the process's umask is copied onto it).
fn write_atomic<S: AsRef<str> + Ord + fmt::Display, V: safetensors::View>(
    path: &Path,
    views: impl IntoIterator<Item = (S, V)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let shown = path.display();
    check_output(path, &[])?;
    let (tmp, placeholder) = crate::paths::fresh_temp(path)?;
    let result = (|| -> Result<()> {
        let perms = placeholder.metadata()?.permissions();
        drop(placeholder);
        safetensors::serialize_to_file(views, Some(metadata), &tmp)
            .map_err(|e| anyhow::anyhow!("{shown}: cannot write ({e})"))?;
        sort_header(&tmp).with_context(|| format!("{shown}: cannot rewrite the header"))?;
        std::fs::set_permissions(&tmp, perms)
            .with_context(|| format!("{shown}: cannot set the mode of {}", tmp.display()))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{shown}: cannot sync {}", tmp.display()))?;
        crate::paths::commit_temp(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("checkergen-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn partial(path: &Path) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    }

    #[test]
    fn dtype_parses_and_prints() {
        assert_eq!("bf16".parse::<Dtype>().unwrap(), Dtype::Bf16);
        assert_eq!("F32".parse::<Dtype>().unwrap(), Dtype::F32);
        assert!("f16".parse::<Dtype>().is_err());
        assert_eq!(Dtype::Bf16.to_string(), "bf16");
        assert_eq!(Dtype::Bf16.encode(&[1.0]), half::bf16::ONE.to_le_bytes());
    }

    /// Two writes of the same tensors and metadata give the same bytes (issue 22 item 9): the
    /// metadata's HashMap order would otherwise differ between writes.
    #[test]
    fn writes_are_byte_reproducible() {
        let entries = vec![
            (
                "b".to_string(),
                safetensors::Dtype::F32,
                vec![2],
                vec![0u8; 8],
            ),
            (
                "a".to_string(),
                safetensors::Dtype::BF16,
                vec![3],
                vec![1u8; 6],
            ),
        ];
        let meta = || -> HashMap<String, String> {
            (0..24)
                .map(|i| (format!("key{i}"), format!("value {i}")))
                .collect()
        };
        let (p1, p2) = (scratch("repro1.safetensors"), scratch("repro2.safetensors"));
        write_safetensors(&p1, &entries, meta()).unwrap();
        let first = std::fs::read(&p1).unwrap();
        for _ in 0..4 {
            write_safetensors(&p2, &entries, meta()).unwrap();
            assert_eq!(
                std::fs::read(&p2).unwrap(),
                first,
                "bytes differ between writes"
            );
        }
        // The file still reads, with every metadata entry and tensor.
        let st = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.names().len(), 2);
        let (_, m) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap().len(), 24);
        std::fs::remove_file(&p1).ok();
        std::fs::remove_file(&p2).ok();
    }

    #[test]
    fn atomic_write_round_trips_and_cleans_up_on_failure() {
        let entries = vec![(
            "x".to_string(),
            safetensors::Dtype::F32,
            vec![2],
            bytemuck::cast_slice(&[1.0f32, 2.0]).to_vec(),
        )];
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let ok = scratch("ok.safetensors");
        write_safetensors(&ok, &entries, meta.clone()).unwrap();
        let (map, m) = load_safetensors(&ok).unwrap();
        assert_eq!(map["x"].data, vec![1.0, 2.0]);
        assert_eq!(m["k"], "v");
        assert!(!partial(&ok).exists());
        // The target is a directory: refused before anything is written, nothing left behind.
        let blocked = scratch("blocked.safetensors");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        let err = format!(
            "{:#}",
            write_safetensors(&blocked, &entries, meta.clone()).unwrap_err()
        );
        assert!(err.contains("is a directory"), "{err}");
        assert!(!partial(&blocked).exists());
        // The directory does not exist: an error naming the file, nothing written.
        let nowhere = scratch("no/such/dir.safetensors");
        let err = format!(
            "{:#}",
            write_safetensors(&nowhere, &entries, meta).unwrap_err()
        );
        assert!(err.contains("dir.safetensors: cannot create"), "{err}");
        assert!(!partial(&nowhere).exists());
    }
}
