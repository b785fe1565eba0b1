//! A deterministic mutation fuzzer over everything a user hands the program (issue 10): a
//! small model file (safetensors), the converter's fixture checkpoint (.pth) and its pickle
//! and YAML, and command-line argument lists. It fails on any panic, signal, hang, or exit 0
//! on an input that is corrupted in a way the program can know.
//!
//! Budget: about 40 s on two cores (`CG_FUZZ_SCALE=10 cargo test --release --test
//! fuzz_inputs -- --nocapture` runs ten times as many; the seed is fixed, so a failure
//! reproduces). The number of inputs tried and the time are printed.
//!
//! How each input runs: the in-process campaign re-executes this test binary under
//! `ulimit -v` (4 GiB) and a time limit, each input inside `catch_unwind`, so a panic is
//! caught and reported with the mutation that caused it, and an abort, stack overflow or
//! runaway allocation fails the test through the child's exit status. A sample of the
//! inputs also goes through the real binary (`checkergen inspect` / `convert` and random
//! argument lists), each under `ulimit -v` and a wall-clock limit.
//!
//! Oracles (what "corrupted" means, per mutation kind):
//! * safetensors, a bit flip in the tensor data: every tensor is f32, so the flipped element
//!   is decoded and the load must fail exactly when it is NaN, infinite or larger than the
//!   loader's `MAX_WEIGHT_ABS` (65504), and succeed otherwise (other values are valid weights);
//! * safetensors, a change in the 8-byte length prefix, a truncation or appended bytes: must
//!   fail (the format fixes the file's length);
//! * safetensors, a byte change in the JSON header: may succeed only if the loaded model has
//!   the same configuration and parameter count (a flip inside a metadata string that is
//!   not read, or in padding, is harmless);
//! * .pth, any byte change anywhere (entry data, local headers, central directory, end
//!   records, including size fields set to extreme values) or a truncation: exit 0 only if
//!   the converted file holds the same tensors and metadata as the clean conversion. Every entry the converter
//!   reads is CRC-32 checked, so a change it reads fails, and a change it does not read
//!   (the storage of a skipped training-only tensor, a timestamp) changes nothing;
//! * pickle bytes changed and re-archived with a correct CRC (to reach the pickle VM): no
//!   panic, no crash; exit 0 only when the output is a loadable model (a change can be a
//!   different valid pickle);
//! * a LEGACY (torch < 1.6) .pth (tests/fixtures/pth/pair_legacy.pth: pickles, then raw
//!   storages), any byte change, extreme u32/u64 values, pickle opcode changes and deletions,
//!   or a truncation: no panic, errors are one line; a truncation always fails (the format
//!   fixes the file's length), and whatever reads has numel x element size bytes per tensor;
//! * YAML text mutations: no panic; a mutated config may be another valid config;
//! * argument lists: no panic, signal or hang; exit status 0, 1 or 2 (clap's usage error);
//!   the input files are unchanged afterwards;
//! * `.npz` `.npy` headers (issue 22): the header text of `arr_0` mutated (flips, deletions,
//!   insertions, a shape entry replaced by a huge or negative number, a nested dict), the
//!   entry re-archived with a correct CRC: read only as the clean images, else one line;
//! * JPEG truncation: every prefix that ends before the end-of-image marker is refused
//!   (PIL refuses it), a flipped byte is no panic;
//! * the evaluator's inputs (issue 24): an activation file and an image `.npz`, byte changes,
//!   truncations and npy-header mutations: read as a consistent set (widths, counts, finite
//!   values, every batch whole) or refused in one line; a truncation always fails;
//! * shard labels, through `merge`: `arr_1` of a shard rewritten with random int64 labels
//!   (negative, huge, in range): merged exactly when every label is a class of the model,
//!   else one line and no output.

mod hostile_common;

use checkergen::io::convert::{ConvertOptions, convert, model_config_from_yaml};
use checkergen::model::Model;
use checkergen::model::file::MAX_WEIGHT_ABS;
use hostile_common::*;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

const SEED: u64 = 0x1005_CAFE;

fn scale() -> usize {
    std::env::var("CG_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// The clean conversion of the fixture checkpoint, and its options.
fn baseline(dir: &Path) -> (ConvertOptions, Vec<u8>) {
    let opts = ConvertOptions::new(
        fixture("tiny.pth"),
        fixture("tiny_config.yaml"),
        fixture("tiny_autoencoder.yaml"),
        dir.join("baseline.safetensors"),
    );
    convert(&opts).expect("the fixture converts");
    let bytes = std::fs::read(&opts.output).unwrap();
    (opts, bytes)
}

/// Failures found, each with its mutation.
#[derive(Default)]
struct Findings {
    tried: usize,
    failures: Vec<String>,
}

impl Findings {
    fn check(&mut self, what: &str, f: impl FnOnce() -> Result<(), String>) {
        self.tried += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failures.push(format!("{what}: {e}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures.push(format!("{what}: PANIC {msg}"));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Mutations
// ------------------------------------------------------------------------------------------

/// A safetensors mutation and whether the result must load.
enum Expect {
    Fail,
    /// Must load exactly when `true`.
    Load(bool),
    /// May load, but then as the same model.
    SameModelIfLoads,
}

fn mutate_safetensors(rng: &mut Rng, clean: &[u8]) -> (String, Vec<u8>, Expect) {
    let n = u64::from_le_bytes(clean[..8].try_into().unwrap()) as usize;
    let data_start = 8 + n;
    let mut b = clean.to_vec();
    match rng.below(10) {
        0..=4 => {
            // Bit flips in one byte of the data region: every tensor is f32 and starts on a
            // 4-byte boundary of the data region, so the element is the aligned word.
            let at = data_start + rng.below(b.len() - data_start);
            let mask = (rng.next_u64() as u8) | 1;
            b[at] ^= mask;
            let w = data_start + (at - data_start) / 4 * 4;
            let v = f32::from_le_bytes(b[w..w + 4].try_into().unwrap());
            let ok = v.is_finite() && v.abs() <= MAX_WEIGHT_ABS;
            (
                format!("data flip {mask:#04x} at {at} -> {v}"),
                b,
                Expect::Load(ok),
            )
        }
        5 => {
            let v = *rng.pick(&[0u64, 1, 7, u64::MAX, 1 << 63, n as u64 + 1, n as u64 - 1]);
            b[..8].copy_from_slice(&v.to_le_bytes());
            (format!("length prefix {v}"), b, Expect::Fail)
        }
        6 => {
            let cut = rng.below(b.len());
            b.truncate(cut);
            (format!("truncated to {cut}"), b, Expect::Fail)
        }
        7 => {
            let extra = 1 + rng.below(64);
            b.extend((0..extra).map(|_| rng.next_u64() as u8));
            (format!("{extra} bytes appended"), b, Expect::Fail)
        }
        _ => {
            let at = 8 + rng.below(n);
            let v = *rng.pick(b"{}[]\",:0123456789eE-+. \\\x00\xff");
            b[at] = v;
            (
                format!("header byte {at} = {v:#04x}"),
                b,
                Expect::SameModelIfLoads,
            )
        }
    }
}

fn mutate_pth(rng: &mut Rng, clean: &[u8]) -> (String, Vec<u8>) {
    let mut b = clean.to_vec();
    let len = b.len();
    match rng.below(6) {
        0..=2 => {
            let at = rng.below(len);
            let mask = (rng.next_u64() as u8) | 1;
            b[at] ^= mask;
            (format!("flip {mask:#04x} at {at}"), b)
        }
        3 => {
            // The structure lives in the last few KB (central directory, end records).
            let tail = len.min(4096);
            let at = len - tail + rng.below(tail - 3);
            let v = *rng.pick(&[0u32, 1, 0xFFFF_FFFF, 0x7FFF_FFFF, 0x8000_0000, len as u32]);
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            (format!("u32 {v:#x} at {at}"), b)
        }
        4 => {
            let at = rng.below(len.saturating_sub(8));
            let v = *rng.pick(&[u64::MAX, 1 << 63, 1 << 40, len as u64]);
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            (format!("u64 {v:#x} at {at}"), b)
        }
        _ => {
            let cut = rng.below(len);
            b.truncate(cut);
            (format!("truncated to {cut}"), b)
        }
    }
}

/// A mutation of `clean` at one random offset `at`: choice 0 of `choices` flips the byte there
/// (named `{prefix}flip at {at}`), any other choice k is `other(k, rng, bytes, at)`, which
/// returns its name.
fn mutate_at(
    rng: &mut Rng,
    clean: &[u8],
    choices: usize,
    prefix: &str,
    other: impl FnOnce(usize, &mut Rng, &mut Vec<u8>, usize) -> String,
) -> (String, Vec<u8>) {
    let mut b = clean.to_vec();
    let at = rng.below(b.len());
    let what = match rng.below(choices) {
        0 => {
            b[at] ^= (rng.next_u64() as u8) | 1;
            format!("{prefix}flip at {at}")
        }
        k => other(k, rng, &mut b, at),
    };
    (what, b)
}

fn mutate_text(rng: &mut Rng, clean: &[u8]) -> (String, Vec<u8>) {
    mutate_at(rng, clean, 5, "", |k, rng, b, at| match k {
        1 => {
            b.remove(at);
            format!("delete at {at}")
        }
        2 => {
            let v = *rng.pick(b"[]{}:-#&*!|>'\"\t\n ,?%@`\\");
            b.insert(at, v);
            format!("insert {v:#04x} at {at}")
        }
        3 => {
            let n = 1 + rng.below(2000);
            let open = *rng.pick(&["[", "{", "- ", "a:\n "]);
            let s: Vec<u8> = open.repeat(n).into_bytes();
            b.splice(at..at, s);
            format!("{n} x {open:?} at {at}")
        }
        _ => {
            let end = (at + 1 + rng.below(64)).min(b.len());
            let chunk = b[at..end].to_vec();
            let to = rng.below(b.len());
            b.splice(to..to, chunk);
            format!("duplicate {at}..{end} at {to}")
        }
    })
}

fn mutate_pickle(rng: &mut Rng, clean: &[u8]) -> (String, Vec<u8>) {
    mutate_at(rng, clean, 4, "pickle ", |k, rng, b, at| match k {
        1 => {
            // An opcode byte from the VM's repertoire.
            let v = *rng.pick(b"()]}ahlestuRQbqXKMJN.\x85\x86\x87\x88\x89\x8a\x93\x94\x95");
            b[at] = v;
            format!("pickle op {v:#04x} at {at}")
        }
        2 => {
            let end = (at + 1 + rng.below(32)).min(b.len());
            b.drain(at..end);
            format!("pickle delete {at}..{end}")
        }
        _ => {
            let v = *rng.pick(&[u32::MAX, 0x7FFF_FFFF, 1 << 20]);
            if at + 4 <= b.len() {
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            format!("pickle u32 {v:#x} at {at}")
        }
    })
}

// ------------------------------------------------------------------------------------------
// The in-process campaign (run in a memory-limited child)
// ------------------------------------------------------------------------------------------

/// A mutation of the header text of an `.npy` (its bytes after the 10-byte preamble).
fn mutate_npy_header(rng: &mut Rng, clean: &[u8]) -> (String, Vec<u8>) {
    let (pre, text) = clean.split_at(10);
    let (what, mut t) = match rng.below(4) {
        0 => mutate_text(rng, text),
        1 => {
            // A shape entry replaced by an extreme number.
            let v = *rng.pick(&[
                "281474976710656",
                "18446744073709551615",
                "18446744073709551616",
                "-1",
                "0",
                "99999999999999999999999",
            ]);
            let t = String::from_utf8_lossy(text).replacen("2,", &format!("{v},"), 1);
            (format!("shape entry {v}"), t.into_bytes())
        }
        2 => {
            // The whole dict nested in another, or a key's value replaced by a dict.
            let t = String::from_utf8_lossy(text).replacen(
                "'fortran_order': False",
                "'fortran_order': {'descr': '|u1', 'shape': (1,)}",
                1,
            );
            ("nested dict".to_string(), t.into_bytes())
        }
        _ => {
            let t = String::from_utf8_lossy(text).replacen("|u1", "<i8", 1);
            ("descr <i8".to_string(), t.into_bytes())
        }
    };
    // The preamble's length field follows the text (numpy pads to 64 with spaces and '\n').
    let mut out = pre.to_vec();
    let len = t.len() as u16;
    out[8..10].copy_from_slice(&len.to_le_bytes());
    out.append(&mut t);
    (what, out)
}

/// Writes `bytes`, a mutation of `clean`, to `path`: true when it is a truncation of `clean`
/// (which every reader must refuse).
fn write_mutant(path: &Path, clean: &[u8], bytes: &[u8]) -> bool {
    std::fs::write(path, bytes).unwrap();
    bytes.len() < clean.len() && clean.starts_with(bytes)
}

/// The verdict on one mutated input: `read` found a problem in what it read (`Ok(Some)`),
/// read a file that must fail (`must_fail`: `what` names it), or refused it in more than one
/// line; anything else passes.
fn verdict(
    read: anyhow::Result<Option<String>>,
    must_fail: bool,
    what: &str,
) -> Result<(), String> {
    match read {
        Ok(Some(problem)) => Err(problem),
        Ok(None) if must_fail => Err(format!("read {what}")),
        Err(e) if format!("{e:#}").lines().count() != 1 => {
            Err(format!("error is not one line: {e:#}"))
        }
        _ => Ok(()),
    }
}

fn same_model(a: &Model, b: &Model) -> bool {
    a.config == b.config && a.parameter_counts() == b.parameter_counts()
}

fn campaign() -> Findings {
    let k = scale();
    let dir = scratch("fuzz-child");
    let mut f = Findings::default();
    let (opts, baseline_out) = baseline(&dir);
    let clean_model = Model::load(&opts.output).unwrap();
    let mut rng = Rng::new(SEED);

    // Safetensors.
    let st_path = dir.join("m.safetensors");
    for i in 0..1500 * k {
        let (what, bytes, expect) = mutate_safetensors(&mut rng, &baseline_out);
        std::fs::write(&st_path, &bytes).unwrap();
        f.check(&format!("safetensors #{i} {what}"), || {
            let got = Model::load(&st_path);
            match (expect, got) {
                (Expect::Fail, Ok(_)) => Err("loaded".into()),
                (Expect::Load(true), Err(e)) => Err(format!("refused a valid file: {e:#}")),
                (Expect::Load(false), Ok(_)) => Err("loaded a non-finite weight".into()),
                (Expect::SameModelIfLoads, Ok(m)) if !same_model(&m, &clean_model) => {
                    Err("loaded as a different model".into())
                }
                (_, Err(e)) if format!("{e:#}").lines().count() != 1 => {
                    Err(format!("error is not one line: {e:#}"))
                }
                _ => Ok(()),
            }
        });
    }

    // .pth: any byte change converts only to the identical file.
    let pth_clean = std::fs::read(&opts.checkpoint).unwrap();
    let mdir = dir.join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    let mut o = opts.clone();
    o.checkpoint = mdir.join("tiny.pth");
    o.output = mdir.join("out.safetensors");
    for i in 0..300 * k {
        let (what, bytes) = mutate_pth(&mut rng, &pth_clean);
        std::fs::write(&o.checkpoint, &bytes).unwrap();
        let _ = std::fs::remove_file(&o.output);
        f.check(&format!("pth #{i} {what}"), || match convert(&o) {
            Ok(_) if !same_safetensors(&std::fs::read(&o.output).unwrap(), &baseline_out) => {
                Err("converted a corrupted checkpoint to a different file".into())
            }
            _ => Ok(()),
        });
    }

    // Pickle: re-archived with correct CRCs, so the mutation reaches the VM.
    let entries = zip_entries(&pth_clean);
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    for i in 0..500 * k {
        let (what, p) = mutate_pickle(&mut rng, &entries[pkl].1);
        let zipped: Vec<(&str, &[u8], Option<u64>)> = entries
            .iter()
            .enumerate()
            .map(|(j, (name, data))| {
                (
                    name.as_str(),
                    if j == pkl { &p[..] } else { &data[..] },
                    None,
                )
            })
            .collect();
        std::fs::write(&o.checkpoint, zip64(&zipped)).unwrap();
        let _ = std::fs::remove_file(&o.output);
        f.check(&format!("pickle #{i} {what}"), || match convert(&o) {
            Ok(_) => Model::load(&o.output)
                .map(|_| ())
                .map_err(|e| format!("converted to an unloadable model: {e:#}")),
            Err(_) => Ok(()),
        });
    }

    // .npz headers (issue 22): only the clean images, or one line.
    let side = 4;
    let pixels: Vec<u8> = (0..2 * side * side * 3).map(|i| (i * 7) as u8).collect();
    let mut npy = checkergen::io::npz::npy_header("|u1", &[2, side, side, 3]);
    let header_len = npy.len();
    npy.extend_from_slice(&pixels);
    let npz_path = dir.join("x.npz");
    for i in 0..300 * k {
        let (what, mut h) = mutate_npy_header(&mut rng, &npy[..header_len]);
        h.extend_from_slice(&pixels);
        std::fs::write(&npz_path, zip64(&[("arr_0.npy", &h, None)])).unwrap();
        f.check(&format!("npz header #{i} {what}"), || {
            let r = checkergen::io::photo::read_npz(&npz_path, side);
            let r = r.map(|imgs| (imgs.concat() != pixels).then(|| "read other images".into()));
            verdict(r, false, "")
        });
    }

    // JPEG: every prefix cut before the end-of-image marker is refused; flips do not panic.
    let jpg = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/score/nodejs_full_white_stripe.jpg"),
    )
    .unwrap();
    let eoi = jpg.windows(2).rposition(|w| w == [0xFF, 0xD9]).unwrap() + 2;
    let jpg_path = dir.join("x.jpg");
    for i in 0..200 * k {
        let (what, bytes, must_fail) = if rng.below(2) == 0 {
            let cut = rng.below(eoi);
            (format!("cut at {cut}"), jpg[..cut].to_vec(), true)
        } else {
            let (what, b) = mutate_at(&mut rng, &jpg, 1, "jpeg ", |_, _, _, _| String::new());
            (what, b, false)
        };
        std::fs::write(&jpg_path, &bytes).unwrap();
        f.check(&format!("jpeg #{i} {what}"), || {
            let r = checkergen::io::photo::read_image(&jpg_path).map(|_| None);
            verdict(r, must_fail, "a truncated JPEG")
        });
    }

    // YAML: the model config and the autoencoder config.
    let yaml_path = dir.join("c.yaml");
    for (which, clean) in [
        ("config", std::fs::read(&opts.config_yaml).unwrap()),
        ("autoenc", std::fs::read(&opts.autoenc_yaml).unwrap()),
    ] {
        for i in 0..400 * k {
            let (what, text) = mutate_text(&mut rng, &clean);
            std::fs::write(&yaml_path, &text).unwrap();
            f.check(&format!("yaml {which} #{i} {what}"), || {
                let r = if which == "config" {
                    model_config_from_yaml(&yaml_path, &opts.autoenc_yaml)
                } else {
                    model_config_from_yaml(&opts.config_yaml, &yaml_path)
                };
                verdict(r.map(|_| None), false, "")
            });
        }
    }

    // Legacy .pth (its own generator, so the streams above are unchanged).
    let mut rng = Rng::new(SEED ^ 0x001E_6AC7);
    let legacy_clean = std::fs::read(fixture("pair_legacy.pth")).unwrap();
    let legacy_path = dir.join("legacy.pth");
    for i in 0..600 * k {
        let (what, bytes) = if rng.below(2) == 0 {
            mutate_pth(&mut rng, &legacy_clean)
        } else {
            mutate_pickle(&mut rng, &legacy_clean)
        };
        let must_fail = write_mutant(&legacy_path, &legacy_clean, &bytes);
        f.check(&format!("legacy #{i} {what}"), || {
            let read = || -> anyhow::Result<Option<String>> {
                let ck = checkergen::io::pth::PthCheckpoint::open(&legacy_path)?;
                let sd = ck.root_state_dict()?;
                for (name, info) in &sd {
                    let t = ck.read_tensor(name, info)?;
                    if t.data.len() != t.numel() * t.dtype.size() {
                        return Ok(Some(format!("tensor '{name}' has {} bytes", t.data.len())));
                    }
                }
                Ok(None)
            };
            verdict(read(), must_fail, "a truncated legacy file")
        });
    }

    // The evaluator's inputs (issue 24; their own generator): an activation file (pool_3
    // and spatial, no statistics) and an image .npz, byte changes and truncations anywhere
    // and npy-header mutations re-archived with a correct CRC. Read as a well-formed set
    // (widths and counts consistent, finite values, every batch whole) or refused in one
    // line; a truncation always fails.
    let mut rng = Rng::new(SEED ^ 0x0E7A_1000);
    use checkergen::eval::activations::{POOL_DIM, SPATIAL_DIM, read_activations};
    use checkergen::eval::input::{ImageSource, InputKind, input_kind};
    let rows = 4;
    let f32_npy = |n: usize, d: usize, off: f32| {
        let mut b = checkergen::io::npz::npy_header("<f4", &[n, d]);
        let header_len = b.len();
        for i in 0..n * d {
            b.extend_from_slice(&((i % 97) as f32 * 0.01 + off).to_le_bytes());
        }
        (b, header_len)
    };
    let (pool, pool_h) = f32_npy(rows, POOL_DIM, 0.0);
    let (spatial, _) = f32_npy(rows, SPATIAL_DIM, 0.5);
    let acts_clean = zip64(&[("pool_3.npy", &pool, None), ("spatial.npy", &spatial, None)]);
    let acts_path = dir.join("acts.npz");
    for i in 0..300 * k {
        let (what, bytes) = if rng.below(3) == 0 {
            let (what, mut h) = mutate_npy_header(&mut rng, &pool[..pool_h]);
            h.extend_from_slice(&pool[pool_h..]);
            let b = zip64(&[("pool_3.npy", &h, None), ("spatial.npy", &spatial, None)]);
            (format!("pool_3 header {what}"), b)
        } else {
            mutate_pth(&mut rng, &acts_clean)
        };
        let must_fail = write_mutant(&acts_path, &acts_clean, &bytes);
        f.check(&format!("activations #{i} {what}"), || {
            let r = read_activations(&acts_path).map(|a| {
                let (n, acts) = (a.acts.rows(), &a.acts);
                let finite = acts.pool.iter().chain(&acts.spatial).all(|v| v.is_finite());
                let whole =
                    acts.pool.len() == n * POOL_DIM && acts.spatial.len() == n * SPATIAL_DIM;
                (!finite || !whole).then(|| format!("read an inconsistent set of {n} rows"))
            });
            verdict(r, must_fail, "a truncated activation file")
        });
    }
    let side = 4;
    let mut img = checkergen::io::npz::npy_header("|u1", &[3, side, side, 3]);
    let img_h = img.len();
    img.extend((0..3 * side * side * 3).map(|i| (i * 11) as u8));
    let imgs_clean = zip64(&[("arr_0.npy", &img, None)]);
    let imgs_path = dir.join("imgs.npz");
    for i in 0..300 * k {
        let (what, bytes) = if rng.below(3) == 0 {
            let (what, mut h) = mutate_npy_header(&mut rng, &img[..img_h]);
            h.extend_from_slice(&img[img_h..]);
            (
                format!("arr_0 header {what}"),
                zip64(&[("arr_0.npy", &h, None)]),
            )
        } else {
            mutate_pth(&mut rng, &imgs_clean)
        };
        let must_fail = write_mutant(&imgs_path, &imgs_clean, &bytes);
        f.check(&format!("eval images #{i} {what}"), || {
            let read = || -> anyhow::Result<Option<String>> {
                if input_kind(&imgs_path)? != InputKind::Images {
                    return Ok(None);
                }
                let mut src = ImageSource::open(&imgs_path)?;
                let (n, s) = (src.len(), src.side());
                let mut seen = 0;
                while let Some(b) = src.next_batch(2)? {
                    if b.pixels.len() != b.count * s * s * 3 || b.first != seen {
                        return Ok(Some(format!(
                            "a batch of {} bytes for {} images",
                            b.pixels.len(),
                            b.count
                        )));
                    }
                    seen += b.count;
                }
                Ok((seen != n).then(|| format!("{seen} of {n} images streamed")))
            };
            verdict(read(), must_fail, "a truncated image file")
        });
    }
    f
}

/// Runs [`campaign`] in a child process of this test binary under `ulimit -v` and a time
/// limit; fails on any finding, on a crash (signal, abort) and on a hang.
#[test]
fn fuzz_in_process() {
    if std::env::var_os("CG_FUZZ_CHILD").is_some() {
        let t = Instant::now();
        std::panic::set_hook(Box::new(|_| {})); // panics are collected and reported
        let f = campaign();
        let _ = std::panic::take_hook();
        println!(
            "fuzz (in process): {} inputs in {:.1} s, {} failures",
            f.tried,
            t.elapsed().as_secs_f64(),
            f.failures.len()
        );
        for e in f.failures.iter().take(20) {
            println!("FAIL {e}");
        }
        assert!(f.failures.is_empty(), "{} failures", f.failures.len());
        return;
    }
    let limit = Duration::from_secs(240 * scale() as u64);
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {MEM_LIMIT_KIB}; exec \"$0\" fuzz_in_process --exact --nocapture --test-threads 1"
        ))
        .arg(&exe)
        .env("CG_FUZZ_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let report: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            l.find("fuzz (")
                .map(|i| &l[i..])
                .or(l.starts_with("FAIL").then_some(l))
        })
        .collect();
    println!("{}", report.join("\n"));
    let status = status.unwrap_or_else(|| panic!("in-process fuzz hung (> {limit:?})"));
    assert!(
        status.success(),
        "in-process fuzz failed ({status}):\n{out}"
    );
}

// ------------------------------------------------------------------------------------------
// Through the real binary
// ------------------------------------------------------------------------------------------

/// Argument values a careless user or an attacker might give.
fn hostile_values(dir: &Path) -> Vec<String> {
    let fifo = make_fifo(&dir.join("fifo"));
    let mut v: Vec<String> = [
        "0",
        "1",
        "-1",
        "2",
        "3",
        "4097",
        "10000",
        "18446744073709551615",
        "18446744073709551616",
        "1e308",
        "nan",
        "inf",
        "-inf",
        "1.000000001",
        "1.0000000000000002",
        "2^(1/1000)",
        "sqrt(1)",
        "0.5",
        "",
        " ",
        "abc",
        "1,2,3",
        "0,0,0,0,0",
        "999999,0",
        "-0",
        "0x10",
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/",
        ".",
        "..",
        "L-2x",
        "tiny",
        "foo",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("x".repeat(5000));
    v.push(fifo.display().to_string());
    v.push(dir.display().to_string());
    v
}

/// Every run must end in time, by an exit code (no signal), 0, 1 or 2, without a panic.
fn check_run(args: &[String], limit: Duration) -> Result<Outcome, String> {
    let o = run_limited(args, limit);
    if o.timed_out {
        return Err(format!("hung (> {limit:?})"));
    }
    if o.stderr.contains("panicked") {
        return Err(format!("panicked: {}", o.stderr));
    }
    match o.code {
        Some(0..=2) => Ok(o),
        other => Err(format!("exit {other:?}: {}", o.stderr)),
    }
}

#[test]
fn fuzz_command_lines() {
    let t = Instant::now();
    let dir = scratch("fuzz-cli");
    let (opts, _) = baseline(&dir);
    let model = opts.output.display().to_string();
    let inputs = [
        opts.output.clone(),
        fixture("tiny.pth"),
        fixture("tiny_config.yaml"),
    ];
    let before: Vec<Vec<u8>> = inputs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let values = hostile_values(&dir);
    let out = dir.join("out").display().to_string();
    let o_path = dir.join("o.safetensors").display().to_string();
    let (ck, cf, ae) = (
        fixture("tiny.pth").display().to_string(),
        fixture("tiny_config.yaml").display().to_string(),
        fixture("tiny_autoencoder.yaml").display().to_string(),
    );
    // A valid command line per subcommand, and the flags it also takes.
    let bases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["order", "--size", "8"], &["--size", "--json", "--png"]),
        (
            vec!["schedule", "--scale-ratio", "2"],
            &[
                "--scale-ratio",
                "--img-size",
                "--scale-min-size",
                "--steps-per-scale",
                "--vq-stride",
                "--json",
            ],
        ),
        (vec!["inspect", &model], &["--verify"]),
        (
            vec!["init", "--preset", "tiny", "-o", &o_path],
            &["--preset", "--seed", "--dtype"],
        ),
        (
            vec!["sample", "--model", &model, "--labels", "0", "--out", &out],
            &[
                "--num-samples",
                "--labels",
                "--cfg",
                "--cfg-start-step",
                "--steps",
                "--steps-per-scale",
                "--temperature",
                "--top-k",
                "--top-p",
                "--seed",
                "--device",
            ],
        ),
        (
            vec![
                "convert",
                "--checkpoint",
                &ck,
                "--config",
                &cf,
                "--autoenc-config",
                &ae,
                "-o",
                &o_path,
            ],
            &["--dtype", "--ema"],
        ),
        (
            vec![
                "bench-decode",
                "--preset",
                "tiny",
                "--batch",
                "1",
                "--iters",
                "1",
            ],
            &["--preset", "--batch", "--iters", "--warmup"],
        ),
    ];
    let mut rng = Rng::new(SEED ^ 0xC11);
    let mut f = Findings::default();
    let mut codes = [0usize; 4];
    for i in 0..400 * scale() {
        let (base, extra) = rng.pick(&bases);
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        // Replace one or two values (never the subcommand) with hostile ones ...
        for _ in 0..1 + rng.below(2) {
            if args.len() > 1 {
                let at = 1 + rng.below(args.len() - 1);
                if !args[at].starts_with('-') {
                    args[at] = rng.pick(&values).clone();
                }
            }
        }
        // ... and maybe add a flag.
        if !extra.is_empty() && rng.below(2) == 0 {
            let flag = rng.pick(extra);
            args.push(flag.to_string());
            if !matches!(*flag, "--json" | "--ema" | "--verify") {
                args.push(rng.pick(&values).clone());
            }
        }
        // Output paths that are not absolute go to the scratch directory (the subprocess
        // runs there anyway); the fixtures are never an output.
        for w in 1..args.len() {
            if matches!(args[w - 1].as_str(), "-o" | "--png" | "--out") && !args[w].starts_with('/')
            {
                args[w] = dir.join("o").display().to_string();
            }
        }
        let limit = Duration::from_secs(30);
        f.check(&format!("cli #{i} {args:?}"), || {
            let o = check_run(&args, limit)?;
            codes[o.code.unwrap_or(3) as usize % 4] += 1;
            Ok(())
        });
    }
    for (p, b) in inputs.iter().zip(&before) {
        assert_eq!(
            &std::fs::read(p).unwrap(),
            b,
            "{} was modified",
            p.display()
        );
    }
    println!(
        "fuzz (command lines): {} argument lists in {:.1} s (exit 0: {}, 1: {}, 2: {}), {} failures",
        f.tried,
        t.elapsed().as_secs_f64(),
        codes[0],
        codes[1],
        codes[2],
        f.failures.len()
    );
    assert!(f.failures.is_empty(), "{}", f.failures.join("\n"));
}

/// A sample of the file mutations through `checkergen inspect` and `convert` themselves.
#[test]
fn fuzz_files_through_the_binary() {
    let t = Instant::now();
    let dir = scratch("fuzz-bin");
    let (opts, clean) = baseline(&dir);
    let mut rng = Rng::new(SEED ^ 0xB1);
    let mut f = Findings::default();
    let st = dir.join("m.safetensors");
    for i in 0..150 * scale() {
        let (what, bytes, expect) = mutate_safetensors(&mut rng, &clean);
        std::fs::write(&st, &bytes).unwrap();
        // `inspect --verify` loads every value: the full oracle. Plain `inspect` reads the
        // header only: it must refuse every corruption the header shows (length prefix,
        // truncation, appended bytes) and may pass a changed value.
        let verify = vec![
            "inspect".to_string(),
            "--verify".to_string(),
            st.display().to_string(),
        ];
        f.check(&format!("inspect --verify #{i} {what}"), || {
            let o = check_run(&verify, Duration::from_secs(30))?;
            let must_fail = matches!(expect, Expect::Fail | Expect::Load(false));
            if must_fail && o.code == Some(0) {
                return Err("exit 0 on a corrupted file".into());
            }
            if o.code != Some(0) && !o.is_clean_failure() {
                return Err(format!("unclear failure: {:?}", o.stderr));
            }
            Ok(())
        });
        if matches!(expect, Expect::Fail | Expect::SameModelIfLoads) {
            let header = vec!["inspect".to_string(), st.display().to_string()];
            f.check(&format!("inspect #{i} {what}"), || {
                let o = check_run(&header, Duration::from_secs(30))?;
                if matches!(expect, Expect::Fail) && o.code == Some(0) {
                    return Err("exit 0 on a file whose header is corrupted".into());
                }
                if o.code != Some(0) && !o.is_clean_failure() {
                    return Err(format!("unclear failure: {:?}", o.stderr));
                }
                Ok(())
            });
        }
    }
    let pth_clean = std::fs::read(&opts.checkpoint).unwrap();
    let ckpt = dir.join("tiny.pth");
    let out = dir.join("out.safetensors");
    for i in 0..100 * scale() {
        let (what, bytes) = mutate_pth(&mut rng, &pth_clean);
        std::fs::write(&ckpt, &bytes).unwrap();
        let _ = std::fs::remove_file(&out);
        let args: Vec<String> = [
            "convert",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--config",
            opts.config_yaml.to_str().unwrap(),
            "--autoenc-config",
            opts.autoenc_yaml.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        f.check(&format!("convert #{i} {what}"), || {
            let o = check_run(&args, Duration::from_secs(30))?;
            match o.code {
                Some(0) if !same_safetensors(&std::fs::read(&out).unwrap(), &clean) => {
                    Err("converted a corrupted checkpoint to a different file".into())
                }
                Some(0) => Ok(()),
                _ if !o.is_clean_failure() => Err(format!("unclear failure: {:?}", o.stderr)),
                _ if out.exists() => Err("left an output behind".into()),
                _ => Ok(()),
            }
        });
    }
    // Shard labels (issue 22): merge takes exactly the shards whose labels are classes.
    let m = dir.join("tiny.safetensors");
    let _ = std::fs::remove_file(&m);
    let init = ["init", "--preset", "tiny", "-o", m.to_str().unwrap()];
    assert_eq!(run_limited(&init, Duration::from_secs(60)).code, Some(0));
    let shard = |k: usize| {
        let p = dir.join(format!("s{k}.npz"));
        let _ = std::fs::remove_file(&p);
        let args = [
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--num-samples",
            "4",
            "--shard",
            &format!("{k}/2"),
            "--steps-per-scale",
            "1",
            "--cfg",
            "0",
            "--quiet",
            "--out",
            p.to_str().unwrap(),
        ];
        assert_eq!(run_limited(&args, Duration::from_secs(120)).code, Some(0));
        p
    };
    let (s0, s1) = (shard(0), shard(1));
    let s1_clean = std::fs::read(&s1).unwrap();
    let entries = zip_entries(&s1_clean);
    let bad_shard = dir.join("s1-labels.npz");
    let merged = dir.join("merged.npz");
    for i in 0..30 * scale() {
        let labels: Vec<i64> = (0..2)
            .map(|_| match rng.below(4) {
                0 => rng.below(10) as i64,
                1 => -(1 + rng.below(1 << 20) as i64),
                2 => 10 + rng.below(1 << 40) as i64,
                _ => rng.next_u64() as i64,
            })
            .collect();
        let ok = labels.iter().all(|l| (0..10).contains(l));
        let bytes = rezip(&entries, |n, d| {
            if n == "arr_1.npy" {
                let at = d.len() - 16;
                for (j, l) in labels.iter().enumerate() {
                    d[at + 8 * j..at + 8 * j + 8].copy_from_slice(&l.to_le_bytes());
                }
            }
        });
        std::fs::write(&bad_shard, bytes).unwrap();
        let _ = std::fs::remove_file(&merged);
        let args: Vec<String> = [&s0, &bad_shard]
            .iter()
            .map(|p| p.display().to_string())
            .chain(["-o".to_string(), merged.display().to_string()])
            .collect();
        let args: Vec<String> = std::iter::once("merge".to_string()).chain(args).collect();
        f.check(&format!("merge #{i} labels {labels:?}"), || {
            let o = check_run(&args, Duration::from_secs(30))?;
            match o.code {
                Some(0) if !ok => Err("merged labels outside the model's classes".into()),
                Some(0) => Ok(()),
                _ if ok => Err(format!("refused valid labels: {:?}", o.stderr)),
                _ if !o.is_clean_failure() => Err(format!("unclear failure: {:?}", o.stderr)),
                _ if merged.exists() => Err("left an output behind".into()),
                _ => Ok(()),
            }
        });
    }
    println!(
        "fuzz (files through the binary): {} inputs in {:.1} s, {} failures",
        f.tried,
        t.elapsed().as_secs_f64(),
        f.failures.len()
    );
    assert!(f.failures.is_empty(), "{}", f.failures.join("\n"));
}
