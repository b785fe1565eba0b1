//! The FID Inception-v3 (the 2015-12-05 TensorFlow graph that ADM's evaluator, pytorch-fid and
//! torch-fidelity use) on the CPU in f32, from the weights file of pytorch-fid /
//! torch-fidelity (`pt_inception-2015-12-05-6726825d.pth`: a state dict of 566 tensors).
//!
//! What is computed per image (exactly ADM's pipeline, as torch-fidelity 0.4.0's
//! `FeatureExtractorInceptionV3` ports it):
//!
//! ```text
//! uint8 (n, n, 3) -> TF1 bilinear resize to 299 x 299 (resize.rs) -> (x - 128) / 128
//!   -> Conv2d_1a_3x3 (s2) -> 2a -> 2b (p1) -> max pool 3/2 -> 3b (1x1) -> 4a -> max pool 3/2
//!   -> Mixed_5b, 5c, 5d (A) -> 6a (B) -> 6b, 6c, 6d, 6e (C) -> 7a (D) -> 7b (E_1) -> 7c (E_2)
//!   -> global average pool = pool_3 (2048)
//! spatial = Mixed_6d.branch1x1 (after BN + ReLU), channels 0..7, 17 x 17 x 7 (y, x, c) = 2023
//! logits  = pool_3 @ fc.weight^T (no bias; 1008)
//! ```
//!
//! The TF-compatible details: BatchNorm eps 0.001; the average pools of A, C and E_1 do not
//! count the padding (`count_include_pad=False`); E_2's pool branch is a 3x3 MAX pool (stride
//! 1, padding 1), a quirk of the TF graph.
//!
//! How (speed): activations are channels-last, a batch of images being one (N*H*W, C) matrix,
//! so every convolution is one GEMM `out (rows, Cout) = patches (rows, kh*kw*Cin) @ W^T` on
//! the crate's NT kernels (math::matmul_strided), with W stored (Cout, kh, kw, Cin). A 1x1
//! convolution reads the activation in place; others gather patches (im2col) in bands of rows.
//! BatchNorm is folded into W and a bias at load; bias + ReLU run on each band right after its
//! GEMM. The 1x1 convolutions of a block that read the same input are stacked into one GEMM;
//! in A, C and E_1 that includes the pool branch's 1x1 conv, since a 1x1 conv commutes with
//! the average pool (both linear; the bias and ReLU come after the pool): the pool then runs
//! over 32..192 output channels instead of 192..1280 input channels.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use super::resize::resize_normalize;
use crate::math;
use crate::model::file::{Tensor, TensorMap};

/// The network's input side.
pub const INPUT_SIZE: usize = 299;
/// Width of `pool_3`.
pub const POOL_DIM: usize = 2048;
/// Channels of `spatial` kept per position (TF's `mixed_6/conv:0[..., :7]`).
pub const SPATIAL_CHANNELS: usize = 7;
/// Width of `spatial`: 17 x 17 x 7.
pub const SPATIAL_DIM: usize = 17 * 17 * SPATIAL_CHANNELS;
/// Width of `logits` (the TF graph's 1008 classes).
pub const LOGITS_DIM: usize = 1008;
/// BatchNorm epsilon of every BasicConv2d (TF's 0.001).
pub const BN_EPS: f64 = 1e-3;

/// Images run through the network together (one GEMM row block); callers' batches are split.
const CHUNK: usize = 16;
/// Floats of gathered patches per GEMM call (16 MiB), as the decoder's COL_BUDGET.
const COL_BUDGET: usize = 1 << 22;

/// Features of a batch of images, row-major, one row per image.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Features {
    /// Images in the batch.
    pub n: usize,
    /// (n, 2048) `pool_3`.
    pub pool: Vec<f32>,
    /// (n, 2023) `mixed_6/conv` channels 0..7, (y, x, c) order.
    pub spatial: Vec<f32>,
    /// (n, 1008) `pool_3 @ fc.weight^T`.
    pub logits: Vec<f32>,
}

// ------------------------------------------------------------------------------------------
// Layers
// ------------------------------------------------------------------------------------------

/// One BasicConv2d (conv without bias, BatchNorm, ReLU) with the BatchNorm folded in, or
/// several 1x1 ones stacked along Cout.
#[derive(Clone, Debug)]
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub ph: usize,
    pub pw: usize,
    /// (cout, kh, kw, cin) row-major: each row one output channel's patch weights.
    pub w: Vec<f32>,
    /// Folded BatchNorm shift.
    pub b: Vec<f32>,
}

impl Conv {
    fn k(&self) -> usize {
        self.kh * self.kw * self.cin
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.ph - self.kh) / self.stride + 1,
            (w + 2 * self.pw - self.kw) / self.stride + 1,
        )
    }

    /// Stack 1x1 convolutions of one input along the output channels.
    fn stack(parts: &[Conv]) -> Conv {
        let first = &parts[0];
        assert!(
            parts
                .iter()
                .all(|p| p.kh == 1 && p.kw == 1 && p.stride == 1 && p.cin == first.cin)
        );
        Conv {
            cin: first.cin,
            cout: parts.iter().map(|p| p.cout).sum(),
            kh: 1,
            kw: 1,
            stride: 1,
            ph: 0,
            pw: 0,
            w: parts.iter().flat_map(|p| p.w.iter().copied()).collect(),
            b: parts.iter().flat_map(|p| p.b.iter().copied()).collect(),
        }
    }
}

/// A channels-last activation of `n` images, `c` channels read at column `off` of rows of
/// `ld` floats.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub d: &'a [f32],
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub ld: usize,
    pub off: usize,
}

impl<'a> View<'a> {
    /// A dense (n*h*w, c) activation.
    pub fn dense(d: &'a [f32], n: usize, h: usize, w: usize, c: usize) -> View<'a> {
        assert_eq!(d.len(), n * h * w * c);
        View {
            d,
            n,
            h,
            w,
            c,
            ld: c,
            off: 0,
        }
    }

    /// Channels `off..off + c` of this view.
    pub fn cols(&self, off: usize, c: usize) -> View<'a> {
        assert!(off + c <= self.c);
        View {
            off: self.off + off,
            c,
            ..*self
        }
    }

    fn rows(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// The destination of a layer: columns `off..off + c` of a (rows, ld) matrix.
pub struct Out<'a> {
    pub d: &'a mut [f32],
    pub ld: usize,
    pub off: usize,
}

/// bias + ReLU over rows of `d` (stride `ld`), columns `off..off + b.len()`, on rayon.
fn bias_relu(d: &mut [f32], ld: usize, off: usize, b: &[f32]) {
    d.par_chunks_mut(ld * 64)
        .for_each(|blk| bias_relu_seq(blk, ld, off, b));
}

/// `relu(conv(x) + b)` into `out`'s columns; with `act_cols` < cout only the first
/// `act_cols` output channels get the bias and ReLU (the rest are left as raw sums for a pool
/// that comes before their bias).
pub fn conv(x: View, cv: &Conv, out: Out, act_cols: usize) {
    assert_eq!(x.c, cv.cin, "conv: input channels");
    let (oh, ow) = cv.out_hw(x.h, x.w);
    let rows = x.n * oh * ow;
    let k = cv.k();
    assert!(out.off + cv.cout <= out.ld && out.d.len() >= rows * out.ld);
    let acts = &cv.b[..act_cols];
    if cv.kh == 1 && cv.kw == 1 && cv.stride == 1 {
        // The activation itself is the patch matrix.
        let band = (COL_BUDGET / k.max(1)).clamp(256, 1 << 14);
        out.d[..rows * out.ld]
            .par_chunks_mut(band * out.ld)
            .enumerate()
            .with_max_len(1)
            .for_each(|(i, dst)| {
                let r0 = i * band;
                patch_gemm(&x.d[x.off + r0 * x.ld..], x.ld, cv, dst, out.ld, out.off);
                bias_relu_seq(dst, out.ld, out.off, acts);
            });
        return;
    }
    let band = (COL_BUDGET / k).clamp(64, rows.max(64));
    let mut col = vec![0.0f32; band.min(rows) * k];
    for r0 in (0..rows).step_by(band) {
        let nr = band.min(rows - r0);
        let col = &mut col[..nr * k];
        im2col(x, cv, oh, ow, r0, col);
        let dst = &mut out.d[r0 * out.ld..(r0 + nr) * out.ld];
        patch_gemm(col, k, cv, dst, out.ld, out.off);
        bias_relu(dst, out.ld, out.off, acts);
    }
}

/// The GEMM of one band of output rows: `dst`'s columns `off..off + cout` (rows `ld` apart,
/// as many as `dst` holds) = patches (rows `lda` apart, `k` wide) · W^T.
fn patch_gemm(patches: &[f32], lda: usize, cv: &Conv, dst: &mut [f32], ld: usize, off: usize) {
    let (k, rows) = (cv.k(), dst.len() / ld);
    math::matmul_strided(
        patches,
        [lda, 1],
        &cv.w,
        [1, k],
        &mut dst[off..],
        ld,
        rows,
        k,
        cv.cout,
        0.0,
    );
}

/// [`bias_relu`] on the calling thread.
fn bias_relu_seq(d: &mut [f32], ld: usize, off: usize, b: &[f32]) {
    for row in d.chunks_mut(ld) {
        for (v, &bb) in row[off..off + b.len()].iter_mut().zip(b) {
            *v = (*v + bb).max(0.0);
        }
    }
}

/// Gather the patches of output rows `r0..r0 + col.len() / k` (row = (image, oy, ox)) into
/// `col` ((ky, kx, ci) per row, zeros outside the image).
fn im2col(x: View, cv: &Conv, oh: usize, ow: usize, r0: usize, col: &mut [f32]) {
    let k = cv.k();
    let cin = cv.cin;
    col.par_chunks_mut(k * 16)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (j, dst) in rows.chunks_mut(k).enumerate() {
                let r = r0 + blk * 16 + j;
                let img = r / (oh * ow);
                let oy = (r / ow) % oh;
                let ox = r % ow;
                for ky in 0..cv.kh {
                    let iy = (oy * cv.stride + ky) as isize - cv.ph as isize;
                    let seg = &mut dst[ky * cv.kw * cin..(ky + 1) * cv.kw * cin];
                    if iy < 0 || iy >= x.h as isize {
                        seg.fill(0.0);
                        continue;
                    }
                    for kx in 0..cv.kw {
                        let ix = (ox * cv.stride + kx) as isize - cv.pw as isize;
                        let s = &mut seg[kx * cin..(kx + 1) * cin];
                        if ix < 0 || ix >= x.w as isize {
                            s.fill(0.0);
                        } else {
                            let p = (img * x.h + iy as usize) * x.w + ix as usize;
                            let src = x.off + p * x.ld;
                            s.copy_from_slice(&x.d[src..src + cin]);
                        }
                    }
                }
            }
        });
}

/// 3x3 max pool, stride `stride`, padding `pad` (padding never wins: TF's and torch's max
/// pools ignore it) into `out`'s columns.
pub fn max_pool3(x: View, stride: usize, pad: usize, out: Out) {
    pool3(x, stride, pad, out, f32::NEG_INFINITY, f32::max, |_, _| {});
}

/// 3x3 average pool, stride 1, padding 1, dividing by the in-image count
/// (`count_include_pad=False`), then `+ b` and ReLU, into `out`'s columns.
fn avg_pool3_bias_relu(x: View, b: &[f32], out: Out) {
    assert_eq!(b.len(), x.c);
    pool3(
        x,
        1,
        1,
        out,
        0.0,
        |d, v| d + v,
        |dst, count| {
            for (d, &bb) in dst.iter_mut().zip(b) {
                *d = (*d / count + bb).max(0.0);
            }
        },
    );
}

/// A 3x3 pool, stride `stride`, padding `pad`, into `out`'s columns, one output pixel per
/// rayon task: its channels start at `init`, `fold(acc, v)` takes in each in-image input
/// pixel of the window in row-major order, then `finish(channels, in-image count)`.
fn pool3(
    x: View,
    stride: usize,
    pad: usize,
    out: Out,
    init: f32,
    fold: impl Fn(f32, f32) -> f32 + Sync,
    finish: impl Fn(&mut [f32], f32) + Sync,
) {
    let oh = (x.h + 2 * pad - 3) / stride + 1;
    let ow = (x.w + 2 * pad - 3) / stride + 1;
    let c = x.c;
    out.d[..x.n * oh * ow * out.ld]
        .par_chunks_mut(out.ld)
        .enumerate()
        .for_each(|(r, dst)| {
            let img = r / (oh * ow);
            let (oy, ox) = ((r / ow) % oh, r % ow);
            let dst = &mut dst[out.off..out.off + c];
            dst.fill(init);
            let (ys, xs) = (window(oy, stride, pad, x.h), window(ox, stride, pad, x.w));
            let count = (ys.len() * xs.len()) as f32;
            for iy in ys {
                for ix in xs.clone() {
                    let s = x.off + ((img * x.h + iy) * x.w + ix) * x.ld;
                    for (d, &v) in dst.iter_mut().zip(&x.d[s..s + c]) {
                        *d = fold(*d, v);
                    }
                }
            }
            finish(dst, count);
        });
}

/// The in-image input indices of a 3-wide window.
fn window(o: usize, stride: usize, pad: usize, n: usize) -> std::ops::Range<usize> {
    let start = (o * stride) as isize - pad as isize;
    (start.max(0) as usize)..((start + 3).min(n as isize) as usize)
}

/// Copy columns of a view into `out`'s columns (row for row).
fn copy_cols(x: View, out: Out) {
    let c = x.c;
    out.d[..x.rows() * out.ld]
        .par_chunks_mut(out.ld * 64)
        .enumerate()
        .for_each(|(blk, dst)| {
            for (j, row) in dst.chunks_mut(out.ld).enumerate() {
                let s = x.off + (blk * 64 + j) * x.ld;
                row[out.off..out.off + c].copy_from_slice(&x.d[s..s + c]);
            }
        });
}

// ------------------------------------------------------------------------------------------
// Blocks
// ------------------------------------------------------------------------------------------

/// A dense activation buffer.
struct Act {
    d: Vec<f32>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl Act {
    fn new(n: usize, h: usize, w: usize, c: usize) -> Act {
        Act {
            d: vec![0.0; n * h * w * c],
            n,
            h,
            w,
            c,
        }
    }

    fn view(&self) -> View<'_> {
        View::dense(&self.d, self.n, self.h, self.w, self.c)
    }

    fn out(&mut self, off: usize) -> Out<'_> {
        Out {
            ld: self.c,
            d: &mut self.d,
            off,
        }
    }
}

/// One conv into a fresh dense buffer.
fn conv_new(x: View, cv: &Conv) -> Act {
    let (oh, ow) = cv.out_hw(x.h, x.w);
    let mut a = Act::new(x.n, oh, ow, cv.cout);
    conv(x, cv, a.out(0), cv.cout);
    a
}

/// Which pool a block's pool branch uses.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PoolKind {
    /// 3x3/1 average without padding counted, the 1x1 conv stacked into the head GEMM.
    Avg,
    /// 3x3/1 max (E_2), then its own 1x1 conv.
    Max,
}

/// InceptionA (Mixed_5b/c/d).
struct BlockA {
    /// [branch1x1 64, branch5x5_1 48, branch3x3dbl_1 64, branch_pool pf]
    head: Conv,
    b5x5_2: Conv,
    dbl_2: Conv,
    dbl_3: Conv,
}

/// InceptionB (Mixed_6a).
struct BlockB {
    b3x3: Conv,
    dbl_1: Conv,
    dbl_2: Conv,
    dbl_3: Conv,
}

/// InceptionC (Mixed_6b..e).
struct BlockC {
    /// [branch1x1 192, branch7x7_1 c7, branch7x7dbl_1 c7, branch_pool 192]
    head: Conv,
    b7_2: Conv,
    b7_3: Conv,
    dbl: [Conv; 4],
}

/// InceptionD (Mixed_7a).
struct BlockD {
    /// [branch3x3_1 192, branch7x7x3_1 192]
    head: Conv,
    b3x3_2: Conv,
    b7: [Conv; 3],
}

/// InceptionE_1 / E_2 (Mixed_7b / 7c).
struct BlockE {
    /// [branch1x1 320, branch3x3_1 384, branch3x3dbl_1 448, (E_1: branch_pool 192)]
    head: Conv,
    b3_2a: Conv,
    b3_2b: Conv,
    dbl_2: Conv,
    dbl_3a: Conv,
    dbl_3b: Conv,
    /// E_2's pool conv (after the max pool); E_1's is in `head`.
    pool_conv: Option<Conv>,
}

/// Run a stacked head (1x1 convs of one input); the pool branch's columns (`pool_cols` at
/// the end) are left raw.
fn run_head(x: View, head: &Conv, pool_cols: usize) -> Act {
    let mut a = Act::new(x.n, x.h, x.w, head.cout);
    conv(x, head, a.out(0), head.cout - pool_cols);
    a
}

impl BlockA {
    fn forward(&self, x: View) -> Act {
        let pf = self.head.cout - 176;
        let t = run_head(x, &self.head, pf);
        let tv = t.view();
        let cout = 64 + 64 + 96 + pf;
        let mut o = Act::new(x.n, x.h, x.w, cout);
        copy_cols(tv.cols(0, 64), o.out(0));
        conv(tv.cols(64, 48), &self.b5x5_2, o.out(64), 64);
        let d2 = conv_new(tv.cols(112, 64), &self.dbl_2);
        conv(d2.view(), &self.dbl_3, o.out(128), 96);
        avg_pool3_bias_relu(tv.cols(176, pf), &self.head.b[176..], o.out(224));
        o
    }
}

impl BlockB {
    fn forward(&self, x: View) -> Act {
        let (oh, ow) = self.b3x3.out_hw(x.h, x.w);
        let mut o = Act::new(x.n, oh, ow, 384 + 96 + x.c);
        conv(x, &self.b3x3, o.out(0), 384);
        let d1 = conv_new(x, &self.dbl_1);
        let d2 = conv_new(d1.view(), &self.dbl_2);
        conv(d2.view(), &self.dbl_3, o.out(384), 96);
        max_pool3(x, 2, 0, o.out(480));
        o
    }
}

impl BlockC {
    /// The output, and the head (its first 192 columns are branch1x1, TF's mixed_6/conv).
    fn forward(&self, x: View) -> (Act, Act) {
        let c7 = self.b7_2.cin;
        let t = run_head(x, &self.head, 192);
        let tv = t.view();
        let mut o = Act::new(x.n, x.h, x.w, 768);
        copy_cols(tv.cols(0, 192), o.out(0));
        let s2 = conv_new(tv.cols(192, c7), &self.b7_2);
        conv(s2.view(), &self.b7_3, o.out(192), 192);
        let d1 = conv_new(tv.cols(192 + c7, c7), &self.dbl[0]);
        let d2 = conv_new(d1.view(), &self.dbl[1]);
        let d3 = conv_new(d2.view(), &self.dbl[2]);
        conv(d3.view(), &self.dbl[3], o.out(384), 192);
        avg_pool3_bias_relu(
            tv.cols(192 + 2 * c7, 192),
            &self.head.b[192 + 2 * c7..],
            o.out(576),
        );
        (o, t)
    }
}

impl BlockD {
    fn forward(&self, x: View) -> Act {
        let t = run_head(x, &self.head, 0);
        let tv = t.view();
        let (oh, ow) = self.b3x3_2.out_hw(x.h, x.w);
        let mut o = Act::new(x.n, oh, ow, 320 + 192 + x.c);
        conv(tv.cols(0, 192), &self.b3x3_2, o.out(0), 320);
        let s2 = conv_new(tv.cols(192, 192), &self.b7[0]);
        let s3 = conv_new(s2.view(), &self.b7[1]);
        conv(s3.view(), &self.b7[2], o.out(320), 192);
        max_pool3(x, 2, 0, o.out(512));
        o
    }
}

impl BlockE {
    fn forward(&self, x: View) -> Act {
        let pool_cols = if self.pool_conv.is_none() { 192 } else { 0 };
        let t = run_head(x, &self.head, pool_cols);
        let tv = t.view();
        let mut o = Act::new(x.n, x.h, x.w, 2048);
        copy_cols(tv.cols(0, 320), o.out(0));
        let b3 = tv.cols(320, 384);
        conv(b3, &self.b3_2a, o.out(320), 384);
        conv(b3, &self.b3_2b, o.out(704), 384);
        let d2 = conv_new(tv.cols(704, 448), &self.dbl_2);
        conv(d2.view(), &self.dbl_3a, o.out(1088), 384);
        conv(d2.view(), &self.dbl_3b, o.out(1472), 384);
        match &self.pool_conv {
            None => avg_pool3_bias_relu(tv.cols(1152, 192), &self.head.b[1152..], o.out(1856)),
            Some(pc) => {
                let mut mp = Act::new(x.n, x.h, x.w, x.c);
                max_pool3(x, 1, 1, mp.out(0));
                conv(mp.view(), pc, o.out(1856), 192);
            }
        }
        o
    }
}

// ------------------------------------------------------------------------------------------
// The network
// ------------------------------------------------------------------------------------------

/// The FID Inception-v3 with BatchNorm folded into its convolutions.
pub struct Inception {
    stem: [Conv; 5],
    m5: [BlockA; 3],
    m6a: BlockB,
    m6: [BlockC; 4],
    m7a: BlockD,
    m7b: BlockE,
    m7c: BlockE,
    /// (1008, 2048)
    fc: Vec<f32>,
}

/// One BasicConv2d of the file: name prefix, in, out, kernel (h, w), stride, padding (h, w).
type ConvSpec = (String, usize, usize, (usize, usize), usize, (usize, usize));

fn spec(
    name: impl Into<String>,
    cin: usize,
    cout: usize,
    k: (usize, usize),
    stride: usize,
    pad: (usize, usize),
) -> ConvSpec {
    (name.into(), cin, cout, k, stride, pad)
}

/// Every BasicConv2d of the network in forward order: stem, then per block its convs.
fn conv_specs() -> Vec<ConvSpec> {
    let mut v = vec![
        spec("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
        spec("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
        spec("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
        spec("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
        spec("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
    ];
    for (m, cin, pf) in [
        ("Mixed_5b", 192, 32),
        ("Mixed_5c", 256, 64),
        ("Mixed_5d", 288, 64),
    ] {
        v.extend([
            spec(format!("{m}.branch1x1"), cin, 64, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch5x5_1"), cin, 48, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch5x5_2"), 48, 64, (5, 5), 1, (2, 2)),
            spec(format!("{m}.branch3x3dbl_1"), cin, 64, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch3x3dbl_2"), 64, 96, (3, 3), 1, (1, 1)),
            spec(format!("{m}.branch3x3dbl_3"), 96, 96, (3, 3), 1, (1, 1)),
            spec(format!("{m}.branch_pool"), cin, pf, (1, 1), 1, (0, 0)),
        ]);
    }
    v.extend([
        spec("Mixed_6a.branch3x3", 288, 384, (3, 3), 2, (0, 0)),
        spec("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1), 1, (0, 0)),
        spec("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        spec("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
    ]);
    for (m, c7) in [
        ("Mixed_6b", 128),
        ("Mixed_6c", 160),
        ("Mixed_6d", 160),
        ("Mixed_6e", 192),
    ] {
        v.extend([
            spec(format!("{m}.branch1x1"), 768, 192, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch7x7_1"), 768, c7, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch7x7_2"), c7, c7, (1, 7), 1, (0, 3)),
            spec(format!("{m}.branch7x7_3"), c7, 192, (7, 1), 1, (3, 0)),
            spec(format!("{m}.branch7x7dbl_1"), 768, c7, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch7x7dbl_2"), c7, c7, (7, 1), 1, (3, 0)),
            spec(format!("{m}.branch7x7dbl_3"), c7, c7, (1, 7), 1, (0, 3)),
            spec(format!("{m}.branch7x7dbl_4"), c7, c7, (7, 1), 1, (3, 0)),
            spec(format!("{m}.branch7x7dbl_5"), c7, 192, (1, 7), 1, (0, 3)),
            spec(format!("{m}.branch_pool"), 768, 192, (1, 1), 1, (0, 0)),
        ]);
    }
    v.extend([
        spec("Mixed_7a.branch3x3_1", 768, 192, (1, 1), 1, (0, 0)),
        spec("Mixed_7a.branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
        spec("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1), 1, (0, 0)),
        spec("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
        spec("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
        spec("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
    ]);
    for (m, cin) in [("Mixed_7b", 1280), ("Mixed_7c", 2048)] {
        v.extend([
            spec(format!("{m}.branch1x1"), cin, 320, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch3x3_1"), cin, 384, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch3x3_2a"), 384, 384, (1, 3), 1, (0, 1)),
            spec(format!("{m}.branch3x3_2b"), 384, 384, (3, 1), 1, (1, 0)),
            spec(format!("{m}.branch3x3dbl_1"), cin, 448, (1, 1), 1, (0, 0)),
            spec(format!("{m}.branch3x3dbl_2"), 448, 384, (3, 3), 1, (1, 1)),
            spec(format!("{m}.branch3x3dbl_3a"), 384, 384, (1, 3), 1, (0, 1)),
            spec(format!("{m}.branch3x3dbl_3b"), 384, 384, (3, 1), 1, (1, 0)),
            spec(format!("{m}.branch_pool"), cin, 192, (1, 1), 1, (0, 0)),
        ]);
    }
    v
}

/// The tensors the network reads, in file order: per BasicConv2d `conv.weight`,
/// `bn.weight`, `bn.bias`, `bn.running_mean`, `bn.running_var`; then `fc.weight`, `fc.bias`
/// (472; the file's other 94 are BatchNorm's `num_batches_tracked`, unused).
pub fn tensor_shapes() -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    for (name, cin, cout, (kh, kw), _, _) in conv_specs() {
        v.push((format!("{name}.conv.weight"), vec![cout, cin, kh, kw]));
        for p in ["weight", "bias", "running_mean", "running_var"] {
            v.push((format!("{name}.bn.{p}"), vec![cout]));
        }
    }
    v.push(("fc.weight".into(), vec![LOGITS_DIM, POOL_DIM]));
    v.push(("fc.bias".into(), vec![LOGITS_DIM]));
    v
}

/// Look a tensor up and check its shape.
fn take<'a>(tensors: &'a TensorMap, file: &str, name: &str, shape: &[usize]) -> Result<&'a [f32]> {
    let Some(Tensor { shape: s, data: d }) = tensors.get(name) else {
        bail!("{file}: not the FID Inception weights: tensor '{name}' is missing");
    };
    if s != shape {
        bail!(
            "{file}: not the FID Inception weights: tensor '{name}' has shape {s:?}, expected {shape:?}"
        );
    }
    if d.len() != shape.iter().product::<usize>() {
        bail!(
            "{file}: tensor '{name}': {} elements for shape {s:?}",
            d.len()
        );
    }
    if let Some(i) = d.iter().position(|v| !v.is_finite()) {
        bail!("{file}: tensor '{name}' has a non-finite value at element {i}");
    }
    Ok(d)
}

/// Read one BasicConv2d and fold its BatchNorm: `w' = w * g / sqrt(var + eps)`, `b' = beta -
/// mean * g / sqrt(var + eps)` (in f64, stored f32), the weight reordered to (cout, kh, kw,
/// cin).
fn load_conv(tensors: &TensorMap, file: &str, s: &ConvSpec) -> Result<Conv> {
    let (name, cin, cout, (kh, kw), stride, (ph, pw)) = s;
    let (cin, cout, kh, kw) = (*cin, *cout, *kh, *kw);
    let w = take(
        tensors,
        file,
        &format!("{name}.conv.weight"),
        &[cout, cin, kh, kw],
    )?;
    let bn = |p: &str| take(tensors, file, &format!("{name}.bn.{p}"), &[cout]);
    let (g, beta, mean, var) = (
        bn("weight")?,
        bn("bias")?,
        bn("running_mean")?,
        bn("running_var")?,
    );
    let mut wf = vec![0.0f32; cout * kh * kw * cin];
    let mut bf = vec![0.0f32; cout];
    for o in 0..cout {
        let v = var[o] as f64 + BN_EPS;
        if v <= 0.0 {
            bail!(
                "{file}: tensor '{name}.bn.running_var' is {} at {o} (variance + eps must be positive)",
                var[o]
            );
        }
        let scale = g[o] as f64 / v.sqrt();
        bf[o] = (beta[o] as f64 - mean[o] as f64 * scale) as f32;
        for ci in 0..cin {
            for y in 0..kh {
                for x in 0..kw {
                    wf[((o * kh + y) * kw + x) * cin + ci] =
                        (w[((o * cin + ci) * kh + y) * kw + x] as f64 * scale) as f32;
                }
            }
        }
    }
    Ok(Conv {
        cin,
        cout,
        kh,
        kw,
        stride: *stride,
        ph: *ph,
        pw: *pw,
        w: wf,
        b: bf,
    })
}

impl Inception {
    /// Load the weights file (a torch.save'd state dict, either format; any float dtype).
    pub fn load(path: impl AsRef<Path>) -> Result<Inception> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let sd = crate::io::pth::read_state_dict(path, "model")
            .with_context(|| format!("reading the Inception weights {file}"))?;
        let mut tensors = TensorMap::new();
        for (name, t) in sd {
            if t.dtype.is_float() {
                let d = t.to_f32();
                tensors.insert(name, Tensor::new(t.shape, d));
            } else if !name.ends_with("num_batches_tracked") {
                bail!(
                    "{file}: tensor '{name}' is {}, not a float tensor",
                    t.dtype.name()
                );
            }
        }
        Inception::from_tensors(&tensors, &file)
    }

    /// Build the network from named tensors (`file` names their source in errors).
    pub fn from_tensors(tensors: &TensorMap, file: &str) -> Result<Inception> {
        let mut convs = conv_specs()
            .iter()
            .map(|s| load_conv(tensors, file, s))
            .collect::<Result<Vec<Conv>>>()?
            .into_iter();
        let fc = take(tensors, file, "fc.weight", &[LOGITS_DIM, POOL_DIM])?.to_vec();
        take(tensors, file, "fc.bias", &[LOGITS_DIM])?;
        let mut next = || convs.next().expect("conv_specs order");
        let stem = [next(), next(), next(), next(), next()];
        let mut block_a = || {
            let (b1, b5_1, b5_2, d1, d2, d3, pool) =
                (next(), next(), next(), next(), next(), next(), next());
            BlockA {
                head: Conv::stack(&[b1, b5_1, d1, pool]),
                b5x5_2: b5_2,
                dbl_2: d2,
                dbl_3: d3,
            }
        };
        let m5 = [block_a(), block_a(), block_a()];
        let m6a = BlockB {
            b3x3: next(),
            dbl_1: next(),
            dbl_2: next(),
            dbl_3: next(),
        };
        let mut block_c = || {
            let (b1, s1, s2, s3) = (next(), next(), next(), next());
            let (d1, d2, d3, d4, d5, pool) = (next(), next(), next(), next(), next(), next());
            BlockC {
                head: Conv::stack(&[b1, s1, d1, pool]),
                b7_2: s2,
                b7_3: s3,
                dbl: [d2, d3, d4, d5],
            }
        };
        let m6 = [block_c(), block_c(), block_c(), block_c()];
        let (a1, a2, s1, s2, s3, s4) = (next(), next(), next(), next(), next(), next());
        let m7a = BlockD {
            head: Conv::stack(&[a1, s1]),
            b3x3_2: a2,
            b7: [s2, s3, s4],
        };
        let mut block_e = |kind: PoolKind| {
            let (b1, t1, t2a, t2b) = (next(), next(), next(), next());
            let (d1, d2, d3a, d3b, pool) = (next(), next(), next(), next(), next());
            let (head, pool_conv) = match kind {
                PoolKind::Avg => (Conv::stack(&[b1, t1, d1, pool]), None),
                PoolKind::Max => (Conv::stack(&[b1, t1, d1]), Some(pool)),
            };
            BlockE {
                head,
                b3_2a: t2a,
                b3_2b: t2b,
                dbl_2: d2,
                dbl_3a: d3a,
                dbl_3b: d3b,
                pool_conv,
            }
        };
        let m7b = block_e(PoolKind::Avg);
        let m7c = block_e(PoolKind::Max);
        Ok(Inception {
            stem,
            m5,
            m6a,
            m6,
            m7a,
            m7b,
            m7c,
            fc,
        })
    }

    /// The softmax layer's weight, (1008, 2048) row-major (`fc.weight`): what the Inception
    /// Score multiplies `pool_3` by (no bias, as the ADM evaluator).
    pub fn fc_weight(&self) -> &[f32] {
        &self.fc
    }

    /// Features of `n` images, uint8 channels last (n, size, size, 3), any square size >= 1.
    /// Batches larger than 16 run 16 images at a time; rows depend only on their own image.
    pub fn features(&self, images: &[u8], n: usize, size: usize) -> Result<Features> {
        if size == 0 {
            bail!("Inception features: image size 0");
        }
        let per = size
            .checked_mul(size)
            .and_then(|v| v.checked_mul(3))
            .context("Inception features: image size overflows")?;
        if Some(images.len()) != per.checked_mul(n) {
            bail!(
                "Inception features: {} bytes for {n} images of {size} x {size} x 3 ({} expected)",
                images.len(),
                per.saturating_mul(n)
            );
        }
        let mut f = Features {
            n,
            pool: vec![0.0; n * POOL_DIM],
            spatial: vec![0.0; n * SPATIAL_DIM],
            logits: vec![0.0; n * LOGITS_DIM],
        };
        for i0 in (0..n).step_by(CHUNK) {
            let m = CHUNK.min(n - i0);
            let imgs = &images[i0 * per..(i0 + m) * per];
            self.forward_chunk(
                imgs,
                m,
                size,
                &mut f.pool[i0 * POOL_DIM..(i0 + m) * POOL_DIM],
                &mut f.spatial[i0 * SPATIAL_DIM..(i0 + m) * SPATIAL_DIM],
            );
        }
        math::matmul_bt(
            &f.pool,
            &self.fc,
            &mut f.logits,
            n,
            POOL_DIM,
            LOGITS_DIM,
            0.0,
        );
        Ok(f)
    }

    fn forward_chunk(
        &self,
        images: &[u8],
        n: usize,
        size: usize,
        pool: &mut [f32],
        spatial: &mut [f32],
    ) {
        let s = INPUT_SIZE;
        let mut x = Act::new(n, s, s, 3);
        let per = size * size * 3;
        x.d.par_chunks_mut(s * s * 3)
            .zip(images.par_chunks(per))
            .for_each(|(dst, img)| resize_normalize(img, size, s, dst));
        let x = conv_new(x.view(), &self.stem[0]); // 149 x 149 x 32
        let x = conv_new(x.view(), &self.stem[1]); // 147 x 147 x 32
        let x = conv_new(x.view(), &self.stem[2]); // 147 x 147 x 64
        let x = pool_new(x.view(), 2, 0); // 73 x 73 x 64
        let x = conv_new(x.view(), &self.stem[3]); // 73 x 73 x 80
        let x = conv_new(x.view(), &self.stem[4]); // 71 x 71 x 192
        let mut x = pool_new(x.view(), 2, 0); // 35 x 35 x 192
        for b in &self.m5 {
            x = b.forward(x.view()); // 35 x 35 x 256 / 288 / 288
        }
        x = self.m6a.forward(x.view()); // 17 x 17 x 768
        for (i, b) in self.m6.iter().enumerate() {
            let (o, head) = b.forward(x.view());
            if i == 2 {
                // Mixed_6d.branch1x1 = head columns 0..192 after bias + ReLU.
                let hw = head.h * head.w;
                assert_eq!(hw * SPATIAL_CHANNELS, SPATIAL_DIM);
                for (img, dst) in spatial.chunks_mut(SPATIAL_DIM).enumerate() {
                    for (p, d) in dst.chunks_mut(SPATIAL_CHANNELS).enumerate() {
                        let r = (img * hw + p) * head.c;
                        d.copy_from_slice(&head.d[r..r + SPATIAL_CHANNELS]);
                    }
                }
            }
            x = o;
        }
        x = self.m7a.forward(x.view()); // 8 x 8 x 1280
        x = self.m7b.forward(x.view()); // 8 x 8 x 2048
        x = self.m7c.forward(x.view()); // 8 x 8 x 2048
        let hw = x.h * x.w;
        for (img, dst) in pool.chunks_mut(POOL_DIM).enumerate() {
            let mut acc = vec![0.0f64; POOL_DIM];
            for p in 0..hw {
                let r = (img * hw + p) * POOL_DIM;
                for (a, &v) in acc.iter_mut().zip(&x.d[r..r + POOL_DIM]) {
                    *a += v as f64;
                }
            }
            for (d, a) in dst.iter_mut().zip(acc) {
                *d = (a / hw as f64) as f32;
            }
        }
    }
}

fn pool_new(x: View, stride: usize, pad: usize) -> Act {
    let oh = (x.h + 2 * pad - 3) / stride + 1;
    let ow = (x.w + 2 * pad - 3) / stride + 1;
    let mut a = Act::new(x.n, oh, ow, x.c);
    max_pool3(x, stride, pad, a.out(0));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd_vec(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    }

    /// A direct convolution in f64 with torch's weight layout (cout, cin, kh, kw), NCHW-free:
    /// reads the channels-last input by index; returns (rows, cout) before bias.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv(
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        cin: usize,
        wt: &[f32],
        cout: usize,
        (kh, kw): (usize, usize),
        stride: usize,
        (ph, pw): (usize, usize),
    ) -> (Vec<f64>, usize, usize) {
        let oh = (h + 2 * ph - kh) / stride + 1;
        let ow = (w + 2 * pw - kw) / stride + 1;
        let mut out = vec![0.0f64; n * oh * ow * cout];
        for img in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for o in 0..cout {
                        let mut acc = 0.0f64;
                        for ci in 0..cin {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * stride + ky) as isize - ph as isize;
                                    let ix = (ox * stride + kx) as isize - pw as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv =
                                        x[((img * h + iy as usize) * w + ix as usize) * cin + ci];
                                    acc +=
                                        xv as f64 * wt[((o * cin + ci) * kh + ky) * kw + kx] as f64;
                                }
                            }
                        }
                        out[((img * oh + oy) * ow + ox) * cout + o] = acc;
                    }
                }
            }
        }
        (out, oh, ow)
    }

    /// Folding + reordering + im2col + GEMM + bias/ReLU against the direct convolution with
    /// the BatchNorm applied after it, for every kernel shape the network has, read from a
    /// column band of a wider input and written into a band of a wider output.
    #[test]
    fn conv_matches_direct_convolution() {
        let mut worst = 0.0f64;
        for (i, &(k, stride, pad)) in [
            ((1, 1), 1, (0, 0)),
            ((3, 3), 2, (0, 0)),
            ((3, 3), 1, (0, 0)),
            ((3, 3), 1, (1, 1)),
            ((5, 5), 1, (2, 2)),
            ((1, 7), 1, (0, 3)),
            ((7, 1), 1, (3, 0)),
            ((1, 3), 1, (0, 1)),
            ((3, 1), 1, (1, 0)),
        ]
        .iter()
        .enumerate()
        {
            let (n, h, w, cin, cout) = (2, 9, 7, 5, 6);
            let (ld_in, off_in) = (cin + 3, 2);
            let xin = rnd_vec(n * h * w * ld_in, 11 + i as u32);
            let wt = rnd_vec(cout * cin * k.0 * k.1, 23 + i as u32);
            let g: Vec<f32> = rnd_vec(cout, 5).iter().map(|v| 1.0 + v).collect();
            let beta = rnd_vec(cout, 6);
            let mean = rnd_vec(cout, 7);
            let var: Vec<f32> = rnd_vec(cout, 8).iter().map(|v| 0.5 + v).collect();
            let mut map = TensorMap::new();
            map.insert(
                "c.conv.weight".into(),
                Tensor::new(vec![cout, cin, k.0, k.1], wt.clone()),
            );
            for (p, v) in [
                ("weight", &g),
                ("bias", &beta),
                ("running_mean", &mean),
                ("running_var", &var),
            ] {
                map.insert(format!("c.bn.{p}"), Tensor::new(vec![cout], v.clone()));
            }
            let cv = load_conv(&map, "t", &spec("c", cin, cout, k, stride, pad)).unwrap();
            let x = View {
                d: &xin,
                n,
                h,
                w,
                c: cin,
                ld: ld_in,
                off: off_in,
            };
            let (oh, ow) = cv.out_hw(h, w);
            let ld_out = cout + 4;
            let mut out = vec![f32::NAN; n * oh * ow * ld_out];
            conv(
                x,
                &cv,
                Out {
                    d: &mut out,
                    ld: ld_out,
                    off: 3,
                },
                cout,
            );
            // The dense input the reference reads.
            let dense: Vec<f32> = xin
                .chunks(ld_in)
                .flat_map(|r| r[off_in..off_in + cin].to_vec())
                .collect();
            let (want, rh, rw) = naive_conv(&dense, n, h, w, cin, &wt, cout, k, stride, pad);
            assert_eq!((rh, rw), (oh, ow));
            for r in 0..n * oh * ow {
                for o in 0..cout {
                    let s = g[o] as f64 / (var[o] as f64 + BN_EPS).sqrt();
                    let y = ((want[r * cout + o] - mean[o] as f64) * s + beta[o] as f64).max(0.0);
                    let got = out[r * ld_out + 3 + o] as f64;
                    worst = worst.max((got - y).abs());
                }
                // Columns outside the band untouched.
                assert!(out[r * ld_out..r * ld_out + 3].iter().all(|v| v.is_nan()));
            }
        }
        println!("conv vs direct convolution: worst abs error {worst:.2e}");
        assert!(worst < 1e-5);
    }

    /// The average pool (count_include_pad=False, then bias and ReLU) and the max pools, by
    /// their definition (the conv moved before the average pool is checked by the golden
    /// test, tests/eval_features.rs).
    #[test]
    fn pools_by_definition() {
        let (n, h, w, c) = (2, 5, 4, 3);
        let x = rnd_vec(n * h * w * c, 3);
        let b = rnd_vec(c, 4);
        let mut avg = vec![0.0; n * h * w * c];
        avg_pool3_bias_relu(
            View::dense(&x, n, h, w, c),
            &b,
            Out {
                d: &mut avg,
                ld: c,
                off: 0,
            },
        );
        let mut worst = 0.0f32;
        for img in 0..n {
            for y in 0..h {
                for xx in 0..w {
                    for ch in 0..c {
                        let (mut s, mut cnt) = (0.0f32, 0);
                        for dy in -1i32..=1 {
                            for dx in -1i32..=1 {
                                let (yy, xs) = (y as i32 + dy, xx as i32 + dx);
                                if yy < 0 || xs < 0 || yy >= h as i32 || xs >= w as i32 {
                                    continue;
                                }
                                let v = x[((img * h + yy as usize) * w + xs as usize) * c + ch];
                                s += v;
                                cnt += 1;
                            }
                        }
                        let r = ((img * h + y) * w + xx) * c + ch;
                        worst = worst.max((avg[r] - (s / cnt as f32 + b[ch]).max(0.0)).abs());
                    }
                }
            }
        }
        println!("avg pool (count_include_pad=False): worst abs error {worst:.2e}");
        assert!(worst < 1e-6);
        // Max pool 3/2 without padding on 5 x 4 -> 2 x 1; 3/1 padded keeps the size.
        let mut mp = vec![0.0; n * 2 * c];
        max_pool3(
            View::dense(&x, n, h, w, c),
            2,
            0,
            Out {
                d: &mut mp,
                ld: c,
                off: 0,
            },
        );
        for img in 0..n {
            for oy in 0..2 {
                for ch in 0..c {
                    let mut m = f32::NEG_INFINITY;
                    for y in 2 * oy..2 * oy + 3 {
                        for xx in 0..3 {
                            m = m.max(x[((img * h + y) * w + xx) * c + ch]);
                        }
                    }
                    assert_eq!(mp[(img * 2 + oy) * c + ch], m);
                }
            }
        }
        let mut mp1 = vec![0.0; n * h * w * c];
        max_pool3(
            View::dense(&x, n, h, w, c),
            1,
            1,
            Out {
                d: &mut mp1,
                ld: c,
                off: 0,
            },
        );
        // The corner sees a 2 x 2 window.
        for ch in 0..c {
            let m = [0, 1, w, w + 1]
                .iter()
                .map(|&p| x[p * c + ch])
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(mp1[ch], m);
        }
    }

    #[test]
    fn network_specs_have_the_files_tensor_count() {
        // 94 BasicConv2d x (conv.weight + 4 BatchNorm tensors + num_batches_tracked) + fc = 566.
        assert_eq!(conv_specs().len(), 94);
        assert_eq!(tensor_shapes().len() + 94, 566);
    }
}
