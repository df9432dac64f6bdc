//! `origami plan --calibrate`: measures this machine and writes the `local` hardware
//! description the planner reads with `--hardware local`.
//!
//! Each rate is measured the way the planner charges it, so that the planner, given the same
//! work, gives back the measured time:
//! - **peak**: the best f32 GEMM rate over large square products (as `origami bench` reports
//!   it, the MFU denominator);
//! - **GEMM, grouped GEMM, attention efficiencies**: forward + backward of the kernels the
//!   layers call, at shapes of the presets, as FLOPs over `peak × time` (attention also as the
//!   masked blocks of a context-parallel ring);
//! - **memory bandwidth**: SwiGLU and RMSNorm forward/backward, as the bytes the planner counts
//!   for them over their time; the optimizer step (gradient norm, clipping, AdamW over a buffer
//!   far beyond the caches) and the cross-entropy (an exponential per logit) as their own
//!   fractions of it; and one thread's rate for the glue the layers run outside kernels (a
//!   residual add, a row permutation);
//! - **collectives**: all-reduce, all-gather, all-to-all and point-to-point of the local backend
//!   on four ranks, as bytes each rank sends over the time (bandwidth) and the time of a
//!   4 KiB call (latency);
//! - **runtime**: the resident memory of this process before anything is allocated (binary,
//!   libraries, thread pools), the fixed cost of every origami process; and glibc's heap
//!   retention rule (the process allocates through glibc's malloc).
//!
//! The ranks of a local run are threads sharing these cores, so the description marks the
//! rates as shared by a node's ranks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use origami_comm::local::LocalWorld;
use origami_comm::{Communicator, ReduceOp};
use origami_kernels::attention::{
    attention_backward, attention_forward, AttentionShape, QkvLayout,
};
use origami_kernels::cross_entropy::cross_entropy_forward_backward;
use origami_kernels::grouped_matmul::{grouped_linear_backward, grouped_linear_forward};
use origami_kernels::masked_attention::{
    attention_row_dots, masked_attention_backward, masked_attention_forward,
    merge_partial_attention, MaskedAttentionShape,
};
use origami_kernels::matmul::{linear_backward, linear_forward, LinearGrads, Par};
use origami_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use origami_kernels::swiglu::{swiglu_backward, swiglu_forward};
use origami_plan::hardware::{Device, Efficiency, Engine, LinkRates, Network, Rate, Runtime};
use origami_plan::{Hardware, MixedPrecision};

use crate::bench::peak_gemm_gflops;
use crate::layers::context_parallel::local_positions;
use crate::model::chunk::OUTPUT_CHUNK_ROWS;
use crate::optim::adamw::AdamWConfig;
use crate::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use crate::params::{Buffers, Init, ParamGroup, ParamRegistry};

/// Timed repetitions of each measurement (after one untimed run); the median counts.
const REPEATS: usize = 5;
/// Ranks of the collective measurements.
const COMM_RANKS: usize = 4;
/// Bytes each rank sends per collective for the bandwidth.
const COMM_BYTES: usize = 16 << 20;
/// Bytes per collective for the latency.
const LATENCY_BYTES: usize = 4 << 10;

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

/// The median of `REPEATS` timings of `run`, after one untimed call.
fn median_seconds(mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[REPEATS / 2]
}

fn filled(len: usize, value: f32) -> Vec<f32> {
    (0..len)
        .map(|i| value * (1.0 + (i % 7) as f32 / 7.0))
        .collect()
}

/// FLOP/s of linear forward + backward (input and weight gradients) over preset shapes.
fn gemm_rate() -> f64 {
    // (rows, in, out): small's q/k/v and output projections and a dense MLP's down projection
    // at 4 × 1,024 tokens.
    let shapes = [(4096, 512, 1024), (4096, 512, 512), (4096, 1024, 512)];
    let (mut flops, mut seconds) = (0.0, 0.0);
    for (rows, input, output) in shapes {
        let x = filled(rows * input, 0.01);
        let w = filled(output * input, 0.02);
        let dy = filled(rows * output, 0.03);
        let mut y = vec![0.0; rows * output];
        let mut dx = vec![0.0; rows * input];
        let mut dw = vec![0.0; output * input];
        seconds += median_seconds(|| {
            linear_forward(&mut y, &x, &w, None, rows, input, output, Par::All);
            linear_backward(
                LinearGrads {
                    input: Some(&mut dx),
                    accumulate_input: false,
                    weight: Some(&mut dw),
                    bias: None,
                },
                &dy,
                &x,
                &w,
                rows,
                input,
                output,
                Par::All,
            );
        });
        flops += 6.0 * (rows * input * output) as f64;
    }
    flops / seconds
}

/// FLOP/s of the grouped expert GEMMs forward + backward: 16 experts of 512 rows (small's
/// 8,192 routed rows), fc1 512 → 2,048 and fc2 1,024 → 512.
fn grouped_gemm_rate() -> f64 {
    let (experts, rows) = (16, 512);
    let offsets: Vec<usize> = (0..=experts).map(|e| e * rows).collect();
    let total = experts * rows;
    let (mut flops, mut seconds) = (0.0, 0.0);
    for (input, output) in [(512, 2048), (1024, 512)] {
        let x = filled(total * input, 0.01);
        let w = filled(experts * output * input, 0.02);
        let dy = filled(total * output, 0.03);
        let mut y = vec![0.0; total * output];
        let mut dx = vec![0.0; total * input];
        let mut dw = vec![0.0; experts * output * input];
        seconds += median_seconds(|| {
            grouped_linear_forward(&mut y, &x, &w, &offsets, input, output);
            grouped_linear_backward(Some(&mut dx), &mut dw, &dy, &x, &w, &offsets, input, output);
        });
        flops += 6.0 * (total * input * output) as f64;
    }
    flops / seconds
}

/// FLOP/s of causal attention forward + backward at small's shape (one sequence of 1,024,
/// 8 heads over 4 groups of dim 64), counted as the planner counts it: forward
/// `2 · s² · head_dim · heads`, backward twice that.
fn attention_rate() -> f64 {
    let shape = AttentionShape {
        batch: 4,
        seq: 1024,
        heads: 8,
        kv_heads: 4,
        head_dim: 64,
    };
    let width = (shape.heads + 2 * shape.kv_heads) * shape.head_dim;
    let layout = QkvLayout {
        row_stride: width,
        q_offset: 0,
        k_offset: shape.heads * shape.head_dim,
        v_offset: (shape.heads + shape.kv_heads) * shape.head_dim,
    };
    let tokens = shape.batch * shape.seq;
    let qkv = filled(tokens * width, 0.05);
    let dout = filled(tokens * shape.heads * shape.head_dim, 0.01);
    let mut out = vec![0.0; tokens * shape.heads * shape.head_dim];
    let mut dqkv = vec![0.0; tokens * width];
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let seconds = median_seconds(|| {
        let lse = attention_forward(&mut out, &qkv, layout, shape, scale);
        attention_backward(&mut dqkv, &dout, &out, &qkv, &lse, layout, shape, scale);
    });
    let forward = 2.0
        * shape.batch as f64
        * (shape.seq as f64).powi(2)
        * (shape.head_dim * shape.heads) as f64;
    3.0 * forward / seconds
}

/// FLOP/s of one cp rank's attention under context parallelism 2 at small's shape (4 sequences
/// of 1,024 tokens, 8 heads over 4 groups of dim 64), counted as the planner counts it (the
/// rank's half of the causal work): the ring's two masked blocks and their merge forward, the
/// row dots and two masked blocks backward. The exchange is left out (the planner charges it).
fn context_attention_rate() -> f64 {
    let (batch, seq, cp) = (4, 1024, 2);
    let shape = MaskedAttentionShape {
        batch,
        q_len: seq / cp,
        kv_len: seq / cp,
        heads: 8,
        kv_heads: 4,
        head_dim: 64,
    };
    let mine = local_positions(seq, cp, 0);
    let theirs = local_positions(seq, cp, 1);
    let q = filled(shape.q_elements(), 0.05);
    let kv = filled(shape.kv_elements(), 0.04);
    let dout = filled(shape.q_elements(), 0.01);
    let mut out = vec![0.0; shape.q_elements()];
    let mut part = vec![0.0; shape.q_elements()];
    let mut dq = vec![0.0; shape.q_elements()];
    let mut dkv = vec![0.0; shape.kv_elements()];
    let scale = 1.0 / 8.0;
    let seconds = median_seconds(|| {
        let mut lse = masked_attention_forward(&mut out, &q, &kv, &mine, &mine, shape, scale);
        let part_lse = masked_attention_forward(&mut part, &q, &kv, &mine, &theirs, shape, scale);
        merge_partial_attention(&mut out, &mut lse, &part, &part_lse, shape);
        let dots = attention_row_dots(&dout, &out, shape);
        for kv_positions in [&mine, &theirs] {
            masked_attention_backward(
                &mut dq,
                &mut dkv,
                &dout,
                &q,
                &kv,
                &lse,
                &dots,
                &mine,
                kv_positions,
                shape,
                scale,
            );
        }
    });
    let forward = 2.0 * batch as f64 * (seq as f64).powi(2) * (8 * 64) as f64 / cp as f64;
    3.0 * forward / seconds
}

/// Bytes/s of the element-wise kernels, counting their bytes as the planner does: SwiGLU
/// forward 3·f and backward 5·f per row, RMSNorm forward 2·h and backward 3·h per row (f32).
fn memory_rate() -> f64 {
    let (rows, ffn, hidden) = (4096, 1024, 512);
    let gate_up = filled(rows * 2 * ffn, 0.1);
    let dh = filled(rows * ffn, 0.01);
    let mut h = vec![0.0; rows * ffn];
    let mut dgate_up = vec![0.0; rows * 2 * ffn];
    let swiglu = median_seconds(|| {
        swiglu_forward(&mut h, &gate_up, ffn);
        swiglu_backward(&mut dgate_up, &dh, &gate_up, ffn);
    });
    let x = filled(rows * hidden, 0.3);
    let weight = filled(hidden, 1.0);
    let dy = filled(rows * hidden, 0.01);
    let mut y = vec![0.0; rows * hidden];
    let mut dx = vec![0.0; rows * hidden];
    let mut dweight = vec![0.0; hidden];
    let norm = median_seconds(|| {
        let rstd = rmsnorm_forward(&mut y, &x, &weight, hidden, 1e-5);
        rmsnorm_backward(&mut dx, &mut dweight, &dy, &x, &weight, &rstd, hidden);
    });
    let bytes = 4.0 * ((rows * 8 * ffn) as f64 + (rows * 5 * hidden) as f64);
    bytes / (swiglu + norm)
}

/// Bytes/s of the optimizer step as the trainer runs it (gradient norm, clipping, AdamW) over
/// a buffer far larger than the caches, counting 28 bytes per parameter as the planner charges
/// the update (moments read and written, gradient read, weight read and written; f32).
fn optimizer_rate() -> f64 {
    let params = 32 << 20;
    let mut registry = ParamRegistry::default();
    registry.register(
        "calibration.weight".into(),
        &[params],
        ParamGroup::Dense,
        Init::Constant(0.02),
    );
    let mut optimizer = ParallelOptimizer::new(
        &registry,
        AdamWConfig::default(),
        OptimizerGroups::single(),
        false,
        1 << 22,
    );
    let mut weights = Buffers {
        dense: filled(params, 0.02),
        expert: Vec::new(),
    };
    let mut grads = Buffers {
        dense: filled(params, 0.001),
        expert: Vec::new(),
    };
    let seconds = median_seconds(|| {
        optimizer
            .step(&registry, &mut weights, &mut grads, 1e-4)
            .expect("a one-rank optimizer step");
    });
    28.0 * params as f64 / seconds
}

/// Bytes/s of the output layer's cross-entropy (forward and backward fused, one chunk of
/// `OUTPUT_CHUNK_ROWS` rows of the `small` preset's vocabulary), counting its bytes as the
/// planner does: the logits read twice forward, read and written backward (f32).
fn cross_entropy_rate() -> f64 {
    let (rows, vocab) = (OUTPUT_CHUNK_ROWS, 8192);
    let targets: Vec<u32> = (0..rows).map(|r| (r * 7919 % vocab) as u32).collect();
    let mut logits = filled(rows * vocab, 0.1);
    let seconds = median_seconds(|| {
        cross_entropy_forward_backward(&mut logits, &targets, vocab, 0.0, 1.0);
    });
    4.0 * 4.0 * (rows * vocab) as f64 / seconds
}

/// Bytes/s of the glue the layers run on their own thread, counted as the planner counts it:
/// a residual add (read two, write one) and a row permutation (read one, write one).
fn core_memory_rate() -> f64 {
    let (rows, width) = (8192, 512);
    let x = filled(rows * width, 0.1);
    let mut y = filled(rows * width, 0.2);
    let add = median_seconds(|| {
        y.iter_mut().zip(&x).for_each(|(y, x)| *y += x);
        std::hint::black_box(&mut y);
    });
    let order: Vec<usize> = (0..rows).map(|r| r * 4099 % rows).collect();
    let mut permuted = vec![0.0f32; rows * width];
    let permute = median_seconds(|| {
        for (row, &from) in permuted.chunks_mut(width).zip(&order) {
            row.copy_from_slice(&x[from * width..(from + 1) * width]);
        }
        std::hint::black_box(&mut permuted);
    });
    4.0 * (5 * rows * width) as f64 / (add + permute)
}

/// The local backend's collectives on [`COMM_RANKS`] ranks: bandwidth and latency of each.
fn collective_rates() -> anyhow::Result<LinkRates> {
    let rates = LocalWorld::new(COMM_RANKS)
        .run(|comm| measure_collectives(comm.as_ref()))
        .map_err(|e| anyhow::anyhow!("measuring the local backend: {e}"))?;
    Ok(rates[0])
}

/// Seconds per call of `op` on `bytes` per rank, the slowest rank's median.
fn collective_seconds(
    comm: &dyn Communicator,
    bytes: usize,
    op: &dyn Fn(&dyn Communicator, usize) -> origami_comm::Result<()>,
) -> origami_comm::Result<f64> {
    let mut failure = None;
    let mut seconds = median_seconds(|| {
        if let Err(e) = comm.barrier().and_then(|_| op(comm, bytes)) {
            failure = Some(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let mut slowest = [seconds as f32];
    comm.all_reduce(&mut slowest, ReduceOp::Max)?;
    seconds = f64::from(slowest[0]);
    Ok(seconds)
}

/// One collective's [`Rate`]: `sent(bytes)` is what the planner counts a rank as sending.
fn rate(
    comm: &dyn Communicator,
    op: &dyn Fn(&dyn Communicator, usize) -> origami_comm::Result<()>,
    sent: &dyn Fn(usize) -> f64,
) -> origami_comm::Result<Rate> {
    let large = collective_seconds(comm, COMM_BYTES, op)?;
    let small = collective_seconds(comm, LATENCY_BYTES, op)?;
    let bandwidth = (sent(COMM_BYTES) - sent(LATENCY_BYTES)) / (large - small).max(1e-9);
    Ok(Rate {
        bandwidth,
        latency: (small - sent(LATENCY_BYTES) / bandwidth).max(0.0),
    })
}

fn measure_collectives(comm: &dyn Communicator) -> origami_comm::Result<LinkRates> {
    let n = comm.size();
    let share = (n - 1) as f64 / n as f64;
    let elements = |bytes: usize| bytes / std::mem::size_of::<f32>();
    let all_reduce = rate(
        comm,
        &|c, bytes| c.all_reduce(&mut vec![1.0; elements(bytes)], ReduceOp::Sum),
        &|bytes| 2.0 * share * bytes as f64,
    )?;
    let all_gather = rate(
        comm,
        &|c, bytes| {
            let each = elements(bytes) / n;
            let mut recv = vec![0.0; each * n];
            c.all_gather_v(&vec![1.0; each], &vec![each; n], &mut recv)
        },
        &|bytes| share * bytes as f64,
    )?;
    let all_to_all = rate(
        comm,
        &|c, bytes| {
            let each = elements(bytes) / n;
            let mut recv = vec![0.0; each * n];
            c.all_to_all_v(
                &vec![1.0; each * n],
                &vec![each; n],
                &mut recv,
                &vec![each; n],
            )
        },
        &|bytes| share * bytes as f64,
    )?;
    let p2p = rate(
        comm,
        &|c, bytes| {
            let peer = c.rank() ^ 1;
            let mut recv = vec![0.0; elements(bytes)];
            c.send_recv(&vec![1.0; elements(bytes)], peer, &mut recv, peer, 7)
        },
        &|bytes| bytes as f64,
    )?;
    Ok(LinkRates {
        all_reduce,
        all_gather,
        all_to_all,
        p2p,
    })
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

/// Measures this machine; `progress` hears each figure as it is measured.
pub fn calibrate(progress: &mut dyn FnMut(&str)) -> anyhow::Result<Hardware> {
    let baseline = resident_mib();
    let threads = rayon::current_num_threads();
    progress(&format!(
        "process baseline {baseline:.1} MiB resident, {threads} kernel threads"
    ));
    let peak = (0..2).map(|_| peak_gemm_gflops()).fold(0.0, f64::max) * 1e9;
    progress(&format!("peak f32 GEMM {:.1} GFLOP/s", peak / 1e9));
    let gemm = gemm_rate();
    progress(&format!(
        "linear forward+backward {:.1} GFLOP/s",
        gemm / 1e9
    ));
    let grouped = grouped_gemm_rate();
    progress(&format!(
        "grouped expert GEMMs {:.1} GFLOP/s",
        grouped / 1e9
    ));
    let attention = attention_rate();
    progress(&format!("causal attention {:.1} GFLOP/s", attention / 1e9));
    let context_attention = context_attention_rate();
    progress(&format!(
        "context-parallel attention blocks {:.1} GFLOP/s",
        context_attention / 1e9
    ));
    let memory = memory_rate();
    progress(&format!("element-wise kernels {:.2} GB/s", memory / 1e9));
    let optimizer = optimizer_rate();
    progress(&format!(
        "optimizer step {:.2} GB/s as charged",
        optimizer / 1e9
    ));
    let cross_entropy = cross_entropy_rate();
    progress(&format!(
        "cross-entropy {:.2} GB/s as charged",
        cross_entropy / 1e9
    ));
    let core_memory = core_memory_rate();
    progress(&format!("one-thread glue {:.2} GB/s", core_memory / 1e9));
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
    let fraction = |rate: f64| (rate / peak).min(1.0);
    Ok(Hardware {
        name: "local".into(),
        description: format!(
            "this machine, measured by `origami plan --calibrate` ({threads} kernel threads, local backend)"
        ),
        device: Device {
            peak_flops_bf16: None,
            peak_flops_f32: Some(peak),
            memory_gib,
            memory_bandwidth: memory,
            devices_per_node: None,
            shared_by_ranks: true,
            cores: Some(cores),
            core_memory_bandwidth: Some(core_memory),
        },
        efficiency: Efficiency {
            gemm: fraction(gemm),
            grouped_gemm: fraction(grouped),
            attention: fraction(attention),
            context_attention: fraction(context_attention),
            memory: 1.0,
            optimizer: Some(optimizer / memory),
            cross_entropy: Some(cross_entropy / memory),
            bf16: None,
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

/// Calibrates and writes the description to [`local_path`]; returns the path.
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
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok((path, hardware))
}
