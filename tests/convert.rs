//! The .pth reader and the checkpoint converter on the fixtures of tools/make_pth_fixture.py:
//! a tiny model with the reference's complete tensor list, saved in torch.save's format.
//! Values are checked against tests/fixtures/pth/tiny_reference.json, which the script wrote
//! from the files as it read them back with Python's zipfile and pickle.

mod common;

use checkergen::io::convert::{
    ConvertOptions, ConvertSummary, convert, expected_tensors, is_encoder_tensor, is_training_only,
    model_config_from_yaml,
};
use checkergen::io::pth::{PthCheckpoint, PthDtype, read_state_dict};
use checkergen::model::config::{CONFIG_METADATA_KEY, DecoderConfig, ModelConfig};
use checkergen::model::file::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The whole error (every cause) of converting with `opts`, which must fail.
fn failure(opts: &ConvertOptions) -> String {
    format!("{:#}", convert(opts).unwrap_err())
}

/// `err` says every one of `parts`.
fn assert_says(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "{err}\n(lacks {part:?})");
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("convert-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny_reference.json")).unwrap()).unwrap()
}

/// Convert fixture `checkpoint` with the tiny configs into `out` ([`ConvertOptions::new`]).
fn options(checkpoint: &str, out: &str) -> ConvertOptions {
    ConvertOptions::new(
        fixture(checkpoint),
        fixture("tiny_config.yaml"),
        fixture("tiny_autoencoder.yaml"),
        tmp(out),
    )
}

struct Out {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn read_output(path: &Path) -> (BTreeMap<String, Out>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let values =
            checkergen::model::file::view_to_f32(&name, view.dtype(), view.data()).unwrap();
        out.insert(
            name,
            Out {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    (out, metadata)
}

/// sum and sum of v[i]*(i%13+1), in f64 (exact for these fixtures' values).
fn checksums(values: &[f32]) -> (f64, f64) {
    let sum = values.iter().map(|&v| v as f64).sum();
    let wsum = values
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 * ((i % 13) + 1) as f64)
        .sum();
    (sum, wsum)
}

/// Every tensor of `expected` (name -> [dtype, shape, sum, wsum, first]) is in `out` with the
/// same shape and values, and `out` has nothing else besides the VQ encoder (which the
/// fixture reference predates; its names and shapes are checked against `expected_tensors`).
fn assert_matches(out: &BTreeMap<String, Out>, expected: &BTreeMap<String, &Value>, what: &str) {
    let names: Vec<&String> = out.keys().filter(|k| !is_encoder_tensor(k)).collect();
    let want: Vec<&String> = expected.keys().collect();
    assert_eq!(names, want, "{what}: tensor names");
    for (name, e) in expected {
        let t = &out[name.as_str()];
        let shape: Vec<usize> = e[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{what}: {name} shape");
        let (sum, wsum) = checksums(&t.values);
        assert_eq!(sum, e[2].as_f64().unwrap(), "{what}: {name} sum");
        assert_eq!(wsum, e[3].as_f64().unwrap(), "{what}: {name} weighted sum");
        for (i, v) in e[4].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                t.values[i] as f64,
                v.as_f64().unwrap(),
                "{what}: {name}[{i}]"
            );
        }
    }
}

fn section<'a>(reference: &'a Value, file: &str, key: &str) -> BTreeMap<String, &'a Value> {
    reference[file][key]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v))
        .collect()
}

fn expected_config() -> ModelConfig {
    serde_json::from_value(serde_json::json!({
        "img_size": 16, "scale_ratio": 2.0, "scale_min_size": 1, "class_cond": true,
        "num_classes": 4, "use_head_mlp": false, "num_mixing_layers": 2, "hidden_size": 32,
        "num_heads": 2, "num_layers": 2, "ffn_dim": 256, "rms_norm_eps": 1e-6,
        "steps_per_scale": 8,
        "decoder": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 32,
                    "embed_dim": 8, "n_embed": 16, "normalize": true}
    }))
    .unwrap()
}

fn run(
    opts: &ConvertOptions,
) -> (
    ConvertSummary,
    BTreeMap<String, Out>,
    BTreeMap<String, String>,
) {
    let summary = convert(opts).unwrap_or_else(|e| panic!("convert failed: {e:#}"));
    let (out, meta) = read_output(&opts.output);
    (summary, out, meta)
}

#[test]
fn converts_model_f32_with_reference_values_and_metadata() {
    let r = reference();
    let opts = options("tiny.pth", "tiny_f32.safetensors");
    let (summary, out, meta) = run(&opts);
    assert_matches(
        &out,
        &section(&r, "tiny.pth", "model"),
        "tiny.pth model f32",
    );
    assert!(out.values().all(|t| t.dtype == safetensors::Dtype::F32));

    // Names and shapes are exactly what the configuration predicts.
    let config: ModelConfig = serde_json::from_str(&meta[CONFIG_METADATA_KEY]).unwrap();
    assert_eq!(config, expected_config());
    let predicted: BTreeMap<String, Vec<usize>> =
        expected_tensors(&config).unwrap().into_iter().collect();
    let got: BTreeMap<String, Vec<usize>> = out
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    assert_eq!(got, predicted);

    assert_eq!(meta["format"], "checkergen-v1");
    assert_eq!(meta["source"], "tiny.pth");
    assert_eq!(meta["source_state_dict"], "model");
    assert_eq!(summary.config, config);
    assert_eq!(summary.scale_sizes, vec![1, 2, 4, 8]);
    assert_eq!(summary.num_tokens, 85);
    assert_eq!(summary.tensors_written, out.len());
    assert_eq!(
        summary.parameters,
        out.values().map(|t| t.values.len()).sum::<usize>()
    );
    assert_eq!(
        summary.output_bytes,
        std::fs::metadata(&opts.output).unwrap().len()
    );
    assert_eq!(summary.autoenc_source, "tiny.pth");
    assert!(summary.unexpected_tensors.is_empty());
    // Skipped: cluster_usage_train, quantize.initialized (the encoder is kept).
    let all = PthCheckpoint::open(fixture("tiny.pth"))
        .unwrap()
        .state_dict("model")
        .unwrap();
    assert_eq!(
        summary.tensors_skipped,
        all.keys().filter(|k| is_training_only(k)).count()
    );
    assert_eq!(summary.tensors_skipped + summary.tensors_written, all.len());
    let text = summary.to_string();
    for fragment in [
        "tiny.pth ['model']",
        "hidden 32, 2 layers, 2 heads, ffn 256",
        "[1, 2, 4, 8] (85 tokens",
        "f32",
    ] {
        assert!(
            text.contains(fragment),
            "summary lacks {fragment:?}:\n{text}"
        );
    }
    assert!(!tmp("tiny_f32.safetensors.partial").exists());
    // Converting again gives the same bytes (issue 22 item 9: shards sampled from two copies
    // of one checkpoint must merge).
    let again = options("tiny.pth", "tiny_f32_again.safetensors");
    run(&again);
    assert!(
        std::fs::read(&opts.output).unwrap() == std::fs::read(&again.output).unwrap(),
        "two conversions of one checkpoint differ in bytes"
    );
}

#[test]
fn converts_ema_weights_in_f32_and_bf16() {
    let r = reference();
    let (_, f32_out, meta) = run(&ConvertOptions {
        ema: true,
        ..options("tiny.pth", "tiny_ema_f32.safetensors")
    });
    assert_matches(
        &f32_out,
        &section(&r, "tiny.pth", "model_ema"),
        "tiny.pth model_ema f32",
    );
    assert_eq!(meta["source_state_dict"], "model_ema");
    // EMA weights differ from the model's for the transformer.
    let model = section(&r, "tiny.pth", "model");
    let ema = section(&r, "tiny.pth", "model_ema");
    assert_ne!(
        model["llama.layers.0.attention.wqkv.weight"],
        ema["llama.layers.0.attention.wqkv.weight"]
    );

    let (summary, bf16_out, _) = run(&ConvertOptions {
        ema: true,
        dtype: Dtype::Bf16,
        ..options("tiny.pth", "tiny_ema_bf16.safetensors")
    });
    assert_eq!(summary.dtype, Dtype::Bf16);
    assert_eq!(
        bf16_out.keys().collect::<Vec<_>>(),
        f32_out.keys().collect::<Vec<_>>()
    );
    for (name, t) in &bf16_out {
        assert_eq!(t.dtype, safetensors::Dtype::BF16, "{name}");
        let f = &f32_out[name];
        assert_eq!(t.shape, f.shape);
        for (a, b) in t.values.iter().zip(&f.values) {
            assert_eq!(
                a.to_bits(),
                half::bf16::from_f32(*b).to_f32().to_bits(),
                "{name}: bf16 rounding"
            );
        }
    }
}

#[test]
fn converts_model_bf16_keeping_bf16_sources_exact() {
    let r = reference();
    let (_, out, _) = run(&ConvertOptions {
        dtype: Dtype::Bf16,
        ..options("tiny.pth", "tiny_bf16.safetensors")
    });
    let model = section(&r, "tiny.pth", "model");
    // empty_token_emb is bfloat16 in the checkpoint: copied exactly.
    let t = &out["empty_token_emb"];
    assert_eq!(model["empty_token_emb"][0], "bfloat16");
    assert_eq!(
        checksums(&t.values).0,
        model["empty_token_emb"][2].as_f64().unwrap()
    );
    assert!(out.values().all(|t| t.dtype == safetensors::Dtype::BF16));
}

#[test]
fn takes_the_autoencoder_from_a_separate_vq_checkpoint() {
    let r = reference();
    let vq = section(&r, "tiny_vq.pth", "state_dict");
    let mut expected = section(&r, "tiny_noae.pth", "model");
    expected.extend(vq.clone());
    let (summary, out, meta) = run(&ConvertOptions {
        autoenc_checkpoint: Some(fixture("tiny_vq.pth")),
        ..options("tiny_noae.pth", "noae_vq.safetensors")
    });
    assert_matches(&out, &expected, "tiny_noae.pth + tiny_vq.pth");
    assert_eq!(summary.autoenc_source, "tiny_vq.pth");
    assert_eq!(meta["autoenc_source"], "tiny_vq.pth");
    // The Lightning checkpoint's loss.* tensor is not taken.
    assert!(!out.keys().any(|k| k.contains("loss")));

    // Given explicitly, the VQ checkpoint's weights replace the AR checkpoint's autoenc.*.
    let mut expected = section(&r, "tiny.pth", "model");
    expected.retain(|k, _| !k.starts_with("autoenc."));
    expected.extend(vq);
    let (_, out, _) = run(&ConvertOptions {
        autoenc_checkpoint: Some(fixture("tiny_vq.pth")),
        ..options("tiny.pth", "tiny_vq_override.safetensors")
    });
    assert_matches(&out, &expected, "tiny.pth + tiny_vq.pth");
}

#[test]
fn reader_keeps_dtypes_and_materializes_views() {
    let r = reference();
    let model = section(&r, "tiny.pth", "model");
    let sd = read_state_dict(fixture("tiny.pth"), "model").unwrap();
    let encoder = sd.keys().filter(|k| is_encoder_tensor(k)).count();
    assert_eq!(sd.len(), model.len() + count_training_only(&sd) + encoder);
    assert_eq!(sd["empty_token_emb"].dtype, PthDtype::BF16);
    assert_eq!(sd["empty_token_pos"].dtype, PthDtype::F16);
    assert_eq!(sd["lm_head.weight"].dtype, PthDtype::F32);
    let init = &sd["autoenc.quantize.initialized"];
    assert_eq!(
        (init.dtype, init.shape.clone(), init.data.clone()),
        (PthDtype::Bool, vec![], vec![1])
    );
    for (name, e) in &model {
        let (sum, wsum) = checksums(&sd[name.as_str()].to_f32());
        assert_eq!(
            (sum, wsum),
            (e[2].as_f64().unwrap(), e[3].as_f64().unwrap()),
            "{name}"
        );
    }

    // The layouts the fixture was built with.
    let ck = PthCheckpoint::open(fixture("tiny.pth")).unwrap();
    assert_eq!(
        ck.top_level_keys(),
        ["model", "model_ema", "optimizer", "epoch", "scaler", "args"]
    );
    let infos = ck.state_dict("model").unwrap();
    let lm = &infos["lm_head.weight"];
    assert_eq!(
        (lm.shape.clone(), lm.stride.clone(), lm.is_contiguous()),
        (vec![16, 32], vec![1, 16], false)
    );
    let (a, b) = (
        &infos["src_latents_proj.bias"],
        &infos["combine_inputs.bias"],
    );
    assert_eq!(a.storage_key, b.storage_key);
    assert_eq!((a.offset, b.offset), (0, 32));
    let (w1, w3) = (
        &infos["llama.layers.0.feed_forward.w1.weight"],
        &infos["llama.layers.0.feed_forward.w3.weight"],
    );
    assert_eq!(w1.storage_key, w3.storage_key);
    assert_ne!(w1.offset, w3.offset);
    // EMA parameters were saved as torch.nn.Parameter; buffers share the model's storage.
    let ema = ck.state_dict("model_ema").unwrap();
    assert_eq!(ema.len(), infos.len());
    assert_eq!(
        ema["autoenc.cluster_usage_train"],
        infos["autoenc.cluster_usage_train"]
    );
    assert_ne!(
        ema["llama.norm.weight"].storage_key,
        infos["llama.norm.weight"].storage_key
    );
}

fn count_training_only(sd: &BTreeMap<String, checkergen::io::pth::PthTensor>) -> usize {
    sd.keys().filter(|k| is_training_only(k)).count()
}

#[test]
fn reader_reads_only_the_selected_storages() {
    // tiny_broken.pth lacks its optimizer's storages in the archive: reading the model works
    // because nothing else is touched.
    let ck = PthCheckpoint::open(fixture("tiny_broken.pth")).unwrap();
    assert!(ck.has_entry("optimizer"));
    let sd = read_state_dict(fixture("tiny_broken.pth"), "model").unwrap();
    assert!(sd.contains_key("class_embeddings.weight"));
    // A bare state dict is read directly; a missing entry names the top-level keys.
    assert_says(
        &format!("{:#}", ck.state_dict("model_ema").unwrap_err()),
        &["no 'model_ema' entry", "model, optimizer, epoch"],
    );
}

/// Convert with the given YAML texts (written to temporary files) and return the error.
fn convert_err(
    ckpt: &str,
    autoenc: Option<&str>,
    model_yaml: &str,
    ae_yaml: &str,
    tag: &str,
) -> String {
    let my = tmp(&format!("{tag}_config.yaml"));
    let ay = tmp(&format!("{tag}_autoencoder.yaml"));
    std::fs::write(&my, model_yaml).unwrap();
    std::fs::write(&ay, ae_yaml).unwrap();
    let mut opts = ConvertOptions {
        autoenc_checkpoint: autoenc.map(fixture),
        ..options(ckpt, &format!("{tag}.safetensors"))
    };
    opts.config_yaml = my;
    opts.autoenc_yaml = ay;
    let _ = std::fs::remove_file(&opts.output);
    let err = convert(&opts).map(|_| ()).expect_err(tag);
    assert!(
        !opts.output.exists(),
        "{tag}: an output file was written despite the error"
    );
    format!("{err:#}")
}

fn yaml_texts() -> (String, String) {
    (
        std::fs::read_to_string(fixture("tiny_config.yaml")).unwrap(),
        std::fs::read_to_string(fixture("tiny_autoencoder.yaml")).unwrap(),
    )
}

#[test]
fn yaml_and_tensor_disagreements_name_the_key() {
    let (m, a) = yaml_texts();
    let model_cases = [
        (
            "hidden_size: 32",
            "hidden_size: 48",
            &[
                "_config.yaml: model.llama_config.hidden_size is 48",
                "class_embeddings.weight",
            ][..],
        ),
        (
            "intermediate_size: 64",
            "intermediate_size: 300",
            &[
                "model.llama_config.intermediate_size",
                "512",
                "w1.weight has shape [256, 32]",
            ],
        ),
        (
            "num_attention_heads: 2",
            "num_attention_heads: 4",
            &["model.llama_config.num_attention_heads is 4", "head_dim 16"],
        ),
        (
            "num_hidden_layers: 2",
            "num_hidden_layers: 3",
            &["model.llama_config.num_hidden_layers is 3"],
        ),
        (
            "num_classes: 4",
            "num_classes: 5",
            &["model.num_classes is 5"],
        ),
        (
            "scale_ratio: 2",
            "scale_ratio: 3",
            &[
                "scale_ratio",
                "[1, 3, 8] = 74 tokens",
                "embed_positions.weight",
            ],
        ),
        (
            "use_head_mlp: false",
            "use_head_mlp: true",
            &["model.use_head_mlp", "has no head_mlp"],
        ),
        (
            "num_mixing_layers: 2",
            "num_mixing_layers: 1",
            &["model.num_mixing_layers is 1"],
        ),
    ];
    for (from, to, fragments) in model_cases {
        assert!(m.contains(from), "fixture lacks {from}");
        let err = convert_err(
            "tiny.pth",
            None,
            &m.replace(from, to),
            &a,
            &to.replace([':', ' '], "_"),
        );
        for f in fragments {
            assert!(err.contains(f), "{to}: {err}");
        }
    }
    let ae_cases = [
        (
            "n_embed: 16",
            "n_embed: 32",
            &["_autoencoder.yaml: model.params.n_embed is 32"][..],
        ),
        (
            "embed_dim: 8",
            "embed_dim: 4",
            &["model.params.embed_dim is 4"],
        ),
        (
            "z_channels: 32",
            "z_channels: 64",
            &["model.params.ddconfig.z_channels is 64"],
        ),
        (
            "ch_mult: [1, 2]",
            "ch_mult: [1, 1]",
            &["ch * ch_mult", "[32, 32]", "[64, 32]"],
        ),
        (
            "ch_mult: [1, 2]",
            "ch_mult: [1, 2, 2]",
            &["ch_mult (its length) is 3"],
        ),
        (
            "num_res_blocks: 1",
            "num_res_blocks: 2",
            &["model.params.ddconfig.num_res_blocks is 2"],
        ),
        (
            "normalize: true",
            "normalize: false",
            &["model.params.normalize is false"],
        ),
    ];
    for (from, to, fragments) in ae_cases {
        assert!(a.contains(from), "fixture lacks {from}");
        let tag = format!("ae_{}", to.replace([':', ' ', '[', ']', ','], "_"));
        let err = convert_err("tiny.pth", None, &m, &a.replace(from, to), &tag);
        for f in fragments {
            assert!(err.contains(f), "{to}: {err}");
        }
    }
    // `ddconfig: {}` means the reference's defaults (ch 128, z_channels 256, ...).
    let start = a.find("    ddconfig:").unwrap();
    let end = a.find("\ndata:").unwrap();
    let defaults = format!("{}    ddconfig: {{}}\n{}", &a[..start], &a[end..]);
    assert_says(
        &convert_err("tiny.pth", None, &m, &defaults, "ae_defaults"),
        &["model.params.ddconfig.z_channels is 256"],
    );
    // The model config's autoenc.params override the autoencoder config, and errors say so.
    let over = m.replace(
        "requant_pyramid_levels: -1",
        "requant_pyramid_levels: -1\n            n_embed: 8",
    );
    assert_says(
        &convert_err("tiny.pth", None, &over, &a, "override"),
        &["_config.yaml: model.autoenc.params.n_embed is 8"],
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let (m, a) = yaml_texts();
    // Not a zip.
    let garbage = tmp("garbage.pth");
    std::fs::write(
        &garbage,
        b"definitely not a checkpoint, only forty-something bytes",
    )
    .unwrap();
    let mut opts = options("tiny.pth", "never.safetensors");
    opts.checkpoint = garbage;
    assert_says(
        &failure(&opts),
        &["garbage.pth", "not a readable zip archive"],
    );
    // A pickle with an unknown opcode.
    assert_says(
        &convert_err("tiny_bad_opcode.pth", None, &m, &a, "bad_opcode"),
        &[
            "tiny_bad_opcode.pth",
            "unknown pickle opcode 0xff at byte offset 5",
        ],
    );
    // No 'model' entry (a Lightning VQ checkpoint given as the AR checkpoint).
    assert_says(
        &convert_err("tiny_vq.pth", None, &m, &a, "no_model"),
        &["tiny_vq.pth: no 'model' entry", "state_dict"],
    );
    // --ema on a checkpoint saved without EMA.
    let opts = ConvertOptions {
        autoenc_checkpoint: Some(fixture("tiny_vq.pth")),
        ema: true,
        ..options("tiny_noae.pth", "never.safetensors")
    };
    assert_says(&failure(&opts), &["'model_ema' is None", "without --ema"]);
    // No autoencoder weights and no --autoenc-checkpoint.
    assert_says(
        &convert_err("tiny_noae.pth", None, &m, &a, "no_ae"),
        &[
            "tiny_noae.pth",
            "no autoencoder weights",
            "--autoenc-checkpoint",
        ],
    );
    // A missing tensor.
    assert_says(
        &convert_err("tiny_broken.pth", Some("tiny_vq.pth"), &m, &a, "missing"),
        &["tiny_broken.pth ['model']: missing tensor 'lm_head.weight'"],
    );
    // YAML that is not the reference's config, or not YAML the reader accepts.
    assert_says(
        &convert_err("tiny.pth", None, "args:\n  lr: 1\n", &a, "no_model_section"),
        &["no 'model:' mapping"],
    );
    assert_says(
        &convert_err(
            "tiny.pth",
            None,
            &m.replace("    img_size: 16", "    img_size: &a 16"),
            &a,
            "anchor",
        ),
        &["anchor_config.yaml: YAML line 4: anchors"],
    );
    assert_says(
        &convert_err(
            "tiny.pth",
            None,
            &m.replace("    img_size: 16", "    img_size: sixteen"),
            &a,
            "not_int",
        ),
        &["model.img_size must be a non-negative integer, found string \"sixteen\""],
    );
    let mut opts = options("tiny.pth", "never.safetensors");
    opts.config_yaml = fixture("does_not_exist.yaml");
    assert_says(&failure(&opts), &["does_not_exist.yaml: cannot read"]);
}

/// The fixture configs (the reference's nested layout: `model: {autoenc: {params: ...},
/// llama_config: {...}}`, `model: {params: {ddconfig: {...}}}`) and the golden autoencoder
/// config read into the configuration their tensors have.
#[test]
fn reference_config_files_read_into_model_config() {
    let c = model_config_from_yaml(
        &fixture("tiny_config.yaml"),
        &fixture("tiny_autoencoder.yaml"),
    )
    .unwrap();
    let tiny = ModelConfig {
        img_size: 16,
        scale_ratio: 2.0,
        scale_min_size: 1,
        class_cond: true,
        num_classes: 4,
        use_head_mlp: false,
        num_mixing_layers: 2,
        hidden_size: 32,
        num_heads: 2,
        num_layers: 2,
        ffn_dim: 256,
        rms_norm_eps: 1e-6,
        steps_per_scale: 8,
        decoder: DecoderConfig {
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            z_channels: 32,
            embed_dim: 8,
            n_embed: 16,
            normalize: true,
        },
    };
    assert_eq!(c, tiny);

    // The golden models' autoencoder config reads into the decoder the golden tests use.
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let d = model_config_from_yaml(
        &fixture("tiny_config.yaml"),
        &golden.join("autoencoder_small.yaml"),
    )
    .unwrap()
    .decoder;
    assert_eq!(d, common::golden_decoder_config());
}

/// The YAML of the released L models (same keys as the reference's configs/config_256_L.yaml
/// and its autoencoder config with `ddconfig: {}`) gives the L configuration.
#[test]
fn released_l_model_yaml_layout() {
    let model = "model:\n    img_size: 256\n    scale_ratio: RATIO\n    class_cond: true\n    num_classes: 1000\n    \
                 random_block_size: true\n    use_head_mlp: false\n    num_mixing_layers: 2\n    #single_scale: false\n\n    \
                 autoenc:\n        config_path: pretrained_models/autoenc/autoencoder_config.yaml\n        \
                 checkpoint_path: pretrained_models/autoenc/checkpoint.pth\n        params:\n            \
                 requant_pyramid_levels: -1\n\n    llama_config:\n        hidden_size: 1024\n        \
                 intermediate_size: 3072\n        num_attention_heads: 16\n        num_hidden_layers: 20\n\n\
                 args:\n    lr: 5.e-5\n    lr_step_epochs: [200]\n";
    let ae = "model:\n  target: cbgen.autoencoder.VQModel\n  init:\n    ignore_keys: [\"quantize.\"]\n  params:\n    \
              monitor: \"val/qloss\"\n    embed_dim: 8\n    n_embed: 4096\n    normalize: true\n    \
              requant_pyramid_levels: 1\n    resolution: 256\n    ddconfig: {}\n";
    let ae_path = tmp("l_autoencoder.yaml");
    std::fs::write(&ae_path, ae).unwrap();
    for (ratio, sizes) in [("2", vec![1, 2, 4, 8, 16]), ("4", vec![1, 4, 16])] {
        let path = tmp(&format!("l_{ratio}x.yaml"));
        std::fs::write(&path, model.replace("RATIO", ratio)).unwrap();
        let c = model_config_from_yaml(&path, &ae_path).unwrap();
        c.validate().unwrap();
        assert_eq!(
            (c.hidden_size, c.num_heads, c.num_layers, c.ffn_dim),
            (1024, 16, 20, 3072)
        );
        assert_eq!(
            (
                c.num_classes,
                c.num_mixing_layers,
                c.use_head_mlp,
                c.steps_per_scale
            ),
            (1000, 2, false, 8)
        );
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(
            (
                c.decoder.ch,
                c.decoder.ch_mult.clone(),
                c.decoder.num_res_blocks
            ),
            (128, vec![1, 1, 2, 2, 4], 2)
        );
        assert_eq!(
            (
                c.decoder.z_channels,
                c.decoder.n_embed,
                c.decoder.embed_dim,
                c.decoder.normalize
            ),
            (256, 4096, 8, true)
        );
        assert_eq!(c.latent_size(), 16);
        let expected =
            checkergen::order::scale_sizes(c.latent_size(), c.scale_ratio, c.scale_min_size)
                .unwrap();
        assert_eq!(expected, sizes);
        // The transformer-side parameter count of SPEC.md section 8 (about 368 M).
        let transformer: usize = expected_tensors(&c)
            .unwrap()
            .iter()
            .filter(|(n, _)| !n.starts_with("autoenc."))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert!(
            (360_000_000..380_000_000).contains(&transformer),
            "{transformer}"
        );
    }
}

/// `expected_tensors` agrees with the golden model's state dict (minus training-only tensors).
#[test]
fn expected_tensors_match_the_golden_state_dict() {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/golden/public/A_ratio2/config.json");
    if !golden.exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but {} is missing", golden.display());
        }
        eprintln!("SKIPPED: {} not found", golden.display());
        return;
    }
    let g: Value = serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
    let args = &g["ar_constructor_args"];
    let llama = &args["llama_config"];
    let u = |v: &Value| v.as_u64().unwrap() as usize;
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "img_size": args["img_size"], "scale_ratio": args["scale_ratio"],
        "scale_min_size": args["scale_min_size"], "class_cond": true,
        "num_classes": args["num_classes"], "use_head_mlp": args["use_head_mlp"],
        "num_mixing_layers": args["num_mixing_layers"], "hidden_size": llama["hidden_size"],
        "num_heads": llama["num_attention_heads"], "num_layers": llama["num_hidden_layers"],
        "ffn_dim": g["ffn_hidden_dim_actual"], "rms_norm_eps": 1e-6, "steps_per_scale": 4,
        "decoder": {"ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 64,
                    "embed_dim": g["code_dim"], "n_embed": g["codebook_size"], "normalize": true}
    }))
    .unwrap();
    assert_eq!(
        checkergen::io::convert::reference_ffn_dim(
            u(&llama["hidden_size"]),
            Some(u(&llama["intermediate_size"]))
        )
        .unwrap(),
        config.ffn_dim
    );
    let golden_keys: BTreeMap<String, Vec<usize>> = g["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_string(),
                x["shape"].as_array().unwrap().iter().map(u).collect(),
            )
        })
        .filter(|(n, _): &(String, Vec<usize>)| !is_training_only(n))
        .collect();
    let mine: BTreeMap<String, Vec<usize>> =
        expected_tensors(&config).unwrap().into_iter().collect();
    assert_eq!(mine, golden_keys);
}

/// `--no-encoder` drops `autoenc.encoder.*` and `autoenc.quant_conv.*`: the file still loads
/// (and samples), and the commands that need the encoder refuse it in one line.
#[test]
fn no_encoder_drops_the_encoder_and_the_file_still_loads() {
    let mut opts = options("tiny.pth", "tiny_noenc.safetensors");
    let full = convert(&options("tiny.pth", "tiny_enc.safetensors")).unwrap();
    opts.no_encoder = true;
    let summary = convert(&opts).unwrap();
    let (out, _) = read_output(&opts.output);
    assert!(
        out.keys()
            .all(|k| !checkergen::io::convert::is_encoder_tensor(k))
    );
    assert!(summary.tensors_written < full.tensors_written);
    let with = checkergen::model::Model::load(&tmp("tiny_enc.safetensors")).unwrap();
    assert!(with.encoder.is_some());
    let without = checkergen::model::Model::load(&opts.output).unwrap();
    let err = without.encoder().err().unwrap().to_string();
    assert!(
        err.contains("no VQ encoder") && !err.contains('\n'),
        "{err}"
    );
}
