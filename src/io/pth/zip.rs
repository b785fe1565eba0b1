//! The zip layer of a `.pth` file: the end-of-central-directory record (ZIP64 records once
//! the file passes 4 GiB), the central directory, and reads of byte ranges inside stored
//! entries through their local headers.
//!
//! Written here rather than taken from the `zip` crate: torch writes only stored entries,
//! the checkpoint needs random access to a few entries of a file that can be several GB, and
//! this subset of the format is about a hundred lines.
//!
//! Hostile archives: every size and offset the archive claims is checked against the file's
//! real length before anything is allocated, and every entry read is checked against its
//! CRC-32 (`crc32fast`) once, so a corrupted download is an error naming the entry.

use anyhow::{Context, Result, anyhow, bail};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// The start of every "this is not a checkpoint" error.
/// The one reader serves PyTorch checkpoints and numpy's `.npz` files, so its refusals name
/// neither as the only possibility.
pub(super) const NOT_TORCH_ZIP: &str = "not a readable zip archive (PyTorch checkpoint or .npz)";

/// One central-directory entry.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    name: String,
    method: u16,
    /// Uncompressed size in bytes.
    pub(super) size: u64,
    compressed_size: u64,
    local_header_offset: u64,
    crc32: u32,
}

/// An open zip archive: its file and its central directory by entry name.
pub(super) struct Archive {
    file: File,
    len: u64,
    entries: HashMap<String, Entry>,
    /// Entries whose CRC-32 has been checked.
    verified: RefCell<HashSet<String>>,
}

impl Archive {
    /// Read the central directory of `file`.
    pub(super) fn new(file: File) -> Result<Self> {
        let len = file.metadata()?.len();
        let entries = read_index(&file, len)?;
        Ok(Archive {
            file,
            len,
            entries,
            verified: RefCell::new(HashSet::new()),
        })
    }

    pub(super) fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub(super) fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Read `len` bytes at `offset` inside a stored entry. The first read of an entry checks
    /// its CRC-32: on the bytes read when they are the whole entry, else by streaming it.
    pub(super) fn read(&self, e: &Entry, offset: u64, len: u64) -> Result<Vec<u8>> {
        let data_start = data_start(&self.file, self.len, e)?;
        if offset.checked_add(len).is_none_or(|end| end > e.size) {
            bail!("read past the end of zip entry {}", e.name);
        }
        let whole = offset == 0 && len == e.size;
        if !whole && !self.verified.borrow().contains(&e.name) {
            let mut h = crc32fast::Hasher::new();
            let mut at = 0;
            while at < e.size {
                let n = (e.size - at).min(1 << 20);
                h.update(&read_at(&self.file, self.len, data_start + at, n)?);
                at += n;
            }
            self.check_crc(e, h.finalize())?;
        }
        let bytes = read_at(&self.file, self.len, data_start + offset, len)
            .with_context(|| format!("zip entry {}", e.name))?;
        if whole && !self.verified.borrow().contains(&e.name) {
            self.check_crc(e, crc32fast::hash(&bytes))?;
        }
        Ok(bytes)
    }

    fn check_crc(&self, e: &Entry, crc: u32) -> Result<()> {
        if crc != e.crc32 {
            bail!(
                "zip entry {} is corrupt: CRC-32 {crc:08x}, the archive says {:08x} \
                 (damaged or incomplete download?)",
                e.name,
                e.crc32
            );
        }
        self.verified.borrow_mut().insert(e.name.clone());
        Ok(())
    }

    /// Read a whole entry.
    pub(super) fn read_all(&self, e: &Entry) -> Result<Vec<u8>> {
        self.read(e, 0, e.size)
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Read `len` bytes at `offset` of a file of `file_len` bytes; a range past the end is an
/// error before anything is allocated.
pub(super) fn read_at(mut file: &File, file_len: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        bail!("truncated file: {len} bytes at offset {offset} are past its end ({file_len} bytes)");
    }
    let mut buf = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut buf)
        .with_context(|| format!("truncated file: cannot read {len} bytes at offset {offset}"))?;
    Ok(buf)
}

/// Read the central directory (with ZIP64 support) into name -> entry.
fn read_index(file: &File, len: u64) -> Result<HashMap<String, Entry>> {
    let head = read_at(file, len, 0, len.min(4))?;
    // A pickle (a legacy torch.save file; PthCheckpoint reads those before this point, so
    // this is a reader of zips only, such as .npz input, given one).
    let pickle = head.first() == Some(&0x80);
    let not_zip = || {
        if pickle {
            anyhow!("{NOT_TORCH_ZIP}: this is a pickle (a legacy torch.save file?)")
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
    let tail = read_at(file, len, tail_start, tail_len)?;
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
        let rec = read_at(file, len, z64_offset, 56).context("bad ZIP64 end record offset")?;
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
    let cd = read_at(file, len, cd_offset, cd_size)?;
    let mut entries = HashMap::new();
    let mut p = 0usize;
    for _ in 0..count {
        if p + 46 > cd.len() || le32(&cd, p) != 0x0201_4b50 {
            bail!("{NOT_TORCH_ZIP} (corrupt central directory)");
        }
        let method = le16(&cd, p + 10);
        let crc32 = le32(&cd, p + 16);
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
        // A size claim larger than the file is refused here, before any read allocates it.
        if local_header_offset
            .checked_add(30)
            .and_then(|x| x.checked_add(compressed_size))
            .is_none_or(|end| end > len)
        {
            bail!(
                "{NOT_TORCH_ZIP}: zip entry {name} claims {size} bytes at offset \
                 {local_header_offset}, past the end of the {len}-byte file (truncated download?)"
            );
        }
        entries.insert(
            name.clone(),
            Entry {
                name,
                method,
                size,
                compressed_size,
                local_header_offset,
                crc32,
            },
        );
        p = end;
    }
    Ok(entries)
}

/// Where a stored entry's bytes start, through its local header (checked to fit the file).
fn data_start(file: &File, file_len: u64, e: &Entry) -> Result<u64> {
    if e.method != 0 || e.compressed_size != e.size {
        bail!(
            "zip entry {} is compressed (method {}); only stored entries are read (torch.save \
             and np.savez write them; np.savez_compressed does not)",
            e.name,
            e.method
        );
    }
    let header = read_at(file, file_len, e.local_header_offset, 30)
        .with_context(|| format!("zip entry {}: bad local header offset", e.name))?;
    if le32(&header, 0) != 0x0403_4b50 {
        bail!("zip entry {}: corrupt local header", e.name);
    }
    let start = e.local_header_offset + 30 + le16(&header, 26) as u64 + le16(&header, 28) as u64;
    if start.checked_add(e.size).is_none_or(|end| end > file_len) {
        bail!(
            "zip entry {} ({} bytes) runs past the end of the file (truncated download?)",
            e.name,
            e.size
        );
    }
    Ok(start)
}

/// One entry for [`stored_zip`]. `claimed_size` writes another size into the headers: an
/// archive that lies about an entry, for tests of the checks above.
pub struct StoredEntry<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
    pub claimed_size: Option<u64>,
}

/// A zip of stored entries laid out as torch.save writes them (ZIP64 central and end
/// records when `zip64`), each with its CRC-32 and a 3-byte padding extra field in its local
/// header. The one writer behind the reader's unit tests, the hostile-input tests and the
/// fuzzer (checkergen itself never writes .pth files).
pub fn stored_zip(entries: &[StoredEntry], zip64: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u64;
        let crc = crc32fast::hash(e.data);
        let size = e.claimed_size.unwrap_or(e.data.len() as u64);
        let (size32, off32) = if zip64 {
            (0xFFFF_FFFFu32, 0xFFFF_FFFFu32)
        } else {
            (size as u32, offset as u32)
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&3u16.to_le_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(e.data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&(if zip64 { 28u16 } else { 0 }).to_le_bytes());
        central.extend_from_slice(&[0u8; 10]);
        central.extend_from_slice(&off32.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
        if zip64 {
            central.extend_from_slice(&1u16.to_le_bytes());
            central.extend_from_slice(&24u16.to_le_bytes());
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&offset.to_le_bytes());
        }
    }
    let cd_offset = out.len() as u64;
    out.extend_from_slice(&central);
    let n = entries.len() as u64;
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
