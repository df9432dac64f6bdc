//! The two mappings of one rank (MoE Parallel Folding): the attention side's tensor and
//! context groups, and the MoE side's expert groups, all over the same ranks; and the rank's
//! place in the pipeline, which both mappings share.

use std::sync::Arc;

use origami_comm::{Communicator, SoloComm};
use origami_parallel::ParallelState;
use origami_schedule::{SplitError, StageLayers};

use super::config::{ModelConfig, ModelConfigError};
use crate::layers::context_parallel::CpCommType;
use crate::layers::moe::parallel::{check_tensor_split, ExpertSharding, MoeParallel};
use crate::layers::tensor_parallel::TensorParallel;

/// The groups a rank's model talks over. Data parallelism is outside the model (the optimizer
/// reduces gradients over dp-cp and edp).
#[derive(Clone)]
pub struct ModelParallel {
    /// Tensor- and sequence-parallel group of attention, dense MLPs, embedding and output.
    pub tensor: TensorParallel,
    /// Context-parallel group: the ranks holding the other chunks of this rank's sequences.
    pub context: Arc<dyn Communicator>,
    /// How context-parallel attention exchanges keys and values.
    pub cp_comm_type: CpCommType,
    /// The MoE layers' groups.
    pub moe: MoeParallel,
    /// This rank's pipeline stage and the split of the layers over the stages.
    pub pipeline: PipelinePlacement,
    /// The first and last stage of this rank's pipeline, which both hold a tied embedding
    /// table; `None` on a middle stage or without a pipeline.
    pub embedding: Option<Arc<dyn Communicator>>,
}

/// Where a rank sits in its pipeline, and how the model's layers split over the stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelinePlacement {
    /// This rank's stage.
    pub stage: usize,
    /// Stages (`parallel.pp`).
    pub stages: usize,
    /// Model chunks per stage (`parallel.vpp`).
    pub chunks: usize,
    /// Layers of the first stage when the split is uneven (`parallel.pp_first_stage_layers`).
    pub first_stage_layers: Option<usize>,
    /// Layers of the last stage when the split is uneven (`parallel.pp_last_stage_layers`).
    pub last_stage_layers: Option<usize>,
}

impl PipelinePlacement {
    /// No pipeline: one stage, one chunk.
    pub fn single() -> Self {
        PipelinePlacement {
            stage: 0,
            stages: 1,
            chunks: 1,
            first_stage_layers: None,
            last_stage_layers: None,
        }
    }

    /// The layers of each stage and chunk for a model of `layers` layers.
    pub fn split(&self, layers: usize) -> Result<StageLayers, SplitError> {
        StageLayers::new(
            layers,
            self.stages,
            self.chunks,
            self.first_stage_layers,
            self.last_stage_layers,
        )
    }

    /// Whether chunk `chunk` of this stage is the first virtual stage (holds the embedding).
    pub fn holds_embedding(&self, chunk: usize) -> bool {
        self.stage == 0 && chunk == 0
    }

    /// Whether chunk `chunk` of this stage is the last virtual stage (holds the head).
    pub fn holds_head(&self, chunk: usize) -> bool {
        self.stage + 1 == self.stages && chunk + 1 == self.chunks
    }
}

impl std::fmt::Debug for ModelParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelParallel")
            .field("tensor", &self.tensor)
            .field("cp", &self.cp())
            .field("cp_comm_type", &self.cp_comm_type)
            .field("moe", &self.moe)
            .field("pipeline", &self.pipeline)
            .finish()
    }
}

impl ModelParallel {
    /// One rank holding everything.
    pub fn single() -> Self {
        ModelParallel {
            tensor: TensorParallel::single(),
            context: SoloComm::shared(0),
            cp_comm_type: CpCommType::default(),
            moe: MoeParallel::single(),
            pipeline: PipelinePlacement::single(),
            embedding: None,
        }
    }

    /// Every model on one rank except the MoE layers, which use `moe`.
    pub fn moe_only(moe: MoeParallel) -> Self {
        ModelParallel {
            moe,
            ..Self::single()
        }
    }

    /// The groups of `state`'s rank; context-parallel attention by `cp_comm_type`; the layers
    /// split evenly over the pipeline's stages and chunks.
    pub fn from_state(state: &ParallelState, cp_comm_type: CpCommType) -> Self {
        let layout = state.layout();
        ModelParallel {
            tensor: TensorParallel::new(state.tp().comm().clone()),
            context: state.cp().comm().clone(),
            cp_comm_type,
            moe: MoeParallel::from_state(state),
            pipeline: PipelinePlacement {
                stage: state.pp().rank(),
                stages: layout.pp(),
                chunks: layout.vpp(),
                first_stage_layers: None,
                last_stage_layers: None,
            },
            embedding: (layout.pp() > 1)
                .then(|| state.embedding().map(|group| group.comm().clone()))
                .flatten(),
        }
    }

    /// With the first and last stage holding these many layers (the rest split evenly).
    pub fn with_stage_layers(mut self, first: Option<usize>, last: Option<usize>) -> Self {
        self.pipeline.first_stage_layers = first;
        self.pipeline.last_stage_layers = last;
        self
    }

    /// Context-parallel size.
    pub fn cp(&self) -> usize {
        self.context.size()
    }

    /// The sizes of the groups.
    pub fn sizes(&self) -> SplitSizes {
        SplitSizes {
            tp: self.tensor.size(),
            cp: self.cp(),
            ep: self.moe.ep.size(),
            etp: self.moe.etp.size(),
        }
    }
}

/// The parallel sizes that split a model's tensors and sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitSizes {
    /// Tensor-parallel size.
    pub tp: usize,
    /// Context-parallel size.
    pub cp: usize,
    /// Expert-parallel size.
    pub ep: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
}

/// Checks that every tensor the sizes split divides evenly: heads, query groups, vocabulary
/// and MLP hidden units over tp; heads over cp for the all-to-all exchange; experts over ep
/// and their hidden units over etp. The error names the key and the numbers.
pub fn check_split(
    config: &ModelConfig,
    sizes: &SplitSizes,
    cp_comm_type: CpCommType,
) -> Result<(), ModelConfigError> {
    let tp = sizes.tp;
    check_tensor_split("model.num_heads", config.num_heads, tp)?;
    check_tensor_split("model.num_kv_heads", config.num_kv_heads, tp)?;
    check_tensor_split("model.vocab_size", config.vocab_size, tp)?;
    let layers = 0..config.num_layers;
    if layers.clone().any(|l| !config.is_moe_layer(l)) {
        check_tensor_split("model.ffn_hidden_size", config.ffn_hidden_size, tp)?;
    }
    if layers.clone().any(|l| config.is_moe_layer(l)) {
        check_tensor_split(
            "model.moe.shared_expert_ffn_hidden_size",
            config.moe.shared_expert_ffn_hidden_size,
            tp,
        )?;
        let sharding = ExpertSharding {
            ep: sizes.ep,
            ep_rank: 0,
            etp: sizes.etp,
            etp_rank: 0,
        };
        sharding.check(config.moe.num_experts, config.moe.ffn_hidden_size)?;
    }
    let (heads, kv_heads) = (config.num_heads / tp, config.num_kv_heads / tp);
    let cp = sizes.cp;
    if cp > 1
        && cp_comm_type == CpCommType::A2a
        && !(heads.is_multiple_of(cp) && kv_heads.is_multiple_of(cp))
    {
        return Err(ModelConfigError::ContextHeads {
            heads,
            kv_heads,
            cp,
        });
    }
    Ok(())
}
