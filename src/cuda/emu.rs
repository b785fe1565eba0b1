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
//! is listed in README.md, section "The host-emulated device".

use super::Kernel;
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

/// A kernel's host entry point (built by build.rs): returns 0, or non-zero with a
/// NUL-terminated one-line message in `err`.
pub use super::EmuFn;

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
}

/// One emulated device allocation (owned by a `DevBuf`); freed, and unregistered, on drop.
pub struct HostAlloc {
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
        }
    }

    /// An allocation of `n` elements of `T` with red zones; contents unspecified (callers
    /// fill it).
    pub fn alloc<T>(&self, n: usize, loc: &'static Location<'static>) -> Result<HostAlloc> {
        let bytes = n * std::mem::size_of::<T>();
        let layout = Layout::from_size_align(2 * RED + bytes, 256)?;
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
                elem: std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("?"),
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

    /// Check (and restore) every red zone of every live allocation; `what` names the launch.
    pub fn check_red_zones(&self, what: &str) -> Result<()> {
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
