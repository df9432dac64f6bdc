//! A light, always-compiled step profiler: wall time by phase, accumulated per thread.
//!
//! Code marks what it is doing with [`scope`] (a guard; the phase lasts until it drops). Phases
//! nest and time is exclusive: entering a phase pauses the enclosing one, so the phases of a
//! thread add up to the time it spent inside any of them. Time in the allocator is kept apart
//! ([`record_allocation`], called by the binary's global allocator), charged to
//! [`Phase::Allocation`] and taken out of the phase that allocated. Everything is per thread:
//! a rank's thread accumulates its own phases (GEMMs it hands to the kernel pool are charged
//! to it while it waits), and [`take`] returns and clears the calling thread's totals.
//!
//! Off by default ([`enable`]): a scope then costs one relaxed atomic load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Linear and grouped-linear GEMMs (the router's included).
    Gemm,
    /// The attention core (and RoPE).
    Attention,
    /// Routing: scores, top-k, routing weights, auxiliary losses and their backward.
    Router,
    /// Token permutation around the experts: plans, permute, un-permute, chunk sorts.
    Permutation,
    /// Norms and element-wise passes: RMSNorm, residual adds, SwiGLU, embedding, gates.
    Elementwise,
    /// The output layer's cross-entropy.
    Loss,
    /// Rounding to bf16: activations, output gradients and the per-step weight copies.
    Convert,
    /// The optimizer: the gradients' zeroing before the step, gradient norm, clipping, AdamW.
    Optimizer,
    /// Sequence-parallel all-gathers and reduce-scatters over tp (and vocabulary-parallel
    /// embedding and loss reductions).
    CommSequence,
    /// Context-parallel key/value exchanges.
    CommContext,
    /// The MoE dispatcher's all-to-alls and gathers.
    CommDispatch,
    /// Pipeline transfers between stages.
    CommPipeline,
    /// Gradient reductions and parameter gathers of the optimizer.
    CommGradients,
    /// Other reductions: losses, routing statistics, token counts.
    CommOther,
    /// Time inside the memory allocator.
    Allocation,
}

impl Phase {
    /// Every phase, in report order.
    pub const ALL: [Phase; 15] = [
        Phase::Gemm,
        Phase::Attention,
        Phase::Router,
        Phase::Permutation,
        Phase::Elementwise,
        Phase::Loss,
        Phase::Convert,
        Phase::Optimizer,
        Phase::CommSequence,
        Phase::CommContext,
        Phase::CommDispatch,
        Phase::CommPipeline,
        Phase::CommGradients,
        Phase::CommOther,
        Phase::Allocation,
    ];

    /// The phase's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Gemm => "gemm",
            Phase::Attention => "attention",
            Phase::Router => "router",
            Phase::Permutation => "permutation",
            Phase::Elementwise => "norms and element-wise",
            Phase::Loss => "cross-entropy",
            Phase::Convert => "bf16 rounding",
            Phase::Optimizer => "optimizer",
            Phase::CommSequence => "comm: sequence parallel",
            Phase::CommContext => "comm: context parallel",
            Phase::CommDispatch => "comm: expert dispatch",
            Phase::CommPipeline => "comm: pipeline",
            Phase::CommGradients => "comm: gradients",
            Phase::CommOther => "comm: other",
            Phase::Allocation => "allocation",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const PHASES: usize = Phase::ALL.len();
const NONE: u8 = u8::MAX;

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static CURRENT: Cell<u8> = const { Cell::new(NONE) };
    static SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
    static TOTALS: [Cell<u64>; PHASES] = const { [const { Cell::new(0) }; PHASES] };
    static ALLOCATED: [Cell<u64>; PHASES] = const { [const { Cell::new(0) }; PHASES] };
    static ALLOCATED_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Turns the profiler on or off for every thread.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the profiler is on.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A phase in progress on this thread; dropping it returns to the enclosing one.
#[must_use = "the phase ends when the guard drops"]
pub struct Scope {
    previous: Option<u8>,
}

/// Starts `phase` on this thread (a no-op when the profiler is off).
#[inline]
pub fn scope(phase: Phase) -> Scope {
    if !enabled() {
        return Scope { previous: None };
    }
    let previous = switch_to(phase.index() as u8);
    Scope {
        previous: Some(previous),
    }
}

/// Runs `work` as `phase`.
#[inline]
pub fn timed<T>(phase: Phase, work: impl FnOnce() -> T) -> T {
    let _phase = scope(phase);
    work()
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            switch_to(previous);
        }
    }
}

/// Charges the time since the last switch to the current phase and makes `next` current;
/// returns the phase that was.
fn switch_to(next: u8) -> u8 {
    let now = Instant::now();
    let current = CURRENT.with(Cell::get);
    if let Some(since) = SINCE.with(Cell::get) {
        if current != NONE {
            let nanos = now.duration_since(since).as_nanos() as u64;
            TOTALS.with(|t| {
                let cell = &t[current as usize];
                cell.set(cell.get() + nanos);
            });
        }
    }
    SINCE.with(|s| s.set(Some(now)));
    CURRENT.with(|c| c.set(next));
    current
}

/// Records `elapsed` spent in the allocator for `bytes` on this thread (the global allocator
/// calls it while the profiler is on; it never allocates).
#[inline]
pub fn record_allocation(elapsed: Duration, bytes: usize) {
    let current = CURRENT.try_with(Cell::get).unwrap_or(NONE);
    if current == NONE {
        return;
    }
    let nanos = elapsed.as_nanos() as u64;
    let _ = ALLOCATED.try_with(|a| {
        let cell = &a[current as usize];
        cell.set(cell.get() + nanos);
    });
    let _ = ALLOCATED_BYTES.try_with(|b| b.set(b.get() + bytes as u64));
}

/// One thread's time by phase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    /// Seconds in each phase of [`Phase::ALL`], in that order (allocator time in its own).
    pub seconds: Vec<f64>,
    /// Bytes requested from the allocator.
    pub allocated_bytes: u64,
}

impl Profile {
    /// Seconds in `phase`.
    pub fn seconds_in(&self, phase: Phase) -> f64 {
        self.seconds.get(phase.index()).copied().unwrap_or(0.0)
    }

    /// Seconds in every phase together.
    pub fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }
}

/// This thread's totals since the last call, cleared.
pub fn take() -> Profile {
    if enabled() {
        // Close the running phase's stretch so far.
        let current = CURRENT.with(Cell::get);
        switch_to(current);
    }
    let mut seconds = vec![0.0; PHASES];
    let mut in_allocator = 0u64;
    TOTALS.with(|totals| {
        ALLOCATED.with(|allocated| {
            for (i, s) in seconds.iter_mut().enumerate() {
                let (total, allocating) = (totals[i].replace(0), allocated[i].replace(0));
                *s = total.saturating_sub(allocating) as f64 * 1e-9;
                in_allocator += allocating;
            }
        })
    });
    seconds[Phase::Allocation.index()] += in_allocator as f64 * 1e-9;
    Profile {
        seconds,
        allocated_bytes: ALLOCATED_BYTES.with(|b| b.replace(0)),
    }
}

/// Minor page faults of this process so far (Linux `/proc/self/stat`; `None` elsewhere): each
/// is the first touch of a fresh page, which the kernel zeroes.
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is parenthesised and may hold spaces; minflt is field 10.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(7)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_phases_are_exclusive_and_off_costs_nothing() {
        enable(true);
        take();
        {
            let _outer = scope(Phase::Router);
            std::thread::sleep(Duration::from_millis(20));
            {
                let _inner = scope(Phase::Gemm);
                std::thread::sleep(Duration::from_millis(30));
                record_allocation(Duration::from_millis(10), 64);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let p = take();
        let (router, gemm) = (p.seconds_in(Phase::Router), p.seconds_in(Phase::Gemm));
        assert!((0.04..0.06).contains(&router), "router {router}");
        assert!(
            (0.02..0.03).contains(&gemm),
            "gemm {gemm} (30 ms less 10 in the allocator)"
        );
        assert!((p.seconds_in(Phase::Allocation) - 0.01).abs() < 1e-9);
        assert_eq!(p.allocated_bytes, 64);
        enable(false);
        {
            let _off = scope(Phase::Gemm);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(take().total(), 0.0);
    }

    #[test]
    fn touching_fresh_pages_counts_faults() {
        let Some(before) = minor_faults() else {
            return;
        };
        let mut pages = vec![0u8; 64 << 20];
        for page in pages.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&pages);
        let after = minor_faults().unwrap();
        assert!(after > before, "{before} -> {after}");
    }
}
