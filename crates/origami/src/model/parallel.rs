//! The two mappings of one rank (MoE Parallel Folding): the attention side's tensor and
//! context groups, and the MoE side's expert groups, all over the same ranks.

use std::sync::Arc;

use origami_comm::{Communicator, SoloComm};
use origami_parallel::ParallelState;

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
}

impl std::fmt::Debug for ModelParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelParallel")
            .field("tensor", &self.tensor)
            .field("cp", &self.cp())
            .field("cp_comm_type", &self.cp_comm_type)
            .field("moe", &self.moe)
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
        }
    }

    /// Every model on one rank except the MoE layers, which use `moe`.
    pub fn moe_only(moe: MoeParallel) -> Self {
        ModelParallel {
            moe,
            ..Self::single()
        }
    }

    /// The groups of `state`'s rank; context-parallel attention by `cp_comm_type`.
    pub fn from_state(state: &ParallelState, cp_comm_type: CpCommType) -> Self {
        ModelParallel {
            tensor: TensorParallel::new(state.tp().comm().clone()),
            context: state.cp().comm().clone(),
            cp_comm_type,
            moe: MoeParallel::from_state(state),
        }
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
