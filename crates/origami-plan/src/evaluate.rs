//! One layout, evaluated: its memory per rank, its step time, throughput and MFU.

use std::collections::HashMap;

use origami_parallel::{GroupKind, Topology};
use origami_schedule::{StageLayers, StageTimes};
use serde::Serialize;

use crate::memory::{rank_memory, MemoryBreakdown, Overheads, Sharding};
use crate::network::Spans;
use crate::pipeline::{PipelineCache, PipelineRun};
use crate::stage::{stages, LayerKinds, Stage};
use crate::step::{Rates, StageTime, StepTime};
use crate::work::{Collective, CommKind, Passes, WorkInputs};
use crate::{Hardware, Layout, ModelShape, PlanError, Precision, Recompute};

/// What is being planned: a model trained on a cluster.
#[derive(Clone, Debug)]
pub struct PlanInputs {
    /// The model.
    pub model: ModelShape,
    /// The cluster.
    pub hardware: Hardware,
    /// Devices (ranks).
    pub gpus: usize,
    /// Sequences per optimizer step.
    pub global_batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Numeric format.
    pub precision: Precision,
    /// Shard optimizer states over the data-parallel ranks.
    pub distributed_optimizer: bool,
    /// Context parallelism by all-to-all over heads instead of the key/value ring.
    pub cp_all_to_all: bool,
    /// Expert rows of the busiest rank over the uniform share.
    pub expert_imbalance: f64,
    /// What each transformer layer's backward recomputes instead of keeping.
    pub recompute: Recompute,
    /// Also search pipelines whose first or last stage holds its own number of layers.
    pub uneven_stages: bool,
}

impl PlanInputs {
    /// Checks the model and the run sizes.
    pub fn validate(&self) -> Result<(), PlanError> {
        self.model.validate()?;
        for (what, value) in [
            ("--gpus", self.gpus),
            ("--global-batch", self.global_batch),
            ("--seq", self.seq),
        ] {
            if value == 0 {
                return Err(PlanError::ZeroRun { what });
            }
        }
        let margin = self.expert_imbalance;
        if margin.is_nan() || margin.is_infinite() || margin < 1.0 {
            return Err(PlanError::ExpertImbalance(margin));
        }
        self.hardware.peak_flops(self.precision)?;
        Ok(())
    }
}

/// One evaluated layout.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// The layout, `tp=… cp=… pp=… vpp=… ep=… etp=… mbs=…`.
    pub layout: Layout,
    /// Data-parallel size of attention.
    pub dp: usize,
    /// Expert data-parallel size.
    pub edp: usize,
    /// Micro-batches per step on each pipeline.
    pub micro_batches: usize,
    /// What each transformer layer's backward recomputes (the run's `--recompute`).
    pub recompute: Recompute,
    /// Whether it fits in the device (or node) memory.
    pub fits: bool,
    /// The busiest rank's memory, GiB.
    pub memory_per_rank_gib: f64,
    /// Memory of the busiest node's ranks together, GiB (what one process holds when a node's
    /// ranks share it).
    pub memory_per_node_gib: f64,
    /// What the fit is judged against, GiB (device memory, or node memory when shared).
    pub capacity_gib: f64,
    /// The busiest rank's memory by term.
    pub memory: MemoryBreakdown,
    /// Seconds per step.
    pub step_time_s: f64,
    /// The step by part.
    pub time: StepTime,
    /// Trained tokens per second.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation against the device's peak.
    pub mfu: f64,
    /// The simulated pipeline. Its bubble is what `time.bubble` charges, except where the ranks
    /// share one node's cores: there the waiting stages' cores serve the others and `time`
    /// charges none.
    pub pipeline: PipelineRun,
    /// Each pipeline stage's layers and one micro-batch's passes on it: the slowest stage sets
    /// every stage's pace, so this says why one pipeline depth beats another.
    pub stages: Vec<StagePace>,
    /// The stage whose passes set the pace (the busiest).
    pub pacing_stage: usize,
}

/// One pipeline stage as the step sees it: what it holds and how long one micro-batch's
/// forward and backward take on it (exposed communication included).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagePace {
    /// Transformer layers on the stage, all chunks.
    pub layers: usize,
    /// It also runs the embedding.
    pub embedding: bool,
    /// It also runs the final norm, the output layer and the loss.
    pub output_layer: bool,
    /// One micro-batch's passes, seconds.
    pub passes: Passes,
}

impl StagePace {
    fn new(stage: &Stage, time: &StageTime) -> Self {
        StagePace {
            layers: stage.dense_layers + stage.moe_layers,
            embedding: stage.first,
            output_layer: stage.last,
            passes: time.passes,
        }
    }
}

/// Evaluates layouts of one set of inputs, reusing pipeline simulations.
#[derive(Debug)]
pub struct Planner {
    inputs: PlanInputs,
    pipelines: PipelineCache,
    /// Group spans by (tp, cp, pp, ep, etp): they do not depend on vpp or the micro-batch.
    spans: HashMap<(usize, usize, usize, usize, usize), Spans>,
}

impl Planner {
    /// A planner for `inputs` (checked).
    pub fn new(inputs: PlanInputs) -> Result<Self, PlanError> {
        inputs.validate()?;
        Ok(Planner {
            inputs,
            pipelines: PipelineCache::default(),
            spans: HashMap::new(),
        })
    }

    /// The inputs.
    pub fn inputs(&self) -> &PlanInputs {
        &self.inputs
    }

    /// Memory and time of `layout`.
    pub fn evaluate(&mut self, layout: &Layout) -> Result<Evaluation, PlanError> {
        let i = &self.inputs;
        let (parallel, micro_batches) = layout.resolve(&i.model, i.gpus, i.global_batch, i.seq)?;
        let split = StageLayers::new(
            i.model.layers,
            layout.pp,
            layout.vpp,
            layout.first,
            layout.last,
        )?;
        let hardware = &i.hardware;
        let bytes = i.precision.bytes(hardware.engine.mixed_precision);
        let work_inputs = WorkInputs {
            model: &i.model,
            layout,
            seq: i.seq,
            bytes,
            regather: hardware.engine.regather_sequence_parallel_inputs,
            cp_all_to_all: i.cp_all_to_all,
            expert_imbalance: i.expert_imbalance,
            output_chunk_rows: hardware.engine.output_chunk_rows,
            recompute: i.recompute,
        };
        let kinds = LayerKinds::new(&work_inputs);
        let stages = stages(&i.model, layout, &split);
        let devices_per_node = hardware.devices_per_node(i.gpus);
        let spans = self
            .spans
            .entry((layout.tp, layout.cp, layout.pp, layout.ep, layout.etp))
            .or_insert_with(|| Spans::new(&Topology::new(&parallel), devices_per_node))
            .clone();
        let node_ranks = devices_per_node.min(i.gpus);
        let rates = Rates {
            hardware,
            peak: hardware.peak_flops(i.precision)?,
            kernels: hardware.kernel_efficiency(i.precision),
            bytes,
            sharing: if hardware.device.shared_by_ranks {
                node_ranks as f64
            } else {
                1.0
            },
            serial_sharing: match (hardware.device.shared_by_ranks, hardware.device.cores) {
                (true, Some(cores)) => (node_ranks as f64 / cores as f64).max(1.0),
                _ => 1.0,
            },
            spans: &spans,
        };
        let transfer = work_inputs.pipeline_transfer_bytes();
        let stage_times: Vec<StageTime> = stages
            .iter()
            .map(|s| rates.stage(s, &kinds, layout.vpp, transfer))
            .collect();
        let busiest = (0..stages.len())
            .max_by(|&a, &b| {
                stage_times[a]
                    .passes
                    .total()
                    .total_cmp(&stage_times[b].passes.total())
            })
            .expect("at least one stage");
        let slowest = StageTimes {
            forward: stage_times
                .iter()
                .map(|t| t.passes.forward)
                .fold(0.0, f64::max),
            backward: stage_times
                .iter()
                .map(|t| t.passes.backward)
                .fold(0.0, f64::max),
        };
        let pipeline = self
            .pipelines
            .run(layout.pp, layout.vpp, micro_batches, slowest)?;
        // Ranks sharing one node's cores fill each other's bubble: a stage waiting in the
        // pipeline leaves the cores to the stages that compute, so the node's work sets the step.
        let bubble = if hardware.device.shared_by_ranks && i.gpus <= devices_per_node {
            0.0
        } else {
            pipeline.makespan - micro_batches as f64 * stage_times[busiest].passes.total()
        };
        let mut time = StepTime::from_pipeline(&stage_times[busiest], micro_batches, bubble);
        let sharding = Sharding {
            distributed: i.distributed_optimizer,
            dense_replicas: parallel.dp() * parallel.cp(),
            expert_replicas: parallel.edp(),
        };
        self.add_per_step(
            &mut time,
            &rates,
            (&stages[busiest], layout.tp),
            sharding,
            &slowest,
        );
        let overheads = Overheads {
            runtime_mib: hardware.runtime.per_rank_mib,
            heap_retention_cap_mib: hardware.runtime.heap_retention_cap_mib,
        };
        let memories: Vec<MemoryBreakdown> = stages
            .iter()
            .map(|s| {
                rank_memory(
                    s,
                    &kinds,
                    bytes,
                    sharding,
                    (layout.vpp, pipeline.peak_in_flight[s.index]),
                    overheads,
                )
            })
            .collect();
        let memory = memories
            .iter()
            .max_by(|a, b| a.total().total_cmp(&b.total()))
            .expect("at least one stage")
            .clone();
        let node_gib = node_memory(i.gpus, &memories, devices_per_node)
            + hardware.runtime.per_process_mib / 1024.0;
        let capacity_gib = hardware.device.memory_gib;
        let fits = if hardware.device.shared_by_ranks {
            node_gib <= capacity_gib
        } else {
            memory.total() <= capacity_gib
        };
        let tokens = (i.global_batch * i.seq) as f64;
        let flops = i.model.training_flops_per_token(i.seq) * tokens;
        Ok(Evaluation {
            layout: *layout,
            dp: parallel.dp(),
            edp: parallel.edp(),
            micro_batches,
            recompute: i.recompute,
            fits,
            memory_per_rank_gib: memory.total(),
            memory_per_node_gib: node_gib,
            capacity_gib,
            memory,
            step_time_s: time.total,
            tokens_per_s: tokens / time.total,
            mfu: flops / (time.total * i.gpus as f64 * rates.peak),
            time,
            pipeline,
            stages: stages
                .iter()
                .zip(&stage_times)
                .map(|(s, t)| StagePace::new(s, t))
                .collect(),
            pacing_stage: busiest,
        })
    }

    /// Gradient reduction, parameter all-gather and the optimizer update of `stage`.
    fn add_per_step(
        &self,
        time: &mut StepTime,
        rates: &Rates,
        (stage, tp): (&Stage, usize),
        sharding: Sharding,
        slowest: &StageTimes,
    ) {
        let engine = &self.inputs.hardware.engine;
        let b = rates.bytes;
        let p = stage.params;
        let ring = |replicas: usize, elements: f64, all_reduce: bool| {
            let share = (replicas - 1) as f64 / replicas as f64 * elements;
            if all_reduce {
                2.0 * share
            } else {
                share
            }
        };
        let reduce = !sharding.distributed;
        let collective = if reduce {
            Collective::AllReduce
        } else {
            Collective::AllGather
        };
        for (group, replicas, elements) in [
            (GroupKind::DpCp, sharding.dense_replicas, p.dense()),
            (GroupKind::Edp, sharding.expert_replicas, p.experts),
        ] {
            let grads = ring(replicas, elements, reduce) * b.gradient;
            time.add_step_comm(
                CommKind::GradientReduce,
                rates.step_collective(
                    group,
                    collective,
                    grads,
                    engine.overlap_gradient_reduce,
                    slowest.backward,
                ),
            );
            if sharding.distributed {
                let params = ring(replicas, elements, false) * b.gathered_weight;
                time.add_step_comm(
                    CommKind::ParamGather,
                    rates.step_collective(
                        group,
                        Collective::AllGather,
                        params,
                        engine.overlap_param_gather,
                        slowest.forward,
                    ),
                );
            }
        }
        if tp > 1 {
            let grads = ring(tp, p.replicated, true) * b.gradient;
            time.add_step_comm(
                CommKind::GradientReduce,
                rates.step_collective(GroupKind::Tp, Collective::AllReduce, grads, false, 0.0),
            );
        }
        let shard = if sharding.distributed {
            p.dense() / sharding.dense_replicas as f64 + p.experts / sharding.expert_replicas as f64
        } else {
            p.total()
        };
        time.add_optimizer(rates.optimizer_seconds(shard, p.total()));
    }
}

/// Memory of the ranks on the busiest node, GiB, from each stage's per-rank memory. With pp
/// the slowest axis of the order, rank `r` is on stage `r / (world / pp)`.
fn node_memory(world: usize, memories: &[MemoryBreakdown], devices_per_node: usize) -> f64 {
    let per_stage = world / memories.len();
    (0..world.div_ceil(devices_per_node))
        .map(|node| {
            (node * devices_per_node..((node + 1) * devices_per_node).min(world))
                .map(|rank| memories[rank / per_stage].total())
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
}

/// A planner for one of the paper's models at sequence 4096 in bf16 with the distributed
/// optimizer, for the crate's tests.
#[cfg(test)]
pub(crate) fn paper_planner(
    model: &str,
    hardware: Hardware,
    gpus: usize,
    global_batch: usize,
) -> Planner {
    Planner::new(PlanInputs {
        model: crate::paper_model(model).unwrap(),
        hardware,
        gpus,
        global_batch,
        seq: 4096,
        precision: Precision::Bf16,
        distributed_optimizer: true,
        cp_all_to_all: false,
        expert_imbalance: 1.0,
        recompute: Recompute::None,
        uneven_stages: false,
    })
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::paper_planner;
    use crate::Hardware;

    /// The bubble of a 4-stage 1F1B pipeline over `gpus`, with the node's cores shared by its
    /// ranks or not.
    fn bubble(shared_by_ranks: bool, gpus: usize) -> f64 {
        let mut hardware = Hardware::h100_dgx();
        hardware.device.shared_by_ranks = shared_by_ranks;
        paper_planner("qwen2-57b-a14b", hardware, gpus, 16)
            .evaluate(&"pp=4 ep=2 mbs=1".parse().unwrap())
            .unwrap()
            .time
            .bubble
    }

    #[test]
    fn a_pipeline_inside_one_node_of_shared_cores_has_no_bubble() {
        assert!(bubble(false, 8) > 0.0);
        assert_eq!(bubble(true, 8), 0.0);
        // Across two nodes the stages no longer share cores.
        assert!(bubble(true, 16) > 0.0);
    }
}
