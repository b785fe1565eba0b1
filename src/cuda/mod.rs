//! CUDA backend: device context, embedded kernels, typed launchers, cuBLAS GEMMs and the GPU
//! sampler. Everything here loads libcuda at run time (cudarc dynamic loading), so the binary
//! runs on machines without a GPU; [`Gpu::try_new`] says whether one is usable.

#[macro_use]
mod params;

pub mod attention;
pub mod blas;
pub mod decoder;
pub mod device;
pub mod embed;
pub mod emu;
pub mod engine;
pub mod ffn;
pub mod gemm;
pub mod graphs;
pub mod ledger;
pub mod norm;
pub mod registry;
pub mod sampling;
pub mod score;

pub use device::{DevBuf, DevElem, Gpu, Graph, Marks, THREADS, row_grid, stride_grid};
pub use ledger::Traffic;
pub use registry::{EmuFn, KERNEL_FILES, KERNELS, Kernel, KernelFile, c_defines, c_layout, k};
