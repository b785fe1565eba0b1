//! The one cuBLAS wrapper: every GEMM the engine runs (linear layers, the decoder's 1x1 convs
//! and attention) goes through [`gemm`], one `cublasGemmStridedBatchedEx` call with f32
//! accumulation (CUBLAS_COMPUTE_32F), so there is one place that knows cuBLAS's conventions.
//!
//! cuBLAS is column-major: a row-major `Y (m x n) = X (m x k) W^T` is the column-major
//! `Y^T (n x m) = op_T(W) X^T`, with W's stored (n x k) row-major bytes read as a (k x n)
//! column-major matrix (ld k) and X's as (k x m) (ld k); see [`linear`].

use super::Gpu;
use anyhow::{Context, Result, bail};
use cudarc::cublas::{result::gemm_strided_batched_ex, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

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
/// shape (this takes raw addresses).
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
            *gpu.blas.handle(),
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

/// Element type of a GEMM output.
pub trait GemmOut: cudarc::driver::DeviceRepr {
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
    x: &CudaSlice<bf16>,
    x_off: usize,
    w: &CudaSlice<bf16>,
    y: &mut CudaSlice<O>,
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
    let stream = &gpu.stream;
    let (xp, _gx) = x.device_ptr(stream);
    let (wp, _gw) = w.device_ptr(stream);
    let (yp, _gy) = y.device_ptr_mut(stream);
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
