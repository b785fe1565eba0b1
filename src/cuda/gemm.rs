//! The one cuBLAS wrapper: every GEMM the engine runs (linear layers, the decoder's 1x1 convs
//! and attention) goes through [`gemm`], one `cublasGemmStridedBatchedEx` call with f32
//! accumulation (CUBLAS_COMPUTE_32F), so there is one place that knows cuBLAS's conventions.
//! On the host emulator the same call is computed on the host as cuBLAS defines it
//! ([`host_gemm`]): same argument checks, column-major operands, f32 products and sums,
//! `beta == 0` never reads C, output rounded to its dtype (round to nearest even).
//!
//! cuBLAS is column-major: a row-major `Y (m x n) = X (m x k) W^T` is the column-major
//! `Y^T (n x m) = op_T(W) X^T`, with W's stored (n x k) row-major bytes read as a (k x n)
//! column-major matrix (ld k) and X's as (k x m) (ld k); see [`linear`].

use super::device::DevBuf;
use super::emu::EmuDevice;
use super::{DevElem, Gpu, Traffic};
use anyhow::{Context, Result, bail};
use cudarc::cublas::{result::gemm_strided_batched_ex, sys};
use half::{bf16, f16};

/// One operand of a column-major GEMM: device address, element type, leading dimension, and
/// stride between batch entries (elements).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: sys::cudaDataType,
    pub ld: usize,
    pub stride: usize,
}

/// `C_i = op(A_i) B_i + beta C_i` for i in 0..batch, column-major, (m x n) outputs with inner
/// dimension k; `op` is a transpose when `trans_a`. Callers check buffer sizes against the
/// shape (this takes raw addresses; the emulator checks them against its allocations).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &Gpu,
    trans_a: bool,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: Operand,
    beta: f32,
    batch: usize,
) -> Result<()> {
    let traffic = gemm_traffic(trans_a, (m, n, k), a, b, c, beta, batch)?;
    let Some(blas) = gpu.blas() else {
        let run = move |emu: &EmuDevice| {
            host_gemm(
                trans_a,
                (m, n, k),
                a,
                b,
                c,
                beta,
                batch,
                |what, addr, bytes| emu.check_range(what, addr, bytes),
            )?;
            emu.check_red_zones("cuBLAS GEMM")
        };
        return gpu.issue("gemm", traffic, &[a.ptr, b.ptr, c.ptr], run);
    };
    gpu.issue("gemm", traffic, &[], |_: &EmuDevice| Ok(()))?;
    let alpha = 1.0f32;
    let op_a = if trans_a {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    };
    // SAFETY: the callers checked every buffer against the GEMM shape; pointers live for the
    // call and the handle is bound to our stream, so the GEMM is ordered with the kernels.
    unsafe {
        gemm_strided_batched_ex(
            *blas.handle(),
            op_a,
            sys::cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            a.ptr as *const _,
            a.dtype,
            a.ld as i32,
            a.stride as i64,
            b.ptr as *const _,
            b.dtype,
            b.ld as i32,
            b.stride as i64,
            &beta as *const f32 as *const _,
            c.ptr as *mut _,
            c.dtype,
            c.ld as i32,
            c.stride as i64,
            batch as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .context("cuBLAS GEMM")?;
    }
    Ok(())
}

/// The compulsory traffic of a [`gemm`]: each operand's elements once (an operand with
/// stride 0 is shared by the whole batch), C read only when `beta != 0`; 2 m n k FLOPs per
/// batch entry.
#[allow(clippy::too_many_arguments)]
pub fn gemm_traffic(
    trans_a: bool,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: Operand,
    beta: f32,
    batch: usize,
) -> Result<Traffic> {
    // The elements of each stored (rows x cols) matrix (a leading dimension above rows
    // leaves gaps that are not read), once per batch entry unless shared (stride 0).
    let bytes = |o: Operand, rows: usize, cols: usize| -> Result<usize> {
        let copies = if o.stride == 0 { 1 } else { batch };
        Ok(rows * cols * copies * dtype_bytes(o.dtype)?)
    };
    let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
    let c_bytes = bytes(c, m, n)?;
    let read = bytes(a, ar, ac)? + bytes(b, k, n)? + if beta != 0.0 { c_bytes } else { 0 };
    Ok(Traffic::new(read, c_bytes, 2 * m * n * k * batch))
}

fn dtype_bytes(d: sys::cudaDataType) -> Result<usize> {
    Ok(match d {
        sys::cudaDataType::CUDA_R_32F => 4,
        sys::cudaDataType::CUDA_R_16BF | sys::cudaDataType::CUDA_R_16F => 2,
        other => bail!("GEMM dtype {other:?} is not one the engine uses"),
    })
}

/// Element `i` of an operand array at `base` (bytes), as f32.
///
/// # Safety
/// `base + i * size` must be a readable element of `dtype`.
unsafe fn load(dtype: sys::cudaDataType, base: usize, i: usize) -> f32 {
    // SAFETY: per the contract.
    unsafe {
        match dtype {
            sys::cudaDataType::CUDA_R_32F => *(base as *const f32).add(i),
            sys::cudaDataType::CUDA_R_16BF => (*(base as *const bf16).add(i)).to_f32(),
            _ => (*(base as *const f16).add(i)).to_f32(),
        }
    }
}

/// The extent in elements of a column-major (rows x cols) matrix with leading dimension ld.
fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (cols - 1) * ld + rows
    }
}

/// `cublasGemmStridedBatchedEx` with alpha 1, CUBLAS_COMPUTE_32F, on host memory:
/// `C_i (m x n, ldc) = op(A_i) (m x k) B_i (k x n) + beta C_i`, column-major, where
/// `op(A)` reads A as (k x m, lda) transposed when `trans_a`, else as (m x k, lda). Checks
/// the arguments as cuBLAS does (CUBLAS_STATUS_INVALID_VALUE: a leading dimension below the
/// rows of its stored matrix, negative sizes) and every operand's byte range with `check`
/// before reading. Products and sums in f32 (`math::matmul` on f32 copies of the
/// operands), `beta == 0` does not read C (so NaN/poison there does not propagate), the
/// output is rounded to C's dtype.
#[allow(clippy::too_many_arguments)]
pub fn host_gemm(
    trans_a: bool,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: Operand,
    beta: f32,
    batch: usize,
    check: impl Fn(&str, usize, usize) -> Result<()>,
) -> Result<()> {
    let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
    // cuBLAS: lda >= max(1, rows of A as stored), ldb >= max(1, k), ldc >= max(1, m).
    if a.ld < a_rows.max(1) || b.ld < k.max(1) || c.ld < m.max(1) {
        bail!(
            "cuBLAS GEMM: CUBLAS_STATUS_INVALID_VALUE (m {m} n {n} k {k}, trans_a {trans_a}: lda {} \
             needs >= {}, ldb {} needs >= {}, ldc {} needs >= {})",
            a.ld,
            a_rows.max(1),
            b.ld,
            k.max(1),
            c.ld,
            m.max(1)
        );
    }
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let (sa, sb, sc) = (
        dtype_bytes(a.dtype)?,
        dtype_bytes(b.dtype)?,
        dtype_bytes(c.dtype)?,
    );
    let (ea, eb, ec) = (
        extent(a_rows, a_cols, a.ld),
        extent(k, n, b.ld),
        extent(m, n, c.ld),
    );
    for i in 0..batch {
        let what =
            |op: &str| format!("cuBLAS GEMM (m {m} n {n} k {k}, batch {i}/{batch}) operand {op}");
        if k > 0 {
            check(&what("A"), a.ptr as usize + i * a.stride * sa, ea * sa)?;
            check(&what("B"), b.ptr as usize + i * b.stride * sb, eb * sb)?;
        }
        check(&what("C"), c.ptr as usize + i * c.stride * sc, ec * sc)?;
    }
    let mut af = vec![0.0f32; m * k];
    let mut bt = vec![0.0f32; n * k];
    let mut cf = vec![0.0f32; m * n];
    for i in 0..batch {
        let (abase, bbase, cbase) = (
            a.ptr as usize + i * a.stride * sa,
            b.ptr as usize + i * b.stride * sb,
            c.ptr as usize + i * c.stride * sc,
        );
        // op(A) as a dense row-major (m x k) f32 matrix, B transposed: row-major (n x k).
        for r in 0..m {
            for p in 0..k {
                let idx = if trans_a { p + r * a.ld } else { r + p * a.ld };
                // SAFETY: idx < extent of A, checked above.
                af[r * k + p] = unsafe { load(a.dtype, abase, idx) };
            }
        }
        for j in 0..n {
            for p in 0..k {
                // SAFETY: p + j * ldb < extent of B, checked above.
                bt[j * k + p] = unsafe { load(b.dtype, bbase, p + j * b.ld) };
            }
        }
        // As `A B^T` (the NT kernel): every element's sum runs in one order whatever m and n,
        // so a batch's rows come out the same at any batch size (tests/batching.rs).
        crate::math::matmul_bt(&af, &bt, &mut cf, m, k, n, 0.0);
        for r in 0..m {
            for j in 0..n {
                let idx = r + j * c.ld;
                let mut v = cf[r * n + j];
                if beta != 0.0 {
                    // SAFETY: idx < extent of C, checked above.
                    v += beta * unsafe { load(c.dtype, cbase, idx) };
                }
                // SAFETY: as above; C is writable emulated memory.
                unsafe {
                    match c.dtype {
                        sys::cudaDataType::CUDA_R_32F => *(cbase as *mut f32).add(idx) = v,
                        sys::cudaDataType::CUDA_R_16BF => {
                            *(cbase as *mut bf16).add(idx) = bf16::from_f32(v)
                        }
                        _ => *(cbase as *mut f16).add(idx) = f16::from_f32(v),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Element type of a GEMM output.
pub trait GemmOut: DevElem {
    const DATA_TYPE: sys::cudaDataType;
}
impl GemmOut for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}
impl GemmOut for bf16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}

/// `y (m x n) = x (m x k) w^T + beta * y`, row-major, `w` a Linear weight (n x k); `x` and `w`
/// bf16, f32 accumulation. `x_off`/`y_off` are element offsets into the buffers (row slices).
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
    if x.len() < x_off + m * k || w.len() < n * k || y.len() < y_off + m * n {
        bail!(
            "gemm shapes: x {} (need {}), w {} (need {}), y {} (need {})",
            x.len(),
            x_off + m * k,
            w.len(),
            n * k,
            y.len(),
            y_off + m * n
        );
    }
    let (xp, wp, yp) = (gpu.ptr(x), gpu.ptr(w), gpu.ptr(y));
    let bf = sys::cudaDataType::CUDA_R_16BF;
    gemm(
        gpu,
        true,
        (n, m, k),
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
        beta,
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op<T>(v: &[T], dtype: sys::cudaDataType, ld: usize, stride: usize) -> Operand {
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

    fn op_mut<T>(v: &mut [T], dtype: sys::cudaDataType, ld: usize, stride: usize) -> Operand {
        Operand {
            ptr: v.as_mut_ptr() as u64,
            dtype,
            ld,
            stride,
        }
    }

    #[test]
    fn host_gemm_is_cublas_column_major_with_transposes_lds_strides_beta() {
        let f32t = sys::cudaDataType::CUDA_R_32F;
        let bft = sys::cudaDataType::CUDA_R_16BF;
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
                host_gemm(trans_a, (m, n, k), a, b, c, beta, batch, |_, _, _| Ok(())).unwrap()
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
        let f32t = sys::cudaDataType::CUDA_R_32F;
        let a = vec![1.0f32; 4];
        let b = vec![2.0f32; 4];
        let mut c = vec![f32::NAN; 4];
        // 2x2x2, beta 0, with A's leading dimension `lda`.
        let mut gemm = |lda: usize| {
            host_gemm(
                false,
                (2, 2, 2),
                op(&a, f32t, lda, 0),
                op(&b, f32t, 2, 0),
                op_mut(&mut c, f32t, 2, 0),
                0.0,
                1,
                |_, _, _| Ok(()),
            )
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
        let bf = sys::cudaDataType::CUDA_R_16BF;
        let e = gemm(
            &g,
            true,
            (3, 4, 8),
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
                dtype: sys::cudaDataType::CUDA_R_32F,
                ld: 3,
                stride: 0,
            },
            0.0,
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("operand A") && e.contains("overrun buffer bf16 x 24"),
            "{e}"
        );
    }
}
