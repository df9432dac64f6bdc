//! Time of one training step.
//!
//! - **Compute** of a micro-batch on a stage: each GEMM at the device's GEMM (or grouped-GEMM)
//!   efficiency, or at its operands' memory traffic if that is slower (roofline); the
//!   backward runs two GEMMs of each forward shape; the attention core at the attention
//!   efficiency; element-wise kernels at the memory bandwidth's efficiency, and the glue between
//!   them (residual adds, router scores, permutation) too, or at one core's bandwidth where the
//!   engine runs it on the rank's own thread. On hardware whose ranks share a node's cores, a
//!   rank's kernels take as long as all the node's ranks' kernels (they share the cores), and
//!   its single-thread glue `max(1, ranks / cores)` times as long.
//! - **Communication** of each collective over the link its group uses ([`crate::network`]).
//!   Tensor-parallel collectives hide under the layer's GEMMs and the context-parallel ring
//!   under the attention core when the engine overlaps them (what exceeds the window stays
//!   exposed); expert dispatch, expert-tensor-parallel and pipeline transfers are exposed.
//! - **Recomputation** ([`crate::recompute`]): what a layer's backward runs again of its
//!   forward joins the backward — every part of it under `full`, collectives included; the
//!   attention core, the norms and the SwiGLUs under `selective` (and the context-parallel
//!   exchange) — and widens the overlap windows of the backward by the GEMMs and attention it
//!   adds.
//! - **Pipeline**: the schedule is simulated with the busiest stage's forward and backward
//!   times per micro-batch; the bubble is the makespan beyond the busy time.
//! - **Per step**: gradient reduction (exposed beyond one micro-batch's backward when the
//!   engine overlaps it), the distributed optimizer's parameter all-gather (exposed beyond one
//!   forward when overlapped) and the AdamW update over the rank's shard (memory-bound).

use serde::Serialize;

use crate::hardware::KernelEfficiency;
use crate::network::{collective_seconds, comm_seconds, Spans};
use crate::precision::Bytes;
use crate::stage::{LayerKinds, Stage};
use crate::work::{Collective, CommKind, Gemm, LayerWork, Passes};
use crate::{Hardware, Recompute};

/// Seconds by kind of compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ComputeTime {
    /// Dense GEMMs (attention projections, dense and shared-expert MLPs, router, output).
    pub dense_gemm: f64,
    /// Grouped expert GEMMs.
    pub expert_gemm: f64,
    /// The attention core.
    pub attention: f64,
    /// Element-wise kernels (norms, residuals, RoPE, SwiGLU, permutation, loss).
    pub memory_bound: f64,
    /// The optimizer update (once per step).
    pub optimizer: f64,
    /// The MoE dispatcher's overhead beyond its collectives and copies.
    pub dispatch_overhead: f64,
}

impl ComputeTime {
    /// All compute.
    pub fn total(&self) -> f64 {
        self.dense_gemm
            + self.expert_gemm
            + self.attention
            + self.memory_bound
            + self.optimizer
            + self.dispatch_overhead
    }

    fn scaled(self, by: f64) -> Self {
        ComputeTime {
            dense_gemm: self.dense_gemm * by,
            expert_gemm: self.expert_gemm * by,
            attention: self.attention * by,
            memory_bound: self.memory_bound * by,
            optimizer: self.optimizer * by,
            dispatch_overhead: self.dispatch_overhead * by,
        }
    }

    fn add(&mut self, other: ComputeTime) {
        self.dense_gemm += other.dense_gemm;
        self.expert_gemm += other.expert_gemm;
        self.attention += other.attention;
        self.memory_bound += other.memory_bound;
        self.optimizer += other.optimizer;
        self.dispatch_overhead += other.dispatch_overhead;
    }
}

/// Seconds of communication by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CommTime {
    /// Sequence-parallel collectives over tp.
    pub tp: f64,
    /// Context-parallel exchange.
    pub cp: f64,
    /// Expert dispatch and combine over ep.
    pub ep: f64,
    /// Expert rows over etp.
    pub etp: f64,
    /// Gradient reduction.
    pub dp_grad: f64,
    /// Parameter all-gather of the distributed optimizer.
    pub dp_param: f64,
    /// Pipeline transfers.
    pub pp: f64,
}

impl CommTime {
    /// All of it.
    pub fn total(&self) -> f64 {
        self.tp + self.cp + self.ep + self.etp + self.dp_grad + self.dp_param + self.pp
    }

    fn slot(&mut self, kind: CommKind) -> &mut f64 {
        match kind {
            CommKind::TensorParallel => &mut self.tp,
            CommKind::ContextParallel => &mut self.cp,
            CommKind::ExpertDispatch => &mut self.ep,
            CommKind::ExpertTensorParallel => &mut self.etp,
            CommKind::GradientReduce => &mut self.dp_grad,
            CommKind::ParamGather => &mut self.dp_param,
            CommKind::Pipeline => &mut self.pp,
        }
    }

    fn scaled(self, by: f64) -> Self {
        let mut out = self;
        for kind in CommKind::ALL {
            *out.slot(kind) *= by;
        }
        out
    }

    fn add(&mut self, other: CommTime) {
        let mut other = other;
        for kind in CommKind::ALL {
            *self.slot(kind) += *other.slot(kind);
        }
    }
}

/// One stage's time for one micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTime {
    /// Forward and backward seconds, exposed communication included.
    pub passes: Passes,
    /// Compute seconds by kind, both passes.
    pub compute: ComputeTime,
    /// Exposed communication seconds, both passes.
    pub exposed: CommTime,
    /// Communication hidden under compute, both passes.
    pub hidden: CommTime,
}

/// The rates a stage's work runs at.
#[derive(Clone, Copy, Debug)]
pub struct Rates<'a> {
    /// The hardware.
    pub hardware: &'a Hardware,
    /// Peak FLOP/s of one device in the run's precision.
    pub peak: f64,
    /// The compute kernels' fractions of that peak, in the run's precision.
    pub kernels: KernelEfficiency,
    /// Bytes per element.
    pub bytes: Bytes,
    /// How many times longer a rank's parallel kernels take because the node's other ranks
    /// run theirs on the same cores at once: the node's ranks (1 with a device per rank).
    pub sharing: f64,
    /// The same for work on the rank's own thread: `max(1, ranks / cores)`.
    pub serial_sharing: f64,
    /// Where each group lies.
    pub spans: &'a Spans,
}

impl Rates<'_> {
    fn memory_rate(&self) -> f64 {
        let device = &self.hardware.device;
        device.memory_bandwidth * self.hardware.efficiency.memory
    }

    fn optimizer_rate(&self) -> f64 {
        let memory = self.hardware.efficiency.memory;
        self.hardware.device.memory_bandwidth * self.kernels.optimizer.unwrap_or(memory)
    }

    fn cross_entropy_rate(&self) -> f64 {
        let efficiency = &self.hardware.efficiency;
        self.hardware.device.memory_bandwidth
            * efficiency.cross_entropy.unwrap_or(efficiency.memory)
    }

    fn gemm_seconds(&self, gemm: &Gemm) -> f64 {
        let efficiency = if gemm.grouped {
            self.kernels.grouped_gemm
        } else {
            self.kernels.gemm
        };
        let compute = gemm.flops() / (self.peak * efficiency);
        let traffic = gemm.elements() * gemm.count * self.bytes.gemm_input / self.memory_rate();
        compute.max(traffic)
    }

    /// Bytes/s and sharing factor of the element-wise glue: one core's bandwidth on the rank's
    /// thread when the engine runs it there, else the kernels' rate.
    fn glue(&self) -> (f64, f64) {
        match (
            self.hardware.engine.serial_glue,
            self.hardware.device.core_memory_bandwidth,
        ) {
            (true, Some(rate)) => (rate, self.serial_sharing),
            _ => (self.memory_rate(), self.sharing),
        }
    }

    /// One micro-batch of `work` run `count` times.
    fn layer(&self, work: &LayerWork, count: f64) -> StageTime {
        let engine = &self.hardware.engine;
        let share = self.sharing;
        let (mut dense_forward, mut expert_forward) = (0.0, 0.0);
        for gemm in &work.gemms {
            let forward = self.gemm_seconds(gemm) * share;
            if gemm.grouped {
                expert_forward += forward;
            } else {
                dense_forward += forward;
            }
        }
        let per_pass = |quantity: Passes, rate: f64, factor: f64| Passes {
            forward: quantity.forward / rate * factor,
            backward: quantity.backward / rate * factor,
        };
        let attention_efficiency = if work.context_parallel_attention {
            self.kernels.context_attention
        } else {
            self.kernels.attention
        };
        let attention = per_pass(
            work.attention_flops,
            self.peak * attention_efficiency,
            share,
        );
        let memory = per_pass(work.memory_bytes, self.memory_rate(), share);
        let cross_entropy = per_pass(work.cross_entropy_bytes, self.cross_entropy_rate(), share);
        let (glue_rate, glue_share) = self.glue();
        let glue = per_pass(work.glue_bytes, glue_rate, glue_share);
        // The dispatcher's overhead, split over the passes like its all-to-alls (half each).
        let dispatch = work.routed_bytes * engine.dispatch_overhead_per_byte * share;
        let redo = match work.recompute {
            Recompute::None => ComputeTime::default(),
            Recompute::Selective => ComputeTime {
                attention: work.selective_redo.attention_flops / (self.peak * attention_efficiency)
                    * share,
                memory_bound: work.selective_redo.memory_bytes / self.memory_rate() * share,
                ..ComputeTime::default()
            },
            Recompute::Full => ComputeTime {
                dense_gemm: dense_forward,
                expert_gemm: expert_forward,
                attention: attention.forward,
                memory_bound: memory.forward + cross_entropy.forward + glue.forward,
                optimizer: 0.0,
                dispatch_overhead: dispatch / 2.0,
            },
        };
        let mut compute = ComputeTime {
            dense_gemm: 3.0 * dense_forward,
            expert_gemm: 3.0 * expert_forward,
            attention: attention.total(),
            memory_bound: memory.total() + cross_entropy.total() + glue.total(),
            optimizer: 0.0,
            dispatch_overhead: dispatch,
        };
        compute.add(redo);
        let mut passes = Passes {
            forward: dense_forward
                + expert_forward
                + attention.forward
                + memory.forward
                + cross_entropy.forward
                + glue.forward
                + dispatch / 2.0,
            backward: 2.0 * (dense_forward + expert_forward)
                + attention.backward
                + memory.backward
                + cross_entropy.backward
                + glue.backward
                + dispatch / 2.0
                + redo.total(),
        };
        let mut exposed = CommTime::default();
        let mut hidden = CommTime::default();
        for comm in &work.comms {
            let mut seconds = comm_seconds(self.hardware, self.spans, comm);
            if work.recompute.repeats(comm.kind) {
                seconds.backward += seconds.forward;
            }
            let window = match comm.kind {
                CommKind::TensorParallel if engine.overlap_tensor_parallel => Passes {
                    forward: dense_forward,
                    backward: 2.0 * dense_forward + redo.dense_gemm,
                },
                CommKind::ContextParallel if engine.overlap_context_parallel => Passes {
                    forward: attention.forward,
                    backward: attention.backward + redo.attention,
                },
                _ => Passes::default(),
            };
            let shown = Passes {
                forward: (seconds.forward - window.forward).max(0.0),
                backward: (seconds.backward - window.backward).max(0.0),
            };
            *exposed.slot(comm.kind) += shown.total();
            *hidden.slot(comm.kind) += seconds.total() - shown.total();
            passes.forward += shown.forward;
            passes.backward += shown.backward;
        }
        StageTime {
            passes: Passes {
                forward: passes.forward * count,
                backward: passes.backward * count,
            },
            compute: compute.scaled(count),
            exposed: exposed.scaled(count),
            hidden: hidden.scaled(count),
        }
    }

    /// One micro-batch on `stage`, with its pipeline transfers (`vpp` each way per stage).
    pub fn stage(
        &self,
        stage: &Stage,
        kinds: &LayerKinds,
        vpp: usize,
        transfer_bytes: f64,
    ) -> StageTime {
        let mut total = StageTime::default();
        for (work, count) in kinds.of(stage) {
            let part = self.layer(work, count);
            total.passes.forward += part.passes.forward;
            total.passes.backward += part.passes.backward;
            total.compute.add(part.compute);
            total.exposed.add(part.exposed);
            total.hidden.add(part.hidden);
        }
        let span = self.spans.of(origami_parallel::GroupKind::Pp);
        let one_way = vpp as f64
            * collective_seconds(self.hardware, Collective::P2p, span, transfer_bytes, 1.0);
        let (exposed, hidden) = if vpp > 1 && self.hardware.engine.overlap_interleaved_pipeline {
            // Each chunk's transfer runs under the next chunk's compute.
            let chunk = total.passes.total() / (2.0 * vpp as f64);
            let shown = (one_way / vpp as f64 - chunk).max(0.0) * vpp as f64;
            (shown, one_way - shown)
        } else {
            (one_way, 0.0)
        };
        total.passes.forward += exposed;
        total.passes.backward += exposed;
        total.exposed.pp += 2.0 * exposed;
        total.hidden.pp += 2.0 * hidden;
        total
    }

    /// Seconds of the per-step collective `bytes` of `kind` over `group`, exposed beyond
    /// `window` when the engine overlaps that kind; returns (exposed, hidden).
    pub fn step_collective(
        &self,
        group: origami_parallel::GroupKind,
        collective: Collective,
        bytes: f64,
        overlapped: bool,
        window: f64,
    ) -> (f64, f64) {
        let seconds =
            collective_seconds(self.hardware, collective, self.spans.of(group), bytes, 1.0);
        let exposed = if overlapped {
            (seconds - window).max(0.0)
        } else {
            seconds
        };
        (exposed, seconds - exposed)
    }

    /// The optimizer update of `shard` parameters (reading and writing state and weight,
    /// reading the gradient; a kernel) and the zeroing of `held` gradients (glue).
    pub fn optimizer_seconds(&self, shard: f64, held: f64) -> f64 {
        let b = self.bytes;
        let update = shard * (2.0 * b.optimizer + b.gradient + 2.0 * b.weight);
        let (glue_rate, glue_share) = self.glue();
        update / self.optimizer_rate() * self.sharing + held * b.gradient / glue_rate * glue_share
    }
}

/// One training step, seconds by part.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepTime {
    /// Seconds per step.
    pub total: f64,
    /// Compute of the busiest stage, all micro-batches, and the optimizer.
    pub compute: ComputeTime,
    /// Exposed communication by kind.
    pub communication: CommTime,
    /// Communication hidden under compute by kind.
    pub hidden_communication: CommTime,
    /// Pipeline bubble.
    pub bubble: f64,
}

impl StepTime {
    /// Adds `micro_batches` of `stage` (the busiest) and the pipeline's bubble.
    pub fn from_pipeline(stage: &StageTime, micro_batches: usize, bubble: f64) -> Self {
        let m = micro_batches as f64;
        let compute = stage.compute.scaled(m);
        let communication = stage.exposed.scaled(m);
        StepTime {
            total: compute.total() + communication.total() + bubble,
            compute,
            communication,
            hidden_communication: stage.hidden.scaled(m),
            bubble,
        }
    }

    /// Adds a per-step exposed and hidden communication of `kind`.
    pub fn add_step_comm(&mut self, kind: CommKind, (exposed, hidden): (f64, f64)) {
        *self.communication.slot(kind) += exposed;
        *self.hidden_communication.slot(kind) += hidden;
        self.total += exposed;
    }

    /// Adds the optimizer update.
    pub fn add_optimizer(&mut self, seconds: f64) {
        self.compute.optimizer += seconds;
        self.total += seconds;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MixedPrecision, Precision};

    /// The group spans of one rank on nodes of 8.
    fn one_rank_spans() -> Spans {
        let parallel = origami_parallel::ParallelConfig::default()
            .layout(1)
            .unwrap();
        Spans::new(&origami_parallel::Topology::new(&parallel), 8)
    }

    /// Megatron's bf16 at 989.5 TFLOP/s on `hardware`, one rank per device.
    fn bf16_rates<'a>(hardware: &'a Hardware, spans: &'a Spans) -> Rates<'a> {
        Rates {
            hardware,
            peak: 989.5e12,
            kernels: hardware.kernel_efficiency(Precision::Bf16),
            bytes: Precision::Bf16.bytes(MixedPrecision::Megatron),
            sharing: 1.0,
            serial_sharing: 1.0,
            spans,
        }
    }

    #[test]
    fn a_gemm_runs_at_its_efficiency_or_its_traffic_whichever_is_slower() {
        let hardware = Hardware::h100_dgx();
        let spans = one_rank_spans();
        let rates = bf16_rates(&hardware, &spans);
        let e = &hardware.efficiency;
        let bandwidth = hardware.device.memory_bandwidth * e.memory;
        // 8192 × 8192 × 8192: compute-bound.
        let big = Gemm {
            name: "big",
            m: 8192.0,
            k: 8192.0,
            n: 8192.0,
            count: 1.0,
            grouped: false,
        };
        let expected = 2.0 * 8192f64.powi(3) / (989.5e12 * e.gemm);
        assert!((rates.gemm_seconds(&big) / expected - 1.0).abs() < 1e-12);
        // 16 × 8192 × 8192: its 8192² weight read dominates.
        let thin = Gemm { m: 16.0, ..big };
        let traffic = (16.0 * 8192.0 * 2.0 + 8192.0 * 8192.0) * 2.0 / bandwidth;
        assert!((rates.gemm_seconds(&thin) / traffic - 1.0).abs() < 1e-12);
        // Sharing a node's cores between 4 ranks makes each rank's compute 4 times longer.
        let shared = Rates {
            sharing: 4.0,
            serial_sharing: 2.0,
            ..rates
        };
        let work = LayerWork {
            gemms: vec![big],
            ..LayerWork::default()
        };
        let one = rates.layer(&work, 1.0);
        let four = shared.layer(&work, 1.0);
        assert!((four.passes.total() / one.passes.total() - 4.0).abs() < 1e-12);
        assert!((one.passes.backward / one.passes.forward - 2.0).abs() < 1e-12);
    }

    #[test]
    fn optimizer_and_cross_entropy_run_at_their_own_efficiency_or_the_memory_one() {
        let mut hardware = Hardware::h100_dgx();
        hardware.efficiency.optimizer = None;
        hardware.efficiency.cross_entropy = None;
        let spans = one_rank_spans();
        let rates = |hardware| bf16_rates(hardware, &spans);
        let work = LayerWork {
            cross_entropy_bytes: Passes {
                forward: 1e9,
                backward: 3e9,
            },
            ..LayerWork::default()
        };
        let memory = hardware.device.memory_bandwidth * hardware.efficiency.memory;
        let plain = rates(&hardware);
        let (optimizer, cross_entropy) =
            (plain.optimizer_seconds(1e9, 0.0), plain.layer(&work, 1.0));
        let update_bytes =
            1e9 * (2.0 * plain.bytes.optimizer + plain.bytes.gradient + 2.0 * plain.bytes.weight);
        assert!((optimizer / (update_bytes / memory) - 1.0).abs() < 1e-12);
        assert!((cross_entropy.passes.total() / (4e9 / memory) - 1.0).abs() < 1e-12);
        let mut slower = hardware.clone();
        slower.efficiency.optimizer = Some(hardware.efficiency.memory / 4.0);
        slower.efficiency.cross_entropy = Some(hardware.efficiency.memory / 8.0);
        let slow = rates(&slower);
        assert!((slow.optimizer_seconds(1e9, 0.0) / optimizer - 4.0).abs() < 1e-9);
        assert!(
            (slow.layer(&work, 1.0).passes.total() / cross_entropy.passes.total() - 8.0).abs()
                < 1e-9
        );
        assert!(
            (slow.layer(&work, 1.0).passes.backward / slow.layer(&work, 1.0).passes.forward - 3.0)
                .abs()
                < 1e-9
        );
    }

    #[test]
    fn recomputation_adds_to_the_backward_what_it_runs_again() {
        let hardware = Hardware::h100_dgx();
        let spans = one_rank_spans();
        let rates = bf16_rates(&hardware, &spans);
        let gemm = Gemm {
            name: "qkv",
            m: 4096.0,
            k: 4096.0,
            n: 4096.0,
            count: 1.0,
            grouped: false,
        };
        let plain = LayerWork {
            gemms: vec![gemm],
            attention_flops: Passes {
                forward: 1e12,
                backward: 2e12,
            },
            memory_bytes: Passes {
                forward: 1e9,
                backward: 2e9,
            },
            selective_redo: crate::work::SelectiveRedo {
                attention_flops: 1e12,
                memory_bytes: 0.25e9,
            },
            ..LayerWork::default()
        };
        let with = |recompute| {
            rates.layer(
                &LayerWork {
                    recompute,
                    ..plain.clone()
                },
                1.0,
            )
        };
        let (none, selective, full) = (
            with(Recompute::None),
            with(Recompute::Selective),
            with(Recompute::Full),
        );
        // Full: the backward runs the whole forward again; the forward is unchanged.
        assert_eq!(full.passes.forward, none.passes.forward);
        let extra = full.passes.backward - none.passes.backward;
        assert!((extra / none.passes.forward - 1.0).abs() < 1e-12);
        assert!((full.compute.dense_gemm / none.compute.dense_gemm - 4.0 / 3.0).abs() < 1e-12);
        // Selective: the attention core's forward and a quarter of the element-wise forward.
        let e = &hardware.efficiency;
        let attention = 1e12 / (989.5e12 * rates.kernels.attention);
        let memory = 0.25e9 / (hardware.device.memory_bandwidth * e.memory);
        let extra = selective.passes.backward - none.passes.backward;
        assert!((extra / (attention + memory) - 1.0).abs() < 1e-12);
        assert_eq!(selective.compute.dense_gemm, none.compute.dense_gemm);
    }
}
