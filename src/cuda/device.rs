//! The device: one of two backends behind the same API, chosen at start-up.
//!
//! * **cuda** (cudarc): context, one created stream (capturable into a CUDA graph), cuBLASLt
//!   handle, and every kernel of the build-time registry (`super::KERNELS`) loaded once from
//!   the best embedded image.
//! * **emu** (`super::emu`): the host-emulated device of issue 9. Device buffers are host
//!   allocations with red zones, copies are memcpy, a launch calls the kernel's host-compiled
//!   entry point (`Kernel::emu`), GEMMs are computed on the host as cuBLAS defines them, and
//!   stream order is program order. A development/checking device, not a user device.
//!
//! Launches name their kernel by a `super::k` constant; buffers are [`DevBuf`]s. Nothing
//! outside this file and `emu.rs`/`gemm.rs` knows which backend it drives.

use super::emu::{EmuDevice, HostAlloc};
use super::ledger::{AuditRecord, Ledger, Record, TRANSFORMER, Traffic};
use super::registry::{KERNEL_FILES, KERNELS, Kernel, KernelFile};
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::path::PathBuf;
use std::sync::Arc;

/// GEMM workspace bytes (NVIDIA's recommendation for cuBLASLt on Hopper is 32 MiB).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Threads per block of the kernels launched with [`Gpu::launch_256`] (their C side assumes
/// 256 where it sizes shared memory or reductions).
pub const THREADS: u32 = 256;

/// Blocks of [`THREADS`] for a grid-stride loop over `total` elements (at least 1, capped at
/// 65535: the loop covers the rest).
pub fn stride_grid(total: usize) -> u32 {
    total.div_ceil(THREADS as usize).clamp(1, 65535) as u32
}

/// The grid of a kernel that strides over `rows` (images, sequence rows, tokens) in grid.y and
/// over the `per_row` elements of a row in grid.x, with 32-bit indexing inside a row (which
/// this checks fits).
pub fn row_grid(per_row: usize, rows: usize) -> Result<(u32, u32, u32)> {
    ensure!(
        per_row <= u32::MAX as usize,
        "{per_row} elements per row exceed the kernels' 32-bit indexing"
    );
    Ok((stride_grid(per_row), rows.clamp(1, 65535) as u32, 1))
}

/// An element type of device buffers: plain old data with a poison value, the bit pattern
/// the emulator fills new (uninitialized) allocations with so that a read of memory nobody
/// wrote shows in the outputs (NaN for floats and 16-bit types, 0xDEADBEEF for ints).
pub trait DevElem:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + Send + Sync + std::fmt::Debug + 'static
{
    const POISON: Self;
}
impl DevElem for f32 {
    const POISON: f32 = f32::from_bits(0x7FC0_DEAD);
}
impl DevElem for half::bf16 {
    const POISON: half::bf16 = half::bf16::from_bits(0x7FFF);
}
impl DevElem for half::f16 {
    const POISON: half::f16 = half::f16::from_bits(0x7FFF);
}
impl DevElem for i32 {
    const POISON: i32 = 0xDEAD_BEEFu32 as i32;
}
impl DevElem for u32 {
    const POISON: u32 = 0xDEAD_BEEF;
}
impl DevElem for u8 {
    const POISON: u8 = 0xA5;
}
impl DevElem for u64 {
    const POISON: u64 = 0xDEAD_BEEF_DEAD_BEEF;
}

/// A device buffer of `len` elements of `T`, on whichever backend allocated it (the
/// project-owned replacement of `CudaSlice` in the engine, decoder, launchers and tests).
pub struct DevBuf<T> {
    mem: Mem<T>,
    len: usize,
}

enum Mem<T> {
    Cuda(CudaSlice<T>),
    Emu(HostAlloc),
}

impl<T> DevBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in bytes (for declared traffic).
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl<T> std::fmt::Debug for DevBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.mem {
            Mem::Cuda(_) => write!(
                f,
                "DevBuf<{}>[{}] (cuda)",
                std::any::type_name::<T>(),
                self.len
            ),
            Mem::Emu(h) => write!(f, "DevBuf[{}] (emu: {})", self.len, h.label()),
        }
    }
}

/// The cudarc backend's state.
struct CudaDev {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// cuBLASLt handle and the GEMM algorithms pinned on this device (`gemm.rs`).
    blas: super::blas::Lt,
    /// The GEMMs' workspace, allocated once so that no GEMM allocates (a graph capture
    /// forbids it).
    blas_workspace: cudarc::driver::CudaSlice<u8>,
    /// Every registered kernel, indexed by `Kernel::id`.
    funcs: Vec<CudaFunction>,
}

enum Backend {
    Cuda(Box<CudaDev>),
    Emu(EmuDevice),
}

/// A device ready to run checkergen kernels: a CUDA GPU or the host emulator.
pub struct Gpu {
    backend: Backend,
    /// Device name, e.g. "NVIDIA H200", or "host emulator".
    pub name: String,
    /// Compute capability (major, minor); the emulator reports 9.0 (the kernels' sm_90a paths
    /// are the ones compiled for the host).
    pub cc: (i32, i32),
    /// How the kernels were loaded: "sm_90a cubin", "sm_80 cubin", "compute_80 PTX", "NVRTC"
    /// or "host emulator".
    pub image_kind: &'static str,
    /// While a graph is being captured: on the emulator the recorded operations (on a GPU an
    /// empty list: the stream records). See [`Gpu::begin_capture`].
    capture: std::sync::Mutex<Option<Vec<EmuOp>>>,
    /// Device buffers created so far (`alloc`, `zeros`, `upload`): tests check that a
    /// repeated call of one shape allocates nothing ([`Gpu::allocations`]).
    allocations: std::sync::atomic::AtomicU64,
    /// Every launch and GEMM issued, with its declared traffic ([`Gpu::ledger`]), while
    /// `recording` is on: off by default, so a long run (or an embedding service) does not
    /// keep one record per launch for ever; the dry run and the ledger tests turn it on.
    ledger: std::sync::Mutex<Ledger>,
    recording: std::sync::atomic::AtomicBool,
    /// The part of the sampler launches are attributed to now ([`Gpu::in_part`]).
    part: std::sync::Mutex<&'static str>,
    /// Emulator only: when Some, every launch and GEMM is audited ([`Gpu::set_audit`]).
    audit: std::sync::Mutex<Option<Vec<AuditRecord>>>,
}

/// One recorded emulator operation (a kernel launch with a copy of its parameters, a GEMM,
/// a memset), run again by [`Gpu::replay`].
pub(crate) type EmuOp = Box<dyn Fn(&EmuDevice) -> Result<()> + Send + Sync>;

/// Device work recorded once by [`Gpu::begin_capture`] / [`Gpu::end_capture`] and run again,
/// with the same buffers and parameters, by [`Gpu::replay`]: a CUDA graph on a GPU; on the
/// emulator the list of recorded operations (so the capture code path runs in CI).
pub struct Graph {
    inner: GraphInner,
}

enum GraphInner {
    Cuda(cudarc::driver::CudaGraph),
    Emu(Vec<EmuOp>),
}

#[cfg(test)]
impl Graph {
    /// An emulator recording of no operation (the graph cache's unit tests).
    pub(crate) fn empty_for_tests() -> Graph {
        Graph {
            inner: GraphInner::Emu(Vec::new()),
        }
    }
}

// SAFETY: a CUDA graph and its executable are driver handles that any thread may launch
// (cudarc binds the context first); the engine keeps graphs inside its batch cache behind a
// Mutex, so one thread uses a graph at a time. The emulator's recording is Send already.
unsafe impl Send for GraphInner {}

impl Graph {
    /// Operations recorded (emulator) or None (a CUDA graph does not say).
    pub fn emu_ops(&self) -> Option<usize> {
        match &self.inner {
            GraphInner::Emu(ops) => Some(ops.len()),
            GraphInner::Cuda(_) => None,
        }
    }
}

/// Timestamps on the stream: `n` slots, each set by [`Gpu::mark`] when the device reaches
/// that point of its queue (CUDA timing events; on the emulator the host clock when the
/// emulated work before it finished). Marks recorded inside a graph capture become part of
/// the graph (event record nodes) and are set again by every replay, so a replayed loop is
/// timed step by step like an eager one, without synchronizing between steps.
pub struct Marks {
    inner: MarksInner,
}

enum MarksInner {
    Cuda(Vec<cudarc::driver::CudaEvent>),
    Emu(Arc<std::sync::Mutex<Vec<Option<std::time::Instant>>>>),
}

// SAFETY: CUDA events are driver handles usable from any thread (cudarc binds the context
// before each call); marks live in the engine's batch, used by one thread at a time.
unsafe impl Send for MarksInner {}

impl Marks {
    pub fn len(&self) -> usize {
        match &self.inner {
            MarksInner::Cuda(v) => v.len(),
            MarksInner::Emu(v) => v.lock().unwrap().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `auto`'s decision from the attempt to open the first GPU ([`Gpu::try_new`]): the GPU
/// when it opened; the CPU when there is none (nothing to say); the CPU with a one-line
/// warning when a GPU is present but could not be initialised (driver, cuBLAS, context,
/// loading the kernel modules, NVRTC). Used by `--device auto` and the API's `Device::Auto`;
/// `cuda` turns the same error into a failure instead.
pub fn auto_fallback<G>(opened: Result<Option<G>>) -> (Option<G>, Option<String>) {
    match opened {
        Ok(g) => (g, None),
        Err(e) => {
            // `{:#}` joins the context chain with ": "; a message that spans lines (a log)
            // is folded so the warning stays one line.
            let why = format!("{e:#}")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" / ");
            (
                None,
                Some(format!(
                    "GPU present but unusable ({why}); running on the CPU"
                )),
            )
        }
    }
}

/// Whether libcuda and libcublas can be loaded, and how many devices the driver sees:
/// `Ok(None)` when the driver library is absent (no GPU), an error when it is present but
/// the device count or cuBLAS fails (a broken install is not "no GPU").
pub(crate) fn cuda_device_count() -> Result<Option<usize>> {
    // SAFETY: only checks whether the driver library can be loaded.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    classify_device_count(present, || {
        CudaContext::device_count().map_err(|e| format!("{e:?}"))
    })
}

/// No driver library: no GPU (`Ok(None)`); driver present: the device count, where a failing
/// count is an error (not "no GPU") and zero devices is `Ok(None)`.
fn classify_device_count(
    driver_present: bool,
    count: impl FnOnce() -> std::result::Result<i32, String>,
) -> Result<Option<usize>> {
    if !driver_present {
        return Ok(None);
    }
    let n = count()
        .map_err(|e| anyhow!("the CUDA driver is present but cuDeviceGetCount failed: {e}"))?;
    Ok((n > 0).then_some(n as usize))
}

/// cudarc panics when libcublasLt cannot be loaded; this is the check made before the first
/// cuBLASLt call, as an error.
fn require_cublas(present: bool) -> Result<()> {
    ensure!(
        present,
        "libcublasLt cannot be loaded (CUDA driver present): install the CUDA 13 cuBLAS library \
         or put it on LD_LIBRARY_PATH"
    );
    Ok(())
}

/// Which embedded image a device of compute capability `cc` loads.
fn pick_image(cc: (i32, i32), f: &KernelFile) -> Option<(&'static str, Ptx)> {
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

/// The CUDA toolkit roots NVRTC's library and the CUDA headers are looked for in, in order:
/// `$CUDA_HOME`, then /usr/local/cuda (where the target GPU hosts have the toolkit).
pub(crate) fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::var_os("CUDA_HOME")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

/// The NVRTC options the runtime compiles the embedded kernel sources with for a device of
/// compute capability `cc`, the CUDA headers taken from the first of `roots` that has them.
/// The one place these options are built: [`nvrtc_compile_source`] (the runtime) and
/// tests/kernels_nvrtc.rs use it.
///
/// * `-std=c++17`, like build.rs's nvcc.
/// * An include path for cuda_bf16.h / cuda_fp16.h, which NVRTC does not carry (its wheel and
///   library hold no headers; a toolkit's include/ or the `nvidia-cuda-runtime` wheel do).
///   Nothing else is included: kernels/common.cuh is inlined by build.rs and needs no libc
///   header under NVRTC (`__CUDACC_RTC__`).
/// * `compute_90a` on cc 9.0, the architecture of build.rs's sm_90a cubin (so the PTX takes
///   the same code paths), `compute_80` on every other cc >= 8.0 (the driver JIT-compiles it
///   forward, like build.rs's compute_80 PTX).
#[doc(hidden)]
pub fn nvrtc_options(cc: (i32, i32), roots: &[PathBuf]) -> Result<cudarc::nvrtc::CompileOptions> {
    let arch: &'static str = match cc {
        (9, 0) => "compute_90a",
        (m, _) if m >= 8 => "compute_80",
        _ => bail!(
            "compute capability {}.{} is below 8.0 (bf16 tensor cores)",
            cc.0,
            cc.1
        ),
    };
    let include = roots
        .iter()
        .map(|r| r.join("include"))
        .find(|inc| inc.join("cuda_bf16.h").is_file())
        .with_context(|| {
            format!(
                "NVRTC needs the CUDA headers (cuda_bf16.h), found in none of {}: set CUDA_HOME \
                 to a CUDA 13 toolkit",
                roots
                    .iter()
                    .map(|r| format!("{}/include", r.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    Ok(cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        include_paths: vec![include.display().to_string()],
        options: vec!["-std=c++17".into()],
        ..Default::default()
    })
}

/// Makes libnvrtc loadable by cudarc, or says why it is not. cudarc opens it by name
/// (`libnvrtc.so`, ..., `libnvrtc.so.13`: LD_LIBRARY_PATH and the ld.so cache) and panics
/// when it finds none, so this checks first. A toolkit root that is not on the loader's path
/// (CUDA_HOME, or the PyPI wheel's nvidia/cu13 in tests/kernels_nvrtc.rs) works too: its
/// `lib64/` or `lib/` libnvrtc.so.13 is loaded here by path, kept loaded, and cudarc's later
/// open of `libnvrtc.so.13` returns that library, because the dynamic loader matches a name
/// against the sonames of what is loaded (unless one of cudarc's earlier names, such as an
/// unversioned `libnvrtc.so` of another CUDA on the loader's path, is found first; the test
/// checks the version it got). libnvrtc in turn opens `libnvrtc-builtins.so.13.x`
/// by name, not beside itself, so that is loaded from the same folder first.
fn ensure_nvrtc(roots: &[PathBuf]) -> Result<()> {
    use std::sync::Mutex;
    // The libraries loaded by path, never unloaded (cudarc keeps its own handle for the
    // process's lifetime too).
    static LOADED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if loaded.is_empty() {
        let dir = roots
            .iter()
            .flat_map(|r| [r.join("lib64"), r.join("lib")])
            .find(|d| d.join("libnvrtc.so.13").is_file());
        if let Some(dir) = dir {
            let builtins = std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc-builtins.so.13."))
                })
                .min();
            for lib in builtins.into_iter().chain([dir.join("libnvrtc.so.13")]) {
                // SAFETY: NVIDIA's NVRTC libraries; loading them runs no initialiser with
                // preconditions on the caller.
                let l = unsafe { libloading::Library::new(&lib) }
                    .with_context(|| format!("cannot load {}", lib.display()))?;
                loaded.push(l);
            }
        }
    }
    // SAFETY: only checks whether the library can be loaded by cudarc's names.
    ensure!(
        unsafe { cudarc::nvrtc::sys::is_culib_present() },
        "libnvrtc (CUDA 13) not found (LD_LIBRARY_PATH, the ld.so cache, {}): this build embeds \
         kernel sources only (no nvcc at build time) and needs NVRTC to compile them",
        roots
            .iter()
            .map(|r| format!("{}/lib64", r.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// One kernel source compiled by NVRTC to PTX for compute capability `cc`, with
/// [`nvrtc_options`] and libnvrtc and the headers from `roots` ([`cuda_roots`] at run time).
/// An error (never a panic) when libnvrtc, the headers or the compilation fail; the message
/// is one line, with the first error of NVRTC's log.
#[doc(hidden)]
pub fn nvrtc_compile_source(
    name: &str,
    source: &str,
    cc: (i32, i32),
    roots: &[PathBuf],
) -> Result<String> {
    let mut opts = nvrtc_options(cc, roots)?;
    let arch = opts.arch.unwrap_or("?");
    // The program name NVRTC's log gives its errors (not an option).
    opts.name = Some(format!("kernels/{name}.cu"));
    ensure_nvrtc(roots)?;
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                let log = log.to_string_lossy();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains("error:")).collect();
                match lines.first() {
                    Some(first) if lines.len() > 1 => {
                        format!("{} (and {} more errors)", first.trim(), lines.len() - 1)
                    }
                    Some(first) => first.trim().to_string(),
                    None => format!("{e:?}"),
                }
            }
            e => format!("{e:?}"),
        };
        anyhow!("NVRTC ({arch}) failed on kernels/{name}.cu: {detail}")
    })?;
    Ok(ptx.to_src())
}

/// NVRTC compilations of the embedded sources, cached for the process.
fn nvrtc_compile(f: &KernelFile, cc: (i32, i32)) -> Result<Ptx> {
    use std::sync::Mutex;
    type Cache = Vec<((&'static str, (i32, i32)), String)>;
    static CACHE: Mutex<Cache> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, ptx)) = cache.iter().find(|(key, _)| *key == (f.name, cc)) {
        return Ok(Ptx::from_src(ptx.clone()));
    }
    let ptx = nvrtc_compile_source(f.name, f.source, cc, &cuda_roots())?;
    cache.push(((f.name, cc), ptx.clone()));
    Ok(Ptx::from_src(ptx))
}

/// cudarc allocates stream-ordered (`cuMemAllocAsync`) from the device's default memory pool,
/// whose release threshold is 0: at every synchronization the pool hands its freed memory back
/// to the driver, and the next batch's buffers are mapped anew. With the threshold at its
/// maximum, freed memory stays in the pool for the process (what the CUDA docs advise for
/// allocation-heavy loops); `cuMemPoolTrimTo` could still give it back.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .context("cuDeviceGetDefaultMemPool")?;
    let mut threshold = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD takes a cuuint64_t; `threshold` outlives the call.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .context("setting the memory pool's release threshold")?;
    Ok(())
}

/// The launch checks that need no device: the block within the kernel's `__launch_bounds__`
/// and no dynamic shared memory (see [`Gpu::launch`]).
pub(crate) fn check_launch(
    kernel: Kernel,
    block: (u32, u32, u32),
    shared_mem_bytes: u32,
) -> Result<()> {
    let threads = block.0 as u64 * block.1 as u64 * block.2 as u64;
    ensure!(
        threads <= kernel.max_threads as u64,
        "launching {}: block {block:?} of {threads} threads exceeds the kernel's \
         __launch_bounds__({}) (kernels/{}.cu); raise the bound in the source (and rerun \
         scripts/kernel-resources.sh) or launch smaller blocks",
        kernel.name,
        kernel.max_threads,
        kernel.file
    );
    ensure!(
        shared_mem_bytes == 0,
        "launching {}: {shared_mem_bytes} bytes of dynamic shared memory, but no kernel declares \
         any (scripts/kernel-resources.sh counts static shared memory only)",
        kernel.name
    );
    Ok(())
}

impl Gpu {
    /// The release threshold of the device's default memory pool (None on the emulator,
    /// which has no pool): `u64::MAX` once [`Gpu::new`] has set it.
    pub fn pool_release_threshold(&self) -> Result<Option<u64>> {
        use cudarc::driver::sys;
        let Backend::Cuda(c) = &self.backend else {
            return Ok(None);
        };
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: valid out-pointers; the device handle comes from a live context.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, c.ctx.cu_device()) }.result()?;
        let mut v = 0u64;
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut v as *mut u64).cast(),
            )
        }
        .result()?;
        Ok(Some(v))
    }

    /// The first GPU, or `Ok(None)` when there is no CUDA driver or no device. A driver that
    /// is present but fails (device count, cuBLAS missing, context) is an error.
    pub fn try_new() -> Result<Option<Gpu>> {
        match cuda_device_count()? {
            Some(_) => Gpu::new(0).map(Some),
            None => Ok(None),
        }
    }

    /// The host-emulated device (every kernel host-compiled, cuBLAS on the host).
    pub fn emu() -> Result<Gpu> {
        Self::emu_with(EmuDevice::new(), "host emulator")
    }

    /// The emulator in dry-run mode (`bench --dry-run`): every launch, GEMM, memset and copy
    /// goes through the same code path and is recorded in the ledger, but nothing executes;
    /// allocations have no memory (downloads return zeros), so any batch costs nothing.
    pub fn emu_dry() -> Result<Gpu> {
        let g = Self::emu_with(EmuDevice::dry(), "host emulator (dry run)")?;
        g.record_ledger(true);
        Ok(g)
    }

    fn emu_with(dev: EmuDevice, name: &str) -> Result<Gpu> {
        Ok(Gpu::on(
            Backend::Emu(dev),
            name.into(),
            (9, 0),
            "host emulator",
        ))
    }

    /// A Gpu on `backend` with nothing captured, allocated or recorded yet.
    fn on(backend: Backend, name: String, cc: (i32, i32), image_kind: &'static str) -> Gpu {
        Gpu {
            backend,
            name,
            cc,
            image_kind,
            capture: std::sync::Mutex::new(None),
            allocations: Default::default(),
            ledger: Default::default(),
            recording: Default::default(),
            part: std::sync::Mutex::new(TRANSFORMER),
            audit: Default::default(),
        }
    }

    /// Whether this is the emulator's dry run (nothing executes).
    pub fn is_dry(&self) -> bool {
        self.emu_device().is_some_and(EmuDevice::is_dry)
    }

    /// Record every following launch in the ledger (`on`), or stop recording (what was
    /// recorded stays until [`Ledger::clear`]). Off by default except in a dry run.
    pub fn record_ledger(&self, on: bool) {
        self.recording
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The launches recorded so far (see [`super::ledger`] and [`Gpu::record_ledger`]).
    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attribute the launches `f` issues to `part` ([`super::ledger::TRANSFORMER`],
    /// [`super::ledger::DECODER`]), then restore the part before.
    pub fn in_part<R>(&self, part: &'static str, f: impl FnOnce() -> R) -> R {
        let before = std::mem::replace(&mut *self.part.lock().unwrap(), part);
        let r = f();
        *self.part.lock().unwrap() = before;
        r
    }

    /// Emulator: audit every following launch and GEMM (`on`), or stop and return the
    /// audit records (see [`AuditRecord`]): per kernel name ("gemm", "memset"), the largest of
    /// its first launches is audited. Slow: that launch reruns once per probed element.
    pub fn set_audit(&self, on: bool) -> Vec<AuditRecord> {
        let mut a = self.audit.lock().unwrap();
        let out = a.take().unwrap_or_default();
        if on {
            *a = Some(Vec::new());
        }
        out
    }

    /// Record one launch in the ledger (when recording); on the emulator run it (`run`), unless this is a dry
    /// run or a capture records it, auditing it when asked (`addrs`: the addresses its
    /// parameters hold).
    pub(crate) fn issue(
        &self,
        name: &'static str,
        traffic: Traffic,
        addrs: &[u64],
        run: impl Fn(&EmuDevice) -> Result<()> + Clone + Send + Sync + 'static,
    ) -> Result<()> {
        if self.recording.load(std::sync::atomic::Ordering::Relaxed) {
            let part = *self.part.lock().unwrap();
            self.ledger().records.push(Record {
                name,
                part,
                traffic,
            });
        }
        let Some(e) = self.emu_device() else {
            return Ok(());
        };
        if e.is_dry() {
            return Ok(());
        }
        if self.emu_record(|| Box::new(run.clone())) {
            return Ok(());
        }
        let mut audit = self.audit.lock().unwrap();
        match audit.as_mut() {
            // The first launch of each name is audited, and again (up to 3 times) a later
            // one that declares more bytes (a first step can be degenerate: attention over
            // one key does not depend on q or k); the audit kept is the largest.
            Some(log)
                if log
                    .iter()
                    .find(|r| r.name == name)
                    .is_none_or(|r| r.declared.bytes() < traffic.bytes() && r.audits < 3) =>
            {
                let (written, read, unprobed) = e.audit(&run, addrs)?;
                let audits = log.iter().find(|r| r.name == name).map_or(0, |r| r.audits) + 1;
                log.retain(|r| r.name != name);
                log.push(AuditRecord {
                    audits,
                    name,
                    declared: traffic,
                    written,
                    read,
                    unprobed,
                });
                Ok(())
            }
            _ => {
                drop(audit);
                run(e)
            }
        }
    }

    /// Whether this is the host emulator.
    pub fn is_emu(&self) -> bool {
        matches!(self.backend, Backend::Emu(_))
    }

    /// The emulator's state (None on a GPU).
    pub(crate) fn emu_device(&self) -> Option<&EmuDevice> {
        match &self.backend {
            Backend::Emu(e) => Some(e),
            Backend::Cuda(_) => None,
        }
    }

    /// The cuBLASLt state, the GEMM workspace (address, bytes) and the stream (None on the
    /// emulator).
    pub(crate) fn blas_lt(
        &self,
    ) -> Option<(
        &super::blas::Lt,
        (u64, usize),
        cudarc::cublaslt::sys::cudaStream_t,
    )> {
        match &self.backend {
            Backend::Cuda(c) => {
                let (ws, _sync) = c.blas_workspace.device_ptr(&c.stream);
                let stream = c.stream.cu_stream() as cudarc::cublaslt::sys::cudaStream_t;
                Some((&c.blas, (ws, BLAS_WORKSPACE_BYTES), stream))
            }
            Backend::Emu(_) => None,
        }
    }

    /// Open device `ordinal` and load every kernel.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        // cudarc panics when libcublasLt cannot be loaded: check first.
        // SAFETY: only checks whether the cuBLASLt library can be loaded.
        require_cublas(unsafe { cudarc::cublaslt::sys::is_culib_present() })?;
        let ctx = CudaContext::new(ordinal).context("cannot create a CUDA context")?;
        // One stream, no per-buffer event tracking: ordering is the stream's program order.
        // SAFETY: called before any buffer is allocated in this context.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx)?;
        let stream = ctx.new_stream().context("cannot create a CUDA stream")?;
        // cuBLASLt takes the workspace per call (gemm.rs passes this one to every GEMM).
        let blas = super::blas::Lt::new().context("cannot create a cuBLASLt handle")?;
        let blas_workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .context("allocating the GEMM workspace")?;
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
        Ok(Gpu::on(
            Backend::Cuda(Box::new(CudaDev {
                ctx,
                stream,
                blas,
                blas_workspace,
                funcs,
            })),
            name,
            cc,
            image_kind,
        ))
    }

    /// [`Gpu::launch`] with blocks of [`THREADS`] threads and no dynamic shared memory: the
    /// launch of every element-wise, row and grid-stride kernel.
    pub fn launch_256<P: DeviceRepr>(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        params: &P,
        traffic: Traffic,
    ) -> Result<()> {
        self.launch(kernel, grid, (THREADS, 1, 1), 0, params, traffic)
    }

    /// Launch `kernel(params)` with a grid, block and dynamic shared memory size. On the
    /// emulator the launch runs to completion here and then every allocation's red zones are
    /// checked: an out-of-bounds write fails the launch naming the kernel and the buffer.
    ///
    /// Both backends refuse, before launching, a block of more threads than the kernel's
    /// `__launch_bounds__` ([`Kernel::max_threads`]: its registers were allocated for at most
    /// that many) and any dynamic shared memory: no kernel uses it, so
    /// scripts/kernel-resources.sh checks static shared memory only (a kernel that needs it
    /// must first declare its maximum where that script counts it, and set
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` above 48 KiB).
    ///
    /// `traffic` is the launch's declared compulsory DRAM bytes and FLOPs, recorded in the
    /// ledger ([`Gpu::ledger`]); tests/gpu_ledger.rs checks it against what the kernel does.
    pub fn launch<P: DeviceRepr>(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
        traffic: Traffic,
    ) -> Result<()> {
        check_launch(kernel, block, shared_mem_bytes)?;
        match &self.backend {
            Backend::Cuda(c) => {
                self.issue(kernel.name, traffic, &[], |_: &EmuDevice| Ok(()))?;
                let f = &c.funcs[kernel.id];
                let mut b = c.stream.launch_builder(f);
                b.arg(params);
                let cfg = LaunchConfig {
                    grid_dim: grid,
                    block_dim: block,
                    shared_mem_bytes,
                };
                // SAFETY: every kernel takes exactly one parameter struct, mirrored in C;
                // launchers check shapes and buffer sizes before calling.
                unsafe { b.launch(cfg) }.with_context(|| format!("launching {}", kernel.name))?;
                Ok(())
            }
            Backend::Emu(_) => {
                // A copy of the parameter struct's bytes, 8-byte aligned like the struct.
                let mut words = vec![0u64; std::mem::size_of::<P>().div_ceil(8)];
                // SAFETY: P is a #[repr(C)] parameter struct of plain fields (kernel_params!),
                // copied bytewise into a buffer at least as large and as aligned.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        params as *const P as *const u8,
                        words.as_mut_ptr() as *mut u8,
                        std::mem::size_of::<P>(),
                    )
                };
                // SAFETY (both launches): as for the GPU: one parameter struct mirrored in C,
                // whose pointers the launchers checked against the shapes (and the red zones
                // catch what they miss); a replayed launch runs while its buffers live.
                let addrs: Vec<u64> = words.clone();
                let run = move |e: &EmuDevice| unsafe {
                    e.launch(
                        kernel,
                        grid,
                        block,
                        shared_mem_bytes,
                        words.as_ptr() as *const _,
                    )
                };
                self.issue(kernel.name, traffic, &addrs, run)
            }
        }
    }

    /// Raw device address of a buffer, for parameter structs (a host address on the emulator).
    pub fn ptr<T>(&self, s: &DevBuf<T>) -> u64 {
        match (&self.backend, &s.mem) {
            (Backend::Cuda(c), Mem::Cuda(b)) => {
                let (p, _sync) = b.device_ptr(&c.stream);
                p
            }
            (_, Mem::Emu(h)) => h.addr() as u64,
            (Backend::Emu(_), Mem::Cuda(_)) => panic!("a CUDA buffer passed to the emulator"),
        }
    }

    /// How many device buffers this device has created so far.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_allocation(&self) {
        self.allocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A new buffer of `n` elements whose contents are unspecified: poisoned on the emulator
    /// (see [`DevElem::POISON`]), zeroed on a GPU. For buffers the kernels write before they
    /// read; `zeros` where the engine relies on zeros.
    #[track_caller]
    pub fn alloc<T: DevElem>(&self, n: usize) -> Result<DevBuf<T>> {
        self.alloc_filled(n, T::POISON, std::panic::Location::caller())
    }

    /// A zeroed buffer of `n` elements.
    #[track_caller]
    pub fn zeros<T: DevElem>(&self, n: usize) -> Result<DevBuf<T>> {
        self.alloc_filled(n, T::default(), std::panic::Location::caller())
    }

    /// `n` (at least 1) elements: zeroed on a GPU, `emu_fill` on the emulator.
    fn alloc_filled<T: DevElem>(
        &self,
        n: usize,
        emu_fill: T,
        loc: &'static std::panic::Location<'static>,
    ) -> Result<DevBuf<T>> {
        self.not_capturing("allocating")?;
        self.count_allocation();
        let len = n.max(1);
        let mem = match &self.backend {
            Backend::Cuda(c) => Mem::Cuda(c.stream.alloc_zeros(len).context("device allocation")?),
            Backend::Emu(e) => {
                let h = e.alloc::<T>(len, loc)?;
                h.fill(emu_fill);
                Mem::Emu(h)
            }
        };
        Ok(DevBuf { mem, len })
    }

    /// Upload a host slice.
    #[track_caller]
    pub fn upload<T: DevElem>(&self, host: &[T]) -> Result<DevBuf<T>> {
        self.not_capturing("a host-to-device copy")?;
        self.count_allocation();
        let loc = std::panic::Location::caller();
        match &self.backend {
            Backend::Cuda(c) => Ok(DevBuf {
                mem: Mem::Cuda(c.stream.clone_htod(host).context("host-to-device copy")?),
                len: host.len(),
            }),
            Backend::Emu(e) => {
                let h = e.alloc::<T>(host.len(), loc)?;
                h.write(0, host);
                Ok(DevBuf {
                    mem: Mem::Emu(h),
                    len: host.len(),
                })
            }
        }
    }

    /// Copy `host` into `dev` at element offset `off`.
    pub fn upload_into<T: DevElem>(
        &self,
        host: &[T],
        dev: &mut DevBuf<T>,
        off: usize,
    ) -> Result<()> {
        ensure!(
            off + host.len() <= dev.len,
            "host-to-device copy of {} elements at {off} into a buffer of {}",
            host.len(),
            dev.len
        );
        self.not_capturing("a host-to-device copy")?;
        if host.is_empty() {
            return Ok(());
        }
        match (&self.backend, &mut dev.mem) {
            (Backend::Cuda(c), Mem::Cuda(b)) => {
                let mut view = b.slice_mut(off..off + host.len());
                c.stream
                    .memcpy_htod(host, &mut view)
                    .context("host-to-device copy")
            }
            (Backend::Emu(_), Mem::Emu(h)) => {
                h.write(off, host);
                Ok(())
            }
            _ => bail!("a buffer of the other backend"),
        }
    }

    /// Download a device buffer (synchronizes the stream).
    pub fn download<T: DevElem>(&self, dev: &DevBuf<T>) -> Result<Vec<T>> {
        self.download_range(dev, 0..dev.len)
    }

    /// Download elements `range` of a device buffer (synchronizes the stream).
    pub fn download_range<T: DevElem>(
        &self,
        dev: &DevBuf<T>,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<T>> {
        self.not_capturing("a device-to-host copy")?;
        ensure!(
            range.start <= range.end && range.end <= dev.len,
            "device-to-host copy of {range:?} from a buffer of {}",
            dev.len
        );
        match (&self.backend, &dev.mem) {
            (Backend::Cuda(c), Mem::Cuda(b)) => {
                if range.start == 0 && range.end == b.len() {
                    c.stream.clone_dtoh(b).context("device-to-host copy")
                } else {
                    c.stream
                        .clone_dtoh(&b.slice(range))
                        .context("device-to-host copy")
                }
            }
            (Backend::Emu(_), Mem::Emu(h)) => Ok(h.read(range)),
            _ => bail!("a buffer of the other backend"),
        }
    }

    /// Set every element of `dev` to zero (recorded in the ledger as "memset": its bytes
    /// written).
    pub fn memset_zeros<T: DevElem>(&self, dev: &mut DevBuf<T>) -> Result<()> {
        let bytes = dev.len * std::mem::size_of::<T>();
        let traffic = Traffic::new(0, bytes, 0);
        match (&self.backend, &mut dev.mem) {
            (Backend::Cuda(c), Mem::Cuda(b)) => {
                self.issue("memset", traffic, &[], |_: &EmuDevice| Ok(()))?;
                c.stream.memset_zeros(b).context("memset")
            }
            (Backend::Emu(_), Mem::Emu(h)) => {
                let addr = h.addr();
                let zero = move |_: &EmuDevice| {
                    // SAFETY: (addr, bytes) is the live allocation of `dev`; a graph is only
                    // replayed while the buffers it recorded live (the engine keeps them
                    // together). Not called in a dry run (no memory).
                    unsafe { std::ptr::write_bytes(addr as *mut u8, 0, bytes) };
                    Ok(())
                };
                self.issue("memset", traffic, &[addr as u64], zero)
            }
            _ => bail!("a buffer of the other backend"),
        }
    }

    /// Start recording this device's work into a [`Graph`]: until [`Gpu::end_capture`],
    /// launches, GEMMs and memsets are recorded, not run, and transfers, allocations and
    /// synchronization are refused (as CUDA refuses them on a capturing stream), so everything
    /// a graph touches must be allocated and uploaded before.
    pub fn begin_capture(&self) -> Result<()> {
        let mut cap = self.capture.lock().unwrap();
        ensure!(cap.is_none(), "a graph capture is already in progress");
        if let Backend::Cuda(c) = &self.backend {
            c.stream
                .begin_capture(
                    cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
                .context("beginning a CUDA graph capture")?;
        }
        *cap = Some(Vec::new());
        Ok(())
    }

    /// End the capture begun by [`Gpu::begin_capture`] and instantiate what was recorded.
    pub fn end_capture(&self) -> Result<Graph> {
        let ops = self
            .capture
            .lock()
            .unwrap()
            .take()
            .context("end_capture without begin_capture")?;
        let inner = match &self.backend {
            Backend::Cuda(c) => {
                let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
                let graph = c
                    .stream
                    .end_capture(flags)
                    .context("ending the CUDA graph capture")?
                    .context("the CUDA graph capture recorded nothing")?;
                GraphInner::Cuda(graph)
            }
            Backend::Emu(_) => GraphInner::Emu(ops),
        };
        Ok(Graph { inner })
    }

    /// Whether a capture is in progress.
    pub fn capturing(&self) -> bool {
        self.capture.lock().unwrap().is_some()
    }

    /// Run a captured graph again (enqueued on the stream like any launch).
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        self.not_capturing("replaying a graph")?;
        match (&self.backend, &graph.inner) {
            (Backend::Cuda(_), GraphInner::Cuda(g)) => g.launch().context("launching a CUDA graph"),
            (Backend::Emu(e), GraphInner::Emu(ops)) => ops.iter().try_for_each(|op| op(e)),
            _ => bail!("a graph of the other backend"),
        }
    }

    /// On the emulator while capturing: record `op` instead of running it (returns true).
    pub(crate) fn emu_record(&self, op: impl FnOnce() -> EmuOp) -> bool {
        if !self.is_emu() {
            return false;
        }
        match self.capture.lock().unwrap().as_mut() {
            Some(ops) => {
                ops.push(op());
                true
            }
            None => false,
        }
    }

    /// Refuse `what` during a capture.
    fn not_capturing(&self, what: &str) -> Result<()> {
        ensure!(
            !self.capturing(),
            "{what} is not allowed while a graph is being captured (allocate and upload before \
             the capture)"
        );
        Ok(())
    }

    /// Wait for every queued launch (a no-op on the emulator, where launches run in order as
    /// they are issued).
    pub fn sync(&self) -> Result<()> {
        self.not_capturing("synchronizing")?;
        match &self.backend {
            Backend::Cuda(c) => c.stream.synchronize().context("stream synchronize"),
            Backend::Emu(_) => Ok(()),
        }
    }

    /// Milliseconds `f` takes on the device: CUDA events on a GPU, wall time on the
    /// emulator (which models no timing).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        match &self.backend {
            Backend::Cuda(c) => {
                let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let t0 = c.stream.record_event(flags).context("recording event")?;
                f()?;
                let t1 = c.stream.record_event(flags).context("recording event")?;
                Ok(t0.elapsed_ms(&t1).context("event timing")? as f64)
            }
            Backend::Emu(_) => {
                let t0 = std::time::Instant::now();
                f()?;
                Ok(t0.elapsed().as_secs_f64() * 1e3)
            }
        }
    }

    /// `n` timestamp slots for [`Gpu::mark`] (allocate before a capture).
    pub fn marks(&self, n: usize) -> Result<Marks> {
        self.not_capturing("creating timing events")?;
        let inner = match &self.backend {
            Backend::Cuda(c) => MarksInner::Cuda(
                (0..n)
                    .map(|_| {
                        c.ctx
                            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    })
                    .collect::<Result<_, _>>()
                    .context("creating timing events")?,
            ),
            Backend::Emu(_) => MarksInner::Emu(Arc::new(std::sync::Mutex::new(vec![None; n]))),
        };
        Ok(Marks { inner })
    }

    /// Enqueue timestamp `i` of `marks`: set when the device has done everything enqueued
    /// before it. During a capture the mark is recorded into the graph.
    pub fn mark(&self, marks: &Marks, i: usize) -> Result<()> {
        ensure!(i < marks.len(), "timestamp {i} of {}", marks.len());
        match (&self.backend, &marks.inner) {
            (Backend::Cuda(c), MarksInner::Cuda(ev)) => {
                let flags = if self.capturing() {
                    // An event record node in the graph being captured.
                    cudarc::driver::sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32
                } else {
                    0
                };
                c.ctx.bind_to_thread().context("binding the CUDA context")?;
                // SAFETY: the event and the stream are live handles of this context.
                unsafe {
                    cudarc::driver::sys::cuEventRecordWithFlags(
                        ev[i].cu_event(),
                        c.stream.cu_stream(),
                        flags,
                    )
                }
                .result()
                .context("recording a timing event")
            }
            (Backend::Emu(_), MarksInner::Emu(slots)) => {
                let stamp = {
                    let slots = slots.clone();
                    move |_: &EmuDevice| {
                        slots.lock().unwrap()[i] = Some(std::time::Instant::now());
                        Ok(())
                    }
                };
                if !self.emu_record(|| Box::new(stamp.clone())) {
                    stamp(self.emu_device().context("no emulator")?)?;
                }
                Ok(())
            }
            _ => bail!("timestamps of the other backend"),
        }
    }

    /// Milliseconds from timestamp `from` to `to` of `marks`, once the device has reached
    /// `to` (waits for it). An error when either was never recorded.
    pub fn mark_ms(&self, marks: &Marks, from: usize, to: usize) -> Result<f64> {
        self.not_capturing("reading timing events")?;
        ensure!(
            from < marks.len() && to < marks.len(),
            "timestamps {from}..{to} of {}",
            marks.len()
        );
        match &marks.inner {
            MarksInner::Cuda(ev) => Ok(ev[from]
                .elapsed_ms(&ev[to])
                .context("reading timing events")? as f64),
            MarksInner::Emu(slots) => {
                let s = slots.lock().unwrap();
                match (s[from], s[to]) {
                    (Some(a), Some(b)) => Ok(b.saturating_duration_since(a).as_secs_f64() * 1e3),
                    _ => bail!("timestamp {from} or {to} was never recorded"),
                }
            }
        }
    }

    /// Forget every timestamp (emulator; on a GPU a re-record replaces the old one).
    pub fn clear_marks(&self, marks: &Marks) {
        if let MarksInner::Emu(slots) = &marks.inner {
            slots.lock().unwrap().iter_mut().for_each(|t| *t = None);
        }
    }

    /// The memory batches on this device are planned against (`pipeline::batch_rule`).
    pub fn memory(&self) -> Result<crate::pipeline::Memory> {
        use crate::pipeline::Memory;
        Ok(match &self.backend {
            Backend::Cuda(c) => {
                let (free, total) = c.ctx.mem_get_info()?;
                Memory::Gpu {
                    total: total as u64,
                    free: free as u64,
                }
            }
            // A dry run plans as on a nominal 80 GB GPU (nothing is backed by host memory).
            Backend::Emu(e) if e.is_dry() => {
                let (free, total) = self.mem_get_info()?;
                Memory::Gpu {
                    total: total as u64,
                    free: free as u64,
                }
            }
            Backend::Emu(_) => Memory::Emulated,
        })
    }

    /// (free, total) device memory in bytes; on the emulator, live allocations against a
    /// nominal 80 GB.
    pub fn mem_get_info(&self) -> Result<(usize, usize)> {
        match &self.backend {
            Backend::Cuda(c) => Ok(c.ctx.mem_get_info()?),
            Backend::Emu(e) => {
                let total = 80usize << 30;
                Ok((total.saturating_sub(e.live_bytes()), total))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cublas_is_an_error_not_a_panic() {
        let e = require_cublas(false).unwrap_err().to_string();
        assert!(e.contains("libcublas"), "{e}");
        assert!(require_cublas(true).is_ok());
    }

    #[test]
    fn device_count_failure_with_a_driver_is_an_error() {
        assert!(
            classify_device_count(false, || panic!("not called"))
                .unwrap()
                .is_none()
        );
        assert!(classify_device_count(true, || Ok(0)).unwrap().is_none());
        assert_eq!(classify_device_count(true, || Ok(2)).unwrap(), Some(2));
        let e = classify_device_count(true, || Err("CUDA_ERROR_NO_DEVICE".into())).unwrap_err();
        assert!(e.to_string().contains("cuDeviceGetCount failed"), "{e}");
    }

    #[test]
    fn auto_falls_back_to_the_cpu_with_one_warning_line() {
        // A GPU that opened is used, silently; no GPU is the CPU, silently.
        assert_eq!(auto_fallback(Ok(Some(7))), (Some(7), None));
        assert_eq!(auto_fallback::<i32>(Ok(None)), (None, None));
        // A GPU that failed to initialise (here: NVRTC's error, whose log spans lines) is the
        // CPU with one warning line that says why.
        let e = anyhow!("NVRTC (compute_90a) failed on kernels/norm.cu: line 1\nline 2")
            .context("cannot load kernels/norm.cu (NVRTC) on NVIDIA H100");
        let (gpu, warning) = auto_fallback::<i32>(Err(e));
        assert_eq!(gpu, None);
        let w = warning.unwrap();
        assert_eq!(w.lines().count(), 1, "{w}");
        assert!(
            w.contains("NVRTC (compute_90a) failed on kernels/norm.cu"),
            "{w}"
        );
        assert!(w.contains("line 2"), "{w}");
        assert!(w.ends_with("running on the CPU"), "{w}");
    }

    #[test]
    fn nvrtc_without_headers_or_library_is_an_error_not_a_panic() {
        let nowhere = [PathBuf::from("/nonexistent/cuda")];
        let e = nvrtc_compile_source("norm", KERNEL_FILES[0].source, (9, 0), &nowhere)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda_bf16.h") && e.contains("CUDA_HOME"), "{e}");
        assert!(nvrtc_options((7, 5), &nowhere).is_err());
        // The architectures: the cubin's for cc 9.0, forward-compatible PTX otherwise.
        let here = std::env::temp_dir().join(format!("cg-nvrtc-opts-{}", std::process::id()));
        std::fs::create_dir_all(here.join("include")).unwrap();
        std::fs::write(here.join("include/cuda_bf16.h"), "").unwrap();
        let roots = [PathBuf::from("/nonexistent/cuda"), here.clone()];
        assert_eq!(
            nvrtc_options((9, 0), &roots).unwrap().arch,
            Some("compute_90a")
        );
        assert_eq!(
            nvrtc_options((8, 6), &roots).unwrap().arch,
            Some("compute_80")
        );
        assert_eq!(
            nvrtc_options((12, 0), &roots).unwrap().arch,
            Some("compute_80")
        );
        let o = nvrtc_options((9, 0), &roots).unwrap();
        assert_eq!(
            o.include_paths,
            [here.join("include").display().to_string()]
        );
        // A root with headers but no libnvrtc: an error naming the library, where the machine
        // has none on the loader's path either.
        // SAFETY: only checks whether the library can be loaded.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            let e = nvrtc_compile_source("norm", KERNEL_FILES[0].source, (9, 0), &roots)
                .unwrap_err()
                .to_string();
            assert!(e.contains("libnvrtc (CUDA 13) not found"), "{e}");
        }
        std::fs::remove_dir_all(here).unwrap();
    }

    #[test]
    fn without_a_gpu_only_the_emulator_opens() {
        // SAFETY: only checks whether the driver library can be loaded.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // a machine with a driver: covered by the GPU tests
        }
        assert!(Gpu::try_new().unwrap().is_none());
        assert!(Gpu::new(0).is_err());
        let g = Gpu::emu().unwrap();
        assert!(g.is_emu());
        assert_eq!(g.image_kind, "host emulator");
    }

    #[test]
    fn emu_buffers_copy_poison_and_zero() {
        let g = Gpu::emu().unwrap();
        let mut b = g.upload(&[1.0f32, 2.0, 3.0]).unwrap();
        g.upload_into(&[9.0f32], &mut b, 1).unwrap();
        assert_eq!(g.download(&b).unwrap(), vec![1.0, 9.0, 3.0]);
        assert_eq!(g.download_range(&b, 1..3).unwrap(), vec![9.0, 3.0]);
        assert!(g.upload_into(&[0.0f32; 3], &mut b, 1).is_err());
        let p = g.alloc::<f32>(4).unwrap();
        assert!(g.download(&p).unwrap().iter().all(|x| x.is_nan()));
        let pb = g.alloc::<half::bf16>(4).unwrap();
        assert!(g.download(&pb).unwrap().iter().all(|x| x.is_nan()));
        let ph = g.alloc::<half::f16>(4).unwrap();
        assert!(g.download(&ph).unwrap().iter().all(|x| x.is_nan()));
        let pi = g.alloc::<i32>(2).unwrap();
        assert_eq!(g.download(&pi).unwrap(), vec![0xDEAD_BEEFu32 as i32; 2]);
        let mut z = g.alloc::<f32>(3).unwrap();
        g.memset_zeros(&mut z).unwrap();
        assert_eq!(g.download(&z).unwrap(), vec![0.0; 3]);
        assert_eq!(g.download(&g.zeros::<i32>(2).unwrap()).unwrap(), vec![0, 0]);
        assert_eq!(g.ptr(&z) % 256, 0, "cudaMalloc-like alignment");
    }

    #[test]
    fn emu_red_zones_catch_out_of_bounds_writes() {
        let g = Gpu::emu().unwrap();
        let emu = g.emu_device().unwrap();
        let buf = g.zeros::<f32>(10).unwrap();
        let p = g.ptr(&buf) as *mut f32;
        emu.check_red_zones("nothing").unwrap();
        // SAFETY: one element past the end lies in the red zone of this live allocation.
        unsafe { *p.add(10) = 1.0 };
        let e = emu
            .check_red_zones("kernel fake_kernel_f32")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernel fake_kernel_f32"), "{e}");
        assert!(e.contains("past the end of buffer f32 x 10"), "{e}");
        assert!(e.contains("src/cuda/device.rs"), "allocation site in {e}");
        // restored after the report
        emu.check_red_zones("again").unwrap();
        // SAFETY: one element before the start lies in the front red zone.
        unsafe { *p.sub(1) = 1.0 };
        let e = emu.check_red_zones("kernel k").unwrap_err().to_string();
        assert!(e.contains("before"), "{e}");
        // reads past the end see NaN
        // SAFETY: red zone of a live allocation.
        assert!(unsafe { *p.add(11) }.is_nan());
        emu.check_red_zones("again").unwrap();
        // `+=` past the end (what an off-by-one grid-stride loop does) changes the signaling
        // NaN into a quiet one, so it is caught too.
        // SAFETY: as above.
        unsafe { *p.add(10) += 1.0 };
        let e = emu.check_red_zones("kernel k").unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        let bb = g.zeros::<half::bf16>(3).unwrap();
        let q = g.ptr(&bb) as *mut half::bf16;
        // SAFETY: the element past the end of a bf16 buffer (2-byte aligned red zone start).
        unsafe { *q.add(3) = half::bf16::from_f32(q.add(3).read().to_f32() + 1.0) };
        assert!(emu.check_red_zones("kernel k16").is_err());
    }

    #[test]
    fn emu_launch_without_a_host_entry_is_a_clear_error() {
        let g = Gpu::emu().unwrap();
        if let Some(kern) = KERNELS
            .iter()
            .find(|k| crate::cuda::emu::entry(**k).is_none())
        {
            let e = g
                .launch(*kern, (1, 1, 1), (1, 1, 1), 0, &0u64, Traffic::default())
                .unwrap_err();
            assert!(
                e.to_string().contains("not compiled for the host emulator"),
                "{e}"
            );
        }
        let kern = KERNELS[0];
        // Over the kernel's __launch_bounds__ (at most 1024): refused before the backend.
        let e = g
            .launch(kern, (1, 1, 1), (2048, 1, 1), 0, &0u64, Traffic::default())
            .unwrap_err();
        assert!(e.to_string().contains("exceeds the kernel's"), "{e}");
        let e = g
            .launch(kern, (1, 1, 1), (0, 1, 1), 0, &0u64, Traffic::default())
            .unwrap_err();
        assert!(e.to_string().contains("invalid configuration"), "{e}");
    }
}
