//! The embedding API: load a [`Model`] on a [`Device`], describe a [`Request`], and
//! [`Model::sample`] it into [`Images`]. Everything here is built on the one step loop
//! (`pipeline::sample_batches`); the CLI, the C ABI and the Python module all call it, so the
//! three give the same pixels for the same request and seed.

use crate::model::config;
pub use crate::model::weights::Precision;
use crate::pipeline::{self, SampleOptions, Steps};
use crate::sampling::TokenPolicy;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Boxed error source: the context chain of an internal failure (`source()` walks it).
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a call failed. `Display` is the top line; [`std::error::Error::source`] walks the
/// context chain beneath it (what failed to parse, which tensor, which kernel...), and
/// [`Error::chain_message`] joins the whole chain on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request or a setting is invalid (class id out of range, zero steps, a batch too
    /// large, a temperature that is not a finite number...). Nothing was sampled.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The model file could not be read or is not a valid model.
    #[error("cannot load model {}", path.display())]
    Load {
        /// The file given to [`Model::load`].
        path: PathBuf,
        /// What went wrong, with its context chain.
        #[source]
        source: Source,
    },
    /// The device asked for is not available (no GPU, no such ordinal, a build without
    /// CUDA) or could not take the model.
    #[error("device unavailable: {message}")]
    Device {
        /// What was asked for and why it failed.
        message: String,
        /// The underlying failure, when there is one.
        #[source]
        source: Option<Source>,
    },
    /// Sampling failed on the device (out of memory, a kernel error...).
    #[error("sampling failed")]
    Sampling(#[source] Source),
    /// Scoring real images failed on the device (out of memory, a kernel error...).
    #[error("scoring failed")]
    Scoring(#[source] Source),
    /// The cancellation flag was set; the images of finished batches are discarded.
    #[error("sampling cancelled")]
    Cancelled,
}

impl Error {
    /// The message and every cause beneath it, joined with `": "` on one line (what the C
    /// ABI's `cg_last_error` and the Python exceptions carry).
    pub fn chain_message(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}

/// `anyhow` inside the crate, with its chain kept, as an [`Error`] source.
fn source(e: anyhow::Error) -> Source {
    e.into()
}

/// The result type of this API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// The first CUDA GPU when one is present and usable, else the CPU.
    #[default]
    Auto,
    /// The f32 CPU reference backend (all cores).
    Cpu,
    /// CUDA device `ordinal` (0 = the first); an error without one.
    Cuda(usize),
    /// The host-emulated CUDA device: the CUDA engine's kernels and orchestration run on the
    /// CPU with memory checking. For development and testing only: slow, and its pixels are
    /// the GPU engine's (bf16), not the CPU reference's.
    Emulated,
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `auto`, `cpu`, `cuda` (= `cuda:0`), `cuda:N` or `emu`.
    ///
    /// ```
    /// use checkergen::Device;
    /// assert_eq!("cuda:1".parse::<Device>(), Ok(Device::Cuda(1)));
    /// assert!("gpu".parse::<Device>().is_err());
    /// ```
    fn from_str(s: &str) -> std::result::Result<Device, String> {
        Ok(match s {
            "auto" => Device::Auto,
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            "emu" => Device::Emulated,
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::Cuda(n),
                _ => {
                    return Err(format!(
                        "device must be \"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"emu\", got {s:?}"
                    ));
                }
            },
        })
    }
}

/// How each token is chosen from the (guided) logits. Built only through its constructors,
/// so it never holds an invalid setting.
///
/// ```
/// use checkergen::Policy;
/// let p = Policy::sample(1.0)?.top_k(100)?.top_p(0.9)?;
/// assert_eq!(p.temperature(), 1.0);
/// assert!(Policy::sample(-1.0).is_err());
/// assert!(Policy::sample(1.0)?.top_p(0.0).is_err());
/// # Ok::<(), checkergen::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Policy(TokenPolicy);

impl Policy {
    /// Always the most likely token (argmax; temperature 0).
    pub fn greedy() -> Policy {
        Policy(TokenPolicy {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        })
    }

    /// Sample softmax(logits / `temperature`); `temperature` must be finite and > 0
    /// (use [`Policy::greedy`] for 0).
    pub fn sample(temperature: f32) -> Result<Policy> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::InvalidRequest(format!(
                "temperature must be a finite number > 0 (Policy::greedy for argmax), got \
                 {temperature}"
            )));
        }
        Ok(Policy(TokenPolicy {
            temperature,
            top_k: None,
            top_p: None,
        }))
    }

    /// Keep only the `k` most likely tokens (`k` >= 1).
    pub fn top_k(mut self, k: usize) -> Result<Policy> {
        if k == 0 {
            return Err(Error::InvalidRequest("top-k must be at least 1".into()));
        }
        self.0.top_k = Some(k);
        Ok(self)
    }

    /// Keep the smallest set of most likely tokens whose probability reaches `p`, in (0, 1].
    pub fn top_p(mut self, p: f32) -> Result<Policy> {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "top-p must be in (0, 1], got {p}"
            )));
        }
        self.0.top_p = Some(p);
        Ok(self)
    }

    /// The temperature (0 for greedy).
    pub fn temperature(&self) -> f32 {
        self.0.temperature
    }

    /// The top-k setting, if any.
    pub fn k(&self) -> Option<usize> {
        self.0.top_k
    }

    /// The top-p setting, if any.
    pub fn p(&self) -> Option<f32> {
        self.0.top_p
    }
}

impl Default for Policy {
    /// The released setting: temperature 1, no top-k or top-p.
    fn default() -> Policy {
        Policy(TokenPolicy {
            temperature: pipeline::DEFAULT_TEMPERATURE,
            top_k: None,
            top_p: None,
        })
    }
}

/// What one sampling progress report says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// A serial step of a batch finished.
    Step {
        /// Index of the batch (0-based) and the number of batches.
        batch: usize,
        /// Number of batches of the request.
        batches: usize,
        /// Steps of this batch done (1..=`steps`).
        step: usize,
        /// Serial steps per batch.
        steps: usize,
    },
    /// A batch finished (tokens sampled and decoded).
    Batch {
        /// Index of the batch (0-based).
        batch: usize,
        /// Number of batches of the request.
        batches: usize,
        /// Images finished so far.
        images_done: usize,
        /// Images of the request.
        images: usize,
    },
}

/// Builder methods of [`Request`]: `name(arg: Type) => field = value;` is
/// `pub fn name(mut self, arg: Type) -> Request { self.field = value; self }`.
macro_rules! builder_setters {
    ($($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty) => $field:ident = $value:expr;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Request {
                self.$field = $value;
                self
            }
        )*
    };
}

/// A sampling request: class labels and the sampling settings (the released defaults unless
/// changed). Checked against the model when sampled.
///
/// ```
/// use checkergen::{Policy, Request};
/// let r = Request::new(vec![207, 360])
///     .guidance(2.0)
///     .steps_per_scale(8)
///     .policy(Policy::sample(0.9)?.top_k(600)?)
///     .seed(42)
///     .batch_size(1);
/// assert_eq!(r.labels(), &[207, 360]);
/// # Ok::<(), checkergen::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Request {
    labels: Vec<usize>,
    cfg: f32,
    cfg_start_step: usize,
    cfg_end_step: Option<usize>,
    steps: Steps,
    policy: Policy,
    seed: u64,
    batch_size: Option<usize>,
    keep_tokens: bool,
    cancel: Option<Arc<AtomicBool>>,
}

impl Request {
    /// One image per class id in `labels`, with the released settings: guidance 1.5 from
    /// step 5, 4 steps per scale, temperature 1, seed 0, the device's default batch size.
    pub fn new(labels: impl Into<Vec<usize>>) -> Request {
        Request {
            labels: labels.into(),
            cfg: pipeline::DEFAULT_CFG,
            cfg_start_step: pipeline::DEFAULT_CFG_START_STEP,
            cfg_end_step: None,
            steps: Steps::Uniform(pipeline::DEFAULT_STEPS_PER_SCALE),
            policy: Policy::default(),
            seed: 0,
            batch_size: None,
            keep_tokens: false,
            cancel: None,
        }
    }

    builder_setters! {
        /// Classifier-free guidance strength: logits = cond + cfg * (cond - uncond); 0 turns
        /// guidance (and the unconditional half of the work) off. Must be finite and >= 0.
        guidance(cfg: f32) => cfg = cfg;
        /// The first global serial step (0 = the 1x1 scale) at which guidance applies.
        cfg_start_step(step: usize) => cfg_start_step = step;
        /// The first global serial step at which guidance no longer applies: guidance on for
        /// `cfg_start_step <= t < step` (default: to the end, the authors' behaviour). From
        /// that step on the unconditional rows leave the batch, so the remaining steps cost
        /// half.
        cfg_end_step(step: usize) => cfg_end_step = Some(step);
        /// The same number of serial steps on every scale (>= 1).
        steps_per_scale(k: usize) => steps = Steps::Uniform(k);
        /// Explicit serial steps for each scale, smallest scale first (one value >= 1 per
        /// scale).
        steps(per_scale: impl Into<Vec<usize>>) => steps = Steps::PerScale(per_scale.into());
        /// How tokens are chosen.
        policy(policy: Policy) => policy = policy;
        /// The random seed. Image i of a request is drawn from (seed, i) alone: the images do
        /// not depend on the batch size or on the other labels.
        seed(seed: u64) => seed = seed;
        /// Images per batch (>= 1); without it the device's default
        /// ([`Model::default_batch_size`]).
        batch_size(n: usize) => batch_size = Some(n);
        /// Also return every image's token pyramid ([`Images::tokens`]).
        keep_tokens(keep: bool) => keep_tokens = keep;
        /// A flag that, once set (from any thread), stops sampling after the current serial
        /// step with [`Error::Cancelled`].
        cancel_flag(flag: Arc<AtomicBool>) => cancel = Some(flag);
    }

    /// The class ids, one image each.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The pipeline's options for this request (settings only; checked by the pipeline).
    fn options(&self) -> SampleOptions {
        let mut o = SampleOptions::new(self.labels.clone());
        o.cfg = self.cfg;
        o.cfg_start_step = self.cfg_start_step;
        o.cfg_end_step = self.cfg_end_step;
        o.steps = self.steps.clone();
        o.policy = self.policy.0.clone();
        o.seed = self.seed;
        o
    }
}

/// Where a sampling call spent its time ([`Images::timings`]), from what the step loop
/// measures. Milliseconds, each summed over the request's batches.
///
/// On a GPU the step and prefill figures are device time between timestamps on the stream
/// (eager or a replayed CUDA graph), on the CPU host wall time; `decode_ms` is host wall
/// time of the decode after the loop, plus on a GPU the device time of a decode that ran
/// inside the loop's CUDA graph. On the host-emulated device (`Device::Emulated`) they are
/// wall times of the emulation and mean nothing about a GPU.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Timings {
    /// Per serial step of the schedule (the 1x1 scale's step first), summed over batches:
    /// one entry per serial step, or none when a batch ran as a replayed CUDA graph without
    /// step timestamps (then no per-step figure covers every batch).
    pub step_ms: Vec<f64>,
    /// The class-token prefill, summed over batches.
    pub prefill_ms: f64,
    /// The VQ decode of the last scale into pixels, summed over batches.
    pub decode_ms: f64,
    /// Batches the request ran in.
    pub batches: usize,
    /// Of those, the batches whose token loop ran as a replayed CUDA graph (0 on the CPU).
    pub replayed_batches: usize,
}

impl Timings {
    /// Add one batch's figures: its step times (empty when untimed) and the rest.
    fn add_batch(&mut self, s: &pipeline::Samples) {
        let t = &s.tokens;
        if self.batches == 0 {
            self.step_ms = t.step_ms.clone();
        } else if self.step_ms.len() == t.step_ms.len() {
            for (a, b) in self.step_ms.iter_mut().zip(&t.step_ms) {
                *a += b;
            }
        } else {
            // A batch without step times: no per-step sum covers every batch.
            self.step_ms.clear();
        }
        self.prefill_ms += t.prefill_ms;
        self.decode_ms += s.decode_ms;
        self.batches += 1;
        self.replayed_batches += usize::from(t.replayed);
    }
}

/// Sampled images: `len()` images of `size() x size()` RGB pixels, 8 bits, stored
/// image-major, row-major, channels last (N, H, W, 3). Two `Images` are equal when their
/// pixels, scales and tokens are (their [`Timings`] are not compared).
#[derive(Clone, Debug)]
pub struct Images {
    count: usize,
    size: usize,
    pixels: Vec<u8>,
    scale_sizes: Vec<usize>,
    tokens: Option<Vec<Vec<u32>>>,
    timings: Timings,
}

impl PartialEq for Images {
    fn eq(&self, other: &Images) -> bool {
        (
            self.count,
            self.size,
            &self.pixels,
            &self.scale_sizes,
            &self.tokens,
        ) == (
            other.count,
            other.size,
            &other.pixels,
            &other.scale_sizes,
            &other.tokens,
        )
    }
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no images (never, for a successful request).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Image side in pixels (H = W).
    pub fn size(&self) -> usize {
        self.size
    }

    /// All pixels, (N, H, W, 3).
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The pixels of image `i`, (H, W, 3); panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.size * self.size * 3;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Take the pixel buffer, (N, H, W, 3).
    pub fn into_pixels(self) -> Vec<u8> {
        self.pixels
    }

    /// Token grid sides per scale, ascending.
    pub fn scale_sizes(&self) -> &[usize] {
        &self.scale_sizes
    }

    /// With [`Request::keep_tokens`]: per scale (ascending), the (N, s, s) token ids in
    /// raster order.
    pub fn tokens(&self) -> Option<&[Vec<u32>]> {
        self.tokens.as_deref()
    }

    /// Where the sampling call spent its time: per serial step, prefill and decode, summed
    /// over batches ([`Timings`]: device times on a GPU, wall times on the CPU; the
    /// emulator's mean nothing).
    ///
    /// ```
    /// use checkergen::{Device, Model, Request};
    /// let model = Model::tiny(Device::Cpu)?;
    /// let images = model.sample(&Request::new(vec![0, 1, 2]).steps_per_scale(2).batch_size(2))?;
    /// let t = images.timings();
    /// // The 1x1 scale takes one serial step, every other scale 2: one entry each.
    /// let serial = 1 + 2 * (model.scale_sizes().len() - 1);
    /// assert_eq!((t.step_ms.len(), t.batches, t.replayed_batches), (serial, 2, 0));
    /// assert!(t.step_ms.iter().all(|&ms| ms >= 0.0) && t.decode_ms > 0.0);
    /// # Ok::<(), checkergen::Error>(())
    /// ```
    pub fn timings(&self) -> &Timings {
        &self.timings
    }
}

/// The engine a model runs on.
enum Engine {
    Cpu,
    /// The GPU engine (or the emulator): one request at a time, so behind a lock.
    #[cfg(feature = "cuda")]
    Gpu(Box<std::sync::Mutex<crate::cuda::engine::GpuModel>>),
}

/// A model loaded on a device, ready to sample. `Model` is `Send + Sync`: share it (e.g. in
/// an `Arc`) between threads; on the CPU concurrent requests run side by side (each on its
/// own buffers), on a GPU they take turns.
///
/// ```
/// use checkergen::{Device, Model, Request};
/// // The tiny preset with random weights: no file needed (images are noise-like).
/// let model = Model::tiny(Device::Cpu)?;
/// let images = model.sample(&Request::new(vec![0, 1]).steps_per_scale(1).seed(7))?;
/// assert_eq!((images.len(), images.size()), (2, model.image_size()));
/// assert_eq!(images.image(1).len(), model.image_size() * model.image_size() * 3);
/// # Ok::<(), checkergen::Error>(())
/// ```
pub struct Model {
    model: crate::model::Model,
    engine: Engine,
    description: String,
    note: Option<String>,
    /// The VQ encoder on the device, uploaded by the first [`Model::score`] on a GPU.
    #[cfg(feature = "cuda")]
    gpu_encoder: std::sync::Mutex<Option<Box<crate::cuda::decoder::GpuEncoder>>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("device", &self.device())
            .field("num_classes", &self.num_classes())
            .field("image_size", &self.image_size())
            .finish()
    }
}

impl Model {
    /// Load a model file (from `checkergen convert` or `checkergen init`) onto `device`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Model> {
        let path = path.as_ref();
        let model = crate::model::Model::load(path).map_err(|e| Error::Load {
            path: path.to_path_buf(),
            source: source(e),
        })?;
        Model::on_device(model, device)
    }

    /// The `tiny` preset (a few hundred thousand parameters, 256 x 256 images) with random
    /// weights from seed 0, as `checkergen init --preset tiny` writes it: for tests, examples
    /// and trying the API without a checkpoint. Its images are noise-like by design.
    pub fn tiny(device: Device) -> Result<Model> {
        let build = || -> anyhow::Result<crate::model::Model> {
            let cfg = config::preset("tiny")?;
            let map = crate::model::init::random_tensors(&cfg, 0)?;
            crate::model::Model::from_tensors(cfg, &map)
        };
        let model = build().map_err(|e| Error::Load {
            path: PathBuf::from("<preset tiny>"),
            source: source(e),
        })?;
        Model::on_device(model, device)
    }

    /// A loaded host model on `device`.
    #[doc(hidden)]
    pub fn on_device(model: crate::model::Model, device: Device) -> Result<Model> {
        let (engine, note) = open_engine(&model, device)?;
        let description = match &engine {
            Engine::Cpu => cpu_description(model.weights.precision()),
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                if g.gpu.is_emu() {
                    "emu (host-emulated CUDA device)".into()
                } else {
                    format!("cuda ({}, kernels: {})", g.gpu.name, g.gpu.image_kind)
                }
            }
        };
        Ok(Model {
            model,
            engine,
            description,
            note,
            #[cfg(feature = "cuda")]
            gpu_encoder: std::sync::Mutex::new(None),
        })
    }

    /// Store the CPU path's large transformer linears (qkv, wo, w13, w2, the AdaLN
    /// modulation, the head) in `precision`. [`Precision::F32`] is the default and the
    /// reference; [`Precision::Bf16`] halves those weights' bytes and uses the CPU's bf16
    /// dot products where it has them (f32 accumulation; logits within about 1e-2 relative
    /// of f32, PERF.md). On a GPU (or the emulator) weights are always bf16: `Bf16` changes
    /// nothing there and `F32` is an [`Error::InvalidRequest`]. A bf16 CPU model cannot go
    /// back to f32 (load it again).
    ///
    /// ```
    /// use checkergen::{Device, Model, Precision, Request};
    /// let model = Model::tiny(Device::Cpu)?.with_precision(Precision::Bf16)?;
    /// assert_eq!(model.precision(), Precision::Bf16);
    /// let images = model.sample(&Request::new(vec![0]).steps_per_scale(1))?;
    /// assert_eq!(images.len(), 1);
    /// # Ok::<(), checkergen::Error>(())
    /// ```
    pub fn with_precision(mut self, precision: Precision) -> Result<Model> {
        self.set_precision(precision)?;
        Ok(self)
    }

    /// [`Model::with_precision`] in place (the C ABI's `cg_model_set_precision`): on an
    /// error the model is unchanged.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if !self.is_cpu() {
            return match precision {
                Precision::Bf16 => Ok(()),
                Precision::F32 => Err(Error::InvalidRequest(
                    "precision f32 is the CPU path's: the GPU path always stores weights in bf16 (use Device::Cpu for the f32 reference)"
                        .into(),
                )),
            };
        }
        match (self.model.weights.precision(), precision) {
            (Precision::Bf16, Precision::F32) => Err(Error::InvalidRequest(
                "this model's weights are already bf16; load it again for f32".into(),
            )),
            (_, p) => {
                self.model.set_precision(p);
                self.description = cpu_description(p);
                Ok(())
            }
        }
    }

    /// How the transformer's large linears are stored: on the CPU as chosen by
    /// [`Model::with_precision`] (default f32), on a GPU always bf16.
    pub fn precision(&self) -> Precision {
        match &self.engine {
            Engine::Cpu => self.model.weights.precision(),
            #[cfg(feature = "cuda")]
            Engine::Gpu(_) => Precision::Bf16,
        }
    }

    /// The device the model runs on, in words: `cpu (N threads)` (`cpu (N threads, bf16
    /// weights)` after [`Model::with_precision`]), `cuda (NAME, kernels: KIND)` or `emu
    /// (host-emulated CUDA device)`.
    pub fn device(&self) -> &str {
        &self.description
    }

    /// Whether the model runs on the CPU reference backend.
    pub fn is_cpu(&self) -> bool {
        matches!(self.engine, Engine::Cpu)
    }

    /// Number of classes: valid labels are `0..num_classes()`.
    pub fn num_classes(&self) -> usize {
        self.model.config.num_classes
    }

    /// Side of the sampled images in pixels.
    pub fn image_size(&self) -> usize {
        self.model.config.img_size
    }

    /// Token grid sides per scale, ascending (a request's explicit step list has one entry
    /// per scale).
    pub fn scale_sizes(&self) -> &[usize] {
        &self.model.scale_sizes
    }

    /// The memory this model's batches are planned against (`pipeline::batch_rule`).
    pub fn memory(&self) -> Result<pipeline::Memory> {
        Ok(match &self.engine {
            Engine::Cpu => pipeline::Memory::Host,
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                g.gpu.memory().map_err(|e| Error::Sampling(source(e)))?
            }
        })
    }

    /// The batch-size rule on this model's device (`pipeline::batch_rule`): the most images
    /// one batch may hold, and the default. On a GPU the cap is 85 % of its total memory
    /// and the default what fits in 60 % of its free memory (at most 256, never above the
    /// cap); on the emulator the default is 4; on the CPU at most 8.
    pub fn batch_rule(&self, guided: bool) -> Result<pipeline::BatchRule> {
        pipeline::batch_rule(&self.model.config, guided, self.memory()?)
            .map_err(|e| Error::InvalidRequest(format!("{e:#}")))
    }

    /// The batch size used when a request gives none ([`Model::batch_rule`]'s default).
    pub fn default_batch_size(&self, guided: bool) -> Result<usize> {
        Ok(self.batch_rule(guided)?.default)
    }

    /// Sample `request`.
    pub fn sample(&self, request: &Request) -> Result<Images> {
        self.sample_with_progress(request, |_| {})
    }

    /// Sample `request`, calling `progress` after every serial step and every batch (on the
    /// calling thread).
    ///
    /// ```
    /// use checkergen::{Device, Model, Progress, Request};
    /// let model = Model::tiny(Device::Cpu)?;
    /// let mut batches = 0;
    /// let req = Request::new(vec![3; 3]).steps_per_scale(1).batch_size(2);
    /// model.sample_with_progress(&req, |p| {
    ///     if let Progress::Batch { .. } = p {
    ///         batches += 1
    ///     }
    /// })?;
    /// assert_eq!(batches, 2);
    /// # Ok::<(), checkergen::Error>(())
    /// ```
    pub fn sample_with_progress(
        &self,
        request: &Request,
        mut progress: impl FnMut(Progress),
    ) -> Result<Images> {
        let (opts, batch) = self.prepare(request)?;
        let n = opts.labels.len();
        let side = self.image_size();
        let plane = side * side * 3;
        let batches = n.div_ceil(batch);
        let mut pixels = Vec::new();
        pixels
            .try_reserve_exact(n * plane)
            .map_err(|_| Error::InvalidRequest(format!("{n} images do not fit in memory")))?;
        let mut tokens: Option<Vec<Vec<u32>>> = None;
        let mut timings = Timings::default();
        let cancel = request.cancel.clone();
        let cancelled = || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let progress = std::cell::RefCell::new(&mut progress);
        let mut on_step = |first: usize, done: usize, total: usize| -> anyhow::Result<()> {
            (progress.borrow_mut())(Progress::Step {
                batch: first / batch,
                batches,
                step: done,
                steps: total,
            });
            if cancelled() {
                return Err(anyhow::Error::new(CancelledMarker));
            }
            Ok(())
        };
        let mut each = |first: usize, s: pipeline::Samples| -> anyhow::Result<()> {
            let b = s.pixels.len() / plane;
            timings.add_batch(&s);
            for i in 0..b {
                pixels.extend_from_slice(&crate::io::image::planar_to_rgb(&s.pixels, i, side));
            }
            if request.keep_tokens {
                match &mut tokens {
                    None => tokens = Some(s.tokens.tokens),
                    Some(acc) => {
                        for (a, t) in acc.iter_mut().zip(&s.tokens.tokens) {
                            a.extend_from_slice(t);
                        }
                    }
                }
            }
            (progress.borrow_mut())(Progress::Batch {
                batch: first / batch,
                batches,
                images_done: first + b,
                images: n,
            });
            Ok(())
        };
        self.with_backend(|be| {
            pipeline::sample_batches_observed(be, &opts, batch, &mut on_step, &mut each)
        })
        .map_err(|e| {
            if e.downcast_ref::<CancelledMarker>().is_some() {
                Error::Cancelled
            } else {
                Error::Sampling(source(e))
            }
        })?;
        Ok(Images {
            count: n,
            size: side,
            pixels,
            scale_sizes: self.model.scale_sizes.clone(),
            tokens,
            timings,
        })
    }

    /// Check `request` against the model: the pipeline's options and the batch size.
    fn prepare(&self, request: &Request) -> Result<(SampleOptions, usize)> {
        let opts = request.options();
        let n = opts.labels.len();
        let max_run = crate::limits::MAX_RUN_IMAGES;
        if n > max_run {
            return Err(Error::InvalidRequest(format!(
                "{n} labels: at most {max_run} images per request"
            )));
        }
        let batch = match request.batch_size {
            Some(0) => {
                return Err(Error::InvalidRequest(
                    "batch size must be at least 1".into(),
                ));
            }
            Some(b) => b.min(n.max(1)),
            None => self.default_batch_size(opts.cfg > 0.0)?.min(n.max(1)),
        };
        let mut probe = opts.clone();
        probe.labels.truncate(batch);
        let mem = self.memory()?;
        pipeline::validate_options(
            &self.model.config,
            self.model.scale_sizes.len(),
            &probe,
            mem,
        )
        .map_err(|e| Error::InvalidRequest(format!("{e:#}")))?;
        if let Some(&bad) = opts.labels.iter().find(|&&l| l >= self.num_classes()) {
            return Err(Error::InvalidRequest(format!(
                "class id {bad} is out of range: this model has {} classes (0..{})",
                self.num_classes(),
                self.num_classes() - 1
            )));
        }
        Ok((opts, batch))
    }

    /// The host model (CLI internals: maps, tokens files, run metadata).
    #[doc(hidden)]
    pub fn host_model(&self) -> &crate::model::Model {
        &self.model
    }

    /// What the device choice wants said once (e.g. `Device::Auto` fell back to the CPU
    /// because a GPU failed to open), for a front end to print.
    #[doc(hidden)]
    pub fn device_note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Whether the model runs on the host emulator (its timings mean nothing).
    #[doc(hidden)]
    pub fn is_emulated(&self) -> bool {
        match &self.engine {
            Engine::Cpu => false,
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => g.lock().unwrap_or_else(|p| p.into_inner()).gpu.is_emu(),
        }
    }

    /// Run `f` on a backend of this model (the CPU reference, or the GPU engine under its
    /// lock): the CLI's way to the pipeline's full outputs (statistics, pyramids, timings).
    #[doc(hidden)]
    pub fn with_backend<R>(
        &self,
        f: impl FnOnce(&mut dyn pipeline::Backend) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        match &self.engine {
            Engine::Cpu => f(&mut crate::cpu::CpuBackend::new(&self.model)),
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut crate::cuda::engine::GpuBackend::new(&g))
            }
        }
    }
}

impl Model {
    /// Run `f` on this model's backend and time it: CUDA events on a GPU (the stream's own
    /// time, not the host's), the wall clock on the CPU and the emulator. Seconds.
    #[doc(hidden)]
    pub fn timed_with_backend<R>(
        &self,
        f: impl FnOnce(&mut dyn pipeline::Backend) -> anyhow::Result<R>,
    ) -> anyhow::Result<(f64, R)> {
        match &self.engine {
            Engine::Cpu => {
                let t = std::time::Instant::now();
                let r = f(&mut crate::cpu::CpuBackend::new(&self.model))?;
                Ok((t.elapsed().as_secs_f64(), r))
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                let mut out = None;
                let ms = g.gpu.time_ms(|| {
                    out = Some(f(&mut crate::cuda::engine::GpuBackend::new(&g))?);
                    Ok(())
                })?;
                Ok((ms / 1e3, out.ok_or_else(|| anyhow::anyhow!("no result"))?))
            }
        }
    }

    /// Device memory in use now (bytes) on a GPU or the emulator; None on the CPU (a front
    /// end measures the process's resident memory there).
    #[doc(hidden)]
    pub fn device_memory_in_use(&self) -> Option<u64> {
        match &self.engine {
            Engine::Cpu => None,
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                g.gpu
                    .mem_get_info()
                    .ok()
                    .map(|(free, total)| (total - free) as u64)
            }
        }
    }

    /// The model on the emulator's dry run: the CUDA engine's exact launch sequence, nothing
    /// executed and no memory backed, for the traffic ledger (`bench --dry-run`).
    #[cfg(feature = "cuda")]
    #[doc(hidden)]
    pub fn dry_run(model: crate::model::Model) -> anyhow::Result<Model> {
        let gm = crate::cuda::engine::GpuModel::new(crate::cuda::Gpu::emu_dry()?, &model)?;
        Ok(Model {
            model,
            engine: Engine::Gpu(Box::new(std::sync::Mutex::new(gm))),
            description: "emu (dry run: nothing executed)".into(),
            note: None,
            gpu_encoder: std::sync::Mutex::new(None),
        })
    }

    /// Run `f` with the device's traffic ledger cleared first; returns what it recorded
    /// (launches, bytes, FLOPs). Only the emulator keeps a ledger.
    #[cfg(feature = "cuda")]
    #[doc(hidden)]
    pub fn with_ledger<R>(
        &self,
        f: impl FnOnce(&mut dyn pipeline::Backend) -> anyhow::Result<R>,
    ) -> anyhow::Result<(R, crate::cuda::ledger::Ledger)> {
        match &self.engine {
            Engine::Cpu => anyhow::bail!("the traffic ledger is the CUDA engine's (--device emu)"),
            Engine::Gpu(g) => {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                g.gpu.ledger().clear();
                let r = f(&mut crate::cuda::engine::GpuBackend::new(&g))?;
                let led = g.gpu.ledger().clone();
                Ok((r, led))
            }
        }
    }
}

/// The teacher-forced likelihood of real images at one number of steps per scale
/// (SPEC.md section 9): every true code's cross-entropy given everything before its block,
/// from one masked pass per batch ([`Model::score`]).
#[derive(Clone, Debug)]
pub struct Score(crate::cpu::score::ScoreStats);

impl Score {
    /// Steps per scale (the block size of the mask follows from it).
    pub fn steps_per_scale(&self) -> usize {
        self.0.steps_per_scale
    }

    /// Serial steps of that schedule (the 1x1 scale is one).
    pub fn serial_steps(&self) -> usize {
        self.0.serial_steps
    }

    /// Images scored.
    pub fn images(&self) -> usize {
        self.0.images
    }

    /// Scale sides, ascending.
    pub fn scale_sizes(&self) -> &[usize] {
        &self.0.scale_sizes
    }

    /// Mean cross-entropy over every code of every scale, nats per token (divide by ln 2
    /// for bits).
    pub fn loss_total(&self) -> f64 {
        self.0.loss_total()
    }

    /// Mean cross-entropy of each scale's codes, nats per token, ascending scale.
    pub fn loss_by_scale(&self) -> Vec<f64> {
        self.0.loss_by_scale()
    }

    /// Fraction of each scale's true codes that were the model's argmax.
    pub fn top1_by_scale(&self) -> Vec<f64> {
        self.0.top1_by_scale()
    }

    /// The `score --json` object (docs/cli.md, `score`).
    #[doc(hidden)]
    pub fn to_json(&self) -> serde_json::Value {
        self.0.to_json()
    }

    /// The accumulated sums (CLI internals).
    #[doc(hidden)]
    pub fn stats(&self) -> &crate::cpu::score::ScoreStats {
        &self.0
    }
}

impl Model {
    /// Score real images: `rgb` holds N 8-bit RGB images `(N, S, S, 3)` with S =
    /// [`Model::image_size`] (the layout of [`Images::pixels`]; other sizes go through the
    /// CLI's center crop first), `labels` one class id per image. Each image is encoded into
    /// its code pyramid by the model's VQ encoder and scored at every value of
    /// `steps_per_scale` (one [`Score`] each), in batches of 8 images. Needs a model file
    /// with the encoder (`checkergen convert` keeps it; `init` presets have it).
    ///
    /// ```
    /// use checkergen::{Device, Model};
    /// let model = Model::tiny(Device::Cpu)?;
    /// let side = model.image_size();
    /// let rgb = vec![128u8; 2 * side * side * 3];
    /// let scores = model.score(&rgb, &[0, 1], &[2, 4])?;
    /// assert_eq!(scores.len(), 2);
    /// assert!(scores[0].loss_total() > 0.0 && scores[1].serial_steps() > scores[0].serial_steps());
    /// # Ok::<(), checkergen::Error>(())
    /// ```
    pub fn score(
        &self,
        rgb: &[u8],
        labels: &[usize],
        steps_per_scale: &[usize],
    ) -> Result<Vec<Score>> {
        let side = self.image_size();
        let px = side * side * 3;
        if rgb.len() != labels.len() * px {
            return Err(Error::InvalidRequest(format!(
                "score: {} bytes for {} labels: give (N, {side}, {side}, 3) 8-bit RGB images, one label each",
                rgb.len(),
                labels.len()
            )));
        }
        let mut scores = self.new_scores(steps_per_scale)?;
        for (imgs, lab) in rgb.chunks(8 * px).zip(labels.chunks(8)) {
            self.score_batch(imgs, lab, &mut scores)?;
        }
        Ok(scores)
    }

    /// Empty scores, one per steps-per-scale value (for [`Model::score_batch`]).
    #[doc(hidden)]
    pub fn new_scores(&self, steps_per_scale: &[usize]) -> Result<Vec<Score>> {
        if steps_per_scale.is_empty() {
            return Err(Error::InvalidRequest(
                "score: give at least one steps-per-scale value".into(),
            ));
        }
        steps_per_scale
            .iter()
            .map(|&k| {
                let sched = crate::order::Schedule::uniform(&self.model.scale_sizes, k)
                    .map_err(|e| Error::InvalidRequest(format!("{e:#}")))?;
                Ok(Score(crate::cpu::score::ScoreStats::new(&sched, k)))
            })
            .collect()
    }

    /// Add one batch of images to `scores` ([`Model::score`] in pieces: the CLI reads its
    /// files batch by batch). Returns the seconds spent encoding.
    #[doc(hidden)]
    pub fn score_batch(&self, rgb: &[u8], labels: &[usize], scores: &mut [Score]) -> Result<f64> {
        let side = self.image_size();
        let internal = |e: anyhow::Error| Error::Scoring(source(e));
        if rgb.len() != labels.len() * side * side * 3 || labels.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "score: {} bytes for {} labels (N, {side}, {side}, 3)",
                rgb.len(),
                labels.len()
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l >= self.num_classes()) {
            return Err(Error::InvalidRequest(format!(
                "class id {bad} is out of range: this model has {} classes (0..{})",
                self.num_classes(),
                self.num_classes() - 1
            )));
        }
        let t = std::time::Instant::now();
        let tokens = self.encode(rgb)?;
        let t_enc = t.elapsed().as_secs_f64();
        let m = &self.model;
        for sc in scores.iter_mut() {
            let k = sc.0.steps_per_scale;
            match &self.engine {
                Engine::Cpu => crate::cpu::score::score_codes(m, labels, &tokens, k, &mut sc.0),
                #[cfg(feature = "cuda")]
                Engine::Gpu(g) => {
                    let g = g.lock().unwrap_or_else(|p| p.into_inner());
                    crate::cuda::score::score_codes(
                        &g,
                        &m.scale_sizes,
                        labels,
                        &tokens,
                        k,
                        &mut sc.0,
                    )
                }
            }
            .map_err(internal)?;
        }
        Ok(t_enc)
    }

    /// The code pyramids of `rgb` (N images of [`Model::image_size`] squared, RGB, channels
    /// last) by the model's VQ encoder on its device: per scale (smallest first), the N
    /// images' s x s codes one after the other. On a GPU the encoder runs in f32, so the
    /// codes are the CPU reference's. Needs a model file with the encoder.
    pub fn encode(&self, rgb: &[u8]) -> Result<Vec<Vec<u32>>> {
        let side = self.image_size();
        let plane = side * side * 3;
        if rgb.is_empty() || !rgb.len().is_multiple_of(plane) {
            return Err(Error::InvalidRequest(format!(
                "encode: {} bytes is not N images of {side} x {side} x 3",
                rgb.len()
            )));
        }
        let invalid = |e: anyhow::Error| Error::InvalidRequest(format!("{e:#}"));
        let m = &self.model;
        let enc = m.encoder().map_err(invalid)?;
        let codebook = m.decoder.codebook();
        match &self.engine {
            Engine::Cpu => {
                let mut tokens = vec![Vec::new(); m.scale_sizes.len()];
                for img in rgb.chunks_exact(plane) {
                    let pyr = enc.encode_pyramid(img, side, &m.scale_sizes, codebook);
                    for (t, c) in tokens.iter_mut().zip(pyr.codes) {
                        t.extend(c);
                    }
                }
                Ok(tokens)
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => {
                let g = g.lock().unwrap_or_else(|p| p.into_inner());
                let mut slot = self.gpu_encoder.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    let e = crate::cuda::decoder::GpuEncoder::new(&g.gpu, enc).map_err(|e| {
                        device_error("cannot put the encoder on the device", Some(e))
                    })?;
                    *slot = Some(Box::new(e));
                }
                let genc = slot.as_ref().expect("just set");
                let n = rgb.len() / plane;
                let pyr = genc
                    .encode_pyramid(&g.gpu, rgb, n, side, &m.scale_sizes, codebook)
                    .map_err(|e| Error::Scoring(source(e)))?;
                Ok(pyr.codes)
            }
        }
    }
}

/// How [`Model::device`] names the CPU.
fn cpu_description(p: Precision) -> String {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    match p {
        Precision::F32 => format!("cpu ({threads} threads)"),
        Precision::Bf16 => format!("cpu ({threads} threads, bf16 weights)"),
    }
}

/// The error `on_step` returns when the cancellation flag is set.
#[derive(Debug)]
struct CancelledMarker;

impl std::fmt::Display for CancelledMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for CancelledMarker {}

fn device_error(message: impl Into<String>, e: Option<anyhow::Error>) -> Error {
    Error::Device {
        message: message.into(),
        source: e.map(source),
    }
}

/// The engine for `device`, and a note to print when `Auto` fell back to the CPU.
#[cfg(feature = "cuda")]
fn open_engine(model: &crate::model::Model, device: Device) -> Result<(Engine, Option<String>)> {
    use crate::cuda::Gpu;
    use crate::cuda::engine::GpuModel;
    let gpu = match device {
        Device::Cpu => return Ok((Engine::Cpu, None)),
        Device::Emulated => Gpu::emu().map_err(|e| device_error("emulated device", Some(e)))?,
        Device::Cuda(ordinal) => {
            let count = crate::cuda::device::cuda_device_count()
                .map_err(|e| device_error(format!("cuda:{ordinal}"), Some(e)))?;
            match count {
                None => {
                    return Err(device_error(
                        format!("cuda:{ordinal}: no CUDA driver or GPU found on this machine"),
                        None,
                    ));
                }
                Some(n) if ordinal >= n => {
                    return Err(device_error(
                        format!("cuda:{ordinal}: this machine has {n} CUDA device(s)"),
                        None,
                    ));
                }
                Some(_) => Gpu::new(ordinal)
                    .map_err(|e| device_error(format!("cuda:{ordinal}"), Some(e)))?,
            }
        }
        Device::Auto => match crate::cuda::device::auto_fallback(Gpu::try_new()) {
            (Some(g), _) => g,
            (None, note) => return Ok((Engine::Cpu, note)),
        },
    };
    let gm = GpuModel::new(gpu, model)
        .map_err(|e| device_error("cannot put the model on the device", Some(e)))?;
    Ok((Engine::Gpu(Box::new(std::sync::Mutex::new(gm))), None))
}

#[cfg(not(feature = "cuda"))]
fn open_engine(_model: &crate::model::Model, device: Device) -> Result<(Engine, Option<String>)> {
    match device {
        Device::Cpu | Device::Auto => Ok((Engine::Cpu, None)),
        Device::Cuda(_) | Device::Emulated => Err(device_error(
            "this build of checkergen has no CUDA support (the `cuda` feature is off)",
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<Model>();
        assert_send_sync::<Request>();
        assert_send_sync::<Images>();
        assert_send_sync::<Error>();
    }

    #[test]
    fn error_chain_is_one_line() {
        let e = Error::Load {
            path: "m.safetensors".into(),
            source: source(anyhow::anyhow!("inner").context("outer")),
        };
        assert_eq!(
            e.chain_message(),
            "cannot load model m.safetensors: outer: inner"
        );
    }
}
