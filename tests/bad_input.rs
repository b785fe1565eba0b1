//! Bad input fails with a clear error (library) or one line and a non-zero exit (CLI),
//! never a panic or a silent wrong answer.

mod common;

use checkergen::model::Model;
use checkergen::model::config::preset;
use checkergen::model::file::{Dtype, Tensor, TensorMap, write_model};
use checkergen::model::init::random_tensors;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-bad-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn tiny_file(name: &str) -> PathBuf {
    let cfg = preset("tiny").unwrap();
    let map = random_tensors(&cfg, 1).unwrap();
    let p = tmp(name);
    write_model(&p, &cfg, &map, Dtype::F32, &[]).unwrap();
    p
}

/// Write `map` with `cfg` as model file `name` and return why it does not load.
fn written_load_err(
    name: &str,
    cfg: &checkergen::model::config::ModelConfig,
    map: &TensorMap,
) -> String {
    let p = tmp(name);
    write_model(&p, cfg, map, Dtype::F32, &[]).unwrap();
    load_err(&p)
}

fn load_err(p: &std::path::Path) -> String {
    match Model::load(p) {
        Ok(_) => panic!("{} should not load", p.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn run(args: &[&str]) -> (bool, String) {
    let (ok, _, err) = common::cli(args);
    (ok, err)
}

fn assert_cli_fails(args: &[&str], fragment: &str) {
    let (ok, err) = run(args);
    assert!(!ok, "{args:?} should fail");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.contains(fragment),
        "{args:?}: {err:?} lacks {fragment:?}"
    );
    assert!(last.starts_with("error"), "{args:?}: {err:?}");
}

#[test]
fn truncated_and_foreign_files() {
    let p = tiny_file("trunc.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("not a valid safetensors file") && e.contains("trunc"),
        "{e}"
    );

    let q = tmp("text.safetensors");
    std::fs::write(&q, b"this is not a model").unwrap();
    let e = load_err(&q);
    assert!(e.contains("not a valid safetensors file"), "{e}");

    let e = load_err(&tmp("does-not-exist.safetensors"));
    assert!(e.contains("cannot read"), "{e}");
    assert_cli_fails(
        &["inspect", p.to_str().unwrap()],
        "not a valid safetensors file",
    );
}

#[test]
fn missing_and_misshaped_tensors() {
    let cfg = preset("tiny").unwrap();
    let mut map = random_tensors(&cfg, 1).unwrap();
    map.remove("lm_head.weight");
    let e = written_load_err("missing.safetensors", &cfg, &map);
    assert!(
        e.contains("missing tensor `lm_head.weight`") && e.contains("missing.safetensors"),
        "{e}"
    );

    let mut map = random_tensors(&cfg, 1).unwrap();
    map.remove("autoenc.decoder.conv_out.weight");
    let e = written_load_err("missing.safetensors", &cfg, &map);
    assert!(e.contains("autoenc.decoder.conv_out.weight"), "{e}");

    let mut map = random_tensors(&cfg, 1).unwrap();
    map.insert(
        "llama.layers.1.attention.wo.weight".into(),
        Tensor::zeros(vec![64, 32]),
    );
    let e = written_load_err("missing.safetensors", &cfg, &map);
    assert!(
        e.contains("llama.layers.1.attention.wo.weight") && e.contains("[64, 32]"),
        "{e}"
    );
}

#[test]
fn config_disagrees_with_tensors() {
    let cfg = preset("tiny").unwrap();
    let map = random_tensors(&cfg, 1).unwrap();
    let mut other = cfg.clone();
    other.num_classes = 20;
    let e = written_load_err("disagree.safetensors", &other, &map);
    assert!(
        e.contains("class_embeddings.weight") && e.contains("[11, 64]"),
        "{e}"
    );

    let mut bad = cfg.clone();
    bad.num_heads = 3; // 64 not divisible by 3
    let e = written_load_err("disagree.safetensors", &bad, &map);
    assert!(e.contains("not divisible"), "{e}");

    let mut bad = cfg.clone();
    bad.scale_ratio = 40.0;
    assert!(written_load_err("disagree.safetensors", &bad, &map).contains("rounds to 0"));
}

#[test]
fn no_configuration_metadata() {
    let p = tmp("nometa.safetensors");
    checkergen::model::file::write_safetensors(
        &p,
        &[(
            "x".into(),
            safetensors::Dtype::F32,
            vec![1],
            vec![0, 0, 0, 0],
        )],
        Default::default(),
    )
    .unwrap();
    assert!(load_err(&p).contains("no `checkergen_config`"));
}

#[test]
fn cli_rejects_bad_requests() {
    let model = tiny_file("cli.safetensors");
    let m = model.to_str().unwrap();
    let out = tmp("out");
    let o = out.to_str().unwrap();
    assert_cli_fails(
        &["sample", "--model", m, "--labels", "10", "--out", o],
        "class id 10 is out of range",
    );
    assert_cli_fails(
        &[
            "sample",
            "--model",
            m,
            "--labels",
            "1",
            "--steps-per-scale",
            "0",
            "--out",
            o,
        ],
        "at least 1",
    );
    assert_cli_fails(
        &[
            "sample", "--model", m, "--labels", "1", "--steps", "1,2", "--out", o,
        ],
        "per-scale step counts",
    );
    assert_cli_fails(
        &[
            "sample", "--model", m, "--labels", "1", "--top-p", "1.5", "--out", o,
        ],
        "top-p",
    );
    assert_cli_fails(
        &[
            "sample",
            "--model",
            m,
            "--labels",
            "1",
            "--temperature",
            "-1",
            "--out",
            o,
        ],
        "temperature",
    );
    // An output path below a regular file cannot be created.
    let blocker = tmp("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let sub = blocker.join("sub");
    assert_cli_fails(
        &[
            "sample",
            "--model",
            m,
            "--labels",
            "1",
            "--out",
            sub.to_str().unwrap(),
        ],
        "cannot create output directory",
    );
    assert_cli_fails(
        &["init", "--preset", "huge", "-o", o],
        "unknown preset `huge`",
    );
    assert_cli_fails(
        &[
            "sample",
            "--model",
            "/nonexistent.safetensors",
            "--labels",
            "1",
            "--out",
            o,
        ],
        "cannot read",
    );
}
