//! CUDA backend: device context, embedded kernels, typed launchers, cuBLAS GEMMs and the GPU
//! sampler. Everything here loads libcuda at run time (cudarc dynamic loading), so the binary
//! runs on machines without a GPU; [`Gpu::try_new`] says whether one is usable.

pub mod attention;
pub mod decoder;
pub mod device;
pub mod embed;
pub mod engine;
pub mod gemm;
pub mod norm;
pub mod sampling;

pub use device::Gpu;

/// One kernels/*.cu file as embedded by build.rs: ahead-of-time images when nvcc was found at
/// build time, and always the source (with common.cuh inlined) for NVRTC.
pub struct KernelFile {
    pub name: &'static str,
    pub sm90a: Option<&'static [u8]>,
    pub sm80: Option<&'static [u8]>,
    pub ptx: Option<&'static str>,
    pub source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
