//! Memory of one rank, term by term.
//!
//! - **weights, gradients**: every parameter the rank holds, at the run's bytes per weight and
//!   per gradient;
//! - **optimizer states**: master copy and AdamW moments, sharded by the distributed optimizer
//!   over dp-cp for dense parameters and over edp for expert parameters;
//! - **activations**: what each layer keeps for its backward for one micro-batch (sequence-
//!   parallel slices, region tensors split over tp and cp, top-k expert rows with the
//!   imbalance margin), times the (micro-batch, chunk) forwards the stage holds at its peak in
//!   the simulated schedule, each chunk holding `1/vpp` of the stage's layers;
//! - **largest transient**: the biggest working set of one backward (expert gradients and
//!   dispatch buffers, the logits and their gradient);
//! - **allocator**: heap the allocator keeps after frees (glibc: up to twice the largest tensor,
//!   capped by the hardware);
//! - **runtime**: the hardware's fixed cost per rank.

use serde::Serialize;

use crate::precision::Bytes;
use crate::stage::{LayerKinds, Stage};

/// Bytes in one GiB.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Bytes in one MiB.
const MIB: f64 = 1024.0 * 1024.0;

/// One rank's memory, GiB per term.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryBreakdown {
    /// Pipeline stage of this rank.
    pub stage: usize,
    /// Parameters held, in elements.
    pub parameters: f64,
    /// Weights.
    pub weights: f64,
    /// Gradients.
    pub gradients: f64,
    /// Master weights and AdamW moments (this rank's shard).
    pub optimizer_states: f64,
    /// Activations kept for the backward, all in-flight micro-batches.
    pub activations: f64,
    /// (micro-batch, chunk) forwards held at the stage's peak.
    pub in_flight_chunks: usize,
    /// The largest transient buffer set of one backward.
    pub largest_transient: f64,
    /// Heap the allocator retains after frees.
    pub allocator: f64,
    /// Fixed runtime cost of a rank.
    pub runtime: f64,
}

impl MemoryBreakdown {
    /// Every term together, GiB.
    pub fn total(&self) -> f64 {
        self.weights
            + self.gradients
            + self.optimizer_states
            + self.activations
            + self.largest_transient
            + self.allocator
            + self.runtime
    }

    /// Weights, gradients and optimizer states together, GiB.
    pub fn weights_and_optimizer(&self) -> f64 {
        self.weights + self.gradients + self.optimizer_states
    }
}

/// How the optimizer states are sharded.
#[derive(Clone, Copy, Debug)]
pub struct Sharding {
    /// Distributed optimizer on.
    pub distributed: bool,
    /// Ranks sharing dense optimizer states (dp·cp).
    pub dense_replicas: usize,
    /// Ranks sharing expert optimizer states (edp).
    pub expert_replicas: usize,
}

/// Fixed and allocator costs of a rank, MiB.
#[derive(Clone, Copy, Debug)]
pub struct Overheads {
    /// Runtime cost per rank.
    pub runtime_mib: f64,
    /// Cap of the heap the allocator retains.
    pub heap_retention_cap_mib: f64,
}

/// The memory of one rank of `stage`, which holds `in_flight_chunks` chunk forwards at peak.
pub fn rank_memory(
    stage: &Stage,
    kinds: &LayerKinds,
    bytes: Bytes,
    sharding: Sharding,
    (vpp, in_flight_chunks): (usize, usize),
    overheads: Overheads,
) -> MemoryBreakdown {
    let p = stage.params;
    let (dense_shard, expert_shard) = if sharding.distributed {
        (
            p.dense() / sharding.dense_replicas as f64,
            p.experts / sharding.expert_replicas as f64,
        )
    } else {
        (p.dense(), p.experts)
    };
    let layers = kinds.of(stage);
    let stored_per_micro_batch: f64 = layers
        .iter()
        .map(|(work, count)| work.stored_bytes() * count)
        .sum();
    let transient = layers
        .iter()
        .map(|(work, _)| work.backward_working_bytes)
        .fold(0.0, f64::max);
    let largest = layers
        .iter()
        .map(|(work, _)| work.largest_stored())
        .fold(0.0, f64::max);
    let retained = (2.0 * largest / MIB).min(overheads.heap_retention_cap_mib);
    MemoryBreakdown {
        stage: stage.index,
        parameters: p.total(),
        weights: p.total() * bytes.weight / GIB,
        gradients: p.total() * bytes.gradient / GIB,
        optimizer_states: (dense_shard + expert_shard) * bytes.optimizer / GIB,
        activations: stored_per_micro_batch / vpp as f64 * in_flight_chunks as f64 / GIB,
        in_flight_chunks,
        largest_transient: transient / GIB,
        allocator: retained / 1024.0,
        runtime: overheads.runtime_mib / 1024.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{stages, LayerKinds};
    use crate::work::WorkInputs;
    use crate::{Layout, MixedPrecision, ModelShape, Precision};
    use origami_schedule::StageLayers;

    /// Mixtral-8x22B as the issue gives it.
    fn mixtral() -> ModelShape {
        ModelShape {
            name: "mixtral-8x22b".into(),
            vocab: 32000,
            hidden: 6144,
            layers: 56,
            heads: 48,
            query_groups: 8,
            head_dim: 128,
            dense_ffn: 16384,
            moe_layers: vec![true; 56],
            experts: 8,
            topk: 2,
            expert_ffn: 16384,
            shared_expert_ffn: 0,
            shared_expert_gate: false,
            qkv_bias: false,
            tied_embeddings: false,
        }
    }

    #[test]
    fn mixtral_weights_and_optimizer_at_the_folding_layout_by_hand() {
        // TP2 PP8 EP8 ETP1 on 128 GPUs: dp = 8, edp = 2; stage 0 holds 7 layers and the
        // embedding. Per layer: attention 6144·(6144 + 2·1024) + 6144·6144 = 88,080,384 over
        // tp 2; norms 2·6144 and router 8·6144 whole; experts 8·3·6144·16384 = 2,415,919,104
        // over ep 8. Embedding 16000·6144 = 98,304,000.
        let dense_tp = 7.0 * 88_080_384.0 / 2.0 + 98_304_000.0;
        let replicated = 7.0 * (2.0 * 6144.0 + 8.0 * 6144.0);
        let experts = 7.0 * 2_415_919_104.0 / 8.0;
        // bf16 with the distributed optimizer: 6 bytes per parameter plus 12 over the
        // replicas (dense dp·cp = 8, experts edp = 2).
        let bytes = (dense_tp + replicated + experts) * 6.0
            + (dense_tp + replicated) * 12.0 / 8.0
            + experts * 12.0 / 2.0;
        let model = mixtral();
        let layout: Layout = "tp=2 pp=8 vpp=1 ep=8 etp=1 mbs=1".parse().unwrap();
        let split = StageLayers::new(56, 8, 1, None, None).unwrap();
        let stage = &stages(&model, &layout, &split)[0];
        let inputs = WorkInputs {
            model: &model,
            layout: &layout,
            seq: 4096,
            bytes: Precision::Bf16.bytes(MixedPrecision::Megatron),
            regather: true,
            cp_all_to_all: false,
            expert_imbalance: 1.0,
            output_chunk_rows: None,
            recompute: crate::Recompute::None,
        };
        let kinds = LayerKinds::new(&inputs);
        let sharding = Sharding {
            distributed: true,
            dense_replicas: 8,
            expert_replicas: 2,
        };
        let overheads = Overheads {
            runtime_mib: 0.0,
            heap_retention_cap_mib: 0.0,
        };
        let memory = rank_memory(
            stage,
            &kinds,
            Precision::Bf16.bytes(MixedPrecision::Megatron),
            sharding,
            (1, 8),
            overheads,
        );
        assert!((memory.weights_and_optimizer() * GIB / bytes - 1.0).abs() < 1e-12);
        // 28.42 GB, the research note's worked example (28.4 GB).
        assert!((bytes / 1e9 - 28.42).abs() < 0.005, "{}", bytes / 1e9);
    }
}
