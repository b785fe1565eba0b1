//! Linear layers on cuBLAS: bf16 inputs, f32 accumulation (CUBLAS_COMPUTE_32F), output bf16
//! or f32. Row-major `Y (m x n) = X (m x k) W^T (+ beta Y)`, W a PyTorch Linear weight (n x k).
//!
//! cuBLAS is column-major: row-major Y is column-major Y^T (n x m) = W (op T on the stored
//! k x n column-major view) times X^T (the stored k x m view).

use super::Gpu;
use anyhow::{Result, bail};
use cudarc::cublas::{result::gemm_ex, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

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

/// `y (m x n) = x (m x k) w^T + beta * y`; `x` and `w` bf16, f32 accumulation.
/// `x_off`/`y_off` are element offsets into the buffers (for row slices).
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
    let alpha = 1.0f32;
    let stream = &gpu.stream;
    let (xp, _gx) = x.device_ptr(stream);
    let (wp, _gw) = w.device_ptr(stream);
    let (yp, _gy) = y.device_ptr_mut(stream);
    // SAFETY: sizes checked above; pointers live for the call; the handle is bound to our
    // stream, so the GEMM is ordered with the kernels around it.
    unsafe {
        gemm_ex(
            *gpu.blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            wp as *const _,
            sys::cudaDataType::CUDA_R_16BF,
            k as i32,
            (xp + (x_off * 2) as u64) as *const _,
            sys::cudaDataType::CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const _,
            (yp + (y_off * std::mem::size_of::<O>()) as u64) as *mut _,
            O::DATA_TYPE,
            n as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}
