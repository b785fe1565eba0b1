//! The host-emulated device (issue 9): the "emu" backend of [`super::Gpu`].
//!
//! * Device memory is host memory: every allocation is `RED` bytes of red zone, the data,
//!   and `RED` bytes of red zone, 256-byte aligned like `cudaMalloc`. Red zones hold the
//!   word `RED_WORD` at every 4-byte-aligned address (0x7FA57FA5: a *signaling* NaN as f32
//!   and as each bf16 half, a NaN as f16, 2141552549 as i32), so an out-of-bounds *read* shows
//!   as NaN in the outputs, an out-of-bounds `+=` changes the bits (arithmetic quiets a
//!   signaling NaN; a quiet-NaN or huge-value zone would absorb it), and every red zone of every live allocation is checked after
//!   every launch and every GEMM: an out-of-bounds *write* fails that launch, naming the
//!   kernel and the buffer (element type, length, and where it was allocated).
//! * New uninitialized allocations ([`super::Gpu::alloc`]) are filled with the element type's
//!   poison ([`super::device::DevElem::POISON`]).
//! * A launch calls the kernel's host-compiled entry point (`Kernel::emu`, built by build.rs
//!   from the same kernels/*.cu) with the same `#[repr(C)]` parameter struct; device pointers
//!   in it are these host addresses. Launches run to completion in program order, so the
//!   single stream's order is kept by construction.
//! * Launch configurations are checked as the driver does (block at most 1024 threads,
//!   grid.y/z at most 65535, dynamic shared memory at most 48 KiB without an opt-in).
//!
//! What it cannot model (timing, memory ordering across blocks, graph capture, occupancy)
//! is listed in docs/gpu.md, section "The host-emulated device".

use super::registry::Kernel;
use anyhow::{Result, bail};
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::panic::Location;
use std::sync::{Arc, Mutex};

/// Bytes of red zone before and after every allocation.
pub const RED: usize = 256;
/// The red-zone fill word (little-endian, at 4-byte-aligned addresses).
pub const RED_WORD: u32 = 0x7FA5_7FA5;

/// The red-zone byte expected at address `a`.
fn red_byte(a: usize) -> u8 {
    RED_WORD.to_le_bytes()[a % 4]
}

/// Fill `n` bytes at `p` with the red-zone pattern.
///
/// # Safety
/// `p..p + n` is writable.
unsafe fn fill_red(p: *mut u8, n: usize) {
    for i in 0..n {
        // SAFETY: per the contract.
        unsafe { *p.add(i) = red_byte(p as usize + i) };
    }
}

/// Change one element (`at`, little-endian bytes of a float of type `elem`) to a different
/// finite value.
fn perturb(elem: &str, at: &mut [u8]) {
    let f = |x: f32| {
        if x.is_finite() {
            1.0 - 2.0 * x + 0.375
        } else {
            0.75
        }
    };
    match elem {
        "f32" => {
            let x = f32::from_le_bytes(at.try_into().unwrap());
            at.copy_from_slice(&f(x).to_le_bytes());
        }
        "bf16" => {
            let x = half::bf16::from_le_bytes(at.try_into().unwrap()).to_f32();
            at.copy_from_slice(&half::bf16::from_f32(f(x)).to_le_bytes());
        }
        _ => {
            let x = half::f16::from_le_bytes(at.try_into().unwrap()).to_f32();
            at.copy_from_slice(&half::f16::from_f32(f(x)).to_le_bytes());
        }
    }
}

/// A kernel's host entry point (built by build.rs): returns 0, or non-zero with a
/// NUL-terminated one-line message in `err`.
pub use super::registry::EmuFn;

/// The host entry point of `kernel`, when it was compiled for the host.
pub fn entry(kernel: Kernel) -> Option<EmuFn> {
    kernel.emu
}

struct Info {
    base: usize,
    bytes: usize,
    elem: &'static str,
    len: usize,
    loc: &'static Location<'static>,
}

impl Info {
    fn label(&self) -> String {
        format!(
            "{} x {} ({} bytes) allocated at {}:{}",
            self.elem,
            self.len,
            self.bytes,
            self.loc.file(),
            self.loc.line()
        )
    }
}

#[derive(Default)]
struct Registry {
    /// Live allocations by data address.
    live: Mutex<BTreeMap<usize, Info>>,
}

/// The emulator's state: the registry of live allocations and launch counters.
pub struct EmuDevice {
    reg: Arc<Registry>,
    launches: std::sync::atomic::AtomicU64,
    /// Dry run (`bench --dry-run`): launches, GEMMs, memsets and copies are recorded in the
    /// ledger but not executed, and allocations have no backing memory (a reserved address
    /// range only: reads see zeros, writes are dropped).
    dry: bool,
}

/// Next address handed out by dry-run allocations (never dereferenced).
static DRY_NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1 << 44);

/// One emulated device allocation (owned by a `DevBuf`); freed, and unregistered, on drop.
pub struct HostAlloc {
    /// Null for a dry-run allocation (no backing memory; `data` is a reserved address).
    base: *mut u8,
    data: *mut u8,
    bytes: usize,
    layout: Layout,
    reg: Arc<Registry>,
}

// SAFETY: the allocation is plain memory owned by this value; the emulated device, like a
// real one, leaves synchronizing writers to the caller (launches take &mut buffers).
unsafe impl Send for HostAlloc {}
// SAFETY: as above.
unsafe impl Sync for HostAlloc {}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        let mut live = self.reg.live.lock().unwrap();
        live.remove(&(self.data as usize));
        if self.base.is_null() {
            return; // dry run: nothing was allocated
        }
        // SAFETY: allocated in `EmuDevice::alloc` with this layout; unregistered above, so no
        // red-zone check reads it any more.
        unsafe { std::alloc::dealloc(self.base, self.layout) };
    }
}

impl HostAlloc {
    /// The data address (what kernels and GEMMs see as the device pointer).
    pub fn addr(&self) -> usize {
        self.data as usize
    }

    /// "f32 x 1024 (4096 bytes) allocated at src/...:12".
    pub fn label(&self) -> String {
        let live = self.reg.live.lock().unwrap();
        live.get(&(self.data as usize))
            .map(|i| i.label())
            .unwrap_or_default()
    }

    fn elems<T>(&self) -> usize {
        self.bytes / std::mem::size_of::<T>().max(1)
    }

    /// Copy `src` in at element offset `off` (the caller checked the bounds).
    pub fn write<T: Copy>(&self, off: usize, src: &[T]) {
        assert!(off + src.len() <= self.elems::<T>());
        if self.base.is_null() {
            return;
        }
        // SAFETY: in bounds (asserted), `data` is aligned to 256, T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), (self.data as *mut T).add(off), src.len())
        };
    }

    /// Copy elements `range` out.
    pub fn read<T: Copy>(&self, range: std::ops::Range<usize>) -> Vec<T> {
        assert!(range.start <= range.end && range.end <= self.elems::<T>());
        let n = range.len();
        let mut out = Vec::with_capacity(n);
        if self.base.is_null() {
            // Dry run: zeros (every device element type is valid as zero bits).
            // SAFETY: capacity n; zero bytes are a valid T for the device element types.
            unsafe {
                std::ptr::write_bytes(out.as_mut_ptr(), 0, n);
                out.set_len(n);
            }
            return out;
        }
        // SAFETY: in bounds (asserted); `out` has capacity n and T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.data as *const T).add(range.start),
                out.as_mut_ptr(),
                n,
            );
            out.set_len(n);
        }
        out
    }

    /// Set every element to `v`.
    pub fn fill<T: Copy>(&self, v: T) {
        if self.base.is_null() {
            return;
        }
        let n = self.elems::<T>();
        // SAFETY: n elements of T fit in the data area.
        let s = unsafe { std::slice::from_raw_parts_mut(self.data as *mut T, n) };
        s.fill(v);
    }
}

impl Default for EmuDevice {
    fn default() -> Self {
        EmuDevice::new()
    }
}

impl EmuDevice {
    pub fn new() -> EmuDevice {
        EmuDevice {
            reg: Arc::new(Registry::default()),
            launches: 0.into(),
            dry: false,
        }
    }

    /// The dry-run device (see [`EmuDevice::is_dry`]).
    pub fn dry() -> EmuDevice {
        EmuDevice {
            dry: true,
            ..EmuDevice::new()
        }
    }

    /// Whether this is a dry run: nothing executes, allocations have no memory.
    pub fn is_dry(&self) -> bool {
        self.dry
    }

    /// An allocation of `n` elements of `T` with red zones; contents unspecified (callers
    /// fill it).
    pub fn alloc<T>(&self, n: usize, loc: &'static Location<'static>) -> Result<HostAlloc> {
        let bytes = n * std::mem::size_of::<T>();
        let layout = Layout::from_size_align(2 * RED + bytes, 256)?;
        let elem = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        if self.dry {
            // A reserved, 256-aligned address range with a red-zone gap, never touched.
            let span = (2 * RED + bytes).next_multiple_of(256);
            let data = DRY_NEXT.fetch_add(span, std::sync::atomic::Ordering::Relaxed) + RED;
            self.reg.live.lock().unwrap().insert(
                data,
                Info {
                    base: data - RED,
                    bytes,
                    elem,
                    len: n,
                    loc,
                },
            );
            return Ok(HostAlloc {
                base: std::ptr::null_mut(),
                data: data as *mut u8,
                bytes,
                layout,
                reg: self.reg.clone(),
            });
        }
        // SAFETY: non-zero size (2 * RED > 0).
        let base = unsafe { std::alloc::alloc(layout) };
        if base.is_null() {
            bail!("emulated device allocation of {bytes} bytes failed");
        }
        // SAFETY: the layout spans both red zones and the data.
        unsafe {
            fill_red(base, RED);
            fill_red(base.add(RED + bytes), RED);
        }
        // SAFETY: RED < layout size.
        let data = unsafe { base.add(RED) };
        self.reg.live.lock().unwrap().insert(
            data as usize,
            Info {
                base: base as usize,
                bytes,
                elem,
                len: n,
                loc,
            },
        );
        Ok(HostAlloc {
            base,
            data,
            bytes,
            layout,
            reg: self.reg.clone(),
        })
    }

    /// Bytes held by live allocations.
    pub fn live_bytes(&self) -> usize {
        self.reg
            .live
            .lock()
            .unwrap()
            .values()
            .map(|i| i.bytes)
            .sum()
    }

    /// Launches run so far.
    pub fn launches(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run `kernel` on the host, then check every red zone.
    ///
    /// # Safety
    /// `params` points to the kernel's `#[repr(C)]` parameter struct, whose device pointers
    /// are live allocations of this device large enough for the launch.
    pub unsafe fn launch(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: *const c_void,
    ) -> Result<()> {
        let threads = block.0 as u64 * block.1 as u64 * block.2 as u64;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || threads == 0 {
            bail!(
                "launching {}: invalid configuration (grid {grid:?}, block {block:?}: a zero dimension)",
                kernel.name
            );
        }
        if threads > 1024 || block.0 > 1024 || block.1 > 1024 || block.2 > 64 {
            bail!(
                "launching {}: invalid configuration (block {block:?}: at most 1024 threads, z <= 64)",
                kernel.name
            );
        }
        if grid.0 > i32::MAX as u32 || grid.1 > 65535 || grid.2 > 65535 {
            bail!(
                "launching {}: invalid configuration (grid {grid:?}: y and z at most 65535)",
                kernel.name
            );
        }
        if smem > 48 * 1024 {
            bail!(
                "launching {}: {smem} bytes of dynamic shared memory (above 48 KiB needs \
                 cudaFuncAttributeMaxDynamicSharedMemorySize, which the engine does not set)",
                kernel.name
            );
        }
        let Some(f) = entry(kernel) else {
            bail!(
                "launching {}: kernel not compiled for the host emulator (kernels/{}.cu)",
                kernel.name,
                kernel.file
            );
        };
        let g = [grid.0, grid.1, grid.2];
        let b = [block.0, block.1, block.2];
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: per this function's contract.
        let rc = unsafe {
            f(
                g.as_ptr(),
                b.as_ptr(),
                smem,
                params,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        self.launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if rc != 0 {
            // SAFETY: the entry point NUL-terminates its message within err_len bytes.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            bail!(
                "launching {} (grid {grid:?}, block {block:?}) on the host emulator: {msg}",
                kernel.name
            );
        }
        self.check_red_zones(&format!("kernel {}", kernel.name))
    }

    /// The live allocations (data address, bytes, element type) holding any of `addrs`.
    fn buffers_at(&self, addrs: &[u64]) -> Vec<(usize, usize, &'static str)> {
        let live = self.reg.live.lock().unwrap();
        let mut out: Vec<(usize, usize, &'static str)> = Vec::new();
        for &a in addrs {
            let a = a as usize;
            if let Some((&data, info)) = live.range(..=a).next_back()
                && a < data + info.bytes.max(1)
                && !out.iter().any(|b| b.0 == data)
            {
                out.push((data, info.bytes, info.elem));
            }
        }
        out
    }

    /// Run `run` (one launch or GEMM whose parameters hold the addresses `addrs`) and
    /// measure what it touched in the buffers at those addresses: (bytes that changed value,
    /// bytes of floating-point buffers whose perturbation changes any output, bytes of
    /// integer buffers not probed). Leaves the buffers as one plain run leaves them.
    /// Probes element by element up to 1024 elements per buffer, then in equal chunks (a
    /// chunk whose perturbation changes an output counts whole).
    pub fn audit(
        &self,
        run: &dyn Fn(&EmuDevice) -> Result<()>,
        addrs: &[u64],
    ) -> Result<(u64, u64, u64)> {
        let bufs = self.buffers_at(addrs);
        // SAFETY (all slices below): live allocations of this device, `bytes` long.
        let view = |&(d, n, _): &(usize, usize, &str)| unsafe {
            std::slice::from_raw_parts_mut(d as *mut u8, n)
        };
        let before: Vec<Vec<u8>> = bufs.iter().map(|b| view(b).to_vec()).collect();
        run(self)?;
        let after: Vec<Vec<u8>> = bufs.iter().map(|b| view(b).to_vec()).collect();
        let written: usize = before
            .iter()
            .zip(&after)
            .map(|(x, y)| x.iter().zip(y).filter(|(a, b)| a != b).count())
            .sum();
        let restore = |state: &[Vec<u8>]| {
            for (b, s) in bufs.iter().zip(state) {
                view(b).copy_from_slice(s);
            }
        };
        let (mut read, mut unprobed) = (0usize, 0usize);
        for (i, b) in bufs.iter().enumerate() {
            let esz = match b.2 {
                "f32" => 4,
                "bf16" | "f16" => 2,
                _ => {
                    unprobed += b.1;
                    continue;
                }
            };
            let elems = b.1 / esz;
            let per = elems.div_ceil(1024).max(1);
            let mut e0 = 0;
            while e0 < elems {
                let e1 = (e0 + per).min(elems);
                restore(&before);
                let buf = view(b);
                for e in e0..e1 {
                    let at = &mut buf[e * esz..(e + 1) * esz];
                    perturb(b.2, at);
                }
                let changed = run(self).is_err()
                    || bufs.iter().zip(&after).enumerate().any(|(j, (bb, want))| {
                        let got = view(bb);
                        if j == i {
                            // The perturbed element itself does not count as output.
                            got.iter()
                                .zip(want)
                                .enumerate()
                                .any(|(k, (x, y))| !(e0 * esz..e1 * esz).contains(&k) && x != y)
                                || {
                                    // ... unless the kernel wrote it (in place).
                                    (e0 * esz..e1 * esz)
                                        .any(|k| got[k] != want[k] && before[i][k] != want[k])
                                }
                        } else {
                            got != want.as_slice()
                        }
                    });
                if changed {
                    read += (e1 - e0) * esz;
                }
                e0 = e1;
            }
        }
        restore(&after);
        Ok((written as u64, read as u64, unprobed as u64))
    }

    /// Check (and restore) every red zone of every live allocation; `what` names the launch.
    pub fn check_red_zones(&self, what: &str) -> Result<()> {
        if self.dry {
            return Ok(());
        }
        let live = self.reg.live.lock().unwrap();
        let mut bad = Vec::new();
        for (&data, info) in live.iter() {
            let front = info.base as *mut u8;
            let back = (data + info.bytes) as *mut u8;
            for (zone, start, before) in [(front, 0usize, true), (back, 0, false)] {
                // SAFETY: both red zones lie inside the live allocation's layout.
                let z = unsafe { std::slice::from_raw_parts_mut(zone.add(start), RED) };
                let at = zone as usize + start;
                let ok = |(i, &b): (usize, &u8)| b == red_byte(at + i);
                if z.iter().enumerate().all(ok) {
                    continue;
                }
                let first = z.iter().enumerate().position(|x| !ok(x)).unwrap();
                let last = z.iter().enumerate().rposition(|x| !ok(x)).unwrap();
                bad.push(if before {
                    format!(
                        "{what} wrote out of bounds: bytes {} to {} *before* the start of buffer {}",
                        RED - first,
                        RED - last,
                        info.label()
                    )
                } else {
                    format!(
                        "{what} wrote out of bounds: bytes {first}..={last} past the end of buffer {}",
                        info.label()
                    )
                });
                // SAFETY: the zone checked above.
                unsafe { fill_red(at as *mut u8, RED) };
            }
        }
        if !bad.is_empty() {
            bail!("{}", bad.join("\n"));
        }
        Ok(())
    }

    /// The live allocation holding bytes `[addr, addr + bytes)`, or an error naming the
    /// access `what` and the nearest buffer.
    pub fn check_range(&self, what: &str, addr: usize, bytes: usize) -> Result<()> {
        let live = self.reg.live.lock().unwrap();
        let Some((&data, info)) = live.range(..=addr).next_back() else {
            bail!("{what}: address {addr:#x} is not in any emulated device allocation");
        };
        if addr + bytes > data + info.bytes {
            if addr >= data + info.bytes {
                bail!(
                    "{what}: address {addr:#x} is {} bytes past the end of buffer {}",
                    addr - data - info.bytes,
                    info.label()
                );
            }
            bail!(
                "{what}: {bytes} bytes at offset {} overrun buffer {} by {} bytes",
                addr - data,
                info.label(),
                addr + bytes - data - info.bytes
            );
        }
        Ok(())
    }
}
