//! Launchers for kernels/embed.cu: between-scale upsampling of codes, the code-vector MLP's
//! hidden layers, and the per-step input gather (with combine_inputs folded at load time).

use super::{DevBuf, Gpu, Traffic, k};
use crate::model::weights;
use anyhow::{Result, ensure};
use half::bf16;

kernel_params! {
    /// The parameters of kernels/embed.cu's `UpsampleParams`.
    struct UpsampleParams {
        grid_prev: u64,
        codebook: u64,
        z0: u64,
        batch: i32,
        si: i32,
        so: i32,
        e: i32,
    }
}

/// A codebook on the device: code vectors of `e` f32 values each, row-major (V, e).
#[derive(Clone, Copy, Debug)]
pub struct Codebook<'a> {
    pub vectors: &'a DevBuf<f32>,
    pub e: usize,
}

/// `z0 (B, so*so, e)` = normalized bilinear resize of the code vectors of `grid_prev (B, si*si)`.
pub fn upsample_codes(
    gpu: &Gpu,
    grid_prev: &DevBuf<i32>,
    codebook: Codebook<'_>,
    z0: &mut DevBuf<f32>,
    batch: usize,
    si: usize,
    so: usize,
) -> Result<()> {
    let Codebook { vectors, e } = codebook;
    ensure!(
        e <= 16,
        "code dim {e} > 16 is not supported by upsample_codes"
    );
    ensure!(
        grid_prev.len() >= batch * si * si && z0.len() >= batch * so * so * e,
        "upsample shapes"
    );
    let p = UpsampleParams {
        grid_prev: gpu.ptr(grid_prev),
        codebook: gpu.ptr(vectors),
        z0: gpu.ptr(z0),
        batch: batch as i32,
        si: si as i32,
        so: so as i32,
        e: e as i32,
    };
    let total = (batch * so * so) as u32;
    // The previous grid, the code vectors it names (at most the codebook), z0 written.
    let codes = (vectors.len() * 4).min(batch * si * si * e * 4);
    let traffic = Traffic::new(
        batch * si * si * 4 + codes,
        batch * so * so * e * 4,
        10 * batch * so * so * e,
    );
    gpu.launch(
        k::UPSAMPLE_CODES_F32,
        (total.div_ceil(128), 1, 1),
        (128, 1, 1),
        0,
        &p,
        traffic,
    )
}

kernel_params! {
    /// The parameters of kernels/embed.cu's `CodevecParams`.
    struct CodevecParams {
        z: u64,
        w0: u64,
        b0: u64,
        w2: u64,
        b2: u64,
        h2: u64,
        rows: i32,
        e: i32,
    }
}

/// The code MLP's two hidden layers of 64 (weights f32, [out, in]).
pub struct CodevecMlp {
    pub w0: DevBuf<f32>,
    pub b0: DevBuf<f32>,
    pub w2: DevBuf<f32>,
    pub b2: DevBuf<f32>,
    pub e: usize,
}

/// `h2 (rows, 64) = silu(W2 silu(W0 z + b0) + b2)` in bf16.
pub fn codevec_hidden(
    gpu: &Gpu,
    mlp: &CodevecMlp,
    z: &DevBuf<f32>,
    h2: &mut DevBuf<bf16>,
    rows: usize,
) -> Result<()> {
    ensure!(
        mlp.e <= 16 && z.len() >= rows * mlp.e && h2.len() >= rows * 64,
        "codevec shapes"
    );
    let p = CodevecParams {
        z: gpu.ptr(z),
        w0: gpu.ptr(&mlp.w0),
        b0: gpu.ptr(&mlp.b0),
        w2: gpu.ptr(&mlp.w2),
        b2: gpu.ptr(&mlp.b2),
        h2: gpu.ptr(h2),
        rows: rows as i32,
        e: mlp.e as i32,
    };
    let e = mlp.e;
    let weights = (64 * e + 64 + 64 * 64 + 64) * 4;
    let traffic = Traffic::new(
        rows * e * 4 + weights,
        rows * 64 * 2,
        2 * rows * (64 * e + 64 * 64),
    );
    gpu.launch(
        k::CODEVEC_HIDDEN_BF16,
        ((rows as u32).div_ceil(64), 1, 1),
        (64, 1, 1),
        0,
        &p,
        traffic,
    )
}

kernel_params! {
    /// The parameters of kernels/embed.cu's `GatherParams`.
    struct GatherParams {
        pa: u64,
        pc: u64,
        dc: u64,
        empty: u64,
        bias: u64,
        src: u64,
        grid: u64,
        cur_global: u64,
        local: u64,
        prev_global: u64,
        prev_local: u64,
        x: u64,
        rows: i32,
        batch: i32,
        n: i32,
        c: i32,
        cells: i32,
        first: i32,
        row_stride: i32,
        row_off: i32,
    }
}

/// The folded input tables of [`weights::InputTables`] on the device (see kernels/embed.cu).
pub struct InputTables {
    /// The host tables' pa, pc, dc, empty and bias, in that order (GatherParams' order).
    tables: [DevBuf<f32>; 5],
    /// The hidden size C.
    c: usize,
}

impl InputTables {
    /// Uploads the host tables of a model of hidden size `c`.
    pub fn upload(gpu: &Gpu, host: &weights::InputTables, c: usize) -> Result<InputTables> {
        let [pa, pc, dc, empty, bias] =
            [&host.pa, &host.pc, &host.dc, &host.empty, &host.bias].map(|t| gpu.upload(t));
        Ok(InputTables {
            tables: [pa?, pc?, dc?, empty?, bias?],
            c,
        })
    }
}

/// Index arrays of one step, uploaded once per batch (nothing is uploaded inside the loop).
pub struct StepIndex {
    /// (n) global position ids of the step's cells (also their RoPE rows).
    pub cur_global: DevBuf<i32>,
    /// (n) local raster positions (scatter targets, SRC rows).
    pub local: DevBuf<i32>,
    /// (n) RoPE rows of the paired previous-block cells (N+1 = "empty" on a scale's first step).
    pub prev_rope: DevBuf<i32>,
    /// (n) global / local positions of the paired previous-block cells; None on a first step.
    pub prev_global: Option<DevBuf<i32>>,
    pub prev_local: Option<DevBuf<i32>>,
    pub n: usize,
}

/// Where [`gather_inputs`] puts a step's tokens: token j of row r at row
/// `r * stride + off + j` of x.
#[derive(Clone, Copy, Debug)]
pub struct SeqRows {
    /// Tokens per sequence row in x (n for one step; 1 + N for a whole teacher-forced sequence).
    pub stride: usize,
    /// The step's first token within its row.
    pub off: usize,
}

impl SeqRows {
    /// One step's `(rows * n, C)`: the sampler's layout.
    pub fn step(n: usize) -> SeqRows {
        SeqRows { stride: n, off: 0 }
    }
}

/// One step's inputs (folded tables + this scale's SRC rows + previous block) into
/// `x (rows, at.stride, C)` at the step's place `at`: `SeqRows::step(n)` for the sampler's
/// `(rows*n, C)`; the teacher-forced pass (cuda::score) gathers every step into one sequence.
#[allow(clippy::too_many_arguments)]
pub fn gather_inputs(
    gpu: &Gpu,
    t: &InputTables,
    src: &DevBuf<f32>,
    grid: &DevBuf<i32>,
    idx: &StepIndex,
    x: &mut DevBuf<f32>,
    rows: usize,
    batch: usize,
    n: usize,
    cells: usize,
    at: SeqRows,
) -> Result<()> {
    ensure!(
        rows.is_multiple_of(batch) && at.off + n <= at.stride && x.len() >= rows * at.stride * t.c,
        "gather shapes"
    );
    ensure!(
        at.stride <= i32::MAX as usize,
        "gather: sequence of {} tokens too long",
        at.stride
    );
    ensure!(
        src.len() >= batch * cells * t.c && grid.len() >= batch * cells,
        "gather scale shapes"
    );
    ensure!(
        idx.cur_global.len() >= n && idx.local.len() >= n,
        "gather index shapes"
    );
    let [pa, pc, dc, empty, bias] = t.tables.each_ref().map(|b| gpu.ptr(b));
    let p = GatherParams {
        pa,
        pc,
        dc,
        empty,
        bias,
        src: gpu.ptr(src),
        grid: gpu.ptr(grid),
        cur_global: gpu.ptr(&idx.cur_global),
        local: gpu.ptr(&idx.local),
        prev_global: idx.prev_global.as_ref().map(|s| gpu.ptr(s)).unwrap_or(0),
        prev_local: idx.prev_local.as_ref().map(|s| gpu.ptr(s)).unwrap_or(0),
        x: gpu.ptr(x),
        rows: rows as i32,
        batch: batch as i32,
        n: n as i32,
        c: t.c as i32,
        cells: cells as i32,
        first: idx.prev_global.is_none() as i32,
        row_stride: at.stride as i32,
        row_off: at.off as i32,
    };
    // Per cell: its position row of pa and its SRC row per image, the bias; then either the
    // empty vector or the paired cell's pc row, grid token and dc row (at most the table).
    let c = t.c;
    let prev = if idx.prev_global.is_none() {
        c * 4
    } else {
        let dc = &t.tables[2];
        n * c * 4 + batch * n * 4 + (dc.len() * 4).min(batch * n * c * 4) + 2 * n * 4
    };
    let traffic = Traffic::new(
        n * c * 4 + batch * n * c * 4 + c * 4 + 2 * n * 4 + prev,
        rows * n * c * 4,
        5 * rows * n * c,
    );
    gpu.launch_256(k::GATHER_INPUTS_F32, ((rows * n) as u32, 1, 1), &p, traffic)
}
