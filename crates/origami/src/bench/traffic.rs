//! The bytes one rank must send per training step for a layout, in theory: what the benchmark's
//! measured traffic is compared with. Counted like [`origami_comm::CountedComm`] counts
//! (ring all-reduce `2·(n−1)/n`, all-gather / reduce-scatter `(n−1)/n`, all-to-all what leaves
//! the rank, point-to-point the message), for a step of `micro_batches` micro-batches per
//! pipeline, expert routing assumed uniform. With a pipeline the figures are the mean over the
//! stages: each stage runs `1/pp` of the layers, the first and last the embedding and output.

use serde::Serialize;

use crate::layers::context_parallel::CpCommType;
use crate::layers::moe::config::DispatcherKind;
use crate::model::config::ModelConfig;

/// The per-rank bytes of one step, by cause.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Traffic {
    /// Sequence parallelism: all-gathers and reduce-scatters of activations around attention,
    /// dense and shared-expert MLPs, embedding and output layer, forward and backward, and the
    /// vocabulary-parallel cross-entropy's row statistics.
    pub sequence_parallel: f64,
    /// Context-parallel attention: key/value blocks around the ring (and their gradients back),
    /// or the all-to-alls of the head split.
    pub context_parallel: f64,
    /// MoE dispatch and combine, forward and backward (all-to-all dispatcher with etp = 1 only;
    /// `None` otherwise).
    pub expert_dispatch: Option<f64>,
    /// Gradient reduction: dense over dp-cp, expert over edp, sequence-parallel weights over tp.
    pub gradients: f64,
    /// Pipeline: activations to the next virtual stage and their gradients back, and the tied
    /// embedding's gradient between the first and last stage.
    pub pipeline: f64,
}

impl Traffic {
    /// All causes together (the dispatch counted as 0 where unknown).
    pub fn total(&self) -> f64 {
        self.sequence_parallel
            + self.context_parallel
            + self.expert_dispatch.unwrap_or(0.0)
            + self.gradients
            + self.pipeline
    }
}

/// The sizes of a layout that set its traffic.
#[derive(Clone, Copy, Debug)]
pub struct TrafficLayout {
    /// Tensor-parallel size.
    pub tp: usize,
    /// Context-parallel size.
    pub cp: usize,
    /// Data-parallel size.
    pub dp: usize,
    /// Expert-parallel size.
    pub ep: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
    /// Expert-data-parallel size.
    pub edp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Model chunks per stage.
    pub vpp: usize,
    /// Micro-batches per pipeline per step.
    pub micro_batches: usize,
    /// Context-parallel exchange.
    pub cp_comm_type: CpCommType,
    /// Whether the layers compute in bf16: the sequence-parallel gathers of GEMM inputs, the
    /// dispatch of the experts' input, the context-parallel ring's key/value blocks and the
    /// context-parallel all-to-all's q, k, v, output and output gradient then move 2 bytes a
    /// value (everything else stays f32).
    pub bf16_gemm_inputs: bool,
}

/// Elements of a group of `n` that a rank sends in an all-gather or reduce-scatter of `len`.
fn gather(n: usize, len: f64) -> f64 {
    (n - 1) as f64 / n as f64 * len
}

/// Elements a rank sends in a ring all-reduce of `len` over `n` ranks.
fn all_reduce(n: usize, len: f64) -> f64 {
    2.0 * gather(n, len)
}

/// Theory for `config` trained on `layout` with micro-batches of `sequences` of `seq` tokens per
/// data-parallel rank; `params` are a rank's (dense, expert, whole-over-tp dense) element
/// counts (the mean over the stages with a pipeline); `tied_table` the elements of a rank's
/// shard of a tied embedding table that its first and last stage both hold (0 otherwise).
pub fn theoretical_traffic(
    config: &ModelConfig,
    layout: &TrafficLayout,
    (sequences, seq): (usize, usize),
    (dense, expert, whole_over_tp): (f64, f64, f64),
    tied_table: usize,
) -> Traffic {
    let h = config.hidden_size as f64;
    let layers = config.num_layers;
    let moe_layers = (0..layers).filter(|&l| config.is_moe_layer(l)).count();
    let dense_layers = layers - moe_layers;
    let shared_layers = if config.moe.shared_expert_ffn_hidden_size > 0 {
        moe_layers
    } else {
        0
    };
    let region_tokens = (sequences * seq / layout.cp) as f64;
    let rank_tokens = region_tokens / layout.tp as f64;
    let pp = layout.pp as f64;
    // Activation traffic of the step on one rank: every micro-batch, this stage's share.
    let per_stage = layout.micro_batches as f64 / pp;
    let bytes = |elements: f64| 4.0 * elements;

    // Each parallel region (attention, dense MLP, shared expert, the output layer with the
    // embedding) gathers its input and scatters its output forward, and the reverse backward;
    // the input gather moves bf16 when the GEMMs take bf16.
    let regions = (layers + dense_layers + shared_layers + 1) as f64;
    let input_bytes = if layout.bf16_gemm_inputs { 2.0 } else { 4.0 };
    let sequence_parallel = per_stage
        * ((3.0 * 4.0 + input_bytes) * regions * gather(layout.tp, region_tokens * h)
            + bytes(all_reduce(layout.tp, 3.0 * region_tokens)));

    let head_dim = config.head_dim() as f64;
    let q = region_tokens * (config.num_heads / layout.tp) as f64 * head_dim;
    let kv = region_tokens * 2.0 * (config.num_kv_heads / layout.tp) as f64 * head_dim;
    let cp = layout.cp;
    let per_layer_bytes = match (cp, layout.cp_comm_type) {
        (1, _) => 0.0,
        // Forward: cp − 1 key/value blocks on; backward: cp − 1 blocks with their gradient
        // accumulators, then the last accumulator home (the blocks bf16 when the attention
        // computes in bf16, the accumulators f32).
        (_, CpCommType::P2p) => (cp - 1) as f64 * (2.0 * input_bytes + 4.0) * kv + 4.0 * kv,
        // Forward: q, kv out and the output back; backward: dout out, dq and dkv back. All but
        // the gradients dq and dkv are bf16 when the attention computes in bf16.
        (_, CpCommType::A2a) => input_bytes * gather(cp, 3.0 * q + kv) + bytes(gather(cp, q + kv)),
    };
    let context_parallel = per_stage * layers as f64 * per_layer_bytes;

    let expert_dispatch = (config.moe.dispatcher == DispatcherKind::Alltoall && layout.etp == 1)
        .then(|| {
            // Dispatch and combine forward, their gradients backward; the dispatch carries the
            // experts' input, bf16 when they compute in bf16.
            let routed = rank_tokens * config.moe.topk as f64 * h;
            per_stage * (3.0 * 4.0 + input_bytes) * moe_layers as f64 * gather(layout.ep, routed)
        });

    let gradients = bytes(
        all_reduce(layout.dp * layout.cp, dense)
            + all_reduce(layout.edp, expert)
            + all_reduce(layout.tp, whole_over_tp),
    );
    // Each micro-batch crosses vpp·pp − 1 chunk boundaries forward and back; the pp ranks of a
    // pipeline share the sends. A tied table's gradient is all-reduced by two of them.
    let boundaries = (layout.vpp * layout.pp - 1) as f64;
    let pipeline = bytes(
        layout.micro_batches as f64 * 2.0 * boundaries * rank_tokens * h / pp
            + if layout.pp > 1 {
                2.0 * all_reduce(2, tied_table as f64) / pp
            } else {
                0.0
            },
    );
    Traffic {
        sequence_parallel,
        context_parallel,
        expert_dispatch,
        gradients,
        pipeline,
    }
}
