//! `origami plan --calibrate`: measures this machine and writes the `local` hardware
//! description the planner reads with `--hardware local`.
//!
//! Each rate is measured the way the layers run the work and counted the way the planner
//! charges it, so that the planner, given the same work, gives back the measured time
//! (`kernels.rs`):
//! - **GEMM, grouped GEMM, attention efficiencies**, in f32 and in bf16 (`[efficiency.bf16]`,
//!   with the kernel this CPU runs bf16 on): forward + backward of the kernels the layers call,
//!   at shapes of the presets, as FLOPs over `peak × time` (attention also as the masked blocks
//!   of a context-parallel ring);
//! - **peak**: per precision, the best GEMM rate seen, the large square products `origami
//!   bench` divides its MFU by or the probes above, whichever ran faster (a fraction of a peak
//!   measured in a slow moment would otherwise exceed 1);
//! - **memory bandwidth**: SwiGLU and RMSNorm forward/backward, as the bytes the planner counts
//!   for them over their time; the optimizer step (gradient norm, clipping, AdamW over a buffer
//!   far beyond the caches, and the bf16 weight copies in bf16) and the cross-entropy (an
//!   exponential per logit) as their own fractions of it; and one thread's rate for the glue the
//!   layers run outside kernels (a residual add, a row permutation);
//! - **collectives**: all-reduce, all-gather, all-to-all and point-to-point of the local backend
//!   on four ranks, as bytes each rank sends over the time (bandwidth) and the time of a
//!   4 KiB call (latency) (`collectives.rs`);
//! - **runtime**: the resident memory of this process before anything is allocated (binary,
//!   libraries, thread pools), the fixed cost of every origami process; and glibc's heap
//!   retention rule (the process allocates through glibc's malloc).
//!
//! The kernel probes are interleaved over rounds (each rate a median over the same minutes), so
//! that a slow spell of a shared machine moves every rate together. The ranks of a local run
//! are threads sharing these cores, so the description marks the rates as shared by a node's
//! ranks.

mod collectives;
mod kernels;

use std::path::PathBuf;

use anyhow::Context;
use origami_plan::hardware::{Device, Efficiency, Engine, KernelEfficiency, Network, Runtime};
use origami_plan::{Hardware, MixedPrecision, Precision};

use crate::bench::{peak_gemm_gflops, peak_gemm_gflops_bf16};
use crate::compute::{Compute, PrecisionSetting};
use crate::model::chunk::OUTPUT_CHUNK_ROWS;
use crate::tensor_files::write_replacing;
use collectives::{collective_rates, COMM_RANKS};
use kernels::{interleaved_rates, Probe};
use origami_kernels::matmul_bf16::Bf16Kernel;

/// glibc's malloc raises its mmap threshold up to 32 MiB (`DEFAULT_MMAP_THRESHOLD_MAX` on
/// 64-bit) and trims the heap top only beyond twice the threshold: at most 64 MiB retained.
pub const GLIBC_HEAP_RETENTION_CAP_MIB: f64 = 64.0;

/// Where `local` lives: `$ORIGAMI_HARDWARE_DIR/local.toml`, else
/// `$XDG_CONFIG_HOME/origami/local.toml`, else `~/.config/origami/local.toml`.
pub fn local_path() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ORIGAMI_HARDWARE_DIR") {
        return Ok(PathBuf::from(dir).join("local.toml"));
    }
    let config = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CONFIG_HOME nor HOME is set")?,
        )
        .join(".config"),
    };
    Ok(config.join("origami").join("local.toml"))
}

/// A value from `/proc/self/status` or `/proc/meminfo`, in MiB (`key:  N kB`).
fn proc_mib(file: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The resident memory of this process now, MiB.
pub fn resident_mib() -> f64 {
    proc_mib("/proc/self/status", "VmRSS:").unwrap_or(0.0)
}

/// How origami's CPU engine trains: every collective blocks (nothing overlaps), tensor-parallel
/// regions keep their gathered input, the glue between kernels (residual adds, router,
/// permutation) runs on the rank's own thread, the dispatcher has no cost beyond its
/// all-to-alls and copies, the output layer computes [`OUTPUT_CHUNK_ROWS`] rows of logits at a
/// time, and bf16 keeps f32 master weights beside their bf16 copies with only GEMM inputs in
/// bf16 ([`MixedPrecision::Origami`]).
pub fn origami_engine() -> Engine {
    Engine {
        overlap_tensor_parallel: false,
        overlap_context_parallel: false,
        overlap_gradient_reduce: false,
        overlap_param_gather: false,
        overlap_interleaved_pipeline: false,
        regather_sequence_parallel_inputs: false,
        serial_glue: true,
        dispatch_overhead_per_byte: 0.0,
        output_chunk_rows: Some(OUTPUT_CHUNK_ROWS),
        mixed_precision: MixedPrecision::Origami,
    }
}

/// One precision's compute rates: its peak and each kernel's FLOP/s (the optimizer's in bytes/s
/// as charged).
struct ComputeRates {
    peak: f64,
    gemm: f64,
    grouped_gemm: f64,
    attention: f64,
    context_attention: f64,
    optimizer: f64,
}

impl ComputeRates {
    /// The kernels' fractions of the peak, the optimizer's of `memory` bytes/s.
    fn efficiency(&self, memory: f64) -> KernelEfficiency {
        KernelEfficiency {
            gemm: self.gemm / self.peak,
            grouped_gemm: self.grouped_gemm / self.peak,
            attention: self.attention / self.peak,
            context_attention: self.context_attention / self.peak,
            optimizer: Some(self.optimizer / memory),
        }
    }
}

/// Probes per precision: [`ComputeRates`]' fields after the peak, in order.
const COMPUTE_PROBES: usize = 5;

/// The compute probes of one precision, in [`ComputeRates`]' order.
fn compute_probes(compute: Compute) -> [Probe<'static>; COMPUTE_PROBES] {
    let precision = if compute.is_bf16() {
        Precision::Bf16
    } else {
        Precision::F32
    };
    let b = precision.bytes(MixedPrecision::Origami);
    [
        kernels::gemm(compute),
        kernels::grouped_gemm(compute),
        kernels::attention(compute),
        kernels::context_attention(compute),
        kernels::optimizer(compute, 2.0 * b.optimizer + b.gradient + 2.0 * b.weight),
    ]
}

/// Measures this machine; `progress` hears each figure as it is measured.
pub fn calibrate(progress: &mut dyn FnMut(&str)) -> anyhow::Result<Hardware> {
    let baseline = resident_mib();
    let threads = rayon::current_num_threads();
    progress(&format!(
        "process baseline {baseline:.1} MiB resident, {threads} kernel threads"
    ));
    // bf16 on the kernel the layers would run it on here: vdpbf16ps where the CPU has it.
    let bf16 = Compute::resolve(PrecisionSetting::Bf16, false);
    let bursts = [
        (0..2).map(|_| peak_gemm_gflops()).fold(0.0, f64::max) * 1e9,
        (0..2).map(|_| peak_gemm_gflops_bf16()).fold(0.0, f64::max) * 1e9,
    ];
    let mut probes = Vec::from(compute_probes(Compute::F32));
    probes.extend(compute_probes(bf16));
    probes.extend([
        kernels::elementwise(),
        kernels::cross_entropy(),
        kernels::glue(),
    ]);
    progress(&format!(
        "timing {} kernel probes, interleaved over {} rounds",
        probes.len(),
        kernels::ROUNDS
    ));
    let rates = interleaved_rates(&mut probes);
    for (probe, &rate) in probes.iter().zip(&rates) {
        progress(&probe.describe(rate));
    }
    let per_precision = |rates: &[f64], burst: f64| {
        let [gemm, grouped_gemm, attention, context_attention, optimizer] = rates[..] else {
            unreachable!("{COMPUTE_PROBES} compute probes per precision")
        };
        ComputeRates {
            peak: [gemm, grouped_gemm, attention, context_attention]
                .into_iter()
                .fold(burst, f64::max),
            gemm,
            grouped_gemm,
            attention,
            context_attention,
            optimizer,
        }
    };
    let (f32_rates, rest) = rates.split_at(COMPUTE_PROBES);
    let (bf16_rates, rest) = rest.split_at(COMPUTE_PROBES);
    let (f32_rates, bf16_rates) = (
        per_precision(f32_rates, bursts[0]),
        per_precision(bf16_rates, bursts[1]),
    );
    let [memory, cross_entropy, core_memory] = rest[..] else {
        unreachable!("three memory probes")
    };
    let bf16_kernel = match bf16 {
        Compute::Bf16(Bf16Kernel::Dpbf16) => "vdpbf16ps",
        _ => "the portable kernel: no AVX512_BF16 here",
    };
    progress(&format!(
        "peak f32 {:.1} GFLOP/s, bf16 {:.1} GFLOP/s ({bf16_kernel})",
        f32_rates.peak / 1e9,
        bf16_rates.peak / 1e9,
    ));
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let link = collective_rates()?;
    for (name, r) in [
        ("all-reduce", link.all_reduce),
        ("all-gather", link.all_gather),
        ("all-to-all", link.all_to_all),
        ("point-to-point", link.p2p),
    ] {
        progress(&format!(
            "local {name} on {COMM_RANKS} ranks: {:.2} GB/s per rank, {:.1} µs per call",
            r.bandwidth / 1e9,
            r.latency * 1e6
        ));
    }
    let memory_gib = proc_mib("/proc/meminfo", "MemTotal:").unwrap_or(0.0) / 1024.0;
    let f32_efficiency = f32_rates.efficiency(memory);
    Ok(Hardware {
        name: "local".into(),
        description: format!(
            "this machine, measured by `origami plan --calibrate` ({threads} kernel threads, local backend)"
        ),
        device: Device {
            peak_flops_bf16: Some(bf16_rates.peak),
            peak_flops_f32: Some(f32_rates.peak),
            memory_gib,
            memory_bandwidth: memory,
            devices_per_node: None,
            shared_by_ranks: true,
            cores: Some(cores),
            core_memory_bandwidth: Some(core_memory),
        },
        efficiency: Efficiency {
            gemm: f32_efficiency.gemm,
            grouped_gemm: f32_efficiency.grouped_gemm,
            attention: f32_efficiency.attention,
            context_attention: f32_efficiency.context_attention,
            memory: 1.0,
            optimizer: f32_efficiency.optimizer,
            cross_entropy: Some(cross_entropy / memory),
            bf16: Some(bf16_rates.efficiency(memory)),
        },
        network: Network {
            intra_node: link,
            inter_node: None,
            rings_aggregate_nics: false,
        },
        engine: origami_engine(),
        runtime: Runtime {
            per_rank_mib: 0.0,
            per_process_mib: baseline,
            heap_retention_cap_mib: GLIBC_HEAP_RETENTION_CAP_MIB,
        },
    })
}

/// Calibrates and writes the description to [`local_path`]; returns the path. The file is
/// written beside its place and moved in, so an interrupted write leaves the previous one.
pub fn write_local(progress: &mut dyn FnMut(&str)) -> anyhow::Result<(PathBuf, Hardware)> {
    let hardware = calibrate(progress)?;
    let path = local_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = format!(
        "# Written by `origami plan --calibrate`; `origami plan --hardware local` reads it.\n{}",
        hardware.to_toml()
    );
    write_replacing(&path, text.as_bytes())?;
    Ok((path, hardware))
}
