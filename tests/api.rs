//! The embedding front ends: the Rust API (checkergen::Model), the C ABI (examples/c/sample.c
//! and score.c compiled with the system C compiler) and the CLI give the same pixels for the
//! same request, seed and precision, and the same scores for the same images; per-step
//! timings; a model shared by threads; progress, cancellation and refusals. The Python module
//! has its own suite (python/tests, run by .ci/run) against the same CLI output.

mod common;

use checkergen::{Device, Error, Model, Policy, Progress, Request};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-api-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The CLI's images for the tiny preset (no --model), labels `labels`, `seed`, on the CPU.
fn cli_images(name: &str, labels: &str, seed: u64, extra: &[&str]) -> Vec<Vec<u8>> {
    let out = dir(name);
    let seed = seed.to_string();
    let mut args = vec![
        "sample", "--labels", labels, "--seed", &seed, "--device", "cpu", "--out",
    ];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkergen"));
    common::run_ok(cmd.args(&args), "checkergen sample");
    let n = labels.split(',').count();
    (0..n)
        .map(|i| read_png(&out.join(format!("sample_{i:04}.png"))))
        .collect()
}

fn read_png(p: &Path) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    buf
}

/// Binary PPM (P6) pixels, as examples/c/sample.c writes them.
fn read_ppm(p: &Path) -> (usize, Vec<u8>) {
    let b = std::fs::read(p).unwrap();
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while b[i].is_ascii_whitespace() {
            i += 1;
        }
        let s = i;
        while !b[i].is_ascii_whitespace() {
            i += 1;
        }
        fields.push(String::from_utf8(b[s..i].to_vec()).unwrap());
    }
    assert_eq!(fields[0], "P6");
    assert_eq!(fields[3], "255");
    (fields[1].parse().unwrap(), b[i + 1..].to_vec())
}

#[test]
fn api_equals_cli_for_the_same_seed_and_any_batch_size() {
    let model = Model::tiny(Device::Cpu).unwrap();
    let cli = cli_images("cli", "0,1,2", 5, &["--batch-size", "3"]);
    let req = Request::new(vec![0, 1, 2]).seed(5).batch_size(2);
    let images = model.sample(&req).unwrap();
    assert_eq!((images.len(), images.size()), (3, 256));
    for (i, want) in cli.iter().enumerate() {
        assert!(
            images.image(i) == want.as_slice(),
            "image {i} differs from the CLI's"
        );
    }
    // Another seed gives other images (the comparison above can fail).
    let other = model.sample(&req.clone().seed(6)).unwrap();
    assert_ne!(other.pixels(), images.pixels());
}

/// Compile examples/c/`name`.c with the system C compiler (CC) against the cdylib beside
/// the CLI binary (target/<profile>/libcheckergen.so) into `d`/`name`-c.
fn compile_c_example(name: &str, d: &Path) -> PathBuf {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        panic!("no C compiler ({cc}) on this machine: set CC");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = Path::new(env!("CARGO_BIN_EXE_checkergen"))
        .parent()
        .unwrap();
    assert!(
        lib_dir.join("libcheckergen.so").exists(),
        "no libcheckergen.so in {}",
        lib_dir.display()
    );
    let exe = d.join(format!("{name}-c"));
    let mut compile = Command::new(&cc);
    compile
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg(root.join(format!("examples/c/{name}.c")))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-L")
        .arg(lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lcheckergen", "-o"])
        .arg(&exe);
    common::run_ok(&mut compile, "cc");
    exe
}

#[test]
#[ignore = "needs the cdylib built (cargo build --release --lib); .ci/run builds it and runs this"]
fn c_example_equals_cli() {
    let d = dir("c");
    let exe = compile_c_example("sample", &d);
    for (prec, extra) in [("f32", vec![]), ("bf16", vec!["--precision", "bf16"])] {
        let prefix = d.join(format!("img-{prec}"));
        let mut run = Command::new(&exe);
        let r = common::run_ok(run.arg("-").arg(&prefix).args(["9", prec]), "sample-c");
        let stdout = String::from_utf8_lossy(&r.stdout);
        println!("{stdout}");
        // 3 images in batches of 2 and 1, 17 steps each on the tiny preset: 17 per-step
        // timings summed over the 2 batches.
        assert!(
            stdout.contains(&format!(
                "3 images of 256x256, 34 progress calls, precision {prec}"
            )),
            "{stdout}"
        );
        assert!(
            stdout.contains("timings: 17 serial steps, 2 batches"),
            "{stdout}"
        );
        assert!(
            stdout.contains("bad label refused: invalid request: class id 1000000 is out of range"),
            "{stdout}"
        );
        let cli = cli_images(&format!("c-cli-{prec}"), "0,1,2", 9, &extra);
        for (i, want) in cli.iter().enumerate() {
            let (side, got) = read_ppm(&d.join(format!("img-{prec}_{i:04}.ppm")));
            assert_eq!(side, 256);
            assert!(&got == want, "C image {i} ({prec}) differs from the CLI's");
        }
    }
    // bf16 gives other pixels than f32 (the comparisons above can tell them apart).
    let (_, f) = read_ppm(&d.join("img-f32_0000.ppm"));
    let (_, b) = read_ppm(&d.join("img-bf16_0000.ppm"));
    assert_ne!(f, b, "bf16 and f32 gave the same pixels");
}

/// Three 256 x 256 test images (smooth ramps and a checker, different per image), written
/// as PNG (for the CLI) and binary PPM (for examples/c/score.c) under `d`; returns their
/// pixels (N, H, W, 3) and the two files of each.
fn score_images(d: &Path) -> (Vec<u8>, Vec<(PathBuf, PathBuf)>) {
    let side = 256;
    let mut all = Vec::new();
    let mut files = Vec::new();
    for n in 0..3usize {
        let mut rgb = Vec::with_capacity(side * side * 3);
        for y in 0..side {
            for x in 0..side {
                let checker = ((x / (16 << n)) + (y / 32)) % 2 * 60;
                rgb.push(((x + 40 * n) % 256) as u8);
                rgb.push(((y * (n + 1)) % 256) as u8);
                rgb.push((checker + (x ^ y) % 64 + 50 * n) as u8);
            }
        }
        let png = d.join(format!("real_{n}.png"));
        let ppm = d.join(format!("real_{n}.ppm"));
        checkergen::io::image::write_rgb_png(&png, side, side, &rgb).unwrap();
        let mut p = format!("P6\n{side} {side}\n255\n").into_bytes();
        p.extend_from_slice(&rgb);
        std::fs::write(&ppm, p).unwrap();
        all.extend_from_slice(&rgb);
        files.push((png, ppm));
    }
    (all, files)
}

/// `checkergen score --json` on the tiny preset's model file: (model file, one JSON object
/// per steps value).
fn cli_scores(d: &Path, pngs: &[&Path], labels: &str, steps: &str) -> Vec<serde_json::Value> {
    let model_file = d.join("tiny.safetensors");
    let mf = model_file.to_str().unwrap();
    if !model_file.exists() {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkergen"));
        common::run_ok(
            cmd.args(["init", "--preset", "tiny", "--out", mf]),
            "checkergen init",
        );
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkergen"));
    cmd.args(["score", "--model", mf, "--labels", labels])
        .args(pngs)
        .args(["--steps-per-scale", steps, "--device", "cpu", "--json"]);
    let o = common::run_ok(&mut cmd, "checkergen score");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// examples/c/score.c (cg_score) on PPM copies of three images vs `checkergen score --json`
/// on their PNGs: every field equal within 1e-12 relative (the same library call on the
/// same pixels in the same batches, so the same f64 values; serde_json's default float
/// parser, reading the CLI's line back, may be one ulp off: 1.6e-16 seen). The worst is
/// printed.
#[test]
#[ignore = "needs the cdylib built (cargo build --release --lib); .ci/run builds it and runs this"]
fn c_score_equals_cli() {
    let d = dir("c-score");
    let exe = compile_c_example("score", &d);
    let (_, files) = score_images(&d);
    let labels = [3, 0, 7];
    let pngs: Vec<&Path> = files.iter().map(|(p, _)| p.as_path()).collect();
    let cli = cli_scores(&d, &pngs, "3,0,7", "2,4");
    let mut run = Command::new(&exe);
    run.arg(d.join("tiny.safetensors")).arg("2,4");
    for ((_, ppm), l) in files.iter().zip(labels) {
        run.arg(format!("{l}:{}", ppm.display()));
    }
    let r = common::run_ok(&mut run, "score-c");
    let stdout = String::from_utf8_lossy(&r.stdout);
    println!("{stdout}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("steps_per_scale="))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        stdout.contains("short buffer refused: invalid request: cg_score: "),
        "{stdout}"
    );
    let mut worst = 0.0f64;
    let mut compared = 0;
    for (line, j) in lines.iter().zip(&cli) {
        let field = |k: &str| -> f64 {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {line}"))
                .parse()
                .unwrap()
        };
        for k in ["steps_per_scale", "serial_steps", "images"] {
            assert_eq!(field(k), j[k].as_f64().unwrap(), "{k}: {line}");
        }
        let mut pairs = vec![
            (field("loss_total"), j["loss_total"].as_f64().unwrap()),
            (
                field("bits_per_token"),
                j["bits_per_token"].as_f64().unwrap(),
            ),
        ];
        for (s, v) in j["loss_by_scale"].as_object().unwrap() {
            pairs.push((field(&format!("loss_{s}")), v.as_f64().unwrap()));
        }
        for (s, v) in j["top1_by_scale"].as_object().unwrap() {
            pairs.push((field(&format!("top1_{s}")), v.as_f64().unwrap()));
        }
        for (c, want) in pairs {
            worst = worst.max((c - want).abs() / want.abs().max(1e-300));
            compared += 1;
        }
    }
    println!("C score vs CLI: {compared} values, worst rel {worst:.2e} (tolerance 1e-12)");
    assert!(compared > 10);
    assert!(worst <= 1e-12, "C score vs CLI: worst rel {worst:.2e}");
}

/// The per-step timings of a sampling call: one entry per serial step of the schedule
/// (summed over batches), on the CPU, for uniform and explicit step counts.
#[test]
fn timings_have_one_entry_per_serial_step() {
    use checkergen::order::Schedule;
    let model = Model::tiny(Device::Cpu).unwrap();
    let sizes = model.scale_sizes().to_vec();
    let explicit = vec![1, 2, 3, 1, 2];
    assert_eq!(sizes.len(), explicit.len());
    for (req, sched, batches) in [
        (
            Request::new(vec![0, 1, 2]).steps_per_scale(2).batch_size(2),
            Schedule::uniform(&sizes, 2).unwrap(),
            2,
        ),
        (
            Request::new(vec![5]).steps(explicit.clone()),
            Schedule::with_steps(&sizes, &explicit).unwrap(),
            1,
        ),
    ] {
        let images = model.sample(&req).unwrap();
        let t = images.timings();
        println!(
            "{} step entries ({} serial steps): {:.1} ms in all, prefill {:.2} ms, decode \
             {:.1} ms, {} batches",
            t.step_ms.len(),
            sched.total_steps(),
            t.step_ms.iter().sum::<f64>(),
            t.prefill_ms,
            t.decode_ms,
            t.batches
        );
        assert_eq!(t.step_ms.len(), sched.total_steps());
        assert_eq!((t.batches, t.replayed_batches), (batches, 0));
        assert!(t.step_ms.iter().all(|&ms| ms > 0.0) && t.decode_ms > 0.0);
    }
}

#[test]
fn one_model_shared_by_threads_gives_the_serial_images() {
    let model = Arc::new(Model::tiny(Device::Cpu).unwrap());
    let req = |i: usize| {
        Request::new(vec![i % 10, (i + 3) % 10])
            .steps_per_scale(2)
            .seed(i as u64)
    };
    let serial: Vec<Vec<u8>> = (0..4)
        .map(|i| model.sample(&req(i)).unwrap().into_pixels())
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let m = model.clone();
            std::thread::spawn(move || m.sample(&req(i)).unwrap().into_pixels())
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert!(
            t.join().unwrap() == serial[i],
            "thread {i} differs from the serial run"
        );
    }
}

#[test]
fn progress_reports_every_step_and_batch() {
    let model = Model::tiny(Device::Cpu).unwrap();
    let mut steps = 0;
    let mut batches = Vec::new();
    let req = Request::new(vec![1; 5]).steps_per_scale(1).batch_size(2);
    model
        .sample_with_progress(&req, |p| match p {
            Progress::Step {
                step, steps: total, ..
            } => {
                assert!(step >= 1 && step <= total);
                steps += 1
            }
            Progress::Batch {
                batch,
                batches: nb,
                images_done,
                images,
            } => {
                assert_eq!((nb, images), (3, 5));
                batches.push((batch, images_done))
            }
            _ => {}
        })
        .unwrap();
    let per_batch = model.scale_sizes().len(); // one step per scale
    assert_eq!(steps, 3 * per_batch);
    assert_eq!(batches, vec![(0, 2), (1, 4), (2, 5)]);
}

#[test]
fn cancellation_stops_sampling() {
    let model = Model::tiny(Device::Cpu).unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let req = Request::new(vec![0; 4])
        .batch_size(1)
        .cancel_flag(flag.clone());
    let mut seen = 0;
    let r = model.sample_with_progress(&req, |p| {
        if let Progress::Step { .. } = p {
            seen += 1;
            if seen == 3 {
                flag.store(true, Ordering::Relaxed);
            }
        }
    });
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(seen, 3, "sampling went on after the flag was set");
}

#[test]
fn tokens_are_kept_on_request() {
    let model = Model::tiny(Device::Cpu).unwrap();
    let req = Request::new(vec![2, 4, 6]).steps_per_scale(1).batch_size(2);
    assert!(model.sample(&req).unwrap().tokens().is_none());
    let images = model.sample(&req.keep_tokens(true)).unwrap();
    let tokens = images.tokens().unwrap();
    assert_eq!(tokens.len(), model.scale_sizes().len());
    for (t, &s) in tokens.iter().zip(model.scale_sizes()) {
        assert_eq!(t.len(), 3 * s * s);
    }
}

#[test]
fn bad_requests_are_typed_errors() {
    let model = Model::tiny(Device::Cpu).unwrap();
    let bad = |r: Request, want: &str| match model.sample(&r) {
        Err(e @ Error::InvalidRequest(_)) => {
            assert!(e.to_string().contains(want), "{e} lacks {want:?}")
        }
        other => panic!("expected InvalidRequest({want}), got {other:?}"),
    };
    bad(Request::new(vec![]), "no labels");
    bad(Request::new(vec![10]), "class id 10 is out of range");
    bad(Request::new(vec![0, 1, 99]).batch_size(1), "class id 99");
    bad(Request::new(vec![0]).steps_per_scale(0), "at least 1");
    bad(
        Request::new(vec![0]).steps(vec![1, 2]),
        "per-scale step counts",
    );
    bad(Request::new(vec![0]).guidance(f32::NAN), "cfg must be");
    bad(Request::new(vec![0]).guidance(-1.0), "cfg must be");
    bad(Request::new(vec![0]).batch_size(0), "batch size");
    assert!(Policy::sample(f32::INFINITY).is_err());
    assert!(Policy::sample(0.0).is_err());
    assert!(Policy::greedy().top_k(0).is_err());
    assert!(Policy::greedy().top_p(1.5).is_err());
    assert!(Policy::greedy().top_p(f32::NAN).is_err());

    let e = Model::load("/nonexistent/model.safetensors", Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::Load { .. }), "{e:?}");
    let msg = e.chain_message();
    assert!(
        msg.starts_with("cannot load model /nonexistent/model.safetensors: "),
        "{msg}"
    );
    assert!(std::error::Error::source(&e).is_some());
}

/// The C ABI's last error on this thread (`cg_last_error`), as a string.
fn c_last_error() -> String {
    let p = checkergen::capi::cg_last_error();
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn c_abi_refuses_bad_arguments_with_a_status() {
    use checkergen::capi::*;
    let msg = c_last_error;
    unsafe {
        assert_eq!(
            cg_model_load(std::ptr::null(), CgDevice::Cpu, 0, std::ptr::null_mut()),
            CgStatus::InvalidArgument
        );
        let mut m: *mut CgModel = std::ptr::null_mut();
        let path = c"/nonexistent.safetensors";
        assert_eq!(
            cg_model_load(path.as_ptr(), CgDevice::Cpu, 0, &mut m),
            CgStatus::LoadFailed
        );
        assert!(m.is_null());
        assert!(msg().contains("/nonexistent.safetensors"), "{}", msg());
        assert_eq!(
            cg_model_load(std::ptr::null(), CgDevice::Cpu, 0, &mut m),
            CgStatus::Ok
        );
        assert_eq!(msg(), "");
        let mut req = std::mem::MaybeUninit::<CgRequest>::uninit();
        cg_request_init(req.as_mut_ptr());
        let mut req = req.assume_init();
        let labels = [1u32, 2];
        req.labels = labels.as_ptr();
        req.num_labels = 2;
        req.steps_per_scale = 1;
        let need = cg_image_bytes(m, 2);
        assert_eq!(need, 2 * 256 * 256 * 3);
        let mut buf = vec![0u8; need];
        assert_eq!(
            cg_sample(m, &req, buf.as_mut_ptr(), need - 1),
            CgStatus::InvalidArgument
        );
        assert!(msg().contains("output buffer"), "{}", msg());
        assert_eq!(
            cg_sample(std::ptr::null(), &req, buf.as_mut_ptr(), need),
            CgStatus::InvalidArgument
        );
        req.temperature = -1.0;
        assert_eq!(
            cg_sample(m, &req, buf.as_mut_ptr(), need),
            CgStatus::InvalidArgument
        );
        assert!(msg().contains("temperature"), "{}", msg());
        req.temperature = 1.0;
        unsafe extern "C" fn stop(
            _: *mut std::ffi::c_void,
            _: u32,
            _: u32,
            step: u32,
            _: u32,
        ) -> i32 {
            (step >= 2) as i32
        }
        req.progress = Some(stop);
        assert_eq!(
            cg_sample(m, &req, buf.as_mut_ptr(), need),
            CgStatus::Cancelled
        );
        req.progress = None;
        assert_eq!(cg_sample(m, &req, buf.as_mut_ptr(), need), CgStatus::Ok);
        let api = Model::tiny(Device::Cpu).unwrap();
        let want = api
            .sample(&Request::new(vec![1, 2]).steps_per_scale(1))
            .unwrap();
        assert!(buf == want.pixels(), "C ABI pixels differ from the API's");
        cg_model_free(m);
        cg_model_free(std::ptr::null_mut());
    }
}

/// The C ABI's precision, score and timings through the Rust-side declarations: bf16 gives
/// the API's bf16 pixels, `cg_score` the API's scores (exactly: the same call), the timings
/// one entry per serial step; bad arguments are statuses.
#[test]
fn c_abi_precision_score_and_timings() {
    use checkergen::capi::*;
    let msg = c_last_error;
    unsafe {
        let mut m: *mut CgModel = std::ptr::null_mut();
        assert_eq!(
            cg_model_load(std::ptr::null(), CgDevice::Cpu, 0, &mut m),
            CgStatus::Ok
        );
        assert_eq!(cg_model_precision(m), CgPrecision::F32);
        assert_eq!(
            cg_model_set_precision(std::ptr::null_mut(), CgPrecision::Bf16),
            CgStatus::InvalidArgument
        );

        // Score: the API's scores on the same pixels.
        let (rgb, _) = score_images(&dir("capi-score"));
        let labels = [3u32, 0, 7];
        let steps = [2u32, 4];
        let mut out = vec![std::mem::MaybeUninit::<CgScore>::uninit(); 2];
        let outp = out.as_mut_ptr().cast::<CgScore>();
        let (p, n) = (rgb.as_ptr(), rgb.len());
        assert_eq!(
            cg_score(m, p, n, labels.as_ptr(), 3, steps.as_ptr(), 2, outp),
            CgStatus::Ok,
            "{}",
            msg()
        );
        let api = Model::tiny(Device::Cpu).unwrap();
        let want = api.score(&rgb, &[3, 0, 7], &[2, 4]).unwrap();
        for (o, w) in out.iter().zip(&want) {
            let o = o.assume_init_ref();
            assert_eq!(o.steps_per_scale as usize, w.steps_per_scale());
            assert_eq!(o.serial_steps as usize, w.serial_steps());
            assert_eq!(o.images, 3);
            assert_eq!(o.loss_total, w.loss_total());
            assert_eq!(o.bits_per_token, w.loss_total() / std::f64::consts::LN_2);
            let k = o.num_scales;
            assert_eq!(k, w.scale_sizes().len());
            assert_eq!(&o.loss_by_scale[..k], w.loss_by_scale().as_slice());
            assert_eq!(&o.top1_by_scale[..k], w.top1_by_scale().as_slice());
            assert_eq!(o.scale_sizes[k - 1] as usize, w.scale_sizes()[k - 1]);
            println!(
                "cg_score k={}: loss {:.4} nats/token ({} serial steps)",
                o.steps_per_scale, o.loss_total, o.serial_steps
            );
        }
        let null = std::ptr::null();
        let lp = labels.as_ptr();
        let sp = steps.as_ptr();
        for (what, st) in [
            ("short", cg_score(m, p, n - 1, lp, 3, sp, 2, outp)),
            ("null", cg_score(m, null, n, lp, 3, sp, 2, outp)),
            ("no values", cg_score(m, p, n, lp, 3, sp, 0, outp)),
            (
                "zero steps",
                cg_score(m, p, n, lp, 3, [0u32, 4].as_ptr(), 2, outp),
            ),
            (
                "label",
                cg_score(m, p, n, [3u32, 0, 10].as_ptr(), 3, sp, 2, outp),
            ),
        ] {
            assert_eq!(st, CgStatus::InvalidArgument, "{what}");
            println!("{what}: {}", msg());
        }

        // Timings, then bf16.
        let mut req = std::mem::MaybeUninit::<CgRequest>::uninit();
        cg_request_init(req.as_mut_ptr());
        let mut req = req.assume_init();
        let lab = [1u32, 2, 4];
        req.labels = lab.as_ptr();
        req.num_labels = 3;
        req.steps_per_scale = 2;
        req.batch_size = 2;
        let need = cg_image_bytes(m, 3);
        let mut buf = vec![0u8; need];
        let mut step_ms = [f64::NAN; 4];
        let mut t = CgTimings {
            step_ms: step_ms.as_mut_ptr(),
            step_ms_capacity: step_ms.len(),
            num_steps: 0,
            steps_total_ms: 0.0,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            batches: 0,
            replayed_batches: 0,
        };
        assert_eq!(
            cg_sample_timed(m, &req, buf.as_mut_ptr(), need, &mut t),
            CgStatus::Ok
        );
        let serial = checkergen::order::Schedule::uniform(api.scale_sizes(), 2)
            .unwrap()
            .total_steps();
        println!(
            "cg_sample_timed: {} step entries ({serial} serial steps), {:.1} ms, {} batches",
            t.num_steps, t.steps_total_ms, t.batches
        );
        assert_eq!((t.num_steps, t.batches, t.replayed_batches), (serial, 2, 0));
        // Only the buffer's capacity is written; the total covers every step.
        assert!(step_ms.iter().all(|&x| x > 0.0));
        assert!(t.steps_total_ms > step_ms.iter().sum::<f64>() && t.decode_ms > 0.0);
        let f32_pixels = buf.clone();
        let req_api = Request::new(vec![1, 2, 4]).steps_per_scale(2);
        let want = api.sample(&req_api).unwrap();
        assert!(
            f32_pixels == want.pixels(),
            "C ABI f32 pixels differ from the API's"
        );

        // The guidance interval: cfg_end_step reaches the engine (0 = to the end).
        req.cfg_start_step = 1;
        req.cfg_end_step = 4;
        assert_eq!(cg_sample(m, &req, buf.as_mut_ptr(), need), CgStatus::Ok);
        let want = api
            .sample(&req_api.clone().cfg_start_step(1).cfg_end_step(4))
            .unwrap();
        assert!(
            buf == want.pixels(),
            "C ABI cfg_end_step pixels differ from the API's"
        );
        let full = api.sample(&req_api.clone().cfg_start_step(1)).unwrap();
        assert!(buf != full.pixels(), "cfg_end_step changed nothing");
        req.cfg_start_step = 5;
        req.cfg_end_step = 0;

        assert_eq!(cg_model_set_precision(m, CgPrecision::Bf16), CgStatus::Ok);
        assert_eq!(cg_model_precision(m), CgPrecision::Bf16);
        assert_eq!(cg_sample(m, &req, buf.as_mut_ptr(), need), CgStatus::Ok);
        let bf = api.with_precision(checkergen::Precision::Bf16).unwrap();
        let want = bf.sample(&req_api).unwrap();
        assert!(
            buf == want.pixels(),
            "C ABI bf16 pixels differ from the API's"
        );
        assert!(buf != f32_pixels, "bf16 gave the f32 pixels");
        // bf16 cannot go back to f32; the model stays usable and bf16.
        assert_eq!(
            cg_model_set_precision(m, CgPrecision::F32),
            CgStatus::InvalidArgument
        );
        assert!(msg().contains("already bf16"), "{}", msg());
        assert_eq!(cg_model_precision(m), CgPrecision::Bf16);
        cg_model_free(m);
    }
}

/// `Model::score` on images the tiny model sampled: the same losses as `checkergen score`
/// on those PNGs (the CLI runs the same library call, batch by batch), independent of how
/// the images are split into calls, and bad input is an `InvalidRequest`.
#[test]
fn score_equals_the_cli_and_refuses_bad_input() {
    let images = cli_images("score", "0,1,2", 3, &[]);
    let out = std::env::temp_dir().join(format!("cg-api-{}-score", std::process::id()));
    let model_file = out.join("tiny.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkergen"));
    let mf = model_file.to_str().unwrap();
    common::run_ok(
        cmd.args(["init", "--preset", "tiny", "-o", mf]),
        "checkergen init",
    );
    let model = Model::tiny(Device::Cpu).unwrap();
    let rgb: Vec<u8> = images.concat();
    let labels = [0usize, 1, 2];
    let scores = model.score(&rgb, &labels, &[2, 4]).unwrap();
    assert_eq!(scores.len(), 2);
    assert_eq!(scores[0].images(), 3);
    assert_eq!(scores[1].steps_per_scale(), 4);
    // One image per call gives the same sums (up to f64 summation order).
    let mut parts = model.new_scores(&[2, 4]).unwrap();
    let px = rgb.len() / 3;
    for (img, l) in rgb.chunks(px).zip(labels) {
        model.score_batch(img, &[l], &mut parts).unwrap();
    }
    for (a, b) in scores.iter().zip(&parts) {
        let rel = (a.loss_total() - b.loss_total()).abs() / a.loss_total();
        assert!(rel < 1e-9, "split into calls: rel {rel:.2e}");
        assert_eq!(a.top1_by_scale(), b.top1_by_scale());
    }
    // The CLI on the PNGs.
    let pngs: Vec<String> = (0..3)
        .map(|i| {
            out.join(format!("sample_{i:04}.png"))
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut args = vec!["score", "--model", mf, "--labels", "0,1,2"];
    args.extend(pngs.iter().map(String::as_str));
    args.extend(["--steps-per-scale", "2,4", "--device", "cpu", "--json"]);
    let o = Command::new(env!("CARGO_BIN_EXE_checkergen"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let mut worst = 0.0f64;
    for (j, s) in lines.iter().zip(&scores) {
        let cli = j["loss_total"].as_f64().unwrap();
        worst = worst.max((cli - s.loss_total()).abs() / s.loss_total());
    }
    println!("score: API vs CLI loss_total worst rel {worst:.2e}");
    assert!(worst < 1e-12, "API vs CLI: {worst:.2e}");
    // Bad input.
    for (what, r) in [
        ("bytes", model.score(&rgb[1..], &labels, &[4])),
        ("label", model.score(&rgb, &[0, 1, 99], &[4])),
        ("no steps", model.score(&rgb, &labels, &[])),
        ("zero steps", model.score(&rgb, &labels, &[0])),
    ] {
        match r {
            Err(Error::InvalidRequest(m)) => println!("{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}
