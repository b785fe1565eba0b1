//! Hostile input (issue 10): one test per failure class a fuzz campaign found. Every bad
//! input must fail with one `error:` line naming the file and what is wrong, in bounded time
//! and memory (each CLI run: `ulimit -v`, a wall-clock limit), and nothing given as input is
//! ever modified.

mod hostile_common;

use checkergen::io::pth::PthCheckpoint;
use checkergen::model::config::{CONFIG_METADATA_KEY, FORMAT, preset};
use checkergen::model::file::write_safetensors;
use checkergen::model::init::random_tensors;
use checkergen::pipeline::Memory;
use hostile_common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tiny preset as a model file, with its metadata JSON edited by `meta` and each tensor
/// `(name, dtype, bytes)` edited by `tensor` (f32 little-endian bytes to start with).
fn tiny_model(
    path: &Path,
    meta: impl Fn(&mut serde_json::Value),
    tensor: impl Fn(&str, &mut safetensors::Dtype, &mut Vec<u8>),
) -> PathBuf {
    let cfg = preset("tiny").unwrap();
    let map = random_tensors(&cfg, 1).unwrap();
    let entries: Vec<_> = map
        .iter()
        .map(|(name, t)| {
            let mut dt = safetensors::Dtype::F32;
            let mut bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensor(name, &mut dt, &mut bytes);
            (name.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let mut json = serde_json::to_value(&cfg).unwrap();
    meta(&mut json);
    let mut m = HashMap::new();
    m.insert(CONFIG_METADATA_KEY.to_string(), json.to_string());
    m.insert("format".to_string(), FORMAT.to_string());
    write_safetensors(path, &entries, m).unwrap();
    path.to_path_buf()
}

fn no_edit(_: &str, _: &mut safetensors::Dtype, _: &mut Vec<u8>) {}

/// `convert` arguments; `None` takes the fixture (tiny.pth, tiny_config.yaml,
/// tiny_autoencoder.yaml).
fn convert_cmd(
    ckpt: Option<&Path>,
    cfg: Option<&Path>,
    ae: Option<&Path>,
    out: &Path,
) -> Vec<String> {
    let or = |p: Option<&Path>, f: &str| s(p.unwrap_or(&fixture(f))).to_string();
    vec![
        "convert".into(),
        "--checkpoint".into(),
        or(ckpt, "tiny.pth"),
        "--config".into(),
        or(cfg, "tiny_config.yaml"),
        "--autoenc-config".into(),
        or(ae, "tiny_autoencoder.yaml"),
        "-o".into(),
        s(out).to_string(),
    ]
}

fn open_err(bytes: &[u8], name: &str) -> String {
    let p = scratch("hostile").join(name);
    std::fs::write(&p, bytes).unwrap();
    match PthCheckpoint::open(&p).and_then(|c| c.state_dict("model").map(|_| ())) {
        Ok(()) => panic!("{name} should not give a state dict"),
        Err(e) => format!("{e:#}"),
    }
}

// ---- Panics --------------------------------------------------------------------------------

#[test]
fn panic_num_samples_max_is_refused() {
    let out = scratch("hostile").join("out-max");
    assert_refused(
        &argv(
            "sample --num-samples 18446744073709551615 --out {}",
            &[&out],
        ),
        "at most 10000000 images per run",
    );
}

#[test]
fn panic_zip64_claiming_2_pow_63_byte_data_pkl() {
    let bytes = zip64(&[("ck/data.pkl", b"\x80\x02}.", Some(1 << 63))]);
    let e = open_err(&bytes, "huge-pkl.pth");
    assert!(
        e.contains("huge-pkl.pth") && e.contains("past the end"),
        "{e}"
    );
}

// ---- Aborts (allocation failure) -------------------------------------------------------

#[test]
fn abort_1kb_pth_claiming_1_tib_entry() {
    let bytes = zip64(&[
        ("ck/data.pkl", b"\x80\x02}.", None),
        ("ck/data/0", &[0u8; 512], Some(1 << 40)),
    ]);
    assert!(bytes.len() < 1024);
    let e = open_err(&bytes, "tib.pth");
    assert!(e.contains("ck/data/0") && e.contains("past the end"), "{e}");
}

#[test]
fn abort_and_hang_layer_counts_from_metadata() {
    let dir = scratch("hostile");
    for layers in [1_000_000_000_000u64, 1_000_000_000] {
        let p = tiny_model(
            &dir.join(format!("layers{layers}.safetensors")),
            |j| j["num_layers"] = layers.into(),
            no_edit,
        );
        assert_refused(&["inspect", s(&p)], "num_layers");
    }
    // A count that is small but disagrees with the tensors present is named as such.
    let p = tiny_model(
        &dir.join("layers3.safetensors"),
        |j| j["num_layers"] = 3.into(),
        no_edit,
    );
    assert_refused(&["inspect", s(&p)], "holds tensors for 2 layers");
}

#[test]
fn abort_scale_ratio_just_above_one() {
    let one_ulp = f64::from_bits(1f64.to_bits() + 1);
    for r in ["1.000000001", &one_ulp.to_string()] {
        assert_refused(&["schedule", "--scale-ratio", r], "too close to 1");
    }
    // From model metadata (inspect) ...
    let dir = scratch("hostile");
    let p = tiny_model(
        &dir.join("ratio.safetensors"),
        |j| j["scale_ratio"] = one_ulp.into(),
        no_edit,
    );
    assert_refused(&["inspect", s(&p)], "too close to 1");
    // ... and from YAML (convert).
    let yaml = std::fs::read_to_string(fixture("tiny_config.yaml"))
        .unwrap()
        .replace("scale_ratio: 2", "scale_ratio: 1.000000001");
    let cfg = dir.join("ratio.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = dir.join("ratio-out.safetensors");
    assert_refused(&convert_cmd(None, Some(&cfg), None, &out), "too close to 1");
    assert!(!out.exists());
}

#[test]
fn abort_sample_batches_are_bounded() {
    // Any number of images runs batch after batch; the run and each batch are bounded.
    let out = scratch("hostile").join("out-1e8");
    assert_refused(
        &["sample", "--num-samples", "100000000", "--out", s(&out)],
        "at most 10000000 images per run",
    );
    let out = scratch("hostile").join("out-batch-10000");
    assert_refused(
        &argv(
            "sample --num-samples 10000 --batch-size 10000 --out {}",
            &[&out],
        ),
        "at most 4096 per batch",
    );
    // Below the count limit, a batch whose KV caches would not fit is refused too.
    let cfg = preset("L-2x").unwrap();
    let opts = checkergen::pipeline::SampleOptions::new(vec![0; 1000]);
    let e = checkergen::pipeline::validate_options(&cfg, 5, &opts, Memory::Host).unwrap_err();
    assert!(
        format!("{e}").contains("images of this model per batch"),
        "{e}"
    );
}

// ---- Stack overflows -------------------------------------------------------------------

#[test]
fn stack_pickles_nested_a_million_deep() {
    let depth = 1_000_000;
    for (what, ops) in [
        ("list", nested_list_ops(depth)),
        ("tuple", nested_tuple_ops(depth)),
        ("dict", nested_dict_ops(depth)),
    ] {
        // Run on a thread with a small stack: a recursive drop or walk would overflow it.
        let got = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let p = scratch("hostile").join(format!("deep-{what}.pth"));
                std::fs::write(&p, pth_with_pickle(&model_dict_pickle(&ops))).unwrap();
                PthCheckpoint::open(&p)
                    .and_then(|c| c.state_dict("model"))
                    .map(|sd| sd.len())
                    .map_err(|e| format!("{e:#}"))
            })
            .unwrap()
            .join()
            .unwrap_or_else(|_| panic!("nested {what} crashed the reader"));
        match what {
            // A dict of dicts holds no tensors: an empty state dict (convert then names
            // the missing tensors).
            "dict" => assert_eq!(got, Ok(0)),
            _ => assert!(got.unwrap_err().contains("not a state dict"), "{what}"),
        }
    }
}

#[test]
fn stack_yaml_flow_sequence_nested_100000_deep() {
    let dir = scratch("hostile");
    let deep = dir.join("deep.yaml");
    let n = 100_000;
    std::fs::write(
        &deep,
        format!("model: {}{}\n", "[".repeat(n), "]".repeat(n)),
    )
    .unwrap();
    let out = dir.join("deep-out.safetensors");
    assert_refused(
        &convert_cmd(None, Some(&deep), None, &out),
        "deep.yaml: YAML line 1:",
    );
    // Block style (indentation) nested 100 deep: our own depth limit.
    let block = dir.join("block.yaml");
    let text: String = (0..100)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    std::fs::write(&block, text).unwrap();
    assert_refused(
        &convert_cmd(None, Some(&block), None, &out),
        "nested more than 64 levels deep",
    );
}

// ---- Hangs / runaway memory --------------------------------------------------------------

#[test]
fn hang_grid_sizes_are_bounded_before_allocation() {
    assert_refused(&["order", "--size", "32768"], "at most 4096");
    assert_refused(
        &["schedule", "--scale-ratio", "2", "--img-size", "524288"],
        "latent size 32768 is too large (at most 4096)",
    );
    // The stated maximum itself runs, inside the memory limit.
    let o = run_limited(&["order", "--size", "4096"], Duration::from_secs(120));
    assert_eq!(o.code, Some(0), "{o:?}");
}

// ---- Silent wrong successes --------------------------------------------------------------

#[test]
fn silent_integer_tensors_where_floats_belong() {
    let dir = scratch("hostile");
    let i32_head = tiny_model(
        &dir.join("i32-head.safetensors"),
        |_| {},
        |name, dt, _| {
            if name == "lm_head.weight" {
                *dt = safetensors::Dtype::I32;
            }
        },
    );
    assert_refused(
        &["inspect", s(&i32_head)],
        "tensor `lm_head.weight` has dtype I32",
    );
    let all_i32 = tiny_model(
        &dir.join("all-i32.safetensors"),
        |_| {},
        |_, dt, _| *dt = safetensors::Dtype::I32,
    );
    assert_refused(&["inspect", s(&all_i32)], "has dtype I32");
}

#[test]
fn silent_nonfinite_or_huge_weights() {
    let dir = scratch("hostile");
    for (what, value) in [("NaN", f32::NAN), ("inf", f32::INFINITY), ("1e38", 1e38)] {
        let p = tiny_model(
            &dir.join(format!("w-{what}.safetensors")),
            |_| {},
            |name, _, bytes| {
                if name == "llama.layers.1.attention.wqkv.weight" {
                    bytes[28..32].copy_from_slice(&value.to_le_bytes());
                }
            },
        );
        // Values are read by a load (`inspect --verify`, `sample`), not by the header check.
        let o = assert_refused(&["inspect", "--verify", s(&p)], "at flat index 7");
        assert!(
            o.last_line()
                .contains("llama.layers.1.attention.wqkv.weight")
                && o.last_line().contains(&format!("w-{what}")),
            "{o:?}"
        );
        let header_only = run_limited(&["inspect", s(&p)], Duration::from_secs(20));
        assert_eq!(header_only.code, Some(0), "{header_only:?}");
    }
}

#[test]
fn silent_rms_norm_eps_out_of_range() {
    let dir = scratch("hostile");
    for (i, eps) in [-1.0, 0.0, 1e300].into_iter().enumerate() {
        let p = tiny_model(
            &dir.join(format!("eps{i}.safetensors")),
            |j| j["rms_norm_eps"] = eps.into(),
            no_edit,
        );
        assert_refused(&["inspect", s(&p)], "rms_norm_eps");
    }
}

#[test]
fn outputs_never_write_through_or_replace_special_files() {
    let dir = scratch("hostile-out");
    // A device (as root, /dev/full used to be replaced by a regular file).
    assert_refused(
        &["init", "--preset", "tiny", "-o", "/dev/null"],
        "/dev/null: the output exists and is a device",
    );
    assert!(
        std::fs::metadata("/dev/null")
            .map(|m| !m.is_file())
            .unwrap_or(true)
    );
    // A FIFO (writing it would block forever).
    let fifo = make_fifo(&dir.join("fifo"));
    assert_refused(&["init", "--preset", "tiny", "-o", s(&fifo)], "is a FIFO");
    // A directory; and no temporary is left behind.
    let d = dir.join("a-directory");
    std::fs::create_dir_all(&d).unwrap();
    assert_refused(&["init", "--preset", "tiny", "-o", s(&d)], "is a directory");
    assert!(!dir.join("a-directory.partial").exists());
}

#[test]
fn outputs_never_overwrite_an_input() {
    let dir = scratch("hostile-same");
    let ckpt = dir.join("ckpt.pth");
    std::fs::copy(fixture("tiny.pth"), &ckpt).unwrap();
    let before = std::fs::read(&ckpt).unwrap();
    let cfg = fixture("tiny_config.yaml");
    let ae = fixture("tiny_autoencoder.yaml");
    assert_refused(
        &convert_cmd(Some(&ckpt), Some(&cfg), Some(&ae), &ckpt),
        "same file as the input",
    );
    assert_eq!(std::fs::read(&ckpt).unwrap(), before);
    // Through another name (a hard link) too.
    let link = dir.join("link.pth");
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(&ckpt, &link).unwrap();
    assert_refused(
        &convert_cmd(Some(&ckpt), Some(&cfg), Some(&ae), &link),
        "same file as the input",
    );
    // sample --save-tokens onto its own --model.
    let out = dir.join("samples");
    std::fs::create_dir_all(&out).unwrap();
    let model = tiny_model(&out.join("tokens.safetensors"), |_| {}, no_edit);
    let before = std::fs::read(&model).unwrap();
    // And with --overwrite (which removes an earlier run's files), never an input: the model
    // is named like the tokens file of a run and sits in --out.
    for flag in ["--save-tokens", "--overwrite"] {
        assert_refused(
            &[
                "sample",
                "--model",
                s(&model),
                "--labels",
                "0",
                "--out",
                s(&out),
                flag,
            ],
            "same file as the input",
        );
        assert_eq!(std::fs::read(&model).unwrap(), before, "{flag}");
    }
}

#[test]
fn failed_writes_leave_no_temporary() {
    let dir = scratch("hostile-partial");
    // The temporary's name is taken by something that is not ours: refused, left alone.
    let out = dir.join("m.safetensors");
    let partial = dir.join("m.safetensors.partial");
    std::fs::create_dir_all(&partial).unwrap();
    assert_refused(
        &["init", "--preset", "tiny", "-o", s(&out)],
        "is not a regular file",
    );
    assert!(partial.is_dir() && !out.exists());
    std::fs::remove_dir(&partial).unwrap();
    // A stale regular temporary from a killed run is replaced, and the write succeeds.
    std::fs::write(&partial, b"stale").unwrap();
    let o = run_limited(
        &["init", "--preset", "tiny", "-o", s(&out)],
        Duration::from_secs(60),
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(out.is_file() && !partial.exists());
    // A directory that is not writable: the error names the file, nothing is left.
    let ro = dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let ro_out = ro.join("m.safetensors");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let o = run_limited(
        &["init", "--preset", "tiny", "-o", s(&ro_out)],
        Duration::from_secs(60),
    );
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    // (root can write anyway; then the write must simply have succeeded.)
    if o.code != Some(0) {
        assert!(
            o.is_clean_failure() && o.last_line().contains("m.safetensors"),
            "{o:?}"
        );
        assert!(std::fs::read_dir(&ro).unwrap().next().is_none());
    }
}

#[test]
fn zip_crc32_is_checked_for_every_entry_read() {
    let dir = scratch("hostile-crc");
    let bytes = std::fs::read(fixture("tiny.pth")).unwrap();
    // Flip one byte in the middle of the archive (inside a tensor storage).
    let mut bad = bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    let ckpt = dir.join("flipped.pth");
    std::fs::write(&ckpt, &bad).unwrap();
    let out = dir.join("flipped.safetensors");
    let o = assert_refused(
        &convert_cmd(Some(&ckpt), None, None, &out),
        "is corrupt: CRC-32",
    );
    assert!(o.last_line().contains("flipped.pth") && o.last_line().contains("zip entry"));
    assert!(!out.exists());
}

// ---- Smaller -----------------------------------------------------------------------------

#[test]
fn yaml_with_a_byte_order_mark_reads() {
    let dir = scratch("hostile-bom");
    let cfg = dir.join("bom.yaml");
    let mut text = "\u{feff}".to_string();
    text.push_str(&std::fs::read_to_string(fixture("tiny_config.yaml")).unwrap());
    std::fs::write(&cfg, text).unwrap();
    let out = dir.join("bom.safetensors");
    let o = run_limited(
        &convert_cmd(None, Some(&cfg), None, &out),
        Duration::from_secs(60),
    );
    assert_eq!(o.code, Some(0), "{o:?}");
}

#[test]
fn missing_llama_config_is_named() {
    let dir = scratch("hostile-llama");
    let text = std::fs::read_to_string(fixture("tiny_config.yaml")).unwrap();
    let start = text.find("    llama_config:").unwrap();
    let end = text.find("args:").unwrap();
    let cfg = dir.join("nollama.yaml");
    std::fs::write(&cfg, format!("{}{}", &text[..start], &text[end..])).unwrap();
    assert_refused(
        &convert_cmd(None, Some(&cfg), None, &dir.join("o.safetensors")),
        "model.llama_config is missing",
    );
}

#[test]
fn bench_decode_names_an_unknown_preset() {
    assert_refused(&["bench-decode", "--preset", "foo"], "unknown preset `foo`");
}

#[test]
fn written_files_are_0644_under_umask_022() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("hostile-mode");
    let model = dir.join("m.safetensors");
    let out = dir.join("samples");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "umask 022 && \"$0\" init --preset tiny -o \"$1\" >/dev/null && \
             \"$0\" sample --model \"$1\" --labels 0 --out \"$2\" --save-tokens >/dev/null",
        )
        .arg(env!("CARGO_BIN_EXE_checkergen"))
        .arg(&model)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    for p in [
        model,
        out.join("tokens.safetensors"),
        out.join("sample_0000.png"),
        out.join("run.json"),
    ] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{}", p.display());
    }
}

#[test]
fn inputs_must_be_regular_files() {
    let dir = scratch("hostile-in");
    let fifo = make_fifo(&dir.join("in.fifo"));
    // Opening a FIFO would block forever: it is refused before it is opened.
    let o = run_limited(&["inspect", s(&fifo)], Duration::from_secs(20));
    assert!(!o.timed_out && o.is_clean_failure(), "{o:?}");
    assert!(
        o.last_line().contains("is a FIFO, not a regular file"),
        "{o:?}"
    );
    assert_refused(&["inspect", s(&dir)], "is a directory, not a regular file");
    let cfg = fixture("tiny_config.yaml");
    let ae = fixture("tiny_autoencoder.yaml");
    let out = dir.join("o.safetensors");
    assert_refused(
        &convert_cmd(Some(&fifo), Some(&cfg), Some(&ae), &out),
        "is a FIFO",
    );
    assert_refused(
        &convert_cmd(None, Some(&dir), Some(&ae), &out),
        "is a directory",
    );
    assert_refused(
        &[
            "sample",
            "--model",
            "/dev/zero",
            "--labels",
            "0",
            "--out",
            s(&dir.join("x")),
        ],
        "is a device",
    );
}

// ---- Hostile pickles stay inert ----------------------------------------------------------

/// Pickles that would run code in Python: GLOBAL, STACK_GLOBAL and INST of os.system /
/// builtins.eval / builtins.exec, called through REDUCE and BUILD. Here each is an opaque
/// value: opening works or fails cleanly, and the command's marker file never appears.
#[test]
fn hostile_pickles_stay_inert() {
    let dir = scratch("hostile-pickle");
    let marker = dir.join("pwned");
    let _ = std::fs::remove_file(&marker);
    let cmd = format!("touch {}", marker.display());
    let arg = |s: &str| {
        let mut v = vec![b'X'];
        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
        v.extend_from_slice(s.as_bytes());
        v
    };
    let py = format!("__import__('os').system('{cmd}')");
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // GLOBAL os.system + REDUCE.
    let mut p = b"cos\nsystem\n".to_vec();
    p.extend(arg(&cmd));
    p.extend_from_slice(b"\x85R");
    cases.push(("GLOBAL os.system REDUCE", p));
    // STACK_GLOBAL builtins.eval + REDUCE.
    let mut p = arg("builtins");
    p.extend(arg("eval"));
    p.push(0x93);
    p.extend(arg(&py));
    p.extend_from_slice(b"\x85R");
    cases.push(("STACK_GLOBAL builtins.eval REDUCE", p));
    // INST os system (calls the class with the marked arguments).
    let mut p = b"(".to_vec();
    p.extend(arg(&cmd));
    p.extend_from_slice(b"ios\nsystem\n");
    cases.push(("INST os.system", p));
    // BUILD on an object whose state is an exec call's result.
    let mut p = b"cbuiltins\nobject\n)R".to_vec();
    p.extend_from_slice(b"cbuiltins\nexec\n");
    p.extend(arg(&py));
    p.extend_from_slice(b"\x85Rb");
    cases.push(("BUILD with builtins.exec", p));
    for (what, inner) in cases {
        let bytes = pth_with_pickle(&model_dict_pickle(&inner));
        let path = dir.join("evil.pth");
        std::fs::write(&path, &bytes).unwrap();
        // In-process: the top level opens (the value is opaque), 'model' is not a state dict.
        let ck = PthCheckpoint::open(&path).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let e = format!("{:#}", ck.state_dict("model").unwrap_err());
        assert!(e.contains("not a state dict"), "{what}: {e}");
        // And through the CLI.
        assert_refused(
            &convert_cmd(Some(&path), None, None, &dir.join("evil.safetensors")),
            "evil.pth",
        );
        assert!(!marker.exists(), "{what} ran its command");
    }
}

/// Found by tests/fuzz_inputs.rs: a pickle whose training-only bool tensor was renamed made
/// convert keep it and write a model file the loader then refused. The converter now checks
/// every tensor it keeps as the loader does: a float dtype, finite values.
#[test]
fn converter_keeps_only_finite_float_weights() {
    let dir = scratch("hostile-convert");
    let entries = zip_entries(&std::fs::read(fixture("tiny.pth")).unwrap());
    let rezip = |name: &str, edit: &dyn Fn(&str, &mut Vec<u8>)| {
        let p = dir.join(name);
        std::fs::write(&p, rezip(&entries, edit)).unwrap();
        p
    };
    // Rename the training-only `autoenc.quantize.initialized` (a bool) so it is kept.
    let renamed = rezip("renamed.pth", &|n, d| {
        if n.ends_with("data.pkl") {
            let key = b"autoenc.quantize.initialized";
            let at = d.windows(key.len()).position(|w| w == key).unwrap();
            d[at + key.len() - 1] = b'X';
        }
    });
    let out = dir.join("o.safetensors");
    assert_refused(
        &convert_cmd(Some(&renamed), None, None, &out),
        "is bool, not a floating-point weight",
    );
    // Every storage all-ones bytes (NaN in every float): named with its index.
    let nan = rezip("nan.pth", &|n, d| {
        if n.contains("/data/") {
            d.fill(0xFF);
        }
    });
    let o = assert_refused(
        &convert_cmd(Some(&nan), None, None, &out),
        "at flat index 0",
    );
    assert!(
        o.last_line().contains("nan.pth") && o.last_line().contains("NaN"),
        "{o:?}"
    );
    assert!(!out.exists());
}

// ---- The legacy (torch < 1.6) .pth format ---------------------------------------------------

/// Open `bytes` as `name` and read every tensor of its top-level state dict; the error as
/// one string (`Ok` with the tensor count when everything reads).
fn legacy_read(bytes: &[u8], name: &str) -> Result<usize, String> {
    let p = scratch("hostile-legacy").join(name);
    std::fs::write(&p, bytes).unwrap();
    let read = || -> anyhow::Result<usize> {
        let ck = PthCheckpoint::open(&p)?;
        let sd = ck.root_state_dict()?;
        for (n, info) in &sd {
            ck.read_tensor(n, info)?;
        }
        Ok(sd.len())
    };
    read().map_err(|e| format!("{e:#}"))
}

/// A clean failure: one line that names the file.
fn assert_clean(got: Result<usize, String>, name: &str, fragment: &str, what: &str) {
    let e = got.expect_err(what);
    assert!(
        e.contains(name) && e.contains(fragment) && e.lines().count() == 1,
        "{what}: {e}"
    );
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

/// Every way the storage section and the pickles around it can lie: a clear one-line error
/// naming the file, before any allocation of the claimed size.
#[test]
fn legacy_storage_claims_are_checked() {
    let two = legacy_state_dict(&[
        ("a", "FloatStorage", "k0", 4),
        ("b", "LongStorage", "k1", 2),
    ]);
    let (a, b) = (f32_bytes(4), [7u8; 16]);
    let good = legacy_pth(&two, &["k0", "k1"], &[(4, &a), (2, &b)]);
    assert_eq!(legacy_read(&good, "good.pth"), Ok(2));
    let n = "legacy.pth";
    let case = |what: &str, bytes: Vec<u8>, fragment: &str| {
        let t = std::time::Instant::now();
        assert_clean(legacy_read(&bytes, n), n, fragment, what);
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: slow");
    };
    for count in [u64::MAX, 1 << 62, 1 << 40] {
        case(
            &format!("count {count}"),
            legacy_pth(&two, &["k0", "k1"], &[(count, &a), (2, &b)]),
            "claims",
        );
    }
    // An int64 count whose byte size overflows u64.
    case(
        "count 2^61 of int64",
        legacy_pth(&two, &["k0", "k1"], &[(4, &a), (1 << 61, &b)]),
        "claims 2305843009213693952 int64 elements",
    );
    case(
        "count above the persistent id's (the bytes are there)",
        legacy_pth(&two, &["k0", "k1"], &[(5, &a), (2, &b)]),
        "holds 5 float32 elements, but its persistent id says 4",
    );
    case(
        "count below the persistent id's",
        legacy_pth(&two, &["k0", "k1"], &[(3, &a[..12]), (2, &b)]),
        "holds 3 float32 elements, but its persistent id says 4",
    );
    let huge = legacy_state_dict(&[("a", "FloatStorage", "k0", i32::MAX as u32)]);
    case(
        "persistent id of 2^31 - 1 elements",
        legacy_pth(&huge, &["k0"], &[(i32::MAX as u64, &a)]),
        "claims",
    );
    case(
        "missing storage",
        legacy_pth(&two, &["k0"], &[(4, &a)]),
        "storage k1 is named in the pickle but missing from the storage list",
    );
    case(
        "unknown key",
        legacy_pth(&two, &["k0", "k1", "k9"], &[(4, &a), (2, &b), (1, &[0; 4])]),
        "names storage k9, which no persistent id",
    );
    case(
        "key listed twice",
        legacy_pth(&two, &["k0", "k0", "k1"], &[(4, &a), (4, &a), (2, &b)]),
        "storage k0 is listed twice",
    );
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"garbage");
    case("trailing bytes", trailing, "7 bytes of trailing data");
    let odd = legacy_state_dict(&[("a", "ComplexFloatStorage", "k0", 4)]);
    case(
        "unsupported storage type",
        legacy_pth(&odd, &["k0"], &[(4, &a)]),
        "unsupported type torch.ComplexFloatStorage",
    );
    let mut wrong_magic = good.clone();
    wrong_magic[4] ^= 1;
    case("wrong magic", wrong_magic, "not torch's magic number");
    let mut proto = good.clone();
    let at = proto.windows(3).position(|w| w == b"M\xe9\x03").unwrap();
    proto[at + 1] = 0xe8;
    case("protocol 1000", proto, "protocol version the int 1000");
    let big = good
        .windows(13)
        .position(|w| w == b"little_endian")
        .unwrap();
    let mut be = good.clone();
    be[big + "little_endian".len()] = 0x89; // NEWTRUE -> NEWFALSE
    case("big-endian sys_info", be, "big-endian");
    // The storage list is not a list.
    let mut p = legacy_header();
    p.extend_from_slice(&two);
    p.extend_from_slice(b"\x80\x02K\x05.");
    case("storage list an int", p, "the storage list is the int 5");
    // A view larger than its storage (an int64 one: the message counts int64 elements).
    let mut short = legacy_state_dict(&[("b", "LongStorage", "k1", 2)]);
    let at = short
        .windows(6)
        .position(|w| w == b"J\x02\x00\x00\x00\x85")
        .unwrap();
    short[at + 1] = 3; // size (3,) over a 2-element storage
    case(
        "int64 view past its storage",
        legacy_pth(&short, &["k1"], &[(2, &b)]),
        "needs 3 elements but storage k1 holds 2 int64 elements (16 bytes)",
    );
    // No pickle is ever executed: a REDUCE of os.system in the object is an opaque value.
    let mut evil = b"\x80\x02}(".to_vec();
    evil.extend(pickle_str("x"));
    evil.extend_from_slice(b"cos\nsystem\n");
    evil.extend(pickle_str("touch /tmp/checkergen-pwned"));
    evil.extend_from_slice(b"\x85Ru.");
    assert_eq!(legacy_read(&legacy_pth(&evil, &[], &[]), "evil.pth"), Ok(0));
}

/// The zip format's storage view message also counts elements of the storage's own dtype
/// (issue 22 item 8: an int64 storage's element count was not its bytes / 2).
#[test]
fn zip_int64_view_past_its_storage_counts_int64_elements() {
    // {'model': {'w': _rebuild_tensor_v2(LongStorage '0' of 5, 0, (5,), (1,), ...)}} with
    // the storage entry holding 2 elements (16 bytes).
    let mut p = b"\x80\x02}X\x05\x00\x00\x00model}(X\x01\x00\x00\x00w".to_vec();
    let t = legacy_tensor_ops("LongStorage", "0", 5);
    // The zip format's persistent id has no view_metadata: drop the `N` before `tQ`.
    let at = t.windows(3).position(|w| w == b"NtQ").unwrap();
    p.extend_from_slice(&t[..at]);
    p.extend_from_slice(&t[at + 1..]);
    p.extend_from_slice(b"us.");
    let bytes = zip64(&[
        ("ck/data.pkl", &p, None),
        ("ck/byteorder", b"little", None),
        ("ck/data/0", &[1u8; 16], None),
    ]);
    let path = scratch("hostile").join("short-int64.pth");
    std::fs::write(&path, bytes).unwrap();
    let ck = PthCheckpoint::open(&path).unwrap();
    let sd = ck.state_dict("model").unwrap();
    let e = format!("{:#}", ck.read_tensor("w", &sd["w"]).unwrap_err());
    assert!(
        e.contains("needs 5 elements but ck/data/0 holds 2 int64 elements (16 bytes)"),
        "{e}"
    );
}

/// Every prefix of a legacy file fails cleanly (the format fixes the file's length), and
/// every single-byte change opens or fails cleanly: no panic, one line naming the file.
#[test]
fn legacy_truncations_and_byte_flips() {
    let clean = std::fs::read(fixture("pair_legacy.pth")).unwrap();
    let t = std::time::Instant::now();
    for cut in 0..clean.len() {
        assert_clean(
            legacy_read(&clean[..cut], "cut.pth"),
            "cut.pth",
            "",
            &format!("truncated to {cut}"),
        );
    }
    let mut flipped_ok = 0;
    for at in 0..clean.len() {
        // One flip per byte, the mask cycling over a low bit, the sign bit, all bits.
        let mask = [0x01u8, 0x80, 0xff][at % 3];
        let mut b = clean.clone();
        b[at] ^= mask;
        match legacy_read(&b, "flip.pth") {
            Ok(_) => flipped_ok += 1,
            Err(e) => assert!(
                e.contains("flip.pth") && e.lines().count() == 1,
                "flip {mask:#x} at {at}: {e}"
            ),
        }
    }
    println!(
        "pair_legacy.pth: {} prefixes refused, {} of {} byte flips still read, {:.1} s",
        clean.len(),
        flipped_ok,
        clean.len(),
        t.elapsed().as_secs_f64()
    );
}

/// Recursion bombs and huge length claims in a legacy file's pickles: on a thread with a
/// small stack, a clean error or an empty state dict, no allocation of the claimed size.
#[test]
fn legacy_pickle_bombs() {
    let depth = 1_000_000;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for (what, ops) in [
        ("list", nested_list_ops(depth)),
        ("tuple", nested_tuple_ops(depth)),
        ("dict", nested_dict_ops(depth)),
    ] {
        let mut main = b"\x80\x02".to_vec();
        main.extend(ops);
        main.push(b'.');
        cases.push((what, legacy_pth(&main, &[], &[])));
    }
    // BINUNICODE8 / BINBYTES8 claiming 2^60 bytes, in the object and in the storage list.
    let mut main = b"\x80\x02\x8d".to_vec();
    main.extend_from_slice(&(1u64 << 60).to_le_bytes());
    cases.push(("huge string", legacy_pth(&main, &[], &[])));
    let mut p = legacy_header();
    p.extend_from_slice(b"\x80\x02}.\x80\x02\x8e");
    p.extend_from_slice(&(1u64 << 60).to_le_bytes());
    cases.push(("huge bytes in the storage list", p));
    for (what, bytes) in cases {
        let got = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || legacy_read(&bytes, "bomb.pth"))
            .unwrap()
            .join()
            .unwrap_or_else(|_| panic!("{what} crashed the reader"));
        match got {
            Ok(n) => assert_eq!(n, 0, "{what}"),
            Err(e) => assert!(
                e.contains("bomb.pth") && e.lines().count() == 1,
                "{what}: {e}"
            ),
        }
    }
}
