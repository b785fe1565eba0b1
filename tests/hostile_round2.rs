//! Hostile input, round 2 (issue 22): one test per class that the second campaign found
//! and that `tests/hostile_input.rs` did not cover. Each runs the binary (`ulimit -v`, a
//! wall-clock limit; a full disk is a `ulimit -f` file-size limit with SIGXFSZ ignored, so a
//! write fails with EFBIG) and checks the rules docs/limits.md states: every
//! input is validated before anything is created, removed or announced; no output is ever
//! an input; every file is written to a temporary name and renamed, and a failed run leaves
//! nothing, or a resumable state; one overwrite rule.

mod hostile_common;

use hostile_common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Run and require success.
fn ok<S: AsRef<str> + std::fmt::Debug>(args: &[S]) -> Outcome {
    let o = run_limited(args, Duration::from_secs(120));
    assert_eq!(o.code, Some(0), "{args:?}: {o:?}");
    o
}

/// A fresh directory `name` under this test process's scratch area.
fn fresh(name: &str) -> PathBuf {
    let d = scratch("round2").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny preset as a model file in `dir`.
fn tiny(dir: &Path) -> PathBuf {
    let m = dir.join("m.safetensors");
    ok(&["init", "--preset", "tiny", "-o", s(&m)]);
    m
}

/// A fresh directory `name` holding the tiny preset: (directory, model file).
fn fresh_tiny(name: &str) -> (PathBuf, PathBuf) {
    let dir = fresh(name);
    let m = tiny(&dir);
    (dir, m)
}

/// Quick sampling settings (5 serial steps, unguided).
const FAST: [&str; 4] = ["--steps-per-scale", "1", "--cfg", "0"];

/// The sorted names in `dir` (empty when it does not exist).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A tokens file of `n` images for the tiny model, from the library's writer.
fn tokens_file(path: &Path, n: usize) -> PathBuf {
    let sizes = [1usize, 2, 4, 8, 16];
    let grids: Vec<Vec<u32>> = sizes
        .iter()
        .map(|&s| (0..n * s * s).map(|i| (i * 37 % 256) as u32).collect())
        .collect();
    checkergen::io::tokens::write_token_grids(path, &sizes, &grids, n).unwrap();
    path.to_path_buf()
}

/// `generate` of the tiny model: `n` images, one per batch, into `out`, with `extra`.
fn generate_args(m: &Path, n: usize, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "generate",
        "--model",
        s(m),
        "--num-samples",
        &n.to_string(),
        "--batch-size",
        "1",
        "--quiet",
        "--out",
        s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(FAST.iter().map(|x| x.to_string()));
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

// ---- Item 2: inputs overwritten --------------------------------------------------------

#[test]
fn no_output_is_ever_an_input() {
    let (dir, m) = fresh_tiny("inputs");
    let model_bytes = std::fs::read(&m).unwrap();
    // decode --out holding the tokens file as a recon_NNNN.png name (as itself, and as a
    // hard link), with and without --overwrite.
    let d = dir.join("d");
    std::fs::create_dir_all(&d).unwrap();
    let t = tokens_file(&d.join("recon_0001.png"), 2);
    let t_bytes = std::fs::read(&t).unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = argv("decode --model {} --tokens {} --out {}", &[&m, &t, &d]);
        args.extend(extra.iter().map(|x| x.to_string()));
        let o = assert_refused(&args, "recon_0001.png");
        assert!(o.last_line().contains("input") || o.last_line().contains("another run"));
        assert_eq!(std::fs::read(&t).unwrap(), t_bytes);
    }
    let t2 = tokens_file(&dir.join("t.safetensors"), 2);
    let d2 = dir.join("d2");
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::hard_link(&t2, d2.join("recon_0000.png")).unwrap();
    assert_refused(
        &argv(
            "decode --model {} --tokens {} --out {} --overwrite",
            &[&m, &t2, &d2],
        ),
        "same file as the input",
    );
    assert_eq!(std::fs::read(&t2).unwrap(), t_bytes);
    // merge -o naming one of its own shards.
    let (s0, s1) = (dir.join("s0.npz"), dir.join("s1.npz"));
    ok(&generate_args(&m, 2, &s0, &["--shard", "0/2"]));
    ok(&generate_args(&m, 2, &s1, &["--shard", "1/2"]));
    let s0_bytes = std::fs::read(&s0).unwrap();
    assert_refused(
        &["merge", s(&s0), s(&s1), "-o", s(&s0), "--overwrite"],
        "same file as the input",
    );
    assert_eq!(std::fs::read(&s0).unwrap(), s0_bytes);
    // generate --overwrite --out naming the model or the labels file.
    assert_refused(
        &generate_args(&m, 1, &m, &["--overwrite"]),
        "same file as the input",
    );
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "3\n").unwrap();
    assert_refused(
        &generate_args(
            &m,
            1,
            &labels,
            &["--overwrite", "--labels-file", s(&labels)],
        ),
        "same file as the input",
    );
    assert_eq!(std::fs::read_to_string(&labels).unwrap(), "3\n");
    // A png-dir output that contains the model (a hard link named as an output image).
    let g = dir.join("g");
    std::fs::create_dir_all(g.join("256")).unwrap();
    std::fs::hard_link(&m, g.join("256/sample_00000.png")).unwrap();
    assert_refused(
        &generate_args(&m, 1, &g, &["--format", "png-dir", "--overwrite"]),
        "same file as the input",
    );
    assert_eq!(std::fs::read(&m).unwrap(), model_bytes);
    // encode --out naming one of its images.
    let img = dir.join("img.png");
    std::fs::copy(d.join("recon_0001.png"), &img).unwrap();
    assert_refused(
        &argv(
            "encode --model {} {} --out {} --overwrite",
            &[&m, &img, &img],
        ),
        "same file as the input",
    );
}

// ---- Item 6: partial files on a full disk -------------------------------------------------

/// Every `.partial` under `dir`, recursively.
fn partials(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(partials(&p));
        } else if p.to_string_lossy().contains(".partial") {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_full_disk_leaves_no_truncated_file() {
    let (dir, m) = fresh_tiny("full");
    // A tiny sample PNG is about 157 kB: 100 kB per file fails the first image.
    const LIMIT: u64 = 100_000;
    // sample into a new directory: nothing is left, not even the directory.
    let out = dir.join("sample-new");
    let mut args = argv("sample --model {} --num-samples 2 --out {}", &[&m, &out]);
    args.extend(FAST.map(String::from));
    let o = run_disk_limited(&args, LIMIT);
    assert!(o.is_clean_failure(), "{o:?}");
    assert!(o.last_line().contains("sample_0000.png"), "{o:?}");
    assert!(!out.exists(), "{:?}", names(&out));
    // sample into a directory of the user's: only the user's file stays.
    let out = dir.join("sample-old");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    args[6] = s(&out).to_string();
    assert!(run_disk_limited(&args, LIMIT).is_clean_failure());
    assert_eq!(names(&out), ["notes.txt"]);
    // decode: no recon_NNNN.png, no directory.
    let t = tokens_file(&dir.join("t.safetensors"), 2);
    let d = dir.join("decoded");
    let o = run_disk_limited(
        &argv("decode --model {} --tokens {} --out {}", &[&m, &t, &d]),
        LIMIT,
    );
    assert!(o.is_clean_failure(), "{o:?}");
    assert!(!d.exists(), "{:?}", names(&d));
    // order --png: no file under either name.
    let png = dir.join("order.png");
    let o = run_disk_limited(&["order", "--size", "64", "--png", s(&png)], 1000);
    assert!(o.is_clean_failure(), "{o:?}");
    assert!(!png.exists());
    // generate --format png-dir: nothing left.
    let g = dir.join("pngdir");
    let o = run_disk_limited(&generate_args(&m, 2, &g, &["--format", "png-dir"]), LIMIT);
    assert!(o.is_clean_failure(), "{o:?}");
    assert!(!g.exists(), "{:?}", names(&g));
    // generate to .npz failing in its first batch: FILE.partial has its checkpoint, and the
    // same command resumes to the file an uninterrupted run writes.
    let npz = dir.join("g.npz");
    let args = generate_args(&m, 2, &npz, &[]);
    let o = run_disk_limited(&args, LIMIT);
    assert!(o.is_clean_failure(), "{o:?}");
    assert!(dir.join("g.npz.partial").exists() && dir.join("g.npz.partial.json").exists());
    ok(&args);
    let whole = dir.join("whole.npz");
    ok(&generate_args(&m, 2, &whole, &[]));
    assert_eq!(std::fs::read(&npz).unwrap(), std::fs::read(&whole).unwrap());
    // And no temporary anywhere.
    assert!(partials(&dir).is_empty(), "{:?}", partials(&dir));
}

// ---- Item 10: one overwrite rule ----------------------------------------------------------

#[test]
fn one_overwrite_rule_for_every_command() {
    let (dir, m) = fresh_tiny("rule");
    let before = std::fs::read(&m).unwrap();
    // init, convert, encode, merge, order --png: an existing output is refused unless
    // --overwrite, and left as it was.
    assert_refused(&["init", "--preset", "tiny", "-o", s(&m)], "--overwrite");
    assert_eq!(std::fs::read(&m).unwrap(), before);
    ok(&["init", "--preset", "tiny", "-o", s(&m), "--overwrite"]);
    let fx = |n: &str| fixture(n).to_str().unwrap().to_string();
    let conv = |extra: &[&str]| {
        let mut v = vec![
            "convert".to_string(),
            "--checkpoint".into(),
            fx("tiny.pth"),
            "--config".into(),
            fx("tiny_config.yaml"),
            "--autoenc-config".into(),
            fx("tiny_autoencoder.yaml"),
            "-o".into(),
            s(&m).into(),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    assert_refused(&conv(&[]), "--overwrite");
    assert_eq!(std::fs::read(&m).unwrap(), before);
    ok(&conv(&["--overwrite"]));
    ok(&["init", "--preset", "tiny", "-o", s(&m), "--overwrite"]);
    let png = dir.join("rank.png");
    ok(&["order", "--size", "4", "--png", s(&png)]);
    assert_refused(&["order", "--size", "4", "--png", s(&png)], "--overwrite");
    ok(&["order", "--size", "4", "--png", s(&png), "--overwrite"]);
    let codes = dir.join("codes.safetensors");
    ok(&["encode", "--model", s(&m), s(&png), "--out", s(&codes)]);
    assert_refused(
        &["encode", "--model", s(&m), s(&png), "--out", s(&codes)],
        "--overwrite",
    );
    let (s0, s1, all) = (dir.join("s0.npz"), dir.join("s1.npz"), dir.join("all.npz"));
    ok(&generate_args(&m, 2, &s0, &["--shard", "0/2"]));
    ok(&generate_args(&m, 2, &s1, &["--shard", "1/2"]));
    ok(&["merge", s(&s0), s(&s1), "-o", s(&all)]);
    assert_refused(&["merge", s(&s0), s(&s1), "-o", s(&all)], "--overwrite");
    ok(&["merge", s(&s0), s(&s1), "-o", s(&all), "--overwrite"]);
    // decode into a folder of an earlier, larger run: refused; --overwrite leaves exactly
    // the new run's images, never a mixture.
    let d = dir.join("d");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..6 {
        std::fs::write(d.join(format!("recon_{i:04}.png")), "old").unwrap();
    }
    std::fs::write(d.join("notes.txt"), "mine").unwrap();
    let t = tokens_file(&dir.join("t.safetensors"), 2);
    let dec = argv("decode --model {} --tokens {} --out {}", &[&m, &t, &d]);
    assert_refused(&dec, "--overwrite");
    assert_eq!(names(&d).len(), 7);
    let mut dec_over = dec.to_vec();
    dec_over.push("--overwrite".to_string());
    ok(&dec_over);
    assert_eq!(names(&d), ["notes.txt", "recon_0000.png", "recon_0001.png"]);
    // png-dir shards of one run share a folder: a shard's files are its own range, so
    // another shard is neither refused nor removed, and --overwrite replaces only its own.
    let g = dir.join("shared");
    ok(&generate_args(
        &m,
        2,
        &g,
        &["--format", "png-dir", "--shard", "0/2"],
    ));
    ok(&generate_args(
        &m,
        2,
        &g,
        &["--format", "png-dir", "--shard", "1/2"],
    ));
    assert_refused(
        &generate_args(&m, 2, &g, &["--format", "png-dir", "--shard", "1/2"]),
        "--overwrite",
    );
    ok(&generate_args(
        &m,
        2,
        &g,
        &["--format", "png-dir", "--shard", "1/2", "--overwrite"],
    ));
    assert_eq!(
        names(&g.join("256")),
        ["sample_00000.png", "sample_00001.png"]
    );
    // A failed sample leaves no directory behind.
    let out = dir.join("never");
    let args = argv(
        "sample --model {} --labels 1 --out {} --top-k 0",
        &[&m, &out],
    );
    assert_refused(&args, "top-k");
    assert!(!out.exists());
    // A .pth or an image as --model: run `convert`.
    for not_a_model in [fixture("tiny.pth"), png.clone()] {
        assert_refused(
            &argv(
                "sample --model {} --labels 1 --out {}",
                &[&not_a_model, &out],
            ),
            "checkergen convert",
        );
        assert_refused(&["inspect", s(&not_a_model)], "checkergen convert");
    }
    assert!(!out.exists());
}

// ---- Item 1: validation before any side effect, for every command -------------------------

#[test]
fn every_command_validates_before_touching_anything() {
    let (dir, m) = fresh_tiny("validate");
    // decode into a folder where one planned image's name is taken by a directory: refused
    // before any image is written (no partial output).
    let t = tokens_file(&dir.join("t.safetensors"), 3);
    let d = dir.join("d");
    std::fs::create_dir_all(d.join("recon_0002.png")).unwrap();
    let o = assert_refused(
        &argv(
            "decode --model {} --tokens {} --out {} --overwrite",
            &[&m, &t, &d],
        ),
        "recon_0002.png",
    );
    assert_eq!(error_lines(&o.stderr), 1, "{o:?}");
    assert_eq!(names(&d), ["recon_0002.png"]);
    // generate --format png-dir, likewise: refused before any image, and before it announces
    // its run (one line).
    let g = dir.join("g");
    std::fs::create_dir_all(g.join("256/sample_00001.png")).unwrap();
    let args = generate_args(&m, 3, &g, &["--format", "png-dir", "--overwrite"]);
    let o = assert_refused(&args, "sample_00001.png");
    assert_eq!(error_lines(&o.stderr), 1, "{o:?}");
    assert_eq!(names(&g.join("256")), ["sample_00001.png"]);
    // generate with a bad option creates no directory and keeps an earlier file.
    let fresh_dir = dir.join("nothing");
    let mut args = generate_args(&m, 2, &fresh_dir, &["--format", "png-dir"]);
    args.extend(["--top-k".to_string(), "0".to_string()]);
    let o = assert_refused(&args, "top-k");
    assert_eq!(error_lines(&o.stderr), 1, "{o:?}");
    assert!(!fresh_dir.exists());
    let npz = dir.join("keep.npz");
    std::fs::write(&npz, "earlier").unwrap();
    let mut args = generate_args(&m, 2, &npz, &["--overwrite"]);
    args.extend(["--top-p".to_string(), "2".to_string()]);
    assert_refused(&args, "top-p");
    assert_eq!(std::fs::read_to_string(&npz).unwrap(), "earlier");
    assert!(!dir.join("keep.npz.partial").exists());
    // encode with one unreadable input among its images: refused before the work.
    let codes = dir.join("codes.safetensors");
    let folder = dir.join("folder.png");
    std::fs::create_dir_all(&folder).unwrap();
    let png = dir.join("rank.png");
    ok(&["order", "--size", "4", "--png", s(&png)]);
    let o = assert_refused(
        &argv(
            "encode --model {} {} {} --out {}",
            &[&m, &png, &folder, &codes],
        ),
        "is a directory",
    );
    assert_eq!(error_lines(&o.stderr), 1, "{o:?}");
    assert!(!codes.exists());
}

// ---- Item 4: a resume that trusts its checkpoint -----------------------------------------

#[test]
fn resume_verifies_the_partial_file_against_its_checkpoint() {
    let (dir, m) = fresh_tiny("resume");
    let npz = dir.join("r.npz");
    let (partial, ckpt) = (dir.join("r.npz.partial"), dir.join("r.npz.partial.json"));
    // Four 196 608-byte images, one per batch; a 600 000-byte file holds the first three.
    let args = generate_args(&m, 4, &npz, &[]);
    let o = run_disk_limited(&args, 600_000);
    assert!(o.is_clean_failure(), "{o:?}");
    let (p0, c0) = (
        std::fs::read(&partial).unwrap(),
        std::fs::read(&ckpt).unwrap(),
    );
    let restore = || {
        std::fs::write(&partial, &p0).unwrap();
        std::fs::write(&ckpt, &c0).unwrap();
    };
    // One byte of an image changed.
    let mut p = p0.clone();
    p[5000] ^= 0x40;
    std::fs::write(&partial, &p).unwrap();
    assert_refused(&args, "do not match its checkpoint");
    assert_eq!(
        std::fs::read(&partial).unwrap(),
        p,
        "the partial file is left as it was"
    );
    // A checkpoint that claims more images than the file holds (its counts edited
    // together, and alone).
    restore();
    let mut j: serde_json::Value = serde_json::from_slice(&c0).unwrap();
    let done = j["done"].as_u64().unwrap();
    j["done"] = (done + 1).into();
    std::fs::write(&ckpt, j.to_string()).unwrap();
    assert_refused(&args, "counts disagree");
    j["written"] = (j["written"].as_u64().unwrap() + 196_608).into();
    std::fs::write(&ckpt, j.to_string()).unwrap();
    assert_refused(&args, "shorter than its checkpoint");
    // A truncated partial file.
    restore();
    std::fs::write(&partial, &p0[..p0.len() / 2]).unwrap();
    assert_refused(&args, "shorter than its checkpoint");
    // The intact pair resumes, to the file of an uninterrupted run.
    restore();
    ok(&args);
    let whole = dir.join("whole.npz");
    ok(&generate_args(&m, 4, &whole, &[]));
    assert_eq!(std::fs::read(&npz).unwrap(), std::fs::read(&whole).unwrap());
}

// ---- Item 5: bounded work -----------------------------------------------------------------

/// decode of 5000 images (about 1 MB each as pixels) writes its first images within seconds
/// and within the address-space limit: it decodes batch after batch instead of holding every
/// image before writing one.
#[test]
fn decode_streams_its_batches() {
    let (dir, m) = fresh_tiny("decode-many");
    let t = tokens_file(&dir.join("t.safetensors"), 5000);
    let d = dir.join("d");
    let o = run_limited(
        &argv("decode --model {} --tokens {} --out {}", &[&m, &t, &d]),
        Duration::from_secs(25),
    );
    assert!(o.timed_out || o.code == Some(0), "{o:?}");
    assert!(!o.stderr.contains("panicked"), "{o:?}");
    assert!(d.join("recon_0000.png").is_file(), "{o:?} {:?}", names(&d));
}

#[test]
fn count_options_are_bounded() {
    let (dir, m) = fresh_tiny("counts");
    let max = "18446744073709551615";
    let out = dir.join("o");
    for template in [
        "steps --model {} --batch",
        "bench --model {} --batch",
        "generate --model {} --num-samples 2 --out {} --batch-size",
        "sample --model {} --num-samples 2 --out {} --batch-size",
    ] {
        let mut args = match template.matches("{}").count() {
            1 => argv(template, &[&m]),
            _ => argv(template, &[&m, &out]),
        };
        args.push(max.to_string());
        assert_refused(&args, "4096");
        assert!(!out.exists());
    }
}

// ---- Items 3 and 8: silent successes and misleading messages ------------------------------

#[test]
fn guidance_that_never_applies_is_said_and_recorded() {
    let (dir, m) = fresh_tiny("cfg");
    let out = dir.join("o");
    // The default start step 5 on a 5-step schedule, and a start step past the end.
    for (extra, guided) in [
        (vec!["--steps-per-scale", "1"], 0),
        (vec!["--cfg-start-step", "99"], 0),
        (vec!["--steps-per-scale", "1", "--cfg-start-step", "2"], 3),
    ] {
        let mut args = argv(
            "sample --model {} --labels 1 --overwrite --out {}",
            &[&m, &out],
        );
        args.extend(extra.iter().map(|x| x.to_string()));
        let o = ok(&args);
        assert_eq!(
            o.stderr.contains("never applies"),
            guided == 0,
            "{extra:?}: {o:?}"
        );
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
        assert_eq!(run["guided_steps"], guided, "{extra:?}");
    }
}

#[test]
fn truncated_jpeg_is_refused() {
    let (dir, m) = fresh_tiny("jpeg");
    let jpg = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/score/nodejs_full_white_stripe.jpg"),
    )
    .unwrap();
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &jpg[..jpg.len() * 2 / 3]).unwrap();
    let codes = dir.join("codes.safetensors");
    assert_refused(
        &["encode", "--model", s(&m), s(&cut), "--out", s(&codes)],
        "truncated JPEG",
    );
    assert!(!codes.exists());
}

#[test]
fn tokens_with_more_scales_than_the_model_are_refused() {
    let (dir, m) = fresh_tiny("scales");
    let sizes = [1usize, 2, 4, 8, 16, 32];
    let grids: Vec<Vec<u32>> = sizes.iter().map(|&s| vec![3; s * s]).collect();
    let t = dir.join("t.safetensors");
    checkergen::io::tokens::write_token_grids(&t, &sizes, &grids, 1).unwrap();
    let d = dir.join("d");
    assert_refused(
        &argv("decode --model {} --tokens {} --out {}", &[&m, &t, &d]),
        "holds 6 scales; this model has 5",
    );
    assert!(!d.exists());
}
