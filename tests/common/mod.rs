//! Shared helpers for integration tests: the one RNG, errors and the per-op report, poison
//! and 16-bit helpers, layout transposes, the GPU (or a clear failure), golden data, fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

/// The golden folder `../shared/golden` beside the checkout.
///
/// Missing-golden rule: when it is absent, a test that needs it fails under CI (`CI=true`)
/// and otherwise skips with a loud message (the caller returns on `None`).
pub fn golden_dir() -> Option<PathBuf> {
    // CHECKERGEN_GOLDEN overrides the location (GPU test bundles carry their own copy).
    let dir = match std::env::var_os("CHECKERGEN_GOLDEN") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"),
    };
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "CI=true but the golden folder {} is missing; CI must have ../shared beside the clone",
            dir.display()
        );
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED: {} not found; golden parity NOT checked !!!!!!!!\n",
        dir.display()
    );
    None
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

use checkergen::model::config::{DecoderConfig, ModelConfig};
use checkergen::model::file::{TensorMap, load_safetensors};
use std::path::Path;

/// The golden configurations: directory name and scale ratio.
pub const GOLDEN_CONFIGS: [(&str, f64); 3] =
    [("A_ratio2", 2.0), ("B_ratio4", 4.0), ("C_ratio3", 3.0)];

/// ModelConfig of a golden configuration, from its config.json (constructor arguments) and
/// the small autoencoder of golden/autoencoder_small.yaml.
pub fn golden_model_config(cfg_dir: &Path) -> ModelConfig {
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg_dir.join("config.json")).unwrap()).unwrap();
    let a = &j["ar_constructor_args"];
    let l = &a["llama_config"];
    ModelConfig {
        img_size: a["img_size"].as_u64().unwrap() as usize,
        scale_ratio: a["scale_ratio"].as_f64().unwrap(),
        scale_min_size: a["scale_min_size"].as_u64().unwrap() as usize,
        class_cond: a["class_cond"].as_bool().unwrap(),
        num_classes: a["num_classes"].as_u64().unwrap() as usize,
        use_head_mlp: a["use_head_mlp"].as_bool().unwrap(),
        num_mixing_layers: a["num_mixing_layers"].as_u64().unwrap() as usize,
        hidden_size: l["hidden_size"].as_u64().unwrap() as usize,
        num_heads: l["num_attention_heads"].as_u64().unwrap() as usize,
        num_layers: l["num_hidden_layers"].as_u64().unwrap() as usize,
        ffn_dim: j["ffn_hidden_dim_actual"].as_u64().unwrap() as usize,
        rms_norm_eps: l["rms_norm_eps"].as_f64().unwrap(),
        steps_per_scale: a["num_blocks_per_scale"].as_u64().unwrap() as usize,
        decoder: golden_decoder_config(),
    }
}

/// The decoder of golden/autoencoder_small.yaml (ch 32, ch_mult [1,1,2,2,4], 2 res blocks,
/// z_channels 64, embed_dim 8, n_embed 256, normalize).
pub fn golden_decoder_config() -> DecoderConfig {
    DecoderConfig {
        ch: 32,
        ch_mult: vec![1, 1, 2, 2, 4],
        num_res_blocks: 2,
        z_channels: 64,
        embed_dim: 8,
        n_embed: 256,
        normalize: true,
    }
}

/// The full golden state dict of one configuration (shared + config-specific tensors).
pub fn golden_tensors(golden: &Path, cfg_name: &str) -> TensorMap {
    let (mut map, _) = load_safetensors(&golden.join("public/weights_shared.safetensors")).unwrap();
    let (extra, _) = load_safetensors(
        &golden
            .join("public")
            .join(cfg_name)
            .join("weights_config.safetensors"),
    )
    .unwrap();
    map.extend(extra);
    map
}

/// One golden configuration, loaded: (directory, configuration, scale sizes, folded
/// transformer weights, config.json with the reference's case settings).
pub type GoldenCase = (
    std::path::PathBuf,
    ModelConfig,
    Vec<usize>,
    checkergen::model::weights::TransformerWeights,
    serde_json::Value,
);

/// Load golden configuration `cfg_name` (scale ratio `ratio`).
pub fn golden_case(golden: &Path, cfg_name: &str, ratio: f64) -> GoldenCase {
    let dir = golden.join("public").join(cfg_name);
    let cfg = golden_model_config(&dir);
    let sizes = checkergen::order::scale_sizes(cfg.latent_size(), ratio, 1).unwrap();
    let n_tokens: usize = sizes.iter().map(|s| s * s).sum();
    let weights = checkergen::model::weights::TransformerWeights::from_tensors(
        &cfg,
        &golden_tensors(golden, cfg_name),
        n_tokens,
    )
    .unwrap();
    let meta = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    (dir, cfg, sizes, weights, meta)
}

/// The settings of golden greedy case `case` (labels from its file `st`; cfg and
/// cfg_start_step from the configuration's config.json `meta`) at `steps` per scale,
/// temperature 0.
pub fn golden_greedy_options(
    st: &safetensors::SafeTensors,
    meta: &serde_json::Value,
    case: &str,
    steps: usize,
) -> checkergen::pipeline::SampleOptions {
    let cm = &meta["cases"][case]["case"];
    let labels = checkergen::model::file::load_i64(st, "labels").unwrap().1;
    let mut o =
        checkergen::pipeline::SampleOptions::new(labels.iter().map(|&l| l as usize).collect());
    o.cfg = cm["cfg"].as_f64().unwrap() as f32;
    o.cfg_start_step = cm["cfg_start_step"].as_u64().unwrap() as usize;
    o.steps = checkergen::pipeline::Steps::Uniform(steps);
    o.policy = checkergen::sampling::TokenPolicy {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };
    o
}

/// Teacher-forced argmax against the golden greedy tokens of case file `st` at golden
/// margins above `margin`: (agreeing, compared) over every step of `out` (logits (B, n, V)
/// per step, recorded with the golden tokens forced). The same prefix as the golden run, so
/// a bf16 path moves only near-ties here.
pub fn teacher_forced_agreement(
    st: &safetensors::SafeTensors,
    sizes: &[usize],
    out: &checkergen::pipeline::TokenOutput,
    b: usize,
    v: usize,
    margin: f32,
) -> (usize, usize) {
    let (mut agree, mut total) = (0usize, 0usize);
    for (step, l) in out.schedule.steps.iter().zip(&out.step_logits) {
        let s = sizes[step.scale];
        let gold = checkergen::model::file::load_i64(st, &format!("tokens_s{s}"))
            .unwrap()
            .1;
        let margins = golden_f32s(st, &format!("margin_s{s}"));
        let n = step.positions.len();
        for bi in 0..b {
            for (j, &p) in step.positions.iter().enumerate() {
                let cell = bi * s * s + p;
                if margins[cell] > margin {
                    let row = &l[(bi * n + j) * v..(bi * n + j + 1) * v];
                    total += 1;
                    agree += (checkergen::sampling::argmax(row) as i64 == gold[cell]) as usize;
                }
            }
        }
    }
    (agree, total)
}

/// GPU.md's greedy gate for a bf16 path over all golden cases, at margins above 0.05:
/// prints `what`'s rates (`tf` teacher-forced, `free` free-running: agreeing, compared) and
/// `detail`, then requires teacher-forced agreement above 98 % (the golden prefix, so only
/// near-ties move) and free-running above 80 % (one flipped near-tie changes every later
/// step, so a sanity bound only).
pub fn greedy_gate(what: &str, tf: (usize, usize), free: (usize, usize), detail: &str) {
    let tf_rate = tf.0 as f64 / tf.1 as f64;
    let rate = free.0 as f64 / free.1 as f64;
    println!(
        "{what} greedy agreement over all golden cases: teacher-forced {}/{} = {:.3} %, \
         free-running {}/{} = {:.3} % (margin > 0.05; required > 98 % teacher-forced); {detail}",
        tf.0,
        tf.1,
        100.0 * tf_rate,
        free.0,
        free.1,
        100.0 * rate
    );
    assert!(tf_rate > 0.98, "teacher-forced agreement {tf_rate}");
    assert!(rate > 0.8, "free-running agreement {rate}");
}

/// An f32 tensor of a golden case file.
pub fn golden_f32s(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Per scale, the (B, s, s) token ids stored as `{prefix}{s}` (e.g. `tokens_s16`).
pub fn token_pyramid(
    st: &safetensors::SafeTensors,
    sizes: &[usize],
    prefix: &str,
) -> Vec<Vec<u32>> {
    sizes
        .iter()
        .map(|s| {
            checkergen::model::file::load_i64(st, &format!("{prefix}{s}"))
                .unwrap()
                .1
                .iter()
                .map(|&t| t as u32)
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness: the one generator every test uses (tests/common/rng.rs, also
// included by tests/hostile_common).

mod rng;
pub use rng::Rng;

// How many lines an error takes (tests/common/errors.rs, also in tests/hostile_common).
mod errors;
pub use errors::error_lines;

// Command lines written as one string (tests/common/argv.rs, also in tests/hostile_common).
mod argv;
#[allow(unused_imports)] // not every test file writes command lines
pub use argv::argv;

/// `n` values uniform in [-scale, scale), a pure function of (n, seed, scale).
pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    Rng::new(seed).vec(n, scale)
}

/// `n` token ids uniform in 0..v.
pub fn rand_tokens(n: usize, seed: u64, v: usize) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(v) as u32).collect()
}

/// Random values rounded to multiples of `q`: many exact ties.
pub fn tied_vec(n: usize, seed: u64, scale: f32, q: f32) -> Vec<f32> {
    rand_vec(n, seed, scale)
        .into_iter()
        .map(|x| (x / q).round() * q)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Errors and the per-op report (llama.cpp test-backend-ops style)

/// Relative error ||a - b|| / ||b|| and max absolute error.
pub fn rel_err(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    let mut max = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x - y) as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
        max = max.max(d.abs());
    }
    ((num / den.max(1e-30)).sqrt(), max)
}

pub fn count_non_finite(v: &[f32]) -> usize {
    v.iter().filter(|x| !x.is_finite()).count()
}

/// The results of one op's table of cases: every check prints one line as it runs, `finish`
/// prints the worst error per case and fails the test when any check did.
pub struct Report {
    op: String,
    /// (case, worst error / tolerance, worst error, its tolerance)
    cases: Vec<(String, f64, f64, f64)>,
    failures: Vec<String>,
}

impl Report {
    pub fn new(op: &str) -> Report {
        println!("== {op}");
        Report {
            op: op.to_string(),
            cases: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Record `err < tol` for `case` (`what` names the metric); returns whether it held.
    pub fn check(&mut self, case: &str, what: &str, err: f64, tol: f64) -> bool {
        let ok = err < tol; // NaN fails
        println!(
            "  {case} {what}: {err:.2e} (tol {tol:.0e}) {}",
            if ok { "OK" } else { "FAIL" }
        );
        if !ok {
            self.failures
                .push(format!("{case} {what}: {err:.3e} >= {tol:.0e}"));
        }
        let ratio = if ok { err / tol } else { f64::INFINITY };
        match self.cases.iter_mut().find(|c| c.0 == case) {
            Some(c) if ratio > c.1 => *c = (case.to_string(), ratio, err, tol),
            Some(_) => {}
            None => self.cases.push((case.to_string(), ratio, err, tol)),
        }
        ok
    }

    /// `got` against the CPU reference `want`: every value finite, relative error < `tol`.
    /// Returns the relative error.
    pub fn rel(&mut self, case: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
        let bad = count_non_finite(got);
        let (rel, abs) = rel_err(got, want);
        self.check(case, "non-finite outputs", bad as f64, 0.5);
        self.check(case, &format!("rel err (max abs {abs:.1e})"), rel, tol);
        rel
    }

    /// Print the worst error of every case; panic listing the failed checks.
    pub fn finish(self) {
        println!(
            "== {}: {} cases, worst error per case:",
            self.op,
            self.cases.len()
        );
        for (case, _, err, tol) in &self.cases {
            println!("  {case:70} {err:.2e} (tol {tol:.0e})");
        }
        assert!(
            self.failures.is_empty(),
            "{}: {} checks failed:\n{}",
            self.op,
            self.failures.len(),
            self.failures.join("\n")
        );
        println!("== {}: all OK", self.op);
    }
}

// ---------------------------------------------------------------------------------------------
// Layouts: the GPU decoder runs batched NHWC, the cpu::ops decoder references one image CHW.

/// (B, HW, C) -> (B, C, HW).
pub fn nhwc_to_nchw(x: &[f32], batch: usize, hw: usize, c: usize) -> Vec<f32> {
    assert_eq!(x.len(), batch * hw * c);
    let mut out = vec![0.0f32; x.len()];
    for b in 0..batch {
        for p in 0..hw {
            for ch in 0..c {
                out[(b * c + ch) * hw + p] = x[(b * hw + p) * c + ch];
            }
        }
    }
    out
}

/// (B, C, HW) -> (B, HW, C).
pub fn nchw_to_nhwc(x: &[f32], batch: usize, c: usize, hw: usize) -> Vec<f32> {
    assert_eq!(x.len(), batch * hw * c);
    let mut out = vec![0.0f32; x.len()];
    for b in 0..batch {
        for ch in 0..c {
            for p in 0..hw {
                out[(b * hw + p) * c + ch] = x[(b * c + ch) * hw + p];
            }
        }
    }
    out
}

/// Apply a per-image CHW function to batched NHWC data: `f` maps one image (C, HW) to
/// (out_c, HW'), and the results come back batched NHWC (B, HW', out_c).
pub fn per_image_nhwc(
    x: &[f32],
    batch: usize,
    hw: usize,
    c: usize,
    out_c: usize,
    f: impl Fn(&[f32]) -> Vec<f32>,
) -> Vec<f32> {
    let chw = nhwc_to_nchw(x, batch, hw, c);
    let out: Vec<f32> = chw.chunks_exact(c * hw).flat_map(f).collect();
    let out_hw = out.len() / (batch * out_c);
    nchw_to_nhwc(&out, batch, out_c, out_hw)
}

// ---------------------------------------------------------------------------------------------
// The GPU: tests run on a real GPU when there is one, else on the host emulator; only tests
// that measure real-GPU behaviour are `#[ignore]`d.

/// The device GPU tests run on: `CHECKERGEN_DEVICE`, spelled as `--device` (the crate's one
/// [`checkergen::Device`]) = `cuda` or `cuda:N` (a real GPU, or fail), `emu`
/// (the host-emulated device: host-compiled kernels, cuBLAS on the host, red zones and
/// poison), or unset/`auto`: the real GPU when there is one, else the emulator. A GPU that is
/// present but unusable fails the test (a broken install is not "no GPU").
#[cfg(feature = "cuda")]
pub fn gpu(test: &str) -> checkergen::cuda::Gpu {
    use checkergen::{Device, cuda::Gpu};
    let var = std::env::var("CHECKERGEN_DEVICE").unwrap_or_default();
    let device = match var.as_str() {
        "" => Device::Auto,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("CHECKERGEN_DEVICE: {e}")),
    };
    let opened = match device {
        Device::Cuda(n) => Gpu::new(n),
        Device::Emulated => Gpu::emu(),
        Device::Auto => Gpu::try_new().and_then(|g| g.map_or_else(Gpu::emu, Ok)),
        Device::Cpu => panic!("CHECKERGEN_DEVICE=cpu: the GPU tests run on cuda, emu or auto"),
    };
    match opened {
        Ok(g) => {
            println!(
                "{test}: running on {} (cc {}.{}, kernels: {})",
                g.name, g.cc.0, g.cc.1, g.image_kind
            );
            g
        }
        Err(e) => panic!("{test}: no usable device ({device:?}): {e:#}"),
    }
}

/// Whether the tests run on the host emulator (`CHECKERGEN_DEVICE=emu`, or no GPU): the few
/// cases that would take minutes there use smaller shapes (each says so).
#[cfg(feature = "cuda")]
pub fn on_emu(gpu: &checkergen::cuda::Gpu) -> bool {
    gpu.is_emu()
}

/// The one harness (llama.cpp test-backend-ops style): on the device ([`gpu`]), every case of an op's
/// table with its label (the case's Debug) and a seed, into one [`Report`] that prints the
/// worst error per case and fails the test at the end when any check failed.
#[cfg(feature = "cuda")]
pub fn run_table<C: std::fmt::Debug>(
    op: &str,
    cases: &[C],
    mut f: impl FnMut(&checkergen::cuda::Gpu, &mut Report, &str, u64, &C),
) {
    let gpu = gpu(op);
    let mut report = Report::new(op);
    for (i, case) in cases.iter().enumerate() {
        f(
            &gpu,
            &mut report,
            &format!("{case:?}"),
            1000 * i as u64,
            case,
        );
    }
    report.finish();
}

/// Device index arrays are i32.
pub fn i32s(v: &[usize]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

/// The golden folder, required: a GPU test that was asked to run fails when it is missing
/// (GPU test bundles carry it, CHECKERGEN_GOLDEN).
pub fn golden_dir_required() -> PathBuf {
    golden_dir().expect("this test needs the golden folder (../shared/golden or CHECKERGEN_GOLDEN)")
}

/// 16-bit helpers (the decoder's Storage types, bf16 and f16).
#[cfg(feature = "cuda")]
pub mod half16 {
    use checkergen::cuda::decoder::Storage;

    /// Round to the nearest T, back in f32 (so CPU references see what the GPU sees).
    pub fn round_to<T: Storage>(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
    }

    pub fn to_h<T: Storage>(v: &[f32]) -> Vec<T> {
        v.iter().map(|&x| T::from_f32(x)).collect()
    }

    pub fn to_f32<T: Storage>(v: &[T]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    /// A poisoned host buffer: NaN everywhere, so an unwritten output shows.
    pub fn nan<T: Storage>(n: usize) -> Vec<T> {
        vec![T::from_f32(f32::NAN); n]
    }
}

// ---------------------------------------------------------------------------------------------
// Token choice

pub fn pol(t: f32, k: Option<usize>, p: Option<f32>) -> checkergen::sampling::TokenPolicy {
    checkergen::sampling::TokenPolicy {
        temperature: t,
        top_k: k,
        top_p: p,
    }
}

/// The CPU's kept set (top-k then top-p, weight > 0), replicating choose_token's filter.
pub fn kept_set(l: &[f32], p: &checkergen::sampling::TokenPolicy) -> Vec<bool> {
    let v = l.len();
    let max = l[checkergen::sampling::argmax(l)] as f64;
    let inv_t = 1.0 / p.temperature as f64;
    let w: Vec<f64> = l
        .iter()
        .map(|&x| ((x as f64 - max) * inv_t).exp())
        .collect();
    let k = p.top_k.unwrap_or(v).clamp(1, v);
    let mut idx: Vec<usize> = (0..v).collect();
    idx.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    let mut keep = k;
    if let Some(tp) = p.top_p.filter(|&tp| tp < 1.0) {
        let total: f64 = idx[..k].iter().map(|&i| w[i]).sum();
        let mut acc = 0.0;
        for (j, &i) in idx[..k].iter().enumerate() {
            acc += w[i];
            if acc >= tp as f64 * total {
                keep = j + 1;
                break;
            }
        }
    }
    let mut kept = vec![false; v];
    for &i in &idx[..keep] {
        kept[i] = w[i] > 0.0;
    }
    kept
}

/// Runs `cmd`, which must succeed (else the test fails showing `what`, its stdout and its
/// stderr), and returns its output.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the checkergen binary: (exit success, stdout, stderr). A panic fails the test
/// whatever the exit status: bad input must end in a one-line error, never a panic.
pub fn cli<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> (bool, String, String) {
    // CHECKERGEN_BIN: the CLI of a GPU test bundle (scripts/gpu-bundle.sh), where cargo's
    // build path does not exist.
    let bin = std::env::var_os("CHECKERGEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_checkergen")));
    let out = std::process::Command::new(bin)
        .args(args)
        .output()
        .expect("cannot run checkergen");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        err,
    )
}

/// Runs the binary, which must succeed, and parses one JSON object per line of its stdout.
pub fn json_lines<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
) -> Vec<serde_json::Value> {
    let (ok, out, err) = cli(args);
    assert!(ok, "{args:?}: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The binary refuses `args`: a non-zero exit and exactly one stderr line, holding `want`.
pub fn refused<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], want: &str) {
    let (ok, _, err) = cli(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(
        error_lines(&err) == 1 && err.contains(want),
        "{args:?}: expected one line with {want:?}, got: {err}"
    );
}

/// A golden model with the VQ encoder (shared + config tensors + score/encoder_weights):
/// what the scoring tests (CPU and GPU) load.
pub fn golden_model_with_encoder(golden: &Path, cfg_name: &str) -> checkergen::model::Model {
    let cfg = golden_model_config(&golden.join("public").join(cfg_name));
    checkergen::model::Model::from_tensors(cfg, &golden_tensors_with_encoder(golden, cfg_name))
        .unwrap()
}

/// The state dict of [`golden_model_with_encoder`].
pub fn golden_tensors_with_encoder(golden: &Path, cfg_name: &str) -> TensorMap {
    let mut map = golden_tensors(golden, cfg_name);
    let (enc, _) =
        load_safetensors(&golden.join("public/score/encoder_weights.safetensors")).unwrap();
    map.extend(enc);
    map
}
