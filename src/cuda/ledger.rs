//! The traffic ledger (issue 21): every kernel launch and GEMM declares the compulsory DRAM
//! bytes it reads and writes and its FLOPs ([`Traffic`], computed by its launcher from the
//! shapes, each tensor counted once, no cache re-reads), and the device records one
//! [`Record`] per launch, labelled with the part of the sampler that issued it (the engine
//! sets "decoder" around the decode, everything else is "transformer").
//!
//! `Gpu::launch` and `gemm::gemm` take a `Traffic`, so nothing launches without declaring.
//! The declarations are checked against what the emulated kernels really touch by
//! tests/gpu_ledger.rs ([`AuditRecord`]).
//!
//! [`model_ms`] turns a ledger into a *modelled* time (a roofline per launch plus a fixed
//! launch cost): a model, never a measurement.

/// What one launch moves and computes: compulsory DRAM bytes read and written, FLOPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub read: u64,
    pub write: u64,
    pub flops: u64,
}

impl Traffic {
    /// From element counts: `read` and `write` bytes, `flops`.
    pub fn new(read: usize, write: usize, flops: usize) -> Traffic {
        Traffic {
            read: read as u64,
            write: write as u64,
            flops: flops as u64,
        }
    }

    /// Bytes read plus written.
    pub fn bytes(&self) -> u64 {
        self.read + self.write
    }
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            read: self.read + o.read,
            write: self.write + o.write,
            flops: self.flops + o.flops,
        }
    }
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Traffic) {
        *self = *self + o;
    }
}

/// The part of the sampler a launch belongs to.
pub const TRANSFORMER: &str = "transformer";
pub const DECODER: &str = "decoder";

/// One recorded launch (kernel entry point or "gemm").
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub name: &'static str,
    pub part: &'static str,
    pub traffic: Traffic,
}

/// A device's launches since the last [`Ledger::clear`] (recorded when issued: eagerly, or
/// while a graph is captured; a graph replay adds nothing).
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub records: Vec<Record>,
}

impl Ledger {
    pub fn clear(&mut self) {
        self.records.clear();
    }

    /// Launches of `part` (all parts with None).
    pub fn launches(&self, part: Option<&str>) -> usize {
        self.of(part).count()
    }

    /// Summed traffic of `part` (all parts with None).
    pub fn total(&self, part: Option<&str>) -> Traffic {
        self.of(part).fold(Traffic::default(), |a, r| a + r.traffic)
    }

    fn of<'a>(&'a self, part: Option<&'a str>) -> impl Iterator<Item = &'a Record> + 'a {
        self.records
            .iter()
            .filter(move |r| part.is_none_or(|p| r.part == p))
    }

    /// Per (part, name): launches and summed traffic, in first-launch order.
    pub fn by_name(&self) -> Vec<(&'static str, &'static str, usize, Traffic)> {
        let mut out: Vec<(&'static str, &'static str, usize, Traffic)> = Vec::new();
        for r in &self.records {
            match out
                .iter_mut()
                .find(|(p, n, _, _)| *p == r.part && *n == r.name)
            {
                Some(e) => {
                    e.2 += 1;
                    e.3 += r.traffic;
                }
                None => out.push((r.part, r.name, 1, r.traffic)),
            }
        }
        out
    }
}

/// A device for [`model_ms`]: memory bandwidth and dense 16-bit tensor peak.
#[derive(Clone, Copy, Debug)]
pub struct Roof {
    pub name: &'static str,
    /// Bytes per second.
    pub bandwidth: f64,
    /// FLOP per second.
    pub flops: f64,
}

/// H100 SXM: 3.35 TB/s HBM3, ~989 dense bf16 TFLOP/s.
pub const H100: Roof = Roof {
    name: "h100",
    bandwidth: 3.35e12,
    flops: 989.4e12,
};
/// H200: 4.8 TB/s HBM3e, the same tensor cores as the H100 SXM.
pub const H200: Roof = Roof {
    name: "h200",
    bandwidth: 4.8e12,
    flops: 989.4e12,
};
/// The assumed fixed cost of one eager launch (launch latency and the tail of a small
/// kernel), microseconds. A replayed CUDA graph costs less per node; the model does not
/// claim to know how much.
pub const LAUNCH_US: f64 = 3.0;

/// Modelled milliseconds of `records` on `roof`: the sum over launches of
/// max(bytes / bandwidth, FLOPs / peak) plus `launch_us` per launch. A model, not a
/// measurement: no overlap between launches, every kernel at its roofline.
pub fn model_ms<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    roof: Roof,
    launch_us: f64,
) -> f64 {
    records
        .into_iter()
        .map(|r| {
            let t = r.traffic;
            (t.bytes() as f64 / roof.bandwidth).max(t.flops as f64 / roof.flops) * 1e3
                + launch_us * 1e-3
        })
        .sum()
}

/// What one audited launch declared and what the emulated kernel was seen to touch
/// (`Gpu::set_audit`): `written` counts bytes of the launch's buffers whose value changed
/// (a lower bound of the bytes written: outputs start poisoned); `read` counts bytes of its
/// floating-point buffers whose perturbation changed any output (a lower bound of the bytes
/// read); `unprobed` is the size of the integer buffers the launch was given, which are not
/// perturbed (a changed index could send the kernel out of bounds).
#[derive(Clone, Debug)]
pub struct AuditRecord {
    pub name: &'static str,
    pub declared: Traffic,
    pub written: u64,
    pub read: u64,
    pub unprobed: u64,
    /// Launches of this name audited so far (the record is the last).
    pub audits: u32,
}
