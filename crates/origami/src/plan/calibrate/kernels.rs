//! The kernel measurements of `origami plan --calibrate`, each run the way the layers run it and
//! counted the way the planner charges it.
//!
//! Every probe is built first and warmed once; then [`ROUNDS`] rounds time each probe once in
//! turn, and each rate is the probe's work over its median time. Interleaving puts every probe
//! in the same spells of a shared machine, so one slow spell cannot skew one rate against the
//! others.
//!
//! The compute probes (GEMMs, grouped GEMMs, attention, context-parallel attention blocks, the
//! optimizer step) run in a given precision through the layers' own entry points: the compute
//! interface ([`Weights`](crate::compute::Weights)) and the context-parallel block kernels
//! ([`BlockKernels`]), so bf16 probes include the roundings the layers make on the way (the
//! output gradient before its two products, q/k/v before the attention core, the bf16 weight
//! copies after the update).

use std::time::Instant;

use origami_kernels::attention::{AttentionShape, QkvLayout};
use origami_kernels::cross_entropy::cross_entropy_forward_backward;
use origami_kernels::masked_attention::{merge_partial_attention, MaskedAttentionShape};
use origami_kernels::matmul::LinearGrads;
use origami_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use origami_kernels::swiglu::{swiglu_backward, swiglu_forward};

use crate::compute::{Compute, Input, LinearShape, WeightCopies};
use crate::layers::context_parallel::{local_positions, BlockKernels};
use crate::model::chunk::OUTPUT_CHUNK_ROWS;
use crate::optim::adamw::AdamWConfig;
use crate::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry};

/// Timed runs of every probe (after one untimed run); the median counts.
pub const ROUNDS: usize = 5;

/// What a probe's work counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Floating-point operations.
    Flops,
    /// Bytes as the planner charges them.
    Bytes,
}

/// One measurement: what it runs, and the work of one run as the planner charges it.
pub struct Probe<'a> {
    /// What it measures, for progress lines.
    pub name: String,
    /// What `work` counts.
    pub unit: Work,
    /// Work of one run.
    pub work: f64,
    run: Box<dyn FnMut() + 'a>,
}

impl<'a> Probe<'a> {
    fn new(name: impl Into<String>, (unit, work): (Work, f64), run: impl FnMut() + 'a) -> Self {
        Probe {
            name: name.into(),
            unit,
            work,
            run: Box::new(run),
        }
    }

    /// `rate` (work per second) for a progress line.
    pub fn describe(&self, rate: f64) -> String {
        match self.unit {
            Work::Flops => format!("{} {:.1} GFLOP/s", self.name, rate / 1e9),
            Work::Bytes => format!("{} {:.2} GB/s as charged", self.name, rate / 1e9),
        }
    }
}

/// Each probe's work per second: one untimed run each, then [`ROUNDS`] rounds timing every
/// probe once in turn; the median of each probe's times.
pub fn interleaved_rates(probes: &mut [Probe]) -> Vec<f64> {
    for probe in probes.iter_mut() {
        (probe.run)();
    }
    let mut times = vec![Vec::with_capacity(ROUNDS); probes.len()];
    for _ in 0..ROUNDS {
        for (probe, times) in probes.iter_mut().zip(&mut times) {
            let start = Instant::now();
            (probe.run)();
            times.push(start.elapsed().as_secs_f64());
        }
    }
    probes
        .iter()
        .zip(times)
        .map(|(probe, mut times)| {
            times.sort_by(f64::total_cmp);
            probe.work / times[ROUNDS / 2]
        })
        .collect()
}

/// Values of a probe's operands: small, varied, never zero.
fn filled(len: usize, value: f32) -> Vec<f32> {
    (0..len)
        .map(|i| value * (1.0 + (i % 7) as f32 / 7.0))
        .collect()
}

/// Parameters of the given shapes in one group, with their master values and the compute
/// precision's copies, as a rank holds them.
struct Params {
    ids: Vec<ParamId>,
    master: Buffers,
    copies: WeightCopies,
}

impl Params {
    fn new(
        compute: Compute,
        group: ParamGroup,
        shapes: impl IntoIterator<Item = Vec<usize>>,
    ) -> Self {
        let mut registry = ParamRegistry::default();
        let ids = shapes
            .into_iter()
            .enumerate()
            .map(|(i, shape)| {
                let name = format!("calibration.{i}.weight");
                registry.register(name, &shape, group, Init::Constant(0.02))
            })
            .collect();
        let mut master = registry.zeros();
        for buffer in master.buffers_mut() {
            *buffer = filled(buffer.len(), 0.02);
        }
        let copies = WeightCopies::new(compute, &master);
        Params {
            ids,
            master,
            copies,
        }
    }
}

/// Linear forward + backward (input and weight gradients) at the `small` preset's projection
/// shapes, 4 × 1,024 tokens (q/k/v, attention output, a dense MLP's down projection); work in
/// FLOPs, `6 · rows · in · out` per shape.
pub fn gemm(compute: Compute) -> Probe<'static> {
    let shapes = [(4096, 512, 1024), (4096, 512, 512), (4096, 1024, 512)];
    let weights = shapes.iter().map(|&(_, i, o)| vec![o, i]);
    let params = Params::new(compute, ParamGroup::Dense, weights);
    let mut grads = params.master.clone();
    let compute_weights = params.copies.weights(&params.master);
    let operands: Vec<_> = shapes
        .iter()
        .map(|&(rows, input, output)| {
            let x = filled(rows * input, 0.01);
            // What the layer keeps for the backward: its input in the compute precision.
            let saved = compute_weights.activation(x.clone());
            (x, saved, filled(rows * output, 0.03))
        })
        .collect();
    let work = shapes
        .iter()
        .map(|&(r, i, o)| 6.0 * (r * i * o) as f64)
        .sum();
    let mut y = Vec::new();
    let mut dx = Vec::new();
    let name = format!("{} linear forward+backward", compute.name());
    Probe::new(name, (Work::Flops, work), move || {
        let weights = params.copies.weights(&params.master);
        for ((&(rows, input, output), (x, saved, dy)), &id) in
            shapes.iter().zip(&operands).zip(&params.ids)
        {
            let shape = LinearShape::new(rows, input, output);
            y.resize(rows * output, 0.0);
            dx.resize(rows * input, 0.0);
            weights.linear_forward(&mut y, Input::F32(x), id, None, shape);
            weights.linear_backward(
                LinearGrads {
                    input: Some(&mut dx),
                    accumulate_input: false,
                    weight: Some(grads.get_mut(id)),
                    bias: None,
                },
                dy,
                saved.input(),
                id,
                shape,
            );
        }
    })
}

/// The grouped expert GEMMs forward + backward: 16 experts of 512 rows (`small`'s 8,192 routed
/// rows), fc1 512 → 2,048 and fc2 1,024 → 512; work `6 · rows · in · out` per projection.
pub fn grouped_gemm(compute: Compute) -> Probe<'static> {
    let (experts, rows) = (16, 512);
    let total = experts * rows;
    let offsets: Vec<usize> = (0..=experts).map(|e| e * rows).collect();
    let projections = [(512, 2048), (1024, 512)];
    let weights = projections.iter().map(|&(i, o)| vec![experts, o, i]);
    let params = Params::new(compute, ParamGroup::Expert, weights);
    let mut grads = params.master.clone();
    let compute_weights = params.copies.weights(&params.master);
    let operands: Vec<_> = projections
        .iter()
        .map(|&(input, output)| {
            let x = filled(total * input, 0.01);
            (compute_weights.activation(x), filled(total * output, 0.03))
        })
        .collect();
    let work = projections
        .iter()
        .map(|&(i, o)| 6.0 * (total * i * o) as f64)
        .sum();
    let mut y = Vec::new();
    let mut dx = Vec::new();
    let name = format!("{} grouped expert GEMMs", compute.name());
    Probe::new(name, (Work::Flops, work), move || {
        let weights = params.copies.weights(&params.master);
        for ((&(input, output), (x, dy)), &id) in projections.iter().zip(&operands).zip(&params.ids)
        {
            y.resize(total * output, 0.0);
            dx.resize(total * input, 0.0);
            weights.grouped_linear_forward(&mut y, x.input(), id, &offsets, (input, output));
            weights.grouped_linear_backward(
                Some(&mut dx),
                grads.get_mut(id),
                dy,
                x.input(),
                id,
                &offsets,
                (input, output),
            );
        }
    })
}

/// Causal attention forward + backward at `small`'s shape (4 sequences of 1,024 tokens, 8 heads
/// over 4 groups of dim 64), work as the planner counts it: forward `2 · s² · head_dim · heads`
/// per sequence, backward twice that.
pub fn attention(compute: Compute) -> Probe<'static> {
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
    let params = Params::new(compute, ParamGroup::Dense, []);
    let qkv = filled(tokens * width, 0.05);
    let dout = filled(tokens * shape.heads * shape.head_dim, 0.01);
    let mut out = vec![0.0; tokens * shape.heads * shape.head_dim];
    let mut dqkv = vec![0.0; tokens * width];
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let forward = 2.0
        * shape.batch as f64
        * (shape.seq as f64).powi(2)
        * (shape.head_dim * shape.heads) as f64;
    let name = format!("{} causal attention", compute.name());
    Probe::new(name, (Work::Flops, 3.0 * forward), move || {
        let weights = params.copies.weights(&params.master);
        let lse = weights.attention_forward(&mut out, &qkv, (layout, shape), scale);
        weights.attention_backward(&mut dqkv, &dout, &out, &qkv, &lse, (layout, shape), scale);
    })
}

/// One cp rank's attention under context parallelism 2 at `small`'s shape (4 sequences of
/// 1,024 tokens, 8 heads over 4 groups of dim 64) through the ring's block kernels, the
/// exchange left out (the planner charges it): its own block packed as it travels, the peer's
/// arriving packed (the same values serve), forward both blocks and their merge, backward the
/// row dots and both blocks. Work as the planner counts it: the rank's half of the causal work.
pub fn context_attention(compute: Compute) -> Probe<'static> {
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
    let forward = 2.0 * batch as f64 * (seq as f64).powi(2) * (8 * 64) as f64 / cp as f64;
    let name = format!("{} context-parallel attention blocks", compute.name());
    Probe::new(name, (Work::Flops, 3.0 * forward), move || {
        let kernels = BlockKernels::new(compute, &q, Some(&dout));
        let block = kernels.pack(&kv);
        let mut lse = kernels.forward(&mut out, &q, &block, &mine, &mine, shape, scale);
        let part_lse = kernels.forward(&mut part, &q, &block, &mine, &theirs, shape, scale);
        merge_partial_attention(&mut out, &mut lse, &part, &part_lse, shape);
        let dots = kernels.row_dots(&dout, &out, shape);
        for positions in [&mine, &theirs] {
            kernels.backward(
                &mut dq, &mut dkv, &dout, &q, &block, &lse, &dots, &mine, positions, shape, scale,
            );
        }
    })
}

/// The optimizer step as the trainer runs it (gradient norm, clipping, AdamW, then the bf16
/// weight copies remade in bf16) over 32 M parameters, far beyond the caches; work in the bytes
/// the planner charges the update per parameter, `2 · optimizer + gradient + 2 · weight`
/// (`optimizer_bytes`).
pub fn optimizer(compute: Compute, optimizer_bytes: f64) -> Probe<'static> {
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
    let mut copies = WeightCopies::new(compute, &weights);
    let mut grads = Buffers {
        dense: filled(params, 0.001),
        expert: Vec::new(),
    };
    let name = format!("{} optimizer step", compute.name());
    let work = optimizer_bytes * params as f64;
    Probe::new(name, (Work::Bytes, work), move || {
        optimizer
            .step(&registry, &mut weights, &mut grads, 1e-4)
            .expect("a one-rank optimizer step");
        copies.refresh(&weights);
    })
}

/// The element-wise kernels, their bytes counted as the planner counts them: SwiGLU forward
/// `3·f` and backward `5·f` per row, RMSNorm forward `2·h` and backward `3·h` per row (f32, as
/// the layers run them in either precision).
pub fn elementwise() -> Probe<'static> {
    let (rows, ffn, hidden) = (4096, 1024, 512);
    let gate_up = filled(rows * 2 * ffn, 0.1);
    let dh = filled(rows * ffn, 0.01);
    let mut h = vec![0.0; rows * ffn];
    let mut dgate_up = vec![0.0; rows * 2 * ffn];
    let x = filled(rows * hidden, 0.3);
    let weight = filled(hidden, 1.0);
    let dy = filled(rows * hidden, 0.01);
    let mut y = vec![0.0; rows * hidden];
    let mut dx = vec![0.0; rows * hidden];
    let mut dweight = vec![0.0; hidden];
    let work = 4.0 * ((rows * 8 * ffn) as f64 + (rows * 5 * hidden) as f64);
    Probe::new("element-wise kernels", (Work::Bytes, work), move || {
        swiglu_forward(&mut h, &gate_up, ffn);
        swiglu_backward(&mut dgate_up, &dh, &gate_up, ffn);
        let rstd = rmsnorm_forward(&mut y, &x, &weight, hidden, 1e-5);
        rmsnorm_backward(&mut dx, &mut dweight, &dy, &x, &weight, &rstd, hidden);
    })
}

/// The output layer's cross-entropy (forward and backward fused) over one chunk of
/// `OUTPUT_CHUNK_ROWS` rows of the `small` preset's vocabulary, its bytes counted as the planner
/// does: the logits read twice forward, read and written backward (f32).
pub fn cross_entropy() -> Probe<'static> {
    let (rows, vocab) = (OUTPUT_CHUNK_ROWS, 8192);
    let targets: Vec<u32> = (0..rows).map(|r| (r * 7919 % vocab) as u32).collect();
    let mut logits = filled(rows * vocab, 0.1);
    let work = 4.0 * 4.0 * (rows * vocab) as f64;
    Probe::new("cross-entropy", (Work::Bytes, work), move || {
        cross_entropy_forward_backward(&mut logits, &targets, vocab, 0.0, 1.0);
    })
}

/// The glue the layers run on their own thread, counted as the planner counts it: a residual
/// add (read two, write one) and a row permutation (read one, write one).
pub fn glue() -> Probe<'static> {
    let (rows, width) = (8192, 512);
    let x = filled(rows * width, 0.1);
    let mut y = filled(rows * width, 0.2);
    let order: Vec<usize> = (0..rows).map(|r| r * 4099 % rows).collect();
    let mut permuted = vec![0.0f32; rows * width];
    let work = 4.0 * (5 * rows * width) as f64;
    Probe::new("one-thread glue", (Work::Bytes, work), move || {
        y.iter_mut().zip(&x).for_each(|(y, x)| *y += x);
        std::hint::black_box(&mut y);
        for (row, &from) in permuted.chunks_mut(width).zip(&order) {
            row.copy_from_slice(&x[from * width..(from + 1) * width]);
        }
        std::hint::black_box(&mut permuted);
    })
}
