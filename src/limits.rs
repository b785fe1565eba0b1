//! Every stated maximum of the program, in one place (docs/limits.md lists them; the
//! weight-magnitude bound lives with its check, `model::file::MAX_WEIGHT_ABS`). Pickle
//! nesting needs no bound: nested values are freed iteratively (`io::pth::pickle`).
//!
//! Each bound is checked before anything of that size is allocated, so a hostile file,
//! config or argument is refused with one line instead of exhausting memory or the stack.

/// Largest side of a token grid: `order --size`, a model's latent size (img_size / stride).
pub const MAX_GRID_SIZE: usize = 4096;
/// Most scales in a pyramid: a ratio so close to 1 that it needs more is refused.
pub const MAX_SCALES: usize = 64;
/// Most images in one batch (`--batch-size`, one `pipeline::sample` call); a smaller batch
/// is also refused when its estimated KV cache and pixels exceed [`MAX_SAMPLE_BYTES`].
pub const MAX_IMAGES: usize = 4096;
/// Most images one `sample` run takes (`--num-samples`, `--labels`), batch after batch.
pub const MAX_RUN_IMAGES: usize = 10_000_000;
/// Most warm-up or timed repeats of one measurement (`bench`, `steps`, `bench-decode`
/// `--warmup` / `--iters`): a count that would run for days is refused, not started.
pub const MAX_REPEATS: usize = 10_000;
/// Host memory one batch may plan for (KV caches, logits and pixels of the batch).
pub const MAX_SAMPLE_BYTES: u64 = 16 << 30;
/// Most transformer layers a configuration may declare.
pub const MAX_LAYERS: usize = 1024;
/// Largest width, FFN width, head count, class count, codebook size or channel count.
pub const MAX_DIM: usize = 1 << 20;
/// Most decoder resolution levels (`ch_mult` entries) and residual blocks per level.
pub const MAX_LEVELS: usize = 16;
/// Largest `rms_norm_eps` (it must also be > 0).
pub const MAX_EPS: f64 = 1e-2;
/// Deepest nesting of sequences and mappings in a YAML config (the reference's: 4).
pub const MAX_YAML_DEPTH: usize = 64;

/// `--warmup` and `--iters` within 0..=[`MAX_REPEATS`] and 1..=[`MAX_REPEATS`].
pub fn check_repeats(warmup: usize, iters: usize) -> anyhow::Result<()> {
    let max = MAX_REPEATS;
    if iters == 0 || iters > max {
        anyhow::bail!("--iters {iters}: must be 1 to {max}");
    }
    if warmup > max {
        anyhow::bail!("--warmup {warmup}: at most {max}");
    }
    Ok(())
}
