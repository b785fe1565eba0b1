//! Launcher for kernels/attention.cu: one layer's attention step in one launch (SPEC.md
//! section 5): RoPE of the new tokens' queries and keys, their append to the KV cache, and
//! attention over the cache. Layouts, race freedom and numerics are documented in the kernel
//! file's header.

use super::{DevBuf, Gpu, Traffic, k};
use anyhow::{Result, ensure};
use half::bf16;

pub use crate::cpu::ops::AttnShape;

/// The RoPE inputs of one layer's attention step.
#[derive(Clone, Copy)]
pub struct Rope<'a> {
    /// (table_rows, D) f32: the real parts of each position's unit complex numbers.
    pub re: &'a DevBuf<f32>,
    /// (table_rows, D) f32: the imaginary parts.
    pub im: &'a DevBuf<f32>,
    /// (n) i32: table row of each new token's own position (shared by all rows).
    pub cur: &'a DevBuf<i32>,
    /// (n) i32: table row of its paired previous-block position; read only with `mix`.
    pub prev: &'a DevBuf<i32>,
    /// `Some((buf, offset))` on key-mixing layers, with `buf[offset..offset + H]` the sigmoid
    /// weights of the current position (e.g. the (num_mixing_layers, H) table with offset
    /// layer * H); `None` rotates keys with the current position only.
    pub mix: Option<(&'a DevBuf<f32>, usize)>,
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
    struct AttnParams {
        qkv: u64,
        rope_re: u64,
        rope_im: u64,
        cur: u64,
        prev: u64,
        mix: u64,
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
        table_rows: i32,
    }
}

/// One layer's attention step: rotate the n new tokens' queries and keys, append k' and v to
/// the cache at positions start..start+n, and `o = softmax(q' K'^T / sqrt(D)) V` per
/// (row, head) over keys 0..start+n, in one launch (the composition
/// `cpu::ops::rope_kv_append` -> `cpu::ops::attention`).
///
/// * `qkv` (T, 3C) bf16, T = rows * n, from the wqkv GEMM (`[q | k | v]`, head h at h*D).
/// * `rope`: the tables, the tokens' rows and the optional key mixing (see [`Rope`]).
/// * `k_cache`, `v_cache` (rows, H, capacity, D) bf16: keys 0..start are read, positions
///   start..start+n get k' = rope(k, R_key) and v; nothing at or beyond start+n is touched.
/// * `mask`: optional block-causal mask; a query with no visible key gets o = 0.
/// * `out` (T, C) bf16, `out[(r*n + i)*C + h*D + d]`: heads concatenated, ready for wo.
///
/// A `cur`/`prev` entry outside the table makes that token's q', k' and v NaN (checked on the
/// device).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    imp: AttentionImpl,
    qkv: &DevBuf<bf16>,
    rope: Rope<'_>,
    k_cache: &mut DevBuf<bf16>,
    v_cache: &mut DevBuf<bf16>,
    mask: Option<BlockMask<'_>>,
    out: &mut DevBuf<bf16>,
    s: AttnShape,
) -> Result<()> {
    s.check()?;
    let (d, c) = (s.head_dim, s.c());
    ensure!(
        matches!(d, 32 | 64 | 128),
        "attention: head_dim {d} has no kernel (32, 64, 128)"
    );
    ensure!(
        qkv.len() >= s.tokens() * 3 * c,
        "attention: qkv has {} elements, needs (T={}, 3C={})",
        qkv.len(),
        s.tokens(),
        3 * c
    );
    let (re, im) = (rope.re, rope.im);
    ensure!(
        re.len() == im.len() && re.len().is_multiple_of(d) && re.len() >= d,
        "attention: rope tables of {} and {} elements are not (rows, D={d})",
        re.len(),
        im.len()
    );
    let table_rows = re.len() / d;
    ensure!(
        table_rows <= i32::MAX as usize,
        "attention: rope table too large"
    );
    ensure!(
        rope.cur.len() >= s.n && rope.prev.len() >= s.n,
        "attention: cur/prev have {}/{} entries, need n={}",
        rope.cur.len(),
        rope.prev.len(),
        s.n
    );
    ensure!(
        k_cache.len() >= s.cache_len() && v_cache.len() >= s.cache_len(),
        "attention: caches have {}/{} elements, need (rows, H, capacity, D) = {}",
        k_cache.len(),
        v_cache.len(),
        s.cache_len()
    );
    ensure!(
        out.len() >= s.tokens() * c,
        "attention: out has {} elements, needs (T, C) = {}",
        out.len(),
        s.tokens() * c
    );
    let mix_ptr = match rope.mix {
        Some((m, off)) => {
            ensure!(
                m.len() >= off + s.heads,
                "attention: mix has {} elements, needs offset {off} + H={}",
                m.len(),
                s.heads
            );
            gpu.ptr(m) + (off * std::mem::size_of::<f32>()) as u64
        }
        None => 0,
    };
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
        qkv: gpu.ptr(qkv),
        rope_re: gpu.ptr(re),
        rope_im: gpu.ptr(im),
        cur: gpu.ptr(rope.cur),
        prev: gpu.ptr(rope.prev),
        mix: mix_ptr,
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
        table_rows: table_rows as i32,
    };
    // Each block owns the queries it computes and appends those tokens' k' and v (the
    // kernel's race-freedom argument relies on this partition covering 0..n exactly once).
    let (grid_x, threads) = match imp {
        // One warp per query, 4 warps per block.
        AttentionImpl::Direct => (s.n.div_ceil(4), 128),
        // One warp per 16 queries, up to ATTN_MAX_WARPS (kernels/attention.cu) per block.
        AttentionImpl::TensorCore => {
            let warps =
                s.n.div_ceil(16)
                    .min(super::c_defines::attention::ATTN_MAX_WARPS);
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
    // Compulsory bytes, each tensor once (the blocks of a (row, head) all re-read the new
    // tokens' k and v from qkv, and the table rows; those re-reads hit L2): qkv read, the
    // table rows of the n positions (and of the paired ones, and the H weights, with mix),
    // K and V of the start cached keys read, the mask's block ids; out, k' and v written (each
    // T x C bf16). FLOPs: QK^T and PV, and the rotation of q and k once per token.
    let (t, n) = (s.tokens(), s.n);
    let tables = if rope.mix.is_some() {
        2 * (n * d * 8 + n * 4) + s.heads * 4
    } else {
        n * d * 8 + n * 4
    };
    let cached = 2 * s.rows * s.heads * s.start * d * 2;
    let masks = if mask.is_some() {
        (s.keys() + s.n) * 4
    } else {
        0
    };
    let traffic = Traffic::new(
        t * 3 * c * 2 + tables + cached + masks,
        3 * t * c * 2,
        4 * s.rows * s.heads * s.n * s.keys() * d + 8 * t * c,
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
