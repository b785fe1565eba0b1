//! Launchers for kernels/attention.cu: RoPE + KV-cache append, and attention over the cache
//! (SPEC.md section 5). Layouts are documented in the kernel file's header.

use super::{DevBuf, Gpu, Traffic, k, row_grid};
use anyhow::{Result, ensure};
use half::bf16;

pub use crate::cpu::ops::AttnShape;

kernel_params! {
    /// The parameters of kernels/attention.cu's `RopeKvParams`.
    struct RopeKvParams[104] {
        qkv: u64,
        rope_re: u64,
        rope_im: u64,
        cur: u64,
        prev: u64,
        mix: u64,
        q_out: u64,
        k_cache: u64,
        v_cache: u64,
        rows: i32,
        n: i32,
        h: i32,
        d: i32,
        cap: i32,
        start: i32,
        table_rows: i32,
    }
}

/// Rotate the new block's queries and keys and append keys and values to the cache.
///
/// * `qkv` (T, 3C) bf16, T = rows * n, from the wqkv GEMM (`[q | k | v]`, head h at h*D).
/// * `rope_re`, `rope_im` (table_rows, D) f32: the unit complex numbers of each position.
/// * `cur`, `prev` (n) i32: table rows of each new token's position and of its paired
///   previous-block position (shared by all rows); `prev` is read only with `mix`.
/// * `mix`: `Some((buf, offset))` on key-mixing layers, with `buf[offset..offset + H]` the
///   sigmoid weights of the current position (e.g. the (num_mixing_layers, H) table with
///   offset layer * H); `None` rotates keys with the current position only.
/// * `q_out` (rows, H, n, D) bf16 gets q'; `k_cache`, `v_cache` (rows, H, capacity, D) bf16
///   get k' and v at positions start..start+n.
///
/// A `cur`/`prev` entry outside the table writes NaN for that token (checked on the device).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append(
    gpu: &Gpu,
    qkv: &DevBuf<bf16>,
    rope_re: &DevBuf<f32>,
    rope_im: &DevBuf<f32>,
    cur: &DevBuf<i32>,
    prev: &DevBuf<i32>,
    mix: Option<(&DevBuf<f32>, usize)>,
    q_out: &mut DevBuf<bf16>,
    k_cache: &mut DevBuf<bf16>,
    v_cache: &mut DevBuf<bf16>,
    s: AttnShape,
) -> Result<()> {
    s.check()?;
    let (d, c) = (s.head_dim, s.c());
    ensure!(
        qkv.len() >= s.tokens() * 3 * c,
        "rope_kv_append: qkv has {} elements, needs (T={}, 3C={})",
        qkv.len(),
        s.tokens(),
        3 * c
    );
    ensure!(
        rope_re.len() == rope_im.len() && rope_re.len().is_multiple_of(d) && rope_re.len() >= d,
        "rope_kv_append: rope tables of {} and {} elements are not (rows, D={d})",
        rope_re.len(),
        rope_im.len()
    );
    let table_rows = rope_re.len() / d;
    ensure!(
        table_rows <= i32::MAX as usize,
        "rope_kv_append: rope table too large"
    );
    ensure!(
        cur.len() >= s.n && prev.len() >= s.n,
        "rope_kv_append: cur/prev have {}/{} entries, need n={}",
        cur.len(),
        prev.len(),
        s.n
    );
    ensure!(
        q_out.len() >= s.q_len(),
        "rope_kv_append: q_out has {} elements, needs (rows, H, n, D) = {}",
        q_out.len(),
        s.q_len()
    );
    ensure!(
        k_cache.len() >= s.cache_len() && v_cache.len() >= s.cache_len(),
        "rope_kv_append: caches have {}/{} elements, need (rows, H, capacity, D) = {}",
        k_cache.len(),
        v_cache.len(),
        s.cache_len()
    );
    let mix_ptr = match mix {
        Some((m, off)) => {
            ensure!(
                m.len() >= off + s.heads,
                "rope_kv_append: mix has {} elements, needs offset {off} + H={}",
                m.len(),
                s.heads
            );
            gpu.ptr(m) + (off * std::mem::size_of::<f32>()) as u64
        }
        None => 0,
    };
    let p = RopeKvParams {
        qkv: gpu.ptr(qkv),
        rope_re: gpu.ptr(rope_re),
        rope_im: gpu.ptr(rope_im),
        cur: gpu.ptr(cur),
        prev: gpu.ptr(prev),
        mix: mix_ptr,
        q_out: gpu.ptr(q_out),
        k_cache: gpu.ptr(k_cache),
        v_cache: gpu.ptr(v_cache),
        rows: s.rows as i32,
        n: s.n as i32,
        h: s.heads as i32,
        d: d as i32,
        cap: s.capacity as i32,
        start: s.start as i32,
        table_rows: table_rows as i32,
    };
    let per_row = s.n * s.heads * (d / 2);
    // qkv read, the table rows of the n positions (and of the paired ones with mix), q', k'
    // and v written (each T x C bf16).
    let (t, n) = (s.tokens(), s.n);
    let tables = if mix.is_some() {
        2 * (n * d * 8 + n * 4) + s.heads * 4
    } else {
        n * d * 8 + n * 4
    };
    let traffic = Traffic::new(t * 3 * c * 2 + tables, 3 * t * c * 2, 8 * t * c);
    gpu.launch_256(
        k::ROPE_KV_APPEND_BF16,
        row_grid(per_row, s.rows)?,
        &p,
        traffic,
    )
}

/// Which attention kernel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// `attention_direct_d*`: one warp per query, no tensor cores: the on-device reference.
    Direct,
    /// `attention_tc_d*`: flash-style tiles on bf16 tensor cores (mma.sync m16n8k16), f32
    /// softmax/accumulation.
    #[default]
    TensorCore,
}

/// The optional block-causal mask of the multi-block (teacher-forced / prefill) path: key j is
/// visible to query i iff `key_block[j] <= query_block[i]`.
#[derive(Clone, Copy)]
pub struct BlockMask<'a> {
    /// (start + n) i32: block id of every key in the cache after the append.
    pub key_block: &'a DevBuf<i32>,
    /// (n) i32: block id of every new query.
    pub query_block: &'a DevBuf<i32>,
}

kernel_params! {
    /// The parameters of kernels/attention.cu's `AttnParams`.
    struct AttnParams[72] {
        q: u64,
        k_cache: u64,
        v_cache: u64,
        key_block: u64,
        query_block: u64,
        out: u64,
        rows: i32,
        n: i32,
        h: i32,
        cap: i32,
        start: i32,
    }
}

/// `o = softmax(q' K^T / sqrt(D)) V` per (row, head) over cache keys 0..start+n (the cache
/// already holds this step's keys).
///
/// * `q` (rows, H, n, D) bf16 from [`rope_kv_append`].
/// * `k_cache`, `v_cache` (rows, H, capacity, D) bf16; nothing at or beyond start+n is read.
/// * `mask`: optional block-causal mask; a query with no visible key gets o = 0.
/// * `out` (T, C) bf16, `out[(r*n + i)*C + h*D + d]`: heads concatenated, ready for wo.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    imp: AttentionImpl,
    q: &DevBuf<bf16>,
    k_cache: &DevBuf<bf16>,
    v_cache: &DevBuf<bf16>,
    mask: Option<BlockMask<'_>>,
    out: &mut DevBuf<bf16>,
    s: AttnShape,
) -> Result<()> {
    s.check()?;
    let d = s.head_dim;
    ensure!(
        matches!(d, 32 | 64 | 128),
        "attention: head_dim {d} has no kernel (32, 64, 128)"
    );
    ensure!(
        q.len() >= s.q_len(),
        "attention: q has {} elements, needs (rows, H, n, D) = {}",
        q.len(),
        s.q_len()
    );
    ensure!(
        k_cache.len() >= s.cache_len() && v_cache.len() >= s.cache_len(),
        "attention: caches have {}/{} elements, need (rows, H, capacity, D) = {}",
        k_cache.len(),
        v_cache.len(),
        s.cache_len()
    );
    ensure!(
        out.len() >= s.tokens() * s.c(),
        "attention: out has {} elements, needs (T, C) = {}",
        out.len(),
        s.tokens() * s.c()
    );
    let (kb, qb) = match mask {
        Some(m) => {
            ensure!(
                m.key_block.len() >= s.keys() && m.query_block.len() >= s.n,
                "attention: mask has {}/{} block ids, needs start+n={} keys and n={} queries",
                m.key_block.len(),
                m.query_block.len(),
                s.keys(),
                s.n
            );
            (gpu.ptr(m.key_block), gpu.ptr(m.query_block))
        }
        None => (0, 0),
    };
    let p = AttnParams {
        q: gpu.ptr(q),
        k_cache: gpu.ptr(k_cache),
        v_cache: gpu.ptr(v_cache),
        key_block: kb,
        query_block: qb,
        out: gpu.ptr(out),
        rows: s.rows as i32,
        n: s.n as i32,
        h: s.heads as i32,
        cap: s.capacity as i32,
        start: s.start as i32,
    };
    let (grid_x, threads) = match imp {
        // One warp per query, 4 warps per block.
        AttentionImpl::Direct => (s.n.div_ceil(4), 128),
        // One warp per 16 queries, up to 4 warps per block.
        AttentionImpl::TensorCore => {
            let warps = s.n.div_ceil(16).min(4);
            (s.n.div_ceil(16 * warps), 32 * warps)
        }
    };
    let kernel = match (imp, d) {
        (AttentionImpl::Direct, 32) => k::ATTENTION_DIRECT_D32_BF16,
        (AttentionImpl::Direct, 64) => k::ATTENTION_DIRECT_D64_BF16,
        (AttentionImpl::Direct, _) => k::ATTENTION_DIRECT_D128_BF16,
        (AttentionImpl::TensorCore, 32) => k::ATTENTION_TC_D32_BF16,
        (AttentionImpl::TensorCore, 64) => k::ATTENTION_TC_D64_BF16,
        (AttentionImpl::TensorCore, _) => k::ATTENTION_TC_D128_BF16,
    };
    ensure!(
        grid_x <= i32::MAX as usize,
        "attention: n={} too large",
        s.n
    );
    // q read, K and V of the start+n cached keys read once, out written; QK^T and PV.
    let kv = s.rows * s.heads * s.keys() * d * 2;
    let masks = if mask.is_some() {
        (s.keys() + s.n) * 4
    } else {
        0
    };
    let traffic = Traffic::new(
        s.q_len() * 2 + 2 * kv + masks,
        s.tokens() * s.c() * 2,
        4 * s.rows * s.heads * s.n * s.keys() * d,
    );
    gpu.launch(
        kernel,
        (grid_x as u32, s.heads as u32, s.rows as u32),
        (threads as u32, 1, 1),
        0,
        &p,
        traffic,
    )
}
