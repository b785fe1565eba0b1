//! Helpers shared by `tests/hostile_input.rs` and `tests/fuzz_inputs.rs`: running the binary
//! under a time and address-space limit, and building hostile files (stored zips with real
//! CRC-32s, pickles, model files with edited metadata).
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address-space limit of every subprocess (ulimit -v, KiB): an unbounded allocation fails
/// inside it rather than taking the machine's memory.
pub const MEM_LIMIT_KIB: u64 = 4 << 20;

pub fn scratch(dir: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-{dir}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

/// A fresh FIFO at `path` (replacing whatever is there).
pub fn make_fifo(path: &Path) -> PathBuf {
    let _ = std::fs::remove_file(path);
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
    path.to_path_buf()
}

/// How a limited run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code; None when killed by a signal or the time limit.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stderr: String,
}

impl Outcome {
    /// A clean failure: exit code 1 in time, no panic, and a last stderr line starting
    /// with `error:`.
    pub fn is_clean_failure(&self) -> bool {
        let last = self.stderr.trim().lines().last().unwrap_or("");
        self.code == Some(1) && !self.stderr.contains("panicked") && last.starts_with("error:")
    }

    pub fn last_line(&self) -> &str {
        self.stderr.trim().lines().last().unwrap_or("")
    }
}

/// Run the binary with `args` under `ulimit -v MEM_LIMIT_KIB` and a wall-clock `limit`
/// (killed when it passes; `timed_out` says so).
pub fn run_limited<S: AsRef<str>>(args: &[S], limit: Duration) -> Outcome {
    run_in_shell("", args, limit)
}

/// [`run_limited`] with no file larger than `bytes` (ulimit -f, SIGXFSZ ignored): a write
/// past it fails with EFBIG, as on a full disk.
pub fn run_disk_limited<S: AsRef<str>>(args: &[S], bytes: u64) -> Outcome {
    // POSIX sh counts ulimit -f in 512-byte blocks.
    let setup = format!("ulimit -f {}; trap '' XFSZ;", bytes.div_ceil(512));
    run_in_shell(&setup, args, Duration::from_secs(60))
}

/// Run the binary after the shell commands `setup` (and the memory limit).
fn run_in_shell<S: AsRef<str>>(setup: &str, args: &[S], limit: Duration) -> Outcome {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{setup} ulimit -v {MEM_LIMIT_KIB}; exec \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_checkergen"))
        .args(args.iter().map(|a| a.as_ref()))
        // Relative output paths land in the scratch area, never in the checkout.
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn checkergen");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break (st, false);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break (child.wait().unwrap(), true);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Outcome {
        code: if timed_out { None } else { status.code() },
        timed_out,
        stderr: reader.join().unwrap(),
    }
}

/// Assert a clean one-line failure whose last line contains `fragment`.
pub fn assert_refused<S: AsRef<str> + std::fmt::Debug>(args: &[S], fragment: &str) -> Outcome {
    let o = run_limited(args, Duration::from_secs(60));
    assert!(o.is_clean_failure(), "{args:?}: not a clean failure: {o:?}");
    assert!(
        o.last_line().contains(fragment),
        "{args:?}: {:?} lacks {fragment:?}",
        o.last_line()
    );
    o
}

// ------------------------------------------------------------------------------------------
// Zip archives (stored entries, as torch.save writes them)
// ------------------------------------------------------------------------------------------

pub use checkergen::io::pth::{StoredEntry, stored_zip};

/// A stored ZIP64 archive of `(name, data, claimed size)` entries.
pub fn zip64(entries: &[(&str, &[u8], Option<u64>)]) -> Vec<u8> {
    let e: Vec<StoredEntry> = entries
        .iter()
        .map(|&(name, data, claimed_size)| StoredEntry {
            name,
            data,
            claimed_size,
        })
        .collect();
    stored_zip(&e, true)
}

/// A checkpoint archive `ck/` holding `pickle` as its data.pkl (and a byteorder entry).
pub fn pth_with_pickle(pickle: &[u8]) -> Vec<u8> {
    zip64(&[
        ("ck/data.pkl", pickle, None),
        ("ck/byteorder", b"little", None),
    ])
}

// ------------------------------------------------------------------------------------------
// Pickles
// ------------------------------------------------------------------------------------------

/// `{'model': <inner>}` at protocol 2, where `inner` is the pickle ops of one value.
pub fn model_dict_pickle(inner: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02}X\x05\x00\x00\x00model".to_vec();
    p.extend_from_slice(inner);
    p.extend_from_slice(b"s.");
    p
}

/// Ops of a list nested `depth` deep: `[[[...]]]` (EMPTY_LIST ... APPEND ...).
pub fn nested_list_ops(depth: usize) -> Vec<u8> {
    let mut p = vec![b']'; depth];
    p.extend(std::iter::repeat_n(b'a', depth - 1));
    p
}

/// Ops of a tuple nested `depth` deep: `((((),),),)` (EMPTY_TUPLE, TUPLE1 ...).
pub fn nested_tuple_ops(depth: usize) -> Vec<u8> {
    let mut p = vec![b')'];
    p.extend(std::iter::repeat_n(0x85u8, depth));
    p
}

/// Ops of a dict nested `depth` deep: `{'k': {'k': ...}}`.
pub fn nested_dict_ops(depth: usize) -> Vec<u8> {
    let mut p = Vec::new();
    for _ in 0..depth {
        p.extend_from_slice(b"}X\x01\x00\x00\x00k");
    }
    p.push(b'N');
    p.extend(std::iter::repeat_n(b's', depth));
    p
}

// ------------------------------------------------------------------------------------------
// Legacy (torch < 1.6) checkpoints
// ------------------------------------------------------------------------------------------

/// A pickle string op (BINUNICODE).
pub fn pickle_str(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// The three header pickles of a legacy `torch.save` file: the magic number, the protocol
/// version 1001 and sys_info.
pub fn legacy_header() -> Vec<u8> {
    let mut p = b"\x80\x02\x8a\x0a".to_vec();
    p.extend_from_slice(&0x1950a86a20f9469cfc6c_u128.to_le_bytes()[..10]);
    p.extend_from_slice(b".\x80\x02M\xe9\x03.\x80\x02}");
    p.extend(pickle_str("little_endian"));
    p.extend_from_slice(b"\x88s.");
    p
}

/// Ops of a 1-d tensor over all `numel` elements of the legacy storage `key` of class
/// `torch.<class>`: `_rebuild_tensor_v2(pid, 0, (numel,), (1,), False, OrderedDict())`
/// with the persistent id `('storage', class, key, 'cpu', numel, None)`.
/// `numel` is written as BININT (signed): below 2^31.
pub fn legacy_tensor_ops(class: &str, key: &str, numel: u32) -> Vec<u8> {
    let mut p = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
    p.extend(pickle_str("storage"));
    p.extend_from_slice(format!("ctorch\n{class}\n").as_bytes());
    p.extend(pickle_str(key));
    p.extend(pickle_str("cpu"));
    p.push(b'J');
    p.extend_from_slice(&numel.to_le_bytes());
    p.extend_from_slice(b"NtQK\x00J");
    p.extend_from_slice(&numel.to_le_bytes());
    p.extend_from_slice(b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR");
    p
}

/// A protocol 2 pickle of the dict `{name: tensor}` for `(name, class, key, numel)`.
pub fn legacy_state_dict(tensors: &[(&str, &str, &str, u32)]) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    for &(name, class, key, numel) in tensors {
        p.extend(pickle_str(name));
        p.extend(legacy_tensor_ops(class, key, numel));
    }
    p.extend_from_slice(b"u.");
    p
}

/// A legacy file: the header pickles, `main` (the object's pickle), the pickled storage key
/// list `keys`, then each storage as `(element count, raw bytes)`.
pub fn legacy_pth(main: &[u8], keys: &[&str], storages: &[(u64, &[u8])]) -> Vec<u8> {
    let mut p = legacy_header();
    p.extend_from_slice(main);
    p.extend_from_slice(b"\x80\x02](");
    for k in keys {
        p.extend(pickle_str(k));
    }
    p.extend_from_slice(b"e.");
    for (count, data) in storages {
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(data);
    }
    p
}

// ------------------------------------------------------------------------------------------
// Deterministic randomness for the fuzzer
// ------------------------------------------------------------------------------------------

/// The tests' one generator, shared with tests/common.
#[path = "../common/rng.rs"]
mod rng;
#[allow(unused_imports)] // hostile_input.rs does not draw random numbers
pub use rng::Rng;

/// The tests' one count of an error's lines, shared with tests/common.
#[path = "../common/errors.rs"]
mod errors;
#[allow(unused_imports)]
pub use errors::error_lines;

/// The tests' command lines written as one string, shared with tests/common.
#[path = "../common/argv.rs"]
mod argv;
#[allow(unused_imports)]
pub use argv::argv;

/// The entries `(name, data)` of a stored zip, read through its local headers (the layout
/// `tools/make_pth_fixture.py` and torch.save write: sizes in the local header; or, as the
/// npz writer writes them, in the ZIP64 extra field).
pub fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut p = 0;
    while p + 30 <= bytes.len() && le32(p) == 0x0403_4b50 {
        let (n, x) = (le16(p + 26), le16(p + 28));
        let mut size = le32(p + 18);
        if size == 0xFFFF_FFFF && x >= 20 && le16(p + 30 + n) == 1 {
            let at = p + 30 + n + 4;
            size = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        }
        let name = String::from_utf8_lossy(&bytes[p + 30..p + 30 + n]).into_owned();
        let start = p + 30 + n + x;
        out.push((name, bytes[start..start + size].to_vec()));
        p = start + size;
    }
    out
}

/// `entries` (as [`zip_entries`] reads them) stored again, each entry's data as `edit`
/// leaves it.
pub fn rezip(entries: &[(String, Vec<u8>)], edit: impl Fn(&str, &mut Vec<u8>)) -> Vec<u8> {
    let edited: Vec<(String, Vec<u8>)> = entries
        .iter()
        .map(|(n, d)| {
            let mut d = d.clone();
            edit(n, &mut d);
            (n.clone(), d)
        })
        .collect();
    let refs: Vec<(&str, &[u8], Option<u64>)> = edited
        .iter()
        .map(|(n, d)| (n.as_str(), &d[..], None))
        .collect();
    zip64(&refs)
}

/// Two safetensors files hold the same tensors (names, dtypes, shapes, bytes) and the same
/// metadata. (Byte equality is too strict: the metadata map is written in hash order.)
pub fn same_safetensors(a: &[u8], b: &[u8]) -> bool {
    use safetensors::SafeTensors;
    let (Ok(x), Ok(y)) = (SafeTensors::deserialize(a), SafeTensors::deserialize(b)) else {
        return false;
    };
    let (Ok((_, mx)), Ok((_, my))) = (SafeTensors::read_metadata(a), SafeTensors::read_metadata(b))
    else {
        return false;
    };
    let mut nx = x.names();
    let mut ny = y.names();
    nx.sort();
    ny.sort();
    nx == ny
        && mx.metadata() == my.metadata()
        && nx.iter().all(|n| {
            let (p, q) = (x.tensor(n).unwrap(), y.tensor(n).unwrap());
            p.dtype() == q.dtype() && p.shape() == q.shape() && p.data() == q.data()
        })
}
