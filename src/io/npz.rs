//! A streaming `.npz` writer (numpy's `np.savez` layout: a ZIP of stored `.npy` entries),
//! so that `generate` holds one batch in memory however many images the file gets: ZIP64
//! records throughout (an ADM-evaluator sample file is 9.8 GB), entries stored, each entry's
//! CRC-32 computed as it streams and patched into its local header when it ends. The file is
//! written to `<path>.partial`, fsynced and renamed over `path` by [`NpzWriter::finish`]; a
//! writer dropped unfinished removes the partial file, so an incomplete file never has the
//! final name.
//!
//! The reading side, [`NpzReader`], takes the arrays of any `np.savez` file by byte range.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The `.npy` (format 1.0) header of a C-order array: magic, version, the header dict padded
/// with spaces to a multiple of 64 bytes including the final newline.
pub fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(total.next_multiple_of(64) - total));
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

/// What a `.npy` header declares, parsed as the format defines it (a Python dict literal with
/// exactly the keys `descr`, `fortran_order` and `shape`), not by searching its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Offset of the array data from the start of the `.npy` bytes.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Elements of the array (the product of `shape`), or an error when it passes `usize`.
    pub fn elements(&self) -> Result<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .with_context(|| format!("shape {:?}: element count overflows", self.shape))
    }
}

/// Parse the header at the start of `npy` (versions 1.0, 2.0 and 3.0): magic, version, header
/// length, then the dict. Every error is one line.
pub fn parse_npy_header(npy: &[u8]) -> Result<NpyHeader> {
    if npy.len() < 10 || &npy[..6] != b"\x93NUMPY" {
        bail!("no .npy magic");
    }
    let (hlen, start): (usize, usize) = match npy[6] {
        1 => (u16::from_le_bytes([npy[8], npy[9]]) as usize, 10),
        2 | 3 if npy.len() >= 12 => (
            u32::from_le_bytes(npy[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => bail!("unknown .npy version {v}"),
    };
    let end = start.checked_add(hlen).context("header length overflows")?;
    let text = npy
        .get(start..end)
        .and_then(|h| std::str::from_utf8(h).ok())
        .context("truncated or non-UTF-8 .npy header")?;
    let mut p = DictParser {
        s: text.as_bytes(),
        i: 0,
    };
    let (descr, fortran_order, shape) = p.dict()?;
    Ok(NpyHeader {
        descr,
        fortran_order,
        shape,
        data_offset: end,
    })
}

/// The npy header dict: `{'descr': STR, 'fortran_order': BOOL, 'shape': TUPLE-OF-INTS, }` in
/// any key order, with Python's optional whitespace and trailing commas; nothing else.
struct DictParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl DictParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if !self.eat(c) {
            bail!(
                "bad .npy header: expected '{}' at byte {}",
                c as char,
                self.i
            );
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String> {
        self.ws();
        let q = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => bail!("bad .npy header: expected a string at byte {}", self.i),
        };
        let from = self.i + 1;
        let len = self.s[from..]
            .iter()
            .position(|&c| c == q || c == b'\\')
            .context("bad .npy header: unterminated string")?;
        if self.s[from + len] == b'\\' {
            bail!("bad .npy header: escapes in a string");
        }
        self.i = from + len + 1;
        Ok(String::from_utf8_lossy(&self.s[from..from + len]).into_owned())
    }

    fn word(&mut self) -> &str {
        self.ws();
        let from = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[from..self.i]).unwrap_or("")
    }

    fn shape(&mut self) -> Result<Vec<usize>> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            if self.eat(b')') {
                break;
            }
            let w = self.word().to_string();
            let d: usize = w
                .parse()
                .map_err(|_| anyhow::anyhow!("bad .npy header: shape entry {w:?}"))?;
            dims.push(d);
            if self.eat(b')') {
                // Python writes a 1-tuple as (n,): (n) is an int in parentheses.
                if dims.len() == 1 {
                    bail!("bad .npy header: shape ({d}) is not a tuple");
                }
                break;
            }
            self.expect(b',')?;
        }
        Ok(dims)
    }

    fn dict(&mut self) -> Result<(String, bool, Vec<usize>)> {
        self.expect(b'{')?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        loop {
            if self.eat(b'}') {
                break;
            }
            let key = self.string()?;
            self.expect(b':')?;
            let dup = match key.as_str() {
                "descr" => descr.replace(self.string()?).is_some(),
                "fortran_order" => {
                    let v = match self.word() {
                        "True" => true,
                        "False" => false,
                        w => bail!("bad .npy header: fortran_order is {w:?}"),
                    };
                    fortran.replace(v).is_some()
                }
                "shape" => shape.replace(self.shape()?).is_some(),
                other => bail!("bad .npy header: unexpected key {other:?}"),
            };
            if dup {
                bail!("bad .npy header: key {key:?} given twice");
            }
            if self.eat(b'}') {
                break;
            }
            self.expect(b',')?;
        }
        self.ws();
        if self.i != self.s.len() {
            bail!("bad .npy header: text after the dict");
        }
        match (descr, fortran, shape) {
            (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
            _ => bail!("bad .npy header: descr, fortran_order and shape are all required"),
        }
    }
}

/// The element types the `.npz` readers take, from a `.npy` `descr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    /// `|u1` (uint8)
    U8,
    /// `<f4` (little-endian float32)
    F32,
    /// `<f8` (little-endian float64)
    F64,
}

impl NpyDtype {
    /// The dtype of a `descr`, or None for any other (big-endian, integers, objects, ...).
    pub fn from_descr(descr: &str) -> Option<NpyDtype> {
        match descr {
            "|u1" | "<u1" => Some(NpyDtype::U8),
            "<f4" => Some(NpyDtype::F32),
            "<f8" => Some(NpyDtype::F64),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::U8 => 1,
            NpyDtype::F32 => 4,
            NpyDtype::F64 => 8,
        }
    }
}

/// One array of an `.npz` as its header declares it, checked against its entry: the data
/// (elements x element size, checked arithmetic) fills the entry exactly after the header.
#[derive(Clone, Debug)]
pub struct NpyArray {
    /// The array's name (the entry's name without `.npy`).
    pub name: String,
    /// The parsed header.
    pub header: NpyHeader,
    /// Its element type; None for a `descr` the readers do not take (the caller names it).
    pub dtype: Option<NpyDtype>,
    /// Elements (the product of the shape).
    pub elements: usize,
}

impl NpyArray {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.header.shape
    }
}

/// The arrays of an `.npz` (`np.savez`: stored `.npy` entries), read by byte range through
/// the checked zip reader of `io::pth` (sizes against the file, CRC-32 of each entry), so a
/// 10 GB image array is streamed, never loaded whole.
pub struct NpzReader {
    path: PathBuf,
    zip: crate::io::pth::ZipReader,
}

impl NpzReader {
    /// Open `path` (a regular file: [`crate::paths::check_input`]) and read its directory.
    pub fn open(path: &Path) -> Result<NpzReader> {
        Ok(NpzReader {
            path: path.to_path_buf(),
            zip: crate::io::pth::ZipReader::open(path)?,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the archive has array `name` (entry `name.npy`).
    pub fn contains(&self, name: &str) -> bool {
        self.has_entry(&format!("{name}.npy"))
    }

    /// Whether the archive has an entry named exactly `entry`.
    pub fn has_entry(&self, entry: &str) -> bool {
        self.zip.size(entry).is_ok()
    }

    /// The header of array `name`, checked against its entry's size; errors name the file.
    pub fn array(&self, name: &str) -> Result<NpyArray> {
        let shown = self.path.display();
        let entry = format!("{name}.npy");
        let size = self.zip.size(&entry)?;
        let head = self.zip.read(&entry, 0, size.min(12))?;
        if head.len() < 10 || &head[..6] != b"\x93NUMPY" {
            bail!("{shown}: {name} is not a .npy array (no .npy magic)");
        }
        let hlen = match head[6] {
            1 => 10 + u16::from_le_bytes([head[8], head[9]]) as u64,
            2 | 3 if head.len() == 12 => 12 + u32::from_le_bytes(head[8..12].try_into()?) as u64,
            v => bail!("{shown}: {name}: unknown .npy version {v}"),
        };
        if hlen > size {
            bail!("{shown}: {name}: truncated .npy header ({hlen} bytes in an entry of {size})");
        }
        let header = parse_npy_header(&self.zip.read(&entry, 0, hlen)?)
            .map_err(|e| anyhow::anyhow!("{shown}: {name}: {e:#}"))?;
        let elements = header
            .elements()
            .map_err(|e| anyhow::anyhow!("{shown}: {name}: {e:#}"))?;
        let dtype = NpyDtype::from_descr(&header.descr);
        if let Some(t) = dtype {
            let data = (elements as u64).checked_mul(t.size() as u64);
            if data.and_then(|d| d.checked_add(hlen)) != Some(size) {
                bail!(
                    "{shown}: {name} declares shape {:?} of {} ({} bytes of data) but its entry \
                     holds {} bytes after the header",
                    header.shape,
                    header.descr,
                    data.map_or("too many".to_string(), |d| d.to_string()),
                    size - hlen
                );
            }
        }
        Ok(NpyArray {
            name: name.to_string(),
            header,
            dtype,
            elements,
        })
    }

    /// `len` bytes of `a`'s data from byte `offset` of it.
    pub fn read_bytes(&self, a: &NpyArray, offset: u64, len: u64) -> Result<Vec<u8>> {
        let start = (a.header.data_offset as u64)
            .checked_add(offset)
            .context("read offset overflows")?;
        self.zip.read(&format!("{}.npy", a.name), start, len)
    }

    /// The element type of a float array (`<f4` or `<f8`); any other is refused, its descr
    /// quoted (a header's text may hold anything, newlines included).
    fn float_dtype(&self, a: &NpyArray) -> Result<NpyDtype> {
        match a.dtype {
            Some(t @ (NpyDtype::F32 | NpyDtype::F64)) => Ok(t),
            _ => bail!(
                "{}: {} has dtype {:?}, not float32 or float64",
                self.path.display(),
                a.name,
                a.header.descr
            ),
        }
    }

    /// Elements `first..first + count` of a float array (`<f4`, or `<f8` rounded to f32),
    /// read in chunks of at most 16 MiB.
    pub fn read_f32(&self, a: &NpyArray, first: usize, count: usize) -> Result<Vec<f32>> {
        let t = self.float_dtype(a)?;
        if first.checked_add(count).is_none_or(|e| e > a.elements) {
            bail!(
                "{}: {}: elements {first}.. (+{count}) past its {}",
                self.path.display(),
                a.name,
                a.elements
            );
        }
        let mut out = Vec::with_capacity(count);
        let chunk = (16 << 20) / t.size();
        let mut at = first;
        while at < first + count {
            let n = chunk.min(first + count - at);
            let b = self.read_bytes(a, (at * t.size()) as u64, (n * t.size()) as u64)?;
            match t {
                NpyDtype::F32 => out.extend(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
                ),
                _ => out.extend(
                    b.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32),
                ),
            }
            at += n;
        }
        Ok(out)
    }

    /// All elements of a float array as f64 (`<f8`, or `<f4` widened).
    pub fn read_f64(&self, a: &NpyArray) -> Result<Vec<f64>> {
        let t = self.float_dtype(a)?;
        let b = self.read_bytes(a, 0, (a.elements * t.size()) as u64)?;
        Ok(match t {
            NpyDtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            _ => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
        })
    }
}

/// One finished entry, for the central directory.
struct Done {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

/// The entry being written.
struct Open {
    name: String,
    offset: u64,
    size: u64,
    written: u64,
    crc: crc32fast::Hasher,
}

pub struct NpzWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    pos: u64,
    done: Vec<Done>,
    open: Option<Open>,
    /// Leave `<path>.partial` in place when dropped unfinished (a resumable run).
    keep_partial: bool,
}

/// Where a resumable writer stands: its first entry is open with `written` of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub written: u64,
    pub crc: u32,
}

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const ZIP64_EOCD: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const EOCD: u32 = 0x0605_4b50;
/// 1980-01-01 00:00 in DOS time and date (a fixed stamp: equal inputs give equal files).
const DOS_TIME: u16 = 0;
const DOS_DATE: u16 = (1 << 5) | 1;

impl NpzWriter {
    /// Start `path` (written as `<path>.partial` until [`finish`](Self::finish)).
    pub fn create(path: &Path) -> Result<NpzWriter> {
        crate::paths::check_output(path, &[])?;
        let (tmp, f) = crate::paths::fresh_temp(path)?;
        Ok(NpzWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, f)),
            pos: 0,
            done: Vec::new(),
            open: None,
            keep_partial: false,
        })
    }

    /// The partial file of `path`.
    pub fn partial_path(path: &Path) -> PathBuf {
        crate::paths::partial_path(path)
    }

    /// Keep `<path>.partial` when dropped unfinished, so that a later run can resume it.
    pub fn keep_partial(&mut self) {
        self.keep_partial = true;
    }

    /// Flush what the open (first) entry has received to the file and the disk, and say
    /// where it stands: what [`resume`](Self::resume) takes.
    pub fn checkpoint(&mut self) -> Result<Progress> {
        let e = self
            .open
            .as_ref()
            .context("npz: no open entry to checkpoint")?;
        let (written, crc) = (e.written, e.crc.clone().finalize());
        let out = self.out.as_mut().context("npz writer already finished")?;
        out.flush()
            .with_context(|| format!("{}: write failed", self.tmp.display()))?;
        out.get_ref()
            .sync_data()
            .with_context(|| format!("{}: fsync failed", self.tmp.display()))?;
        Ok(Progress { written, crc })
    }

    /// Reopen `<path>.partial`, whose first entry `name` of `size` bytes had `at` of its
    /// bytes checkpointed: the file is verified against the checkpoint first (the entry's
    /// local header as [`begin_entry`](Self::begin_entry) writes it, at least `at.written`
    /// bytes of data after it, and their CRC-32 equal to `at.crc`); later bytes are cut off
    /// and writing continues there. A file that disagrees is refused and left as it is.
    pub fn resume(path: &Path, name: &str, size: u64, at: Progress) -> Result<NpzWriter> {
        crate::paths::check_output(path, &[])?;
        let tmp = Self::partial_path(path);
        let shown = tmp.display();
        let data = 30 + name.len() as u64 + 20;
        crate::paths::check_output(&tmp, &[])?;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp)
            .with_context(|| format!("{shown}: cannot reopen"))?;
        let len = f.metadata()?.len();
        if at.written > size || len < data + at.written {
            bail!(
                "{shown}: shorter than its checkpoint ({len} bytes, {} expected): --overwrite starts over",
                data + at.written
            );
        }
        // The local header, as begin_entry wrote it (its CRC field is patched only at the end).
        let want = Self::local_header(name, size);
        let mut head = vec![0u8; want.len()];
        f.read_exact(&mut head)
            .with_context(|| format!("{shown}: cannot read"))?;
        let mut crc = crc32fast::Hasher::new();
        let mut left = at.written;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n])
                .with_context(|| format!("{shown}: cannot read"))?;
            crc.update(&buf[..n]);
            left -= n as u64;
        }
        if head != want || crc.finalize() != at.crc {
            bail!(
                "{shown}: its first {} bytes of {name} do not match its checkpoint (CRC-32 \
                 or header differ: the file was changed or damaged): --overwrite starts over",
                at.written
            );
        }
        f.set_len(data + at.written)
            .with_context(|| format!("{shown}: cannot cut it to its checkpoint"))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.seek(SeekFrom::End(0))
            .with_context(|| format!("{shown}: cannot seek"))?;
        Ok(NpzWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(out),
            pos: data + at.written,
            done: Vec::new(),
            open: Some(Open {
                name: name.to_string(),
                offset: 0,
                size,
                written: at.written,
                crc: crc32fast::Hasher::new_with_initial_len(at.crc, at.written),
            }),
            keep_partial: false,
        })
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        let out = self.out.as_mut().context("npz writer already finished")?;
        out.write_all(b)
            .with_context(|| format!("{}: write failed", self.tmp.display()))?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// The local header of entry `name` of `size` bytes (CRC-32 zero until the entry ends).
    fn local_header(name: &str, size: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(30 + name.len() + 20);
        h.extend_from_slice(&LOCAL_HEADER.to_le_bytes());
        h.extend_from_slice(&45u16.to_le_bytes()); // version needed: ZIP64
        h.extend_from_slice(&0u16.to_le_bytes()); // flags
        h.extend_from_slice(&0u16.to_le_bytes()); // stored
        h.extend_from_slice(&DOS_TIME.to_le_bytes());
        h.extend_from_slice(&DOS_DATE.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // CRC-32, patched at the end
        h.extend_from_slice(&u32::MAX.to_le_bytes()); // sizes in the ZIP64 extra
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&20u16.to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&1u16.to_le_bytes()); // ZIP64 extended information
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h
    }

    /// Begin entry `name` of exactly `size` bytes (every entry has its ZIP64 extra field).
    pub fn begin_entry(&mut self, name: &str, size: u64) -> Result<()> {
        if self.open.is_some() {
            bail!("npz: entry {name} begun before the previous one ended");
        }
        let offset = self.pos;
        let h = Self::local_header(name, size);
        self.put(&h)?;
        self.open = Some(Open {
            name: name.to_string(),
            offset,
            size,
            written: 0,
            crc: crc32fast::Hasher::new(),
        });
        Ok(())
    }

    /// Append bytes to the open entry.
    pub fn write(&mut self, b: &[u8]) -> Result<()> {
        let e = self.open.as_mut().context("npz: write outside an entry")?;
        if e.written + b.len() as u64 > e.size {
            bail!("npz: entry {} overflows its {} bytes", e.name, e.size);
        }
        e.written += b.len() as u64;
        e.crc.update(b);
        self.put(b)
    }

    /// End the open entry (it must have received exactly its size) and patch its CRC-32.
    pub fn end_entry(&mut self) -> Result<()> {
        let e = self.open.take().context("npz: no entry to end")?;
        if e.written != e.size {
            bail!(
                "npz: entry {} got {} of its {} bytes",
                e.name,
                e.written,
                e.size
            );
        }
        let crc = e.crc.finalize();
        let out = self.out.as_mut().context("npz writer already finished")?;
        (|| -> std::io::Result<()> {
            out.seek(SeekFrom::Start(e.offset + 14))?;
            out.write_all(&crc.to_le_bytes())?;
            out.seek(SeekFrom::Start(self.pos))?;
            Ok(())
        })()
        .with_context(|| format!("{}: write failed", self.tmp.display()))?;
        self.done.push(Done {
            name: e.name,
            crc,
            size: e.size,
            offset: e.offset,
        });
        Ok(())
    }

    /// A whole entry at once.
    pub fn entry(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.begin_entry(name, bytes.len() as u64)?;
        self.write(bytes)?;
        self.end_entry()
    }

    /// Write the central directory, fsync, and rename the file to its final name.
    pub fn finish(mut self) -> Result<()> {
        if self.open.is_some() {
            bail!("npz: finished with an entry open");
        }
        let cd_start = self.pos;
        let mut cd = Vec::new();
        for d in &self.done {
            cd.extend_from_slice(&CENTRAL_HEADER.to_le_bytes());
            cd.extend_from_slice(&45u16.to_le_bytes()); // made by
            cd.extend_from_slice(&45u16.to_le_bytes()); // needed
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&DOS_TIME.to_le_bytes());
            cd.extend_from_slice(&DOS_DATE.to_le_bytes());
            cd.extend_from_slice(&d.crc.to_le_bytes());
            cd.extend_from_slice(&u32::MAX.to_le_bytes());
            cd.extend_from_slice(&u32::MAX.to_le_bytes());
            cd.extend_from_slice(&(d.name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&28u16.to_le_bytes()); // extra
            cd.extend_from_slice(&0u16.to_le_bytes()); // comment
            cd.extend_from_slice(&0u16.to_le_bytes()); // disk
            cd.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            cd.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // external: a 0644 file
            cd.extend_from_slice(&u32::MAX.to_le_bytes()); // offset in the extra
            cd.extend_from_slice(d.name.as_bytes());
            cd.extend_from_slice(&1u16.to_le_bytes());
            cd.extend_from_slice(&24u16.to_le_bytes());
            cd.extend_from_slice(&d.size.to_le_bytes());
            cd.extend_from_slice(&d.size.to_le_bytes());
            cd.extend_from_slice(&d.offset.to_le_bytes());
        }
        let n = self.done.len() as u64;
        let cd_len = cd.len() as u64;
        let eocd64_at = cd_start + cd_len;
        cd.extend_from_slice(&ZIP64_EOCD.to_le_bytes());
        cd.extend_from_slice(&44u64.to_le_bytes());
        cd.extend_from_slice(&45u16.to_le_bytes());
        cd.extend_from_slice(&45u16.to_le_bytes());
        cd.extend_from_slice(&0u32.to_le_bytes());
        cd.extend_from_slice(&0u32.to_le_bytes());
        cd.extend_from_slice(&n.to_le_bytes());
        cd.extend_from_slice(&n.to_le_bytes());
        cd.extend_from_slice(&cd_len.to_le_bytes());
        cd.extend_from_slice(&cd_start.to_le_bytes());
        cd.extend_from_slice(&ZIP64_LOCATOR.to_le_bytes());
        cd.extend_from_slice(&0u32.to_le_bytes());
        cd.extend_from_slice(&eocd64_at.to_le_bytes());
        cd.extend_from_slice(&1u32.to_le_bytes());
        cd.extend_from_slice(&EOCD.to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        cd.extend_from_slice(&u16::MAX.to_le_bytes());
        cd.extend_from_slice(&u16::MAX.to_le_bytes());
        cd.extend_from_slice(&u32::MAX.to_le_bytes());
        cd.extend_from_slice(&u32::MAX.to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        self.put(&cd)?;
        let out = self.out.take().context("npz writer already finished")?;
        let f = out
            .into_inner()
            .map_err(|e| anyhow::anyhow!("{}: write failed ({})", self.tmp.display(), e.error()))?;
        f.sync_all()
            .with_context(|| format!("{}: fsync failed", self.tmp.display()))?;
        crate::paths::check_output(&self.path, &[])?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.path.display()
            )
        })?;
        Ok(())
    }
}

impl Drop for NpzWriter {
    /// An unfinished file never keeps a name that could pass for a finished one.
    fn drop(&mut self) {
        if self.out.is_some() {
            self.out = None;
            if !self.keep_partial {
                std::fs::remove_file(&self.tmp).ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header parser takes what numpy writes and refuses everything else, including a
    /// nested dict that a substring search used to pass (issue 22 item 3).
    #[test]
    fn npy_headers_parse_as_defined() {
        let h = parse_npy_header(&npy_header("|u1", &[3, 256, 256, 3])).unwrap();
        assert_eq!(h.descr, "|u1");
        assert!(!h.fortran_order);
        assert_eq!(h.shape, vec![3, 256, 256, 3]);
        assert_eq!(h.data_offset, 128);
        assert_eq!(h.elements().unwrap(), 3 * 256 * 256 * 3);
        let one = parse_npy_header(&npy_header("<i8", &[7])).unwrap();
        assert_eq!(one.shape, vec![7]);
        let raw = |dict: &str| {
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            parse_npy_header(&b)
        };
        // Other key orders, double quotes, no trailing comma, spaces: as Python reads them.
        let h = raw("{\"shape\": ( 2 , 4 ), 'fortran_order':True,'descr':'<u1'}\n").unwrap();
        assert_eq!((h.shape, h.fortran_order), (vec![2, 4], true));
        assert_eq!(
            raw("{'descr': '|u1', 'fortran_order': False, 'shape': (), }")
                .unwrap()
                .shape,
            Vec::<usize>::new()
        );
        for bad in [
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2), 'x': {'descr': '|u1'}}",
            "{'descr': {'descr': '|u1'}, 'fortran_order': False, 'shape': (1,)}",
            "{'descr': '|u1', 'fortran_order': False}",
            "{'descr': '|u1', 'descr': '|u1', 'fortran_order': False, 'shape': (1,)}",
            "{'descr': '|u1', 'fortran_order': 0, 'shape': (1,)}",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (-1,)}",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1,)} junk",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1,)",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1)}",
            "{'descr': '|u\\x31', 'fortran_order': False, 'shape': (1,)}",
        ] {
            assert!(raw(bad).is_err(), "accepted: {bad}");
        }
        // A shape whose element count passes usize is an error, not a wrapped count.
        let huge = raw(&format!(
            "{{'descr': '|u1', 'fortran_order': False, 'shape': ({}, 256, 256, 3), }}",
            1u64 << 48
        ))
        .unwrap();
        assert!(huge.elements().is_err());
    }

    #[test]
    fn npy_headers_are_aligned_dicts() {
        let h = npy_header("|u1", &[3, 256, 256, 3]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(
            text.starts_with(
                "{'descr': '|u1', 'fortran_order': False, 'shape': (3, 256, 256, 3), }"
            )
        );
        assert!(text.ends_with('\n'));
        let h1 = npy_header("<i8", &[7]);
        assert!(
            std::str::from_utf8(&h1[10..])
                .unwrap()
                .contains("'shape': (7,)")
        );
    }

    #[test]
    fn written_entries_read_back_through_the_checked_zip_reader() {
        let d = std::env::temp_dir().join(format!("cg-npz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("a.npz");
        let mut w = NpzWriter::create(&p).unwrap();
        w.entry("small.npy", b"abc").unwrap();
        w.begin_entry("big.npy", 10).unwrap();
        w.write(b"01234").unwrap();
        assert!(!p.exists(), "the final name appears only when finished");
        w.write(b"56789").unwrap();
        w.end_entry().unwrap();
        w.finish().unwrap();
        assert!(!d.join("a.npz.partial").exists());
        assert_eq!(
            crate::io::pth::read_zip_entry(&p, "big.npy").unwrap(),
            b"0123456789"
        );
        assert_eq!(
            crate::io::pth::read_zip_entry(&p, "small.npy").unwrap(),
            b"abc"
        );
        // Checkpoint, drop (kept), resume, finish: the same file as in one go.
        let r = d.join("r.npz");
        let mut w = NpzWriter::create(&r).unwrap();
        w.keep_partial();
        w.begin_entry("big.npy", 10).unwrap();
        w.write(b"01234").unwrap();
        let at = w.checkpoint().unwrap();
        w.write(b"XYZ").unwrap(); // lost: written after the checkpoint
        drop(w);
        let mut w = NpzWriter::resume(&r, "big.npy", 10, at).unwrap();
        w.write(b"56789").unwrap();
        w.end_entry().unwrap();
        w.entry("small.npy", b"abc").unwrap();
        w.finish().unwrap();
        let one_go = d.join("one.npz");
        let mut w = NpzWriter::create(&one_go).unwrap();
        w.entry("big.npy", b"0123456789").unwrap();
        w.entry("small.npy", b"abc").unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&r).unwrap(), std::fs::read(&one_go).unwrap());
        // Dropped unfinished: no file under either name.
        let q = d.join("b.npz");
        let mut w = NpzWriter::create(&q).unwrap();
        w.begin_entry("x", 4).unwrap();
        assert!(w.write(b"12345").is_err(), "overflow");
        drop(w);
        assert!(!q.exists() && !d.join("b.npz.partial").exists());
        std::fs::remove_dir_all(&d).ok();
    }
}
