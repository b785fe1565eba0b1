//! The one GEMM wrapper: every GEMM the engine runs (linear layers, the decoder's 1x1 convs
//! and attention) is one [`GemmCall`] value run by [`gemm`]. The value holds exactly the
//! arguments `cublasLtMatmul` receives (operations, the four matrix layouts with their data
//! types, leading dimensions and batch strides, addresses, alpha/beta, compute and scale
//! types, the algorithm), so there is one place that knows cuBLAS's conventions and the two
//! backends cannot disagree about what was asked:
//!
//! * on a GPU, [`gemm`] passes the fields to cuBLASLt unchanged (after pinning the algorithm,
//!   below);
//! * on the host emulator, [`host_gemm`] interprets the same fields by cuBLASLt's definition
//!   (column-major layouts of the *stored* matrices, `op` applied to them, `ld >= rows`,
//!   batch strides in elements, the data type deciding element size and conversion) and
//!   refuses what cuBLASLt refuses (`CUBLAS_STATUS_INVALID_VALUE` / `_NOT_SUPPORTED`), so a
//!   wrong field in the value fails the tests instead of passing them on intent.
//!
//! **Batch invariance.** `cublasGemmEx` with `CUBLAS_GEMM_DEFAULT` picks a kernel and a
//! split-K factor per problem size, so the row of one image could be summed in another order
//! when the batch (the GEMM's M, cuBLAS's n) changes. Instead, the algorithm is pinned per
//! [`AlgoKey`] (everything but n and the batch count: the weight shape, types, layouts,
//! alignment): chosen once by cuBLASLt's heuristic for a fixed representative n, with split-K
//! off (`CUBLASLT_ALGO_CONFIG_SPLITK_NUM` = 1, no reduction scheme), cached in the `Gpu`, and
//! reused for every n. Without split-K each output element is summed over k by one CTA in
//! the kernel's k order, whatever n is; that the chosen kernels keep that promise (no
//! stream-K or other n-dependent decomposition) only a real GPU can confirm
//! (tests/gpu_gemm.rs `rows_do_not_depend_on_the_batch`, run by the GPU bundle).
//!
//! cuBLAS is column-major: a row-major `Y (m x n) = X (m x k) W^T` is the column-major
//! `Y^T (n x m) = op_T(W) X^T`, with W's stored (n x k) row-major bytes read as a (k x n)
//! column-major matrix (ld k) and X's as (k x m) (ld k); see [`linear`].

pub use super::blas::{
    Algo, AlgoKey, ComputeType, DataType, GemmCall, Matrix, Op, Operand, host_gemm,
};
use super::device::{DevBuf, DevElem, Gpu};
use super::emu::EmuDevice;
use anyhow::{Context, Result, ensure};
use half::bf16;

/// Run `call` on `gpu`: on a GPU, pin its algorithm (`Lt::pin`) and pass every field to
/// `cublasLtMatmul`; on the emulator, [`host_gemm`] (recorded into a graph during a capture).
/// Callers check buffer sizes against the shape (this takes raw addresses; the emulator
/// checks them against its allocations).
pub fn gemm(gpu: &Gpu, call: GemmCall) -> Result<()> {
    let traffic = call.traffic()?;
    let Some((lt, ws, stream)) = gpu.blas_lt() else {
        let run = move |emu: &EmuDevice| {
            host_gemm(&call, |what, addr, bytes| {
                emu.check_range(what, addr, bytes)
            })?;
            emu.check_red_zones("cuBLAS GEMM")
        };
        let mut addrs = vec![call.a.ptr, call.b.ptr, call.c.ptr, call.d.ptr];
        addrs.dedup();
        return gpu.issue("gemm", traffic, &addrs, run);
    };
    gpu.issue("gemm", traffic, &[], |_: &EmuDevice| Ok(()))?;
    let call = GemmCall {
        algo: Some(lt.pin(&call, ws.1)?),
        ..call
    };
    // SAFETY: the callers checked every buffer against the GEMM shape; pointers live for the
    // call; the workspace is the Gpu's, used only on this stream, so the GEMM is ordered
    // with the kernels and with the other GEMMs that use it.
    unsafe { lt.matmul(&call, ws, stream) }.context("cuBLASLt GEMM")
}

/// Element type of a GEMM output.
pub trait GemmOut: DevElem {
    const DATA_TYPE: DataType;
}
impl GemmOut for f32 {
    const DATA_TYPE: DataType = DataType::CUDA_R_32F;
}
impl GemmOut for bf16 {
    const DATA_TYPE: DataType = DataType::CUDA_R_16BF;
}

/// `y (m x n) = x (m x k) w^T + beta * y`, row-major, `w` a Linear weight (n x k), `x` and
/// `w` bf16, f32 accumulation; `x_off`/`y_off` are element offsets into the buffers (row
/// slices). Nothing for m = 0; else checks the buffers against the shape and runs the one
/// [`GemmCall`] by [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn linear<O: GemmOut>(
    gpu: &Gpu,
    x: &DevBuf<bf16>,
    x_off: usize,
    w: &DevBuf<bf16>,
    y: &mut DevBuf<O>,
    y_off: usize,
    m: usize,
    k: usize,
    n: usize,
    beta: f32,
) -> Result<()> {
    if m == 0 {
        return Ok(());
    }
    ensure!(
        x.len() >= x_off + m * k && w.len() >= n * k && y.len() >= y_off + m * n,
        "gemm shapes: x {} (need {}), w {} (need {}), y {} (need {})",
        x.len(),
        x_off + m * k,
        w.len(),
        n * k,
        y.len(),
        y_off + m * n
    );
    let (xp, wp, yp) = (gpu.ptr(x), gpu.ptr(w), gpu.ptr(y));
    let bf = DataType::CUDA_R_16BF;
    // Column-major Y^T (n x m) = op_T(W as (k x n), ld k) X^T (k x m, ld k), ldc n.
    let call = GemmCall::strided(
        Op::CUBLAS_OP_T,
        (n, m, k),
        [
            Operand {
                ptr: wp,
                dtype: bf,
                ld: k,
                stride: 0,
            },
            Operand {
                ptr: xp + (x_off * 2) as u64,
                dtype: bf,
                ld: k,
                stride: 0,
            },
            Operand {
                ptr: yp + (y_off * std::mem::size_of::<O>()) as u64,
                dtype: O::DATA_TYPE,
                ld: n,
                stride: 0,
            },
        ],
        beta,
        1,
    );
    gemm(gpu, call)
}

#[cfg(test)]
mod tests {
    use super::super::blas::{REPRESENTATIVE_N, representative};
    use super::*;

    fn op<T>(v: &[T], dtype: DataType, ld: usize, stride: usize) -> Operand {
        Operand {
            ptr: v.as_ptr() as u64,
            dtype,
            ld,
            stride,
        }
    }

    fn val(i: usize) -> f32 {
        ((i * 37 % 23) as f32 - 11.0) / 8.0
    }

    /// Column-major reference of cuBLAS's definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        trans_a: bool,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        (lda, sa): (usize, usize),
        b: &[f32],
        (ldb, sb): (usize, usize),
        c: &mut [f32],
        (ldc, sc): (usize, usize),
        beta: f32,
        batch: usize,
    ) {
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f64;
                    for p in 0..k {
                        let av = if trans_a {
                            a[bi * sa + p + i * lda]
                        } else {
                            a[bi * sa + i + p * lda]
                        };
                        acc += av as f64 * b[bi * sb + p + j * ldb] as f64;
                    }
                    let ci = bi * sc + i + j * ldc;
                    let old = if beta != 0.0 {
                        beta as f64 * c[ci] as f64
                    } else {
                        0.0
                    };
                    c[ci] = (acc + old) as f32;
                }
            }
        }
    }

    fn op_mut<T>(v: &mut [T], dtype: DataType, ld: usize, stride: usize) -> Operand {
        Operand {
            ptr: v.as_mut_ptr() as u64,
            dtype,
            ld,
            stride,
        }
    }

    #[test]
    fn host_gemm_is_cublas_column_major_with_transposes_lds_strides_beta() {
        let f32t = DataType::CUDA_R_32F;
        let bft = DataType::CUDA_R_16BF;
        for &(trans_a, m, n, k, batch, beta) in &[
            (false, 5, 3, 4, 1, 0.0f32),
            (true, 5, 3, 4, 1, 1.0),
            (true, 7, 6, 9, 3, 0.5),
            (false, 4, 8, 2, 2, 0.0),
        ] {
            let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
            let (lda, ldb, ldc) = (ar + 2, k + 1, m + 3);
            let (sa, sb, sc) = (lda * ac + 5, ldb * n + 1, ldc * n + 2);
            let a: Vec<f32> = (0..sa * batch).map(val).collect();
            let b: Vec<f32> = (0..sb * batch).map(|i| val(i + 7)).collect();
            let c0: Vec<f32> = (0..sc * batch).map(|i| val(i + 3)).collect();
            // The f64 reference from a starting C, and one host_gemm call with these shapes.
            let reference_from = |c_init: Vec<f32>| {
                let mut w = c_init;
                let lds = ((lda, sa), (ldb, sb), (ldc, sc));
                reference(
                    trans_a,
                    (m, n, k),
                    &a,
                    lds.0,
                    &b,
                    lds.1,
                    &mut w,
                    lds.2,
                    beta,
                    batch,
                );
                w
            };
            let gemm = |a: Operand, b: Operand, c: Operand| {
                let op = if trans_a {
                    Op::CUBLAS_OP_T
                } else {
                    Op::CUBLAS_OP_N
                };
                let call = GemmCall::strided(op, (m, n, k), [a, b, c], beta, batch);
                host_gemm(&call, |_, _, _| Ok(())).unwrap()
            };
            // f32 everywhere
            let want = reference_from(c0.clone());
            let mut c = c0.clone();
            gemm(
                op(&a, f32t, lda, sa),
                op(&b, f32t, ldb, sb),
                op_mut(&mut c, f32t, ldc, sc),
            );
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (x - y).abs() < 1e-4,
                    "{x} vs {y} (trans {trans_a}, {m}x{n}x{k})"
                );
            }
            // bf16 inputs (values exact in bf16), bf16 output rounded to nearest even
            let ah: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
            let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut ch: Vec<bf16> = c0.iter().map(|&x| bf16::from_f32(x)).collect();
            let wantb = reference_from(ch.iter().map(|x| x.to_f32()).collect());
            gemm(
                op(&ah, bft, lda, sa),
                op(&bh, bft, ldb, sb),
                op_mut(&mut ch, bft, ldc, sc),
            );
            for (i, (x, y)) in ch.iter().zip(&wantb).enumerate() {
                let in_c = (0..batch).any(|bi| {
                    let r = i.wrapping_sub(bi * sc);
                    r < ldc * n && r % ldc < m
                });
                if in_c {
                    assert_eq!(*x, bf16::from_f32(*y), "element {i}");
                } else {
                    assert_eq!(
                        *x,
                        bf16::from_f32(c0[i]),
                        "element {i} outside C was written"
                    );
                }
            }
        }
    }

    #[test]
    fn host_gemm_beta_zero_ignores_nan_in_c_and_checks_lds() {
        let f32t = DataType::CUDA_R_32F;
        let a = vec![1.0f32; 4];
        let b = vec![2.0f32; 4];
        let mut c = vec![f32::NAN; 4];
        // 2x2x2, beta 0, with A's leading dimension `lda`.
        let mut gemm = |lda: usize| {
            let call = GemmCall::strided(
                Op::CUBLAS_OP_N,
                (2, 2, 2),
                [
                    op(&a, f32t, lda, 0),
                    op(&b, f32t, 2, 0),
                    op_mut(&mut c, f32t, 2, 0),
                ],
                0.0,
                1,
            );
            host_gemm(&call, |_, _, _| Ok(()))
        };
        gemm(2).unwrap();
        let e = gemm(1).unwrap_err();
        assert_eq!(c, vec![4.0; 4]);
        assert!(e.to_string().contains("CUBLAS_STATUS_INVALID_VALUE"), "{e}");
    }

    #[test]
    fn emu_gemm_rejects_operands_beyond_their_buffer() {
        let g = Gpu::emu().unwrap();
        let x = g.upload(&[bf16::ONE; 4 * 8]).unwrap();
        let w = g.upload(&[bf16::ONE; 3 * 8]).unwrap();
        let mut y = g.zeros::<f32>(4 * 3).unwrap();
        linear(&g, &x, 0, &w, &mut y, 0, 4, 8, 3, 0.0).unwrap();
        assert_eq!(g.download(&y).unwrap(), vec![8.0; 12]);
        // A leading dimension one too large reads past the end of w.
        let bf = DataType::CUDA_R_16BF;
        let e = gemm(
            &g,
            GemmCall::strided(
                Op::CUBLAS_OP_T,
                (3, 4, 8),
                [
                    Operand {
                        ptr: g.ptr(&w),
                        dtype: bf,
                        ld: 9,
                        stride: 0,
                    },
                    Operand {
                        ptr: g.ptr(&x),
                        dtype: bf,
                        ld: 8,
                        stride: 0,
                    },
                    Operand {
                        ptr: g.ptr(&y),
                        dtype: DataType::CUDA_R_32F,
                        ld: 3,
                        stride: 0,
                    },
                ],
                0.0,
                1,
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("operand A") && e.contains("overrun buffer bf16 x 24"),
            "{e}"
        );
    }

    /// The pinning key ignores exactly what changes with the batch size (n, batch count,
    /// addresses with the same alignment) and nothing else; the representative call keeps
    /// the key and fixes n and the batch count.
    #[test]
    fn algo_key_ignores_only_the_batch_dimensions() {
        let bf = DataType::CUDA_R_16BF;
        let call = |n: usize, k: usize, batch: usize, x_ptr: u64| {
            let o = |ptr, dtype, ld| Operand {
                ptr,
                dtype,
                ld,
                stride: 0,
            };
            GemmCall::strided(
                Op::CUBLAS_OP_T,
                (96, n, k),
                [
                    o(0x1000, bf, k),
                    o(x_ptr, bf, k),
                    o(0x9000, DataType::CUDA_R_32F, 96),
                ],
                0.0,
                batch,
            )
        };
        let key = call(5, 64, 1, 0x4000).algo_key();
        assert_eq!(call(300, 64, 7, 0x8000).algo_key(), key);
        assert_eq!(representative(&call(3, 64, 2, 0x4000)).algo_key(), key);
        assert_eq!(
            representative(&call(3, 64, 2, 0x4000)).d.cols,
            REPRESENTATIVE_N
        );
        assert_ne!(
            call(5, 128, 1, 0x4000).algo_key(),
            key,
            "K is part of the key"
        );
        assert_ne!(
            call(5, 64, 1, 0x4002).algo_key(),
            key,
            "alignment is part of the key"
        );
        let mut t = call(5, 64, 1, 0x4000);
        t.trans_a = Op::CUBLAS_OP_N;
        assert_ne!(t.algo_key(), key, "ops are part of the key");
        representative(&call(3, 64, 2, 0x4000)).check().unwrap();
    }
}
