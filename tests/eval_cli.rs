//! `checkergen eval` end to end (issue 24): two `generate` outputs of the tiny preset
//! evaluated with the golden random-weight Inception; a reference given as an activation
//! file gives the same five numbers as the images; an activation file's own statistics are
//! the ones used; `generate --eval` prints the table and `steps --eval` adds the numbers per
//! configuration; bad input is one line, nothing written.

mod common;
use common::argv;

use checkergen::eval::activations::{read_activations, write_activations};
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-eval-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `generate` of 6 tiny-preset images with `seed` into `out`, with `extra` options; stdout.
fn generate_with(out: &Path, seed: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--num-samples",
        "6",
        "--steps-per-scale",
        "1",
        "--seed",
        seed,
        "--device",
        "cpu",
        "--quiet",
        "--out",
        s(out),
    ];
    args.extend(extra);
    let (ok, stdout, err) = common::cli(&args);
    assert!(ok, "generate: {err}");
    stdout
}

fn generate(out: &Path, seed: &str) {
    generate_with(out, seed, &[]);
}

fn eval_json<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> serde_json::Value {
    let (ok, out, err) = common::cli(args);
    assert!(ok, "{args:?}: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn num(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

const KEYS: [&str; 5] = ["inception_score", "fid", "sfid", "precision", "recall"];

#[test]
fn eval_two_generate_outputs() {
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let w = golden.join("public/eval/inception_random.pth");
    let d = dir();
    let (a, b) = (d.join("a.npz"), d.join("b.npz"));
    generate(&a, "1");
    generate(&b, "2");
    let ra = d.join("ref_acts.npz");
    let first = eval_json(&argv(
        "eval --inception {} --ref {} --sample {} --json --batch-size 4 --save-ref-activations {}",
        &[&w, &a, &b, &ra],
    ));
    for k in KEYS {
        assert!(num(&first, k).is_finite(), "{k} = {}", first[k]);
    }
    assert_eq!(
        (
            first["ref_images"].as_u64(),
            first["sample_images"].as_u64()
        ),
        (Some(6), Some(6))
    );
    assert!(
        num(&first, "fid") > 0.0,
        "two different sets at FID 0: {first}"
    );

    // The reference as an activation file (written by --save-ref-activations, statistics
    // inside): the same five numbers.
    let second = eval_json(&argv(
        "eval --inception {} --ref {} --sample {} --json",
        &[&w, &ra, &b],
    ));
    let mut worst = 0f64;
    for k in KEYS {
        let (x, y) = (num(&first, k), num(&second, k));
        worst = worst.max((x - y).abs() / y.abs().max(1e-12));
    }
    println!("images vs activation file: worst relative difference {worst:.2e}");
    assert!(worst <= 1e-9, "{first} vs {second}");

    // `--activations --out` writes the same file as --save-ref-activations.
    let aa = d.join("a_acts.npz");
    let (ok, _, err) = common::cli(&argv(
        "eval --inception {} --activations {} --out {} --quiet",
        &[&w, &a, &aa],
    ));
    assert!(ok, "{err}");
    let (x, y) = (
        read_activations(&aa).unwrap(),
        read_activations(&ra).unwrap(),
    );
    assert_eq!(x.acts, y.acts);

    // An activation file's statistics are the ones used: a's activations with b's
    // statistics make FID and sFID against b (nearly) 0, while the activations still drive
    // precision and recall.
    let bb = d.join("b_acts.npz");
    let (ok, _, err) = common::cli(&argv(
        "eval --inception {} --activations {} --out {} --quiet",
        &[&w, &b, &bb],
    ));
    assert!(ok, "{err}");
    let b_stats = read_activations(&bb).unwrap().stats.unwrap();
    let mixed = d.join("mixed.npz");
    write_activations(&mixed, &x.acts, &b_stats, &[]).unwrap();
    let third = eval_json(&argv(
        "eval --inception {} --ref {} --sample {} --json",
        &[&w, &mixed, &b],
    ));
    println!(
        "reference with b's statistics: FID {:.3e}, sFID {:.3e} (a vs b: FID {:.3e})",
        num(&third, "fid"),
        num(&third, "sfid"),
        num(&first, "fid")
    );
    assert!(num(&third, "fid").abs() <= 1e-6 * num(&first, "fid").max(1.0));
    assert!(num(&third, "sfid").abs() <= 1e-6 * num(&first, "sfid").max(1.0));
    assert_eq!(third["precision"], first["precision"]);
    assert_eq!(third["recall"], first["recall"]);

    // generate --eval: the table after the file.
    let c = d.join("c.npz");
    let out = generate_with(&c, "3", &["--eval", s(&aa), "--inception", s(&w)]);
    for row in ["Inception Score", "FID", "sFID", "Precision", "Recall"] {
        assert!(out.contains(row), "generate --eval printed no {row}: {out}");
    }

    // steps --eval: quality against serial steps, the five numbers per configuration.
    let (ok, out, err) = common::cli(&[
        "steps",
        "--preset",
        "tiny",
        "--steps-per-scale",
        "1,2",
        "--batch",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--json",
        "--eval",
        s(&aa),
        "--inception",
        s(&w),
        "--num-samples",
        "4",
        "--png",
        s(&d.join("steps.png")),
    ]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    for r in &rows {
        let q = &r["eval"];
        for k in KEYS {
            assert!(num(q, k).is_finite(), "{k}: {r}");
        }
        assert_eq!(q["sample_images"], 4);
    }
    assert_ne!(
        rows[0]["eval"]["fid"], rows[1]["eval"]["fid"],
        "two schedules, one FID"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn eval_bad_input_is_one_line_and_writes_nothing() {
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let w = golden.join("public/eval/inception_random.pth");
    let d = dir().join("bad");
    std::fs::create_dir_all(&d).unwrap();
    let a = d.join("a.npz");
    generate(&a, "1");
    let out = d.join("never.npz");
    let (ws, as_, o) = (s(&w), s(&a), s(&out));
    let cases = [
        (format!("--ref {as_} --sample {as_} --device emu"), "CPU"),
        (
            format!("--activations {as_} --out {o} --inception {as_}"),
            "a.npz",
        ),
        (format!("--activations {as_} --out {as_}"), "a.npz"),
        (
            format!("--ref {as_} --sample /nonexistent.npz"),
            "nonexistent",
        ),
        (
            format!("--ref {as_} --sample {as_} --batch-size 0"),
            "--batch-size",
        ),
    ];
    for (args, want) in cases {
        // The golden weights, unless the case gives a file that is not the Inception.
        let mut v = vec!["eval"];
        if !args.contains("--inception") {
            v.extend(["--inception", ws]);
        }
        v.extend(args.split_whitespace());
        common::refused(&v, want);
    }
    assert!(!out.exists());
    // A set of one image has no covariance, nor precision and recall: said in one line,
    // before any work.
    let one = d.join("one.npz");
    let (ok, _, err) = common::cli(&argv(
        "generate --num-samples 1 --steps-per-scale 1 --device cpu --quiet --out {}",
        &[&one],
    ));
    assert!(ok, "{err}");
    common::refused(
        &argv("eval --inception {} --ref {} --sample {}", &[&w, &a, &one]),
        "one.npz",
    );
    std::fs::remove_dir_all(&d).ok();
}
