//! Everything the planner can refuse, each with the numbers at fault.

use origami_parallel::ParallelError;
use origami_schedule::{ScheduleError, SimulationError, SplitError};

/// Bad input to the planner.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A model dim that must be positive is zero.
    #[error("model {field} must be positive, got 0")]
    ZeroDim {
        /// The dim.
        field: &'static str,
    },
    /// Heads that query groups do not divide.
    #[error("{heads} heads do not split into {query_groups} query groups")]
    QueryGroups {
        /// Query heads.
        heads: usize,
        /// Query groups.
        query_groups: usize,
    },
    /// A layer pattern of the wrong length.
    #[error("the MoE layer pattern has {entries} entries for {layers} layers")]
    LayerPattern {
        /// Entries.
        entries: usize,
        /// Layers.
        layers: usize,
    },
    /// MoE layers without experts.
    #[error("MoE layers need experts, top-k and expert FFN > 0 (got {experts} experts, top-k {topk}, expert FFN {expert_ffn})")]
    MoeDims {
        /// Experts.
        experts: usize,
        /// Top-k.
        topk: usize,
        /// Expert FFN.
        expert_ffn: usize,
    },
    /// More experts per token than experts.
    #[error("top-k {topk} exceeds the {experts} experts")]
    TopkTooLarge {
        /// Top-k.
        topk: usize,
        /// Experts.
        experts: usize,
    },
    /// A precision name that is not known.
    #[error("unknown precision {0:?} (known: bf16, f32)")]
    UnknownPrecision(String),
    /// A recomputation mode that is not known.
    #[error("unknown recomputation {0:?} (known: none, selective, full)")]
    UnknownRecompute(String),
    /// A run size that must be positive is zero.
    #[error("{what} must be positive, got 0")]
    ZeroRun {
        /// `--gpus`, `--global-batch` or `--seq`.
        what: &'static str,
    },
    /// An expert-imbalance margin below 1.
    #[error("expert imbalance {0} must be a number of at least 1 (the busiest rank's expert rows over the mean)")]
    ExpertImbalance(f64),
    /// A hardware description that does not parse.
    #[error("hardware description {source_name}: {message}")]
    HardwareFile {
        /// File or name.
        source_name: String,
        /// The parser's message.
        message: String,
    },
    /// A hardware description that cannot be read.
    #[error("reading hardware description {path}: {message}")]
    HardwareRead {
        /// The path.
        path: String,
        /// The system's message.
        message: String,
    },
    /// A hardware value out of range.
    #[error("hardware description {source_name}: {key} = {value} is out of range")]
    HardwareValue {
        /// File or name.
        source_name: String,
        /// The key.
        key: &'static str,
        /// The value.
        value: f64,
    },
    /// A precision the hardware gives no peak for.
    #[error(
        "hardware {hardware} gives no peak FLOP/s for {precision} (`[device] peak_flops_{precision}` is absent); plan with --precision {other}, the precision it describes{calibrate_hint}",
        other = if *precision == "bf16" { "f32" } else { "bf16" },
        calibrate_hint = if hardware == "local" { " (`origami plan --calibrate` measures this machine's f32 kernels only)" } else { "" }
    )]
    NoPeak {
        /// Hardware name.
        hardware: String,
        /// Precision.
        precision: &'static str,
    },
    /// A `--layout` string that does not parse.
    #[error(
        "layout {text:?}: {problem} (expected e.g. \"tp=2 cp=1 pp=8 vpp=1 ep=8 etp=1 mbs=1\")"
    )]
    LayoutSyntax {
        /// The text.
        text: String,
        /// What is wrong.
        problem: String,
    },
    /// Parallel sizes that do not fit the world or the model.
    #[error(transparent)]
    Parallel(#[from] ParallelError),
    /// Layers that do not split over the pipeline.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// A pipeline shape the schedule cannot run.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The schedule simulation failed.
    #[error(transparent)]
    Simulation(#[from] SimulationError),
    /// A global batch that does not split into micro-batches.
    #[error("global batch {global_batch} does not split into micro-batches of {micro_batch} over dp = {dp} ({micro_batch}·{dp} = {} does not divide it)", micro_batch * dp)]
    BatchNotDivisible {
        /// Global batch, sequences.
        global_batch: usize,
        /// Micro-batch size.
        micro_batch: usize,
        /// Data-parallel size.
        dp: usize,
    },
    /// The sequence does not split over tp·cp (sequence parallelism) or 2·cp (causal balance).
    #[error("sequence {seq} does not split over {what} = {parts}")]
    SequenceNotDivisible {
        /// Sequence length.
        seq: usize,
        /// `tp·cp` or `2·cp`.
        what: &'static str,
        /// Parts.
        parts: usize,
    },
    /// An expert FFN that etp does not divide.
    #[error("expert FFN {ffn} is not divisible by etp = {etp}")]
    ExpertFfnNotDivisible {
        /// Expert FFN.
        ffn: usize,
        /// Expert tensor parallel.
        etp: usize,
    },
    /// An MLP hidden size that tp does not divide.
    #[error("{what} {ffn} is not divisible by tp = {tp}")]
    FfnNotDivisible {
        /// `dense FFN` or `shared-expert FFN`.
        what: &'static str,
        /// Hidden size.
        ffn: usize,
        /// Tensor parallel.
        tp: usize,
    },
    /// A layout that breaks the no-folding rule.
    #[error("without folding etp must equal tp and the ep groups must lie inside the dp groups (ep divides dp, and cp = 1 when ep > 1): tp = {tp}, etp = {etp}, cp = {cp}, ep = {ep}, dp = {dp}")]
    NotUnfolded {
        /// Tensor parallel.
        tp: usize,
        /// Expert tensor parallel.
        etp: usize,
        /// Context parallel.
        cp: usize,
        /// Expert parallel.
        ep: usize,
        /// Data parallel.
        dp: usize,
    },
    /// No layout fits in memory.
    #[error("no layout of {model} fits on {gpus} devices of {memory_gib} GiB: the smallest needs {smallest_gib:.1} GiB per rank ({layout})")]
    NothingFits {
        /// Model name.
        model: String,
        /// Devices.
        gpus: usize,
        /// Memory per device, GiB.
        memory_gib: f64,
        /// Least memory any layout needs, GiB.
        smallest_gib: f64,
        /// That layout.
        layout: String,
    },
    /// No layout is valid at all.
    #[error("no valid layout of {model} on {gpus} devices with global batch {global_batch} and sequence {seq}: {reason}")]
    NoLayout {
        /// Model name.
        model: String,
        /// Devices.
        gpus: usize,
        /// Global batch.
        global_batch: usize,
        /// Sequence length.
        seq: usize,
        /// Why the last candidate failed.
        reason: String,
    },
}
