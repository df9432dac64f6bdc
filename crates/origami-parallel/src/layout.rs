//! Parallel sizes resolved against a world and validated; the two rank generators they define.

use serde::Serialize;

use crate::{Axis, AxisSizes, Order, ParallelConfig, ParallelError, RankGenerator};

/// Validated sizes of both mappings over `world` ranks: dense `tp·cp·dp·pp`, expert
/// `etp·ep·edp·pp`. Only [`ParallelConfig::layout`] makes one, so every layout is valid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParallelLayout {
    world: usize,
    tp: usize,
    cp: usize,
    dp: usize,
    pp: usize,
    vpp: usize,
    ep: usize,
    etp: usize,
    edp: usize,
    order: Order,
}

/// The model dimensions that parallel sizes must divide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelDims {
    /// Transformer layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Key/value heads (query groups); equal to `num_heads` without grouped-query attention.
    pub num_query_groups: usize,
    /// Routed experts per MoE layer (0 or 1 for a dense model).
    pub num_experts: usize,
}

/// One rank's position in both mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Coordinates {
    /// Position in the tp group.
    pub tp: usize,
    /// Position in the cp group.
    pub cp: usize,
    /// Position in the dp group.
    pub dp: usize,
    /// Pipeline stage.
    pub pp: usize,
    /// Position in the ep group.
    pub ep: usize,
    /// Position in the etp group.
    pub etp: usize,
    /// Position in the edp group.
    pub edp: usize,
}

impl ParallelLayout {
    pub(crate) fn new(config: &ParallelConfig, world: usize) -> Result<Self, ParallelError> {
        let etp = config.etp();
        for (axis, size) in [
            ("world", world),
            ("tp", config.tp),
            ("cp", config.cp),
            ("pp", config.pp),
            ("vpp", config.vpp),
            ("ep", config.ep),
            ("etp", etp),
        ] {
            if size == 0 {
                return Err(ParallelError::ZeroSize { axis });
            }
        }
        let dp = divide_world(
            "dense",
            world,
            &[("tp", config.tp), ("cp", config.cp), ("pp", config.pp)],
        )?;
        let edp = divide_world(
            "expert",
            world,
            &[("etp", etp), ("ep", config.ep), ("pp", config.pp)],
        )?;
        if config.vpp > 1 && config.pp == 1 {
            return Err(ParallelError::VppWithoutPipeline {
                vpp: config.vpp,
                pp: config.pp,
            });
        }
        let layout = ParallelLayout {
            world,
            tp: config.tp,
            cp: config.cp,
            dp,
            pp: config.pp,
            vpp: config.vpp,
            ep: config.ep,
            etp,
            edp,
            order: config.order.clone(),
        };
        layout.check_pipeline_groups_coincide()?;
        Ok(layout)
    }

    /// Both mappings must share their pipeline groups; with pp last this always holds.
    fn check_pipeline_groups_coincide(&self) -> Result<(), ParallelError> {
        if self.order.ends_in_pp() || self.pp == 1 {
            return Ok(());
        }
        if self.edp != self.dp {
            return Err(ParallelError::EdpMustEqualDp {
                order: self.order.to_string(),
                pp: self.pp,
                dp: self.dp,
                edp: self.edp,
            });
        }
        let dense_stride = self.dense_generator().stride(Axis::Pp);
        let expert_stride = self.expert_generator().stride(Axis::Pp);
        if dense_stride != expert_stride {
            return Err(ParallelError::PipelineGroupsDiffer {
                order: self.order.to_string(),
                dense_stride,
                expert_stride,
            });
        }
        Ok(())
    }

    /// Checks the constraints that involve the model: experts over ep, heads and query groups
    /// over tp, layers over pp·vpp.
    pub fn check_model(&self, model: &ModelDims) -> Result<(), ParallelError> {
        if model.num_experts > 1 && model.num_experts % self.ep != 0 {
            return Err(ParallelError::ExpertsNotDivisible {
                experts: model.num_experts,
                ep: self.ep,
            });
        }
        if model.num_heads % self.tp != 0 {
            return Err(ParallelError::HeadsNotDivisible {
                heads: model.num_heads,
                tp: self.tp,
            });
        }
        if model.num_query_groups % self.tp != 0 {
            return Err(ParallelError::QueryGroupsNotDivisible {
                query_groups: model.num_query_groups,
                tp: self.tp,
            });
        }
        if model.num_layers % (self.pp * self.vpp) != 0 {
            return Err(ParallelError::LayersNotDivisible {
                layers: model.num_layers,
                pp: self.pp,
                vpp: self.vpp,
            });
        }
        Ok(())
    }

    /// The rank grid of attention (dense) layers: `(tp, cp, ep = 1, dp, pp)`.
    pub fn dense_generator(&self) -> RankGenerator {
        let sizes = AxisSizes {
            tp: self.tp,
            cp: self.cp,
            ep: 1,
            dp: self.dp,
            pp: self.pp,
        };
        RankGenerator::new(self.order.clone(), sizes)
    }

    /// The rank grid of MoE (expert) layers: `(etp, cp = 1, ep, edp, pp)`.
    pub fn expert_generator(&self) -> RankGenerator {
        let sizes = AxisSizes {
            tp: self.etp,
            cp: 1,
            ep: self.ep,
            dp: self.edp,
            pp: self.pp,
        };
        RankGenerator::new(self.order.clone(), sizes)
    }

    /// Where `rank` sits in both mappings.
    pub fn coordinates(&self, rank: usize) -> Coordinates {
        let dense = self.dense_generator();
        let expert = self.expert_generator();
        Coordinates {
            tp: dense.coordinate(rank, Axis::Tp),
            cp: dense.coordinate(rank, Axis::Cp),
            dp: dense.coordinate(rank, Axis::Dp),
            pp: dense.coordinate(rank, Axis::Pp),
            ep: expert.coordinate(rank, Axis::Ep),
            etp: expert.coordinate(rank, Axis::Tp),
            edp: expert.coordinate(rank, Axis::Dp),
        }
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }
    /// Tensor-parallel size of dense layers.
    pub fn tp(&self) -> usize {
        self.tp
    }
    /// Context-parallel size.
    pub fn cp(&self) -> usize {
        self.cp
    }
    /// Data-parallel size of dense layers, `world / (tp·cp·pp)`.
    pub fn dp(&self) -> usize {
        self.dp
    }
    /// Pipeline-parallel size.
    pub fn pp(&self) -> usize {
        self.pp
    }
    /// Virtual pipeline stages per rank.
    pub fn vpp(&self) -> usize {
        self.vpp
    }
    /// Expert-parallel size.
    pub fn ep(&self) -> usize {
        self.ep
    }
    /// Expert tensor-parallel size.
    pub fn etp(&self) -> usize {
        self.etp
    }
    /// Expert data-parallel size, `world / (etp·ep·pp)`.
    pub fn edp(&self) -> usize {
        self.edp
    }
    /// The axis order.
    pub fn order(&self) -> &Order {
        &self.order
    }
}

/// `world / product(factors)`, or the error naming the mapping and every factor.
fn divide_world(
    mapping: &'static str,
    world: usize,
    factors: &[(&str, usize)],
) -> Result<usize, ParallelError> {
    let product: usize = factors.iter().map(|(_, size)| size).product();
    if world % product == 0 {
        return Ok(world / product);
    }
    let names: Vec<&str> = factors.iter().map(|(name, _)| *name).collect();
    let sizes: Vec<String> = factors.iter().map(|(_, size)| size.to_string()).collect();
    Err(ParallelError::WorldNotDivisible {
        mapping,
        world,
        factors: format!("{} = {}", names.join("·"), sizes.join("·")),
        product,
    })
}
