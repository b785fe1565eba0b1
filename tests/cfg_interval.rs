//! The guidance interval (`cfg_end_step`): guidance on for `cfg_start_step <= t <
//! cfg_end_step`, and from the end step on the unconditional rows leave the batch. Checked
//! against a run that keeps every row to the end and only stops guiding (a backend wrapper
//! that ignores `drop_uncond`): a row's values never depend on another row, so dropping the
//! unconditional half must not change what the conditional half computes. On the CPU and on
//! the CUDA engine (the GPU, or the host emulator without one).

mod common;

use checkergen::cpu::CpuBackend;
use checkergen::model::Model;
use checkergen::model::config::preset;
use checkergen::model::init::random_tensors;
use checkergen::order::{Schedule, Step};
use checkergen::pipeline::{
    self, Backend, Decoded, LoopOutcome, LoopPlan, LoopSteps, SampleOptions, StepChoice,
    StepLogits, Stepper, Steps,
};
use checkergen::sampling::TokenPolicy;

/// A backend that notes the rows each step computed and, with `keep`, keeps the
/// unconditional rows to the end: the pipeline's guidance is still off from the end step
/// (its `guidance` is None there), but no row is dropped. Its loops run eagerly (no
/// recording: the reference).
struct Watch<B> {
    inner: B,
    keep: bool,
    rows: Vec<usize>,
}

fn keep_rows<B>(inner: B) -> Watch<B> {
    Watch {
        inner,
        keep: true,
        rows: Vec::new(),
    }
}

/// The steps of a watched loop, on the stepper the inner backend hands them.
struct Watched<'a> {
    inner: &'a mut dyn Stepper,
    keep: bool,
    rows: &'a mut Vec<usize>,
}

impl Stepper for Watched<'_> {
    fn begin_scale(&mut self, s: &Schedule, si: usize) -> anyhow::Result<()> {
        self.inner.begin_scale(s, si)
    }
    fn step(&mut self, s: &Schedule, step: &Step, ch: &StepChoice) -> anyhow::Result<StepLogits> {
        let choice = StepChoice {
            drop_uncond: ch.drop_uncond && !self.keep,
            ..*ch
        };
        let r = self.inner.step(s, step, &choice);
        self.rows.push(self.inner.rows().unwrap_or(0));
        r
    }
}

impl<B: Backend> Watch<B> {
    fn watched(&mut self) -> Watched<'_> {
        Watched {
            inner: &mut self.inner,
            keep: self.keep,
            rows: &mut self.rows,
        }
    }
}

impl<B: Backend> Stepper for Watch<B> {
    fn begin_scale(&mut self, s: &Schedule, si: usize) -> anyhow::Result<()> {
        self.watched().begin_scale(s, si)
    }
    fn step(&mut self, s: &Schedule, step: &Step, ch: &StepChoice) -> anyhow::Result<StepLogits> {
        self.watched().step(s, step, ch)
    }
}

impl<B: Backend> Backend for Watch<B> {
    fn config(&self) -> &checkergen::model::config::ModelConfig {
        self.inner.config()
    }
    fn run_loop(&mut self, plan: &LoopPlan, steps: &mut LoopSteps) -> anyhow::Result<LoopOutcome> {
        let plan = LoopPlan {
            graph: false,
            ..plan.clone()
        };
        let (keep, rows) = (self.keep, &mut self.rows);
        self.inner.run_loop(&plan, &mut |st| {
            rows.clear();
            steps(&mut Watched {
                inner: st,
                keep,
                rows: &mut *rows,
            })
        })
    }
    fn decode(&mut self, s: &Schedule, si: usize) -> anyhow::Result<Decoded> {
        self.inner.decode(s, si)
    }
}

fn tiny() -> Model {
    let cfg = preset("tiny").unwrap();
    let map = random_tensors(&cfg, 3).unwrap();
    Model::from_tensors(cfg, &map).unwrap()
}

/// Options with guidance from step 1 to `end`, sampled (temperature 1) so that the
/// uniforms, not ties, decide.
fn options(end: Option<usize>) -> SampleOptions {
    let mut o = SampleOptions::new(vec![0, 3, 7]);
    o.cfg = 2.0;
    o.cfg_start_step = 1;
    o.cfg_end_step = end;
    o.steps = Steps::Uniform(2);
    o.policy = TokenPolicy {
        temperature: 1.0,
        top_k: None,
        top_p: None,
    };
    o.seed = 11;
    o.record_logits = true;
    o
}

/// The rows each of `total` steps computes when guidance ends at `end`: 2B before, B after.
fn rows_per_step(b: usize, end: usize, total: usize) -> Vec<usize> {
    (0..total)
        .map(|t| if t < end { 2 * b } else { b })
        .collect()
}

/// Largest |a - b| over max |b| across every recorded step's logits.
fn worst_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len(), "different numbers of recorded steps");
    let mut err = 0f64;
    let mut scale = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (&p, &q) in x.iter().zip(y) {
            err = err.max((p as f64 - q as f64).abs());
            scale = scale.max(q.abs() as f64);
        }
    }
    err / scale.max(1e-30)
}

#[test]
fn guided_steps_count_the_interval() {
    let mut o = options(Some(4));
    assert_eq!(pipeline::guided_steps(&o, 9), 3); // steps 1, 2, 3
    assert!(pipeline::guided_at(&o, 1) && pipeline::guided_at(&o, 3));
    assert!(!pipeline::guided_at(&o, 0) && !pipeline::guided_at(&o, 4));
    o.cfg_end_step = Some(1);
    assert_eq!(pipeline::guided_steps(&o, 9), 0);
    let w = pipeline::guidance_warning(&o, 9).expect("an empty interval is warned about");
    assert!(w.contains("--cfg-end-step 1"), "{w}");
    o.cfg_end_step = Some(100);
    assert_eq!(pipeline::guided_steps(&o, 9), 8);
    assert!(pipeline::guidance_warning(&o, 9).is_none());
}

#[test]
fn cpu_dropping_the_unconditional_rows_changes_nothing() {
    let model = tiny();
    let total = pipeline::schedule_of(&model.scale_sizes, &options(None))
        .unwrap()
        .total_steps();
    for end in [2, total - 2] {
        let o = options(Some(end));
        // The rows really leave: 2B before the end step, B from it on.
        let mut count = Watch {
            inner: CpuBackend::new(&model),
            keep: false,
            rows: Vec::new(),
        };
        pipeline::run_steps(&mut count, &o).unwrap();
        let want = rows_per_step(o.labels.len(), end, total);
        assert_eq!(count.rows, want, "rows per step with cfg_end_step {end}");
        let dropped = pipeline::run_steps(&mut CpuBackend::new(&model), &o).unwrap();
        let kept = pipeline::run_steps(&mut keep_rows(CpuBackend::new(&model)), &o).unwrap();
        let rel = worst_rel(&dropped.step_logits, &kept.step_logits);
        println!("cpu, cfg_end_step {end} of {total}: worst logits error {rel:.2e}");
        assert!(rel <= 1e-5, "logits differ by {rel:.2e}");
        assert_eq!(dropped.tokens, kept.tokens);
    }
    // An end at or past the last step is no interval: the authors' behaviour exactly.
    let full = pipeline::run_steps(&mut CpuBackend::new(&model), &options(None)).unwrap();
    let late = pipeline::run_steps(&mut CpuBackend::new(&model), &options(Some(total))).unwrap();
    assert_eq!(full.tokens, late.tokens);
    assert_eq!(full.step_logits, late.step_logits);
    // And the interval does change the images (guidance really stops).
    let early = pipeline::run_steps(&mut CpuBackend::new(&model), &options(Some(2))).unwrap();
    assert_ne!(
        full.tokens, early.tokens,
        "stopping guidance at step 2 changed nothing"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_dropping_the_unconditional_rows_changes_nothing() {
    use checkergen::cuda::engine::{GpuBackend, GpuModel};
    let model = tiny();
    let gm = GpuModel::new(common::gpu("cfg interval"), &model).unwrap();
    let total = pipeline::schedule_of(&model.scale_sizes, &options(None))
        .unwrap()
        .total_steps();
    let end = total - 2;
    let mut o = options(Some(end));
    o.record_logits = true;
    gm.gpu.record_ledger(true);
    gm.gpu.ledger().clear();
    // The rows really leave the engine's batch too.
    let mut count = Watch {
        inner: GpuBackend::new(&gm),
        keep: false,
        rows: Vec::new(),
    };
    let dropped = pipeline::run_steps(&mut count, &o).unwrap();
    assert_eq!(
        count.rows,
        rows_per_step(o.labels.len(), end, total),
        "rows per step on the engine"
    );
    drop(count); // its buffers back to the model, for the next batch
    let dropped_flops = gm.gpu.ledger().total(None).flops;
    gm.gpu.ledger().clear();
    let kept = pipeline::run_steps(&mut keep_rows(GpuBackend::new(&gm)), &o).unwrap();
    let kept_flops = gm.gpu.ledger().total(None).flops;
    gm.gpu.record_ledger(false);
    {
        // The ledger counts the work the launches declare: the last steps run on half the
        // rows.
        println!("ledger FLOPs: {dropped_flops} dropping, {kept_flops} keeping every row");
        assert!(dropped_flops < kept_flops, "no work was saved");
    }
    let rel = worst_rel(&dropped.step_logits, &kept.step_logits);
    println!("cuda engine, cfg_end_step {end} of {total}: worst logits error {rel:.2e}");
    // Both runs are the engine's bf16 arithmetic on the same rows: equal up to GEMM row
    // blocking (1e-5 relative).
    assert!(rel <= 1e-5, "logits differ by {rel:.2e}");
    assert_eq!(dropped.tokens, kept.tokens);
    // A batch of the same shape after a dropping one (the model's cached buffers) starts
    // with every row again: as on a model that never dropped any.
    let again = pipeline::run_steps(&mut GpuBackend::new(&gm), &options(None)).unwrap();
    let gm2 = GpuModel::new(common::gpu("cfg interval, second model"), &model).unwrap();
    let fresh = pipeline::run_steps(&mut GpuBackend::new(&gm2), &options(None)).unwrap();
    assert_eq!(again.tokens, fresh.tokens);
    assert_eq!(again.step_logits, fresh.step_logits);
}

/// `sample --cfg-end-step`: run.json records the interval and the steps it guided.
#[test]
fn cli_records_the_interval() {
    let dir = std::env::temp_dir().join(format!("cg-cfg-interval-{}", std::process::id()));
    let out = dir.join("run");
    let o = out.to_str().unwrap();
    let (ok, _, err) = common::cli(&[
        "sample",
        "--num-samples",
        "2",
        "--steps-per-scale",
        "1",
        "--cfg-start-step",
        "1",
        "--cfg-end-step",
        "3",
        "--device",
        "cpu",
        "--out",
        o,
    ]);
    assert!(ok, "{err}");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["cfg_end_step"], 3);
    assert_eq!(run["guided_steps"], 2);
    std::fs::remove_dir_all(&dir).ok();
}
