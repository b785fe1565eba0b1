//! The device: context, one created stream (capturable into a CUDA graph), cuBLAS handle, and
//! every kernel of the build-time registry (`super::KERNELS`) loaded once at start-up from
//! the best embedded image; launches name their kernel by a `super::k` constant.

use super::{KERNEL_FILES, KERNELS, Kernel};
use anyhow::{Context, Result, anyhow, bail};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

/// A GPU ready to run checkergen kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// Device name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    /// How the kernels were loaded: "sm_90a cubin", "sm_80 cubin", "compute_80 PTX" or "NVRTC".
    pub image_kind: &'static str,
    /// Every registered kernel, indexed by `Kernel::id`.
    funcs: Vec<CudaFunction>,
}

/// Which embedded image a device of compute capability `cc` loads.
fn pick_image(cc: (i32, i32), f: &super::KernelFile) -> Option<(&'static str, Ptx)> {
    match cc {
        (9, 0) if f.sm90a.is_some() => {
            Some(("sm_90a cubin", Ptx::from_binary(f.sm90a.unwrap().to_vec())))
        }
        (8, _) if f.sm80.is_some() => {
            Some(("sm_80 cubin", Ptx::from_binary(f.sm80.unwrap().to_vec())))
        }
        (m, _) if m >= 8 && f.ptx.is_some() => {
            Some(("compute_80 PTX", Ptx::from_src(f.ptx.unwrap())))
        }
        _ => None,
    }
}

/// NVRTC compilations of the embedded sources, cached for the process.
fn nvrtc_compile(f: &super::KernelFile, cc: (i32, i32)) -> Result<Ptx> {
    use std::sync::Mutex;
    static CACHE: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap();
    if let Some((_, ptx)) = cache.iter().find(|(n, _)| *n == f.name) {
        return Ok(Ptx::from_src(ptx.clone()));
    }
    let mut include_paths = Vec::new();
    for dir in [
        std::env::var("CUDA_HOME").ok(),
        Some("/usr/local/cuda".to_string()),
    ]
    .into_iter()
    .flatten()
    {
        let inc = format!("{dir}/include");
        if std::path::Path::new(&inc).is_dir() {
            include_paths.push(inc);
        }
    }
    let arch: &'static str = match cc {
        (9, 0) => "compute_90",
        (m, _) if m >= 8 => "compute_80",
        _ => bail!(
            "compute capability {}.{} is below 8.0 (bf16 tensor cores)",
            cc.0,
            cc.1
        ),
    };
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        include_paths,
        options: vec!["-std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(f.source, opts)
        .map_err(|e| anyhow!("NVRTC failed on kernels/{}.cu: {e:?}", f.name))?;
    cache.push((f.name, ptx.to_src()));
    Ok(ptx)
}

impl Gpu {
    /// The first GPU, or `Ok(None)` when there is no CUDA driver or no device.
    pub fn try_new() -> Result<Option<Gpu>> {
        // SAFETY: only checks whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Ok(None);
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => {}
            _ => return Ok(None),
        }
        Gpu::new(0).map(Some)
    }

    /// Open device `ordinal` and load every kernel.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let ctx = CudaContext::new(ordinal).context("cannot create a CUDA context")?;
        // One stream, no per-buffer event tracking: ordering is the stream's program order.
        // SAFETY: called before any buffer is allocated in this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().context("cannot create a CUDA stream")?;
        let blas = CudaBlas::new(stream.clone()).context("cannot create a cuBLAS handle")?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx
            .compute_capability()
            .context("cannot read the compute capability")?;
        let mut modules = Vec::new();
        let mut image_kind = "NVRTC";
        for f in KERNEL_FILES {
            let (kind, ptx) = match pick_image(cc, f) {
                Some(x) => x,
                None => ("NVRTC", nvrtc_compile(f, cc)?),
            };
            image_kind = kind;
            let module = ctx
                .load_module(ptx)
                .with_context(|| format!("cannot load kernels/{}.cu ({kind}) on {name}", f.name))?;
            modules.push((f.name, module));
        }
        // Every entry point of the generated registry, once, in registry order.
        let mut funcs = Vec::with_capacity(KERNELS.len());
        for kern in KERNELS {
            let module = &modules
                .iter()
                .find(|(file, _)| *file == kern.file)
                .with_context(|| format!("kernels/{}.cu is not embedded", kern.file))?
                .1;
            let func = module.load_function(kern.name).with_context(|| {
                format!("kernel {} missing from kernels/{}.cu", kern.name, kern.file)
            })?;
            funcs.push(func);
        }
        Ok(Gpu {
            ctx,
            stream,
            blas,
            name,
            cc,
            image_kind,
            funcs,
        })
    }

    /// The loaded function of a registered kernel.
    pub fn func(&self, kernel: Kernel) -> &CudaFunction {
        &self.funcs[kernel.id]
    }

    /// Launch `kernel(params)` with a grid, block and dynamic shared memory size.
    pub fn launch<P: DeviceRepr>(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
    ) -> Result<()> {
        let f = self.func(kernel);
        let mut b = self.stream.launch_builder(f);
        b.arg(params);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes,
        };
        // SAFETY: every kernel takes exactly one parameter struct, mirrored in C; launchers
        // check shapes and buffer sizes before calling.
        unsafe { b.launch(cfg) }.with_context(|| format!("launching {}", kernel.name))?;
        Ok(())
    }

    /// Raw device address of a buffer, for parameter structs.
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    /// Upload a host slice.
    pub fn upload<T: DeviceRepr + Clone>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).context("host-to-device copy")
    }

    /// Download a device buffer (synchronizes the stream).
    pub fn download<T: DeviceRepr + Clone + Default>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).context("device-to-host copy")
    }

    /// A zeroed buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .context("device allocation")
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().context("stream synchronize")
    }
}
