//! `checkergen generate` and `merge`: the .npz layout the ADM evaluator reads, determinism by
//! global image index (batch sizes, shards in separate processes merged = one run, byte for
//! byte), and bad input in one line. numpy itself reads the file in
//! `numpy_reads_the_npz` (ignored unless CG_NUMPY_PYTHON names a Python with numpy; .ci/run
//! installs one and runs it).

mod common;

use checkergen::io::pth::read_zip_entry;
use checkergen::model::config::{ModelConfig, preset};
use checkergen::model::file::{Dtype, write_model};
use checkergen::model::init::random_tensors;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-generate-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh scratch directory `name` and the tiny preset at 64 px written into it.
fn setup(name: &str) -> (PathBuf, String) {
    let d = scratch(name);
    let m = tiny64(&d);
    (d, m)
}

/// The tiny preset at 64 px, written to `dir`.
fn tiny64(dir: &Path) -> String {
    let cfg = ModelConfig {
        img_size: 64,
        ..preset("tiny").unwrap()
    };
    let m = dir.join("tiny64.safetensors");
    write_model(&m, &cfg, &random_tensors(&cfg, 8).unwrap(), Dtype::F32, &[]).unwrap();
    m.to_str().unwrap().to_string()
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `generate` of the 10 images of run `seed` from `model` on the CPU, quietly; the output
/// and any other options follow.
fn generate_args(model: &str, seed: u64) -> Vec<String> {
    let seed = seed.to_string();
    let args = [
        "generate",
        "--model",
        model,
        "--num-samples",
        "10",
        "--seed",
        &seed,
    ];
    args.iter()
        .chain(&["--device", "cpu", "--quiet"])
        .map(|a| a.to_string())
        .collect()
}

/// [`generate_args`] with `seed` into `out`, then `extra`: (success, stderr).
fn generate_seed(model: &str, seed: u64, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = generate_args(model, seed);
    args.extend(["--out".to_string(), s(out)]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = common::cli(&args);
    (ok, err)
}

/// Run 5 (the tests' default) into `out`.
fn generate(model: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    generate_seed(model, 5, out, extra)
}

#[test]
fn npz_layout_batches_and_shards_agree_byte_for_byte() {
    let (d, m) = setup("agree");
    let (a, b) = (d.join("b3.npz"), d.join("b7.npz"));
    assert!(generate(&m, &a, &["--batch-size", "3"]).0);
    assert!(generate(&m, &b, &["--batch-size", "7"]).0);
    let whole = std::fs::read(&a).unwrap();
    assert_eq!(whole, std::fs::read(&b).unwrap(), "batch size 3 vs 7");
    // The layout: arr_0 uint8 [10, 64, 64, 3], arr_1 int64 labels 0..9 (class i mod 10).
    let arr0 = read_zip_entry(&a, "arr_0.npy").unwrap();
    let h = String::from_utf8_lossy(&arr0[10..128]).to_string();
    assert!(
        h.contains("'descr': '|u1'") && h.contains("'shape': (10, 64, 64, 3)"),
        "{h}"
    );
    assert_eq!(arr0.len(), 128 + 10 * 64 * 64 * 3);
    let arr1 = read_zip_entry(&a, "arr_1.npy").unwrap();
    let labels: Vec<i64> = arr1[128..]
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(labels, (0..10).collect::<Vec<i64>>());
    // Three shards in three processes at once, merged in a shuffled order.
    let shards: Vec<PathBuf> = (0..3).map(|k| d.join(format!("shard{k}.npz"))).collect();
    let children: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(k, p)| {
            std::process::Command::new(env!("CARGO_BIN_EXE_checkergen"))
                .args(generate_args(&m, 5))
                .args(["--batch-size", "2"])
                .args(["--shard", &format!("{k}/3"), "--out", &s(p)])
                .output()
                .unwrap()
        })
        .collect();
    for c in &children {
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    }
    let merged = d.join("merged.npz");
    let (ok, _, err) = common::cli(&[
        "merge",
        &s(&shards[2]),
        &s(&shards[0]),
        &s(&shards[1]),
        "-o",
        &s(&merged),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(&merged).unwrap(),
        whole,
        "3 shards merged vs one run"
    );
    // Python's zipfile (stdlib) reads the archive and checks every CRC.
    let py = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
             assert z.testzip() is None; print(sorted(z.namelist()))",
            &s(&merged),
        ])
        .output();
    match py {
        Ok(o) if o.status.success() => {
            let names = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(
                names.contains("arr_0.npy") && names.contains("arr_1.npy"),
                "{names}"
            );
            println!("python zipfile: {}", names.trim());
        }
        Ok(o) => panic!(
            "python zipfile failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("python3 not found ({e}): zipfile check not run"),
    }
    std::fs::remove_dir_all(&d).ok();
}

fn labels_of(f: &Path) -> Vec<i64> {
    read_zip_entry(f, "arr_1.npy").unwrap()[128..]
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// --labels-file gives image i the i-th id; --random-labels draws image i's class from
/// (seed, i) alone, so shards still merge into the single run's file.
#[test]
fn labels_from_a_file_or_drawn_per_image() {
    let (d, m) = setup("labels");
    let lf = d.join("labels.txt");
    std::fs::write(&lf, "3 1 4 1 5\n9,2,6,5,3\n").unwrap();
    let f = d.join("file.npz");
    let (ok, err) = generate(&m, &f, &["--labels-file", &s(&lf)]);
    assert!(ok, "{err}");
    assert_eq!(labels_of(&f), vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3]);
    // A file with a UTF-8 byte-order mark reads the same (issue 22 item 8).
    std::fs::write(&lf, "\u{feff}3 1 4 1 5\n9,2,6,5,3\n").unwrap();
    let (ok, err) = generate(&m, &f, &["--labels-file", &s(&lf), "--overwrite"]);
    assert!(ok, "{err}");
    assert_eq!(labels_of(&f), vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3]);
    let (r, r0, r1) = (d.join("r.npz"), d.join("r0.npz"), d.join("r1.npz"));
    assert!(generate(&m, &r, &["--random-labels"]).0);
    assert!(generate(&m, &r0, &["--random-labels", "--shard", "0/2"]).0);
    assert!(
        generate(
            &m,
            &r1,
            &["--random-labels", "--shard", "1/2", "--batch-size", "3"]
        )
        .0
    );
    let merged = d.join("rm.npz");
    let (ok, _, err) = common::cli(&["merge", &s(&r0), &s(&r1), "-o", &s(&merged)]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&merged).unwrap(), std::fs::read(&r).unwrap());
    let l = labels_of(&r);
    assert!(l.iter().all(|&c| (0..10).contains(&c)), "{l:?}");
    assert_ne!(l, (0..10).collect::<Vec<i64>>(), "drawn, not round-robin");
    // Bad label files fail in one line.
    for (text, want) in [
        ("1 2 3", "3 class ids"),
        ("1 2 3 4 5 6 7 8 9 10", "10 classes"),
        ("x", "not a class id"),
    ] {
        std::fs::write(&lf, text).unwrap();
        let out = s(&d.join("bad.npz"));
        common::refused(
            &[
                "generate",
                "--model",
                &m,
                "--num-samples",
                "10",
                "--device",
                "cpu",
                "--quiet",
                "--labels-file",
                &s(&lf),
                "--out",
                &out,
            ],
            want,
        );
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn png_dir_holds_the_same_images() {
    let (d, m) = setup("png");
    let (npz, dir) = (d.join("a.npz"), d.join("pngs"));
    assert!(generate(&m, &npz, &["--batch-size", "4"]).0);
    let (ok, err) = generate(&m, &dir, &["--format", "png-dir", "--shard", "1/2"]);
    assert!(ok, "{err}");
    // Shard 1 of 2 = images 5..10, named by global index.
    assert!(!dir.join("64/sample_00004.png").exists());
    for i in 5..10 {
        assert!(
            dir.join(format!("64/sample_{i:05}.png")).is_file(),
            "image {i}"
        );
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_input_fails_in_one_line() {
    let (d, m) = setup("bad");
    let one_line = |args: &[&str], want: &str| common::refused(args, want);
    let out = s(&d.join("x.npz"));
    let base = [
        "generate",
        "--model",
        &m,
        "--num-samples",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ];
    for (shard, want) in [
        ("3/3", "k < N"),
        ("a/2", "not a whole number"),
        ("1", "k/N"),
    ] {
        let mut a = base.to_vec();
        a.extend_from_slice(&["--shard", shard, "--out", &out]);
        one_line(&a, want);
    }
    let mut a = base.to_vec();
    a.extend_from_slice(&["--out", "/nonexistent-dir/x.npz"]);
    one_line(&a, "nonexistent-dir");
    // An existing output is refused without --overwrite.
    let (s0, s1) = (d.join("s0.npz"), d.join("s1.npz"));
    assert!(generate(&m, &s0, &["--shard", "0/2"]).0);
    let (ok, err) = generate(&m, &s0, &["--shard", "0/2"]);
    assert!(!ok && err.contains("--overwrite"), "{err}");
    assert!(generate(&m, &s0, &["--shard", "0/2", "--overwrite"]).0);
    // Merges: a missing shard, a shard of another run (seed), the same shard twice.
    let merged = s(&d.join("m.npz"));
    one_line(&["merge", &s(&s0), "-o", &merged], "missing");
    let s1s = s(&s1);
    let (ok, err) = generate_seed(&m, 6, &s1, &["--shard", "1/2"]);
    assert!(ok, "{err}");
    // The refusal names the field that differs (issue 22 item 9).
    one_line(
        &["merge", &s(&s0), &s1s, "-o", &merged],
        "\"seed\" differs: 5 vs 6",
    );
    one_line(&["merge", &s(&s0), &s(&s0), "-o", &merged], "overlap");
    // A shard whose labels were altered (CRCs recomputed) is refused before anything is
    // written: -5 and 10^12 are no class of the run's model (issue 22 item 3).
    assert!(generate(&m, &s1, &["--shard", "1/2", "--overwrite"]).0);
    let entry = |name: &str| checkergen::io::pth::read_zip_entry(&s1, name).unwrap();
    let (arr0, arr1, meta) = (
        entry("arr_0.npy"),
        entry("arr_1.npy"),
        entry("checkergen.json"),
    );
    let at = checkergen::io::npz::parse_npy_header(&arr1)
        .unwrap()
        .data_offset;
    // A shard file with these three entries (CRCs as a forger would recompute them).
    let forge = |name: &str, arr1: &[u8], meta: &[u8]| {
        let e = |name, data| checkergen::io::pth::StoredEntry {
            name,
            data,
            claimed_size: None,
        };
        let zip = checkergen::io::pth::stored_zip(
            &[
                e("arr_0.npy", &arr0),
                e("arr_1.npy", arr1),
                e("checkergen.json", meta),
            ],
            true,
        );
        let forged = d.join(name);
        std::fs::write(&forged, zip).unwrap();
        s(&forged)
    };
    for bad in [-5i64, 1_000_000_000_000] {
        let mut labels = arr1.clone();
        labels[at..at + 8].copy_from_slice(&bad.to_le_bytes());
        let forged = forge("forged.npz", &labels, &meta);
        one_line(
            &["merge", &s(&s0), &forged, "-o", &merged],
            &format!("label {bad} of image"),
        );
    }
    // A shard whose recorded range runs backwards is named, not subtracted (issue 22 item 8).
    let mut back: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    back["range"] = serde_json::json!([9, 2]);
    let forged = forge("backwards.npz", &arr1, &serde_json::to_vec(&back).unwrap());
    one_line(
        &["merge", &s(&s0), &forged, "-o", &merged],
        "backwards.npz: checkergen.json's image range [9,2] is not a range",
    );
    one_line(&["merge", &m, "-o", &merged], "zip");
    assert!(!Path::new(&merged).exists());
    std::fs::remove_dir_all(&d).ok();
}

/// Run the binary with `args` and SIGKILL it once its checkpoint `ckpt` records at least
/// `min_done` images (it must still be running then).
fn kill_after_checkpoint(args: &[String], ckpt: &Path, min_done: u64) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_checkergen"))
        .args(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        let n = std::fs::read(ckpt)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|j| j["done"].as_u64())
            .unwrap_or(0);
        if n >= min_done {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(t.elapsed().as_secs() < 120, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// kill -9 in the middle, then the same command again: it resumes after the last complete
/// batch and the file equals an uninterrupted run's byte for byte.
#[test]
fn a_killed_run_resumes_to_the_same_file() {
    let (d, m) = setup("resume");
    let (whole, out) = (d.join("whole.npz"), d.join("out.npz"));
    let args = |o: &Path, batch: &str| {
        let mut v: Vec<String> = [
            "generate",
            "--model",
            &m,
            "--num-samples",
            "24",
            "--seed",
            "3",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(["--device", "cpu", "--batch-size", batch, "--out", &s(o)].map(String::from));
        v
    };
    let ok = |v: Vec<String>| {
        let r: Vec<&str> = v.iter().map(|x| x.as_str()).collect();
        common::cli(&r)
    };
    let (done, _, err) = ok(args(&whole, "8"));
    assert!(done, "{err}");
    let ckpt = d.join("out.npz.partial.json");
    kill_after_checkpoint(&args(&out, "2"), &ckpt, 4);
    assert!(
        !out.exists(),
        "an interrupted run has no file under the final name"
    );
    assert!(d.join("out.npz.partial").exists());
    let (done, _, err) = ok(args(&out, "2"));
    assert!(done, "{err}");
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
    assert!(!ckpt.exists() && !d.join("out.npz.partial").exists());
    // A partial file of another run (another seed) is refused, not resumed.
    kill_after_checkpoint(
        &args(&d.join("x.npz"), "2"),
        &d.join("x.npz.partial.json"),
        1,
    );
    let mut other = args(&d.join("x.npz"), "2");
    other[6] = "4".into(); // --seed 4
    let (done, _, err) = ok(other);
    assert!(!done && err.contains("--overwrite"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// numpy.load reads the file with the evaluator's shapes and dtypes.
#[test]
#[ignore = "needs a Python with numpy: set CG_NUMPY_PYTHON (.ci/run installs one and runs this)"]
fn numpy_reads_the_npz() {
    let py = std::env::var("CG_NUMPY_PYTHON").expect("CG_NUMPY_PYTHON: a python with numpy");
    let (d, m) = setup("numpy");
    let f = d.join("a.npz");
    assert!(generate(&m, &f, &["--batch-size", "4"]).0);
    let o = std::process::Command::new(&py)
        .args([
            "-c",
            "import sys, numpy as np; d = np.load(sys.argv[1]); a, l = d['arr_0'], d['arr_1']; \
             assert a.shape == (10, 64, 64, 3) and a.dtype == np.uint8, (a.shape, a.dtype); \
             assert l.dtype == np.int64 and list(l) == list(range(10)), l; \
             assert a.std() > 0; print('numpy', np.__version__, a.shape, a.dtype, l.dtype)",
            &s(&f),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    println!("{}", String::from_utf8_lossy(&o.stdout).trim());
    std::fs::remove_dir_all(&d).ok();
}
