//! Everything that can be wrong with a parallel configuration, each with the numbers at fault.

use origami_comm::CommError;

/// A parallel configuration that cannot run, or a failure while building a rank's groups.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    /// An order string named something that is not one of tp, cp, ep, dp, pp.
    #[error("order `{order}`: `{name}` is not an axis (expected tp, cp, ep, dp, pp)")]
    UnknownAxis {
        /// The order string as given.
        order: String,
        /// The offending name.
        name: String,
    },
    /// An order string named an axis twice.
    #[error("order `{order}` names {axis} twice")]
    RepeatedAxis {
        /// The order string as given.
        order: String,
        /// The repeated axis.
        axis: &'static str,
    },
    /// An order string left out an axis.
    #[error("order `{order}` leaves out {axis}; it must name each of tp, cp, ep, dp, pp once")]
    MissingAxis {
        /// The order string as given.
        order: String,
        /// The axis left out.
        axis: &'static str,
    },
    /// A parallel size of zero.
    #[error("parallel size {axis} must be at least 1, got 0")]
    ZeroSize {
        /// The axis whose size is zero (`world` for the world size).
        axis: &'static str,
    },
    /// The world does not split evenly over one mapping's fixed axes.
    #[error("world size {world} is not divisible by {factors} = {product} ({mapping} mapping)")]
    WorldNotDivisible {
        /// `dense` or `expert`.
        mapping: &'static str,
        /// The world size.
        world: usize,
        /// The factors as written, e.g. `tp·cp·pp = 2·2·2`.
        factors: String,
        /// Their product.
        product: usize,
    },
    /// With pp not last in the order, the data-parallel sizes of both mappings must agree.
    #[error(
        "order `{order}` does not end in pp and pp = {pp} > 1, so edp must equal dp; \
         got edp = {edp}, dp = {dp}"
    )]
    EdpMustEqualDp {
        /// The order string.
        order: String,
        /// Pipeline size.
        pp: usize,
        /// Dense data-parallel size.
        dp: usize,
        /// Expert data-parallel size.
        edp: usize,
    },
    /// The two mappings would give different pipeline groups (pp's stride differs).
    #[error(
        "order `{order}` gives dense and expert mappings different pipeline groups: pp steps \
         over {dense_stride} ranks in the dense mapping but {expert_stride} in the expert mapping"
    )]
    PipelineGroupsDiffer {
        /// The order string.
        order: String,
        /// Product of the dense sizes of the axes before pp.
        dense_stride: usize,
        /// Product of the expert sizes of the axes before pp.
        expert_stride: usize,
    },
    /// Interleaved (virtual) pipelining needs a pipeline.
    #[error("virtual pipeline size vpp = {vpp} needs pp > 1, got pp = {pp}")]
    VppWithoutPipeline {
        /// Virtual pipeline size.
        vpp: usize,
        /// Pipeline size.
        pp: usize,
    },
    /// Experts must split evenly over ep.
    #[error("number of experts {experts} is not divisible by ep = {ep}")]
    ExpertsNotDivisible {
        /// Number of experts E.
        experts: usize,
        /// Expert-parallel size.
        ep: usize,
    },
    /// Attention heads must split evenly over tp.
    #[error("number of attention heads {heads} is not divisible by tp = {tp}")]
    HeadsNotDivisible {
        /// Number of attention heads.
        heads: usize,
        /// Tensor-parallel size.
        tp: usize,
    },
    /// Key/value query groups must split evenly over tp.
    #[error("number of query groups {query_groups} is not divisible by tp = {tp}")]
    QueryGroupsNotDivisible {
        /// Number of key/value heads (query groups).
        query_groups: usize,
        /// Tensor-parallel size.
        tp: usize,
    },
    /// Layers must split evenly over the (virtual) pipeline stages.
    #[error("number of layers {layers} is not divisible by pp·vpp = {pp}·{vpp} = {}", pp * vpp)]
    LayersNotDivisible {
        /// Number of transformer layers.
        layers: usize,
        /// Pipeline size.
        pp: usize,
        /// Virtual pipeline size.
        vpp: usize,
    },
    /// The communicator handed to [`crate::ParallelState::new`] does not match the layout.
    #[error("communicator has {comm_size} ranks but the parallel layout is for world {world}")]
    WorldMismatch {
        /// Size of the communicator.
        comm_size: usize,
        /// World of the layout.
        world: usize,
    },
    /// Building a group communicator failed.
    #[error("building the {group} group: {source}")]
    Comm {
        /// The group kind being built.
        group: &'static str,
        /// What the communicator reported.
        source: CommError,
    },
}
