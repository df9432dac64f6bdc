//! What one rank does for one micro-batch on one layer — GEMMs, attention FLOPs, bytes moved by
//! memory-bound kernels, bytes sent by each collective, tensors kept for the backward — before
//! any hardware is applied.
//!
//! Token counts of one micro-batch of `mbs` sequences of `s` tokens on one rank: the tensor-
//! parallel *region* holds `T_reg = mbs·s/cp` tokens (attention, dense and shared-expert MLPs
//! see all of them), the sequence-parallel *slice* `T_loc = T_reg/tp` (norms, residual stream,
//! router, the tokens the MoE layer dispatches). Expert rows a rank computes under uniform
//! routing: `T_loc · k · etp` (its slice's k copies arrive back from ep peers on average; the
//! etp all-gather multiplies them by etp), times the load imbalance of the busiest rank.
//!
//! Collectives are counted in bytes one rank sends, as `bench::traffic` and
//! `origami_comm::CountedComm` count them: all-gather and reduce-scatter of a total `n` over
//! `g` ranks send `(g−1)/g · n`, an all-to-all sends what leaves the rank.

use origami_parallel::GroupKind;
use serde::Serialize;

use crate::precision::Bytes;
use crate::recompute::Recompute;
use crate::{Layout, ModelShape};

/// Forward and backward parts of one quantity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Passes {
    /// Forward.
    pub forward: f64,
    /// Backward.
    pub backward: f64,
}

impl Passes {
    /// Both passes.
    pub fn total(&self) -> f64 {
        self.forward + self.backward
    }

    fn add(&mut self, other: Passes) {
        self.forward += other.forward;
        self.backward += other.backward;
    }
}

/// One forward GEMM `[m, k] × [k, n]`, run `count` times (a grouped GEMM's experts); the
/// backward runs two of the same size (input and weight gradients).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Gemm {
    /// What it computes.
    pub name: &'static str,
    /// Rows.
    pub m: f64,
    /// Inner dim.
    pub k: f64,
    /// Columns.
    pub n: f64,
    /// GEMMs of this shape (experts of a grouped GEMM, 1 otherwise).
    pub count: f64,
    /// Part of a grouped expert GEMM.
    pub grouped: bool,
}

impl Gemm {
    /// Forward FLOPs of all `count` products.
    pub fn flops(&self) -> f64 {
        2.0 * self.m * self.k * self.n * self.count
    }

    /// Elements one product reads and writes (both operands and the result).
    pub fn elements(&self) -> f64 {
        self.m * self.k + self.k * self.n + self.m * self.n
    }
}

/// Which cost bucket a collective belongs to in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommKind {
    /// Sequence-parallel all-gathers and reduce-scatters over tp.
    TensorParallel,
    /// Key/value exchange of context-parallel attention.
    ContextParallel,
    /// MoE dispatch and combine all-to-alls over ep.
    ExpertDispatch,
    /// All-gather and reduce-scatter of expert rows over etp.
    ExpertTensorParallel,
    /// Gradient reduction (dense over dp-cp, experts over edp, replicated over tp).
    GradientReduce,
    /// The distributed optimizer's parameter all-gather.
    ParamGather,
    /// Activations and their gradients between pipeline stages.
    Pipeline,
}

impl CommKind {
    /// Every kind, in output order.
    pub const ALL: [CommKind; 7] = [
        CommKind::TensorParallel,
        CommKind::ContextParallel,
        CommKind::ExpertDispatch,
        CommKind::ExpertTensorParallel,
        CommKind::GradientReduce,
        CommKind::ParamGather,
        CommKind::Pipeline,
    ];

    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            CommKind::TensorParallel => "tp",
            CommKind::ContextParallel => "cp",
            CommKind::ExpertDispatch => "ep",
            CommKind::ExpertTensorParallel => "etp",
            CommKind::GradientReduce => "dp_grad",
            CommKind::ParamGather => "dp_param",
            CommKind::Pipeline => "pp",
        }
    }
}

/// The collective algorithm, which sets the link rate used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Collective {
    /// All-reduce.
    AllReduce,
    /// All-gather or reduce-scatter.
    AllGather,
    /// All-to-all.
    AllToAll,
    /// Point-to-point.
    P2p,
}

/// One collective of a micro-batch (or of the step, for gradients), in bytes this rank sends.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Comm {
    /// Output bucket.
    pub kind: CommKind,
    /// Algorithm.
    pub collective: Collective,
    /// The group it runs over.
    #[serde(skip)]
    pub group: GroupKind,
    /// Bytes this rank sends, forward and backward.
    pub bytes: Passes,
    /// Calls, forward and backward (each pays the link latency).
    pub calls: Passes,
}

/// A tensor kept from the forward for the backward.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stored {
    /// What it is.
    pub name: &'static str,
    /// Bytes per micro-batch.
    pub bytes: f64,
}

/// One layer's (or the output layer's) work for one micro-batch on one rank.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LayerWork {
    /// Forward GEMMs.
    pub gemms: Vec<Gemm>,
    /// Attention-core FLOPs (causal scores and weighted values).
    pub attention_flops: Passes,
    /// Whether the attention core runs as context-parallel blocks.
    pub context_parallel_attention: bool,
    /// Bytes read and written by element-wise kernels (norms, RoPE, SwiGLU, embedding).
    pub memory_bytes: Passes,
    /// Bytes read and written by the output layer's cross-entropy over the vocabulary.
    pub cross_entropy_bytes: Passes,
    /// Bytes read and written by the element-wise glue between kernels: residual adds, router
    /// scores and top-k, permutation and weighted un-permutation, the etp re-sort. origami's
    /// CPU engine runs it on the rank's own thread (see `Engine::serial_glue`).
    pub glue_bytes: Passes,
    /// Collectives.
    pub comms: Vec<Comm>,
    /// Tensors kept for the backward.
    pub stored: Vec<Stored>,
    /// Largest buffers alive at once during this layer's backward, beyond `stored`.
    pub backward_working_bytes: f64,
    /// Bytes of routed tokens this rank dispatches (`T_loc · k · h`), for the dispatcher's
    /// per-byte overhead.
    pub routed_bytes: f64,
    /// What the backward runs again of the forward (set by [`Recompute::apply`]).
    pub recompute: Recompute,
    /// The forward work a selective recomputation runs again.
    pub selective_redo: SelectiveRedo,
}

/// The parts of a layer's forward that `selective` recomputation runs again in the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct SelectiveRedo {
    /// FLOPs of the attention core's forward.
    pub attention_flops: f64,
    /// Bytes of the norms' and SwiGLUs' forward passes.
    pub memory_bytes: f64,
}

impl LayerWork {
    /// Bytes kept for the backward.
    pub fn stored_bytes(&self) -> f64 {
        self.stored.iter().map(|s| s.bytes).sum()
    }

    /// The largest single tensor kept for the backward.
    pub fn largest_stored(&self) -> f64 {
        self.stored.iter().map(|s| s.bytes).fold(0.0, f64::max)
    }
}

/// What sets a rank's work: the model, the layout, the sequence and the run's numerics.
#[derive(Clone, Copy, Debug)]
pub struct WorkInputs<'a> {
    /// The model.
    pub model: &'a ModelShape,
    /// The layout.
    pub layout: &'a Layout,
    /// Tokens per sequence.
    pub seq: usize,
    /// Bytes per element of each kind of state.
    pub bytes: Bytes,
    /// Sequence-parallel inputs are kept as this rank's slice and gathered again for the
    /// weight gradient (Megatron-Core); otherwise kept gathered (origami).
    pub regather: bool,
    /// Context-parallel exchange by all-to-all over heads instead of the key/value ring.
    pub cp_all_to_all: bool,
    /// Expert rows of the busiest rank over the uniform share (1 = perfectly balanced).
    pub expert_imbalance: f64,
    /// Rows of the output layer computed at once (`None`: the whole micro-batch).
    pub output_chunk_rows: Option<usize>,
    /// What a transformer layer's backward recomputes.
    pub recompute: Recompute,
}

/// f32 statistics and index tensors keep their own sizes whatever the activation type.
const F32: f64 = 4.0;
/// Router indices per routed slot: expert id (4) and, in the permutation, two 8-byte indices.
const INDEX_BYTES_PER_SLOT: f64 = 20.0;

impl WorkInputs<'_> {
    fn region_tokens(&self) -> f64 {
        (self.layout.mbs * self.seq) as f64 / self.layout.cp as f64
    }

    fn slice_tokens(&self) -> f64 {
        self.region_tokens() / self.layout.tp as f64
    }

    /// Expert rows this rank computes per MoE layer and micro-batch.
    pub fn expert_rows(&self) -> f64 {
        self.slice_tokens()
            * self.model.topk as f64
            * self.layout.etp as f64
            * self.expert_imbalance
    }

    /// Sends of a ring all-gather or reduce-scatter of `total` bytes over `g` ranks.
    fn gather(g: usize, total: f64) -> f64 {
        (g - 1) as f64 / g as f64 * total
    }

    /// Sequence-parallel collectives over tp of the region's `[T_reg, h]`: forward, `entering`
    /// all-gathers of a GEMM input into a region and `leaving` reduce-scatters of partial sums
    /// out of it; backward, the same count of collectives of their gradients, plus, when
    /// `regathered` (the region's input was kept as a slice, or recomputed), one more
    /// all-gather of its input for the weight gradient. A region (attention, an MLP) enters and
    /// leaves (1 + 1 forward, 2 backward); the embedding only leaves, the output layer only
    /// enters.
    fn sequence_parallel(&self, entering: f64, leaving: f64, regathered: bool) -> Option<Comm> {
        let tp = self.layout.tp;
        if tp == 1 {
            return None;
        }
        let one =
            |bytes: f64| Self::gather(tp, self.region_tokens() * self.model.hidden as f64 * bytes);
        let (input, other) = (one(self.bytes.gemm_input), one(self.bytes.activation));
        let regather = if regathered { 1.0 } else { 0.0 };
        Some(Comm {
            kind: CommKind::TensorParallel,
            collective: Collective::AllGather,
            group: GroupKind::Tp,
            bytes: Passes {
                forward: entering * input + leaving * other,
                backward: (entering + leaving) * other + regather * input,
            },
            calls: Passes {
                forward: entering + leaving,
                backward: entering + leaving + regather,
            },
        })
    }

    /// A tensor-parallel region's entry and exit; `norm_input` when its input is a norm's
    /// output, which selective recomputation recomputes and gathers again.
    fn region_comm(&self, norm_input: bool) -> Option<Comm> {
        let recomputed = norm_input && self.recompute == Recompute::Selective;
        self.sequence_parallel(1.0, 1.0, self.regather || recomputed)
    }

    /// Tokens kept for a region's GEMM input: the slice with regathering, else the region.
    fn kept_input_tokens(&self) -> f64 {
        if self.regather {
            self.slice_tokens()
        } else {
            self.region_tokens()
        }
    }

    /// Attention with its norm and residual, and the norm before the feed-forward part.
    fn attention(&self, work: &mut LayerWork) {
        let m = self.model;
        let (tp, a, input) = (
            self.layout.tp as f64,
            self.bytes.activation,
            self.bytes.gemm_input,
        );
        let (h, region, slice) = (m.hidden as f64, self.region_tokens(), self.slice_tokens());
        let (qkv, query) = (m.qkv_width() as f64 / tp, m.query_width() as f64 / tp);
        work.gemms.push(Gemm {
            name: "qkv",
            m: region,
            k: h,
            n: qkv,
            count: 1.0,
            grouped: false,
        });
        work.gemms.push(Gemm {
            name: "attention_out",
            m: region,
            k: query,
            n: h,
            count: 1.0,
            grouped: false,
        });
        // Causal core: 2 products of s²·head_dim per head, halved by the mask; context
        // parallelism splits the queries; the backward does twice the forward's work.
        let core = self.layout.mbs as f64
            * 2.0
            * (self.seq as f64).powi(2)
            * m.head_dim as f64
            * (m.heads as f64 / tp)
            / self.layout.cp as f64;
        work.attention_flops.add(Passes {
            forward: core,
            backward: 2.0 * core,
        });
        work.context_parallel_attention = self.layout.cp > 1;
        work.selective_redo.attention_flops += core;
        work.selective_redo.memory_bytes += 2.0 * 2.0 * h * slice * a;
        // Two norms (forward reads x, writes y; backward reads x and dy, writes dx); RoPE
        // rotates q and k in place both ways. Glue: two residual adds (read two, write one)
        // in each pass.
        let rope = 2.0 * (m.heads + m.query_groups) as f64 * m.head_dim as f64 / tp;
        work.memory_bytes.add(Passes {
            forward: 2.0 * 2.0 * h * slice * a + rope * region * a,
            backward: 2.0 * 3.0 * h * slice * a + rope * region * a,
        });
        work.glue_bytes.add(Passes {
            forward: 2.0 * 3.0 * h * slice * a,
            backward: 2.0 * 3.0 * h * slice * a,
        });
        work.comms.extend(self.region_comm(true));
        self.context_parallel(work);
        work.stored.extend([
            Stored {
                name: "attention_norm_input",
                bytes: slice * h * a,
            },
            Stored {
                name: "attention_norm_output",
                bytes: self.kept_input_tokens() * h * input,
            },
            Stored {
                name: "qkv",
                bytes: region * qkv * a,
            },
            Stored {
                name: "attention_context",
                bytes: region * query * a,
            },
            Stored {
                name: "softmax_statistics",
                bytes: region * m.heads as f64 / tp * F32,
            },
            Stored {
                name: "ffn_norm_input",
                bytes: slice * h * a,
            },
            Stored {
                name: "norm_statistics",
                bytes: 2.0 * slice * F32,
            },
        ]);
        work.backward_working_bytes = work
            .backward_working_bytes
            .max(region * (qkv + query + h) * a);
    }

    /// The context-parallel exchange and what it keeps.
    fn context_parallel(&self, work: &mut LayerWork) {
        let cp = self.layout.cp;
        if cp == 1 {
            return;
        }
        let m = self.model;
        let (tp, a, input) = (
            self.layout.tp as f64,
            self.bytes.activation,
            self.bytes.gemm_input,
        );
        let region = self.region_tokens();
        let hd = m.head_dim as f64;
        // Elements of this rank's queries and of its key/value block.
        let q = region * m.heads as f64 / tp * hd;
        let kv = region * 2.0 * m.query_groups as f64 / tp * hd;
        let (collective, bytes, calls) = if self.cp_all_to_all {
            // Forward: q and kv out, the output back; backward: dout out, dq and dkv back. Only
            // the gradients dq and dkv are not kernel or GEMM inputs.
            (
                Collective::AllToAll,
                Passes {
                    forward: Self::gather(cp, (2.0 * q + kv) * input),
                    backward: Self::gather(cp, q * input + (q + kv) * a),
                },
                Passes {
                    forward: 3.0,
                    backward: 3.0,
                },
            )
        } else {
            // Ring: cp − 1 key/value blocks forward (GEMM inputs); backward the blocks with
            // their gradient accumulators, then the last accumulator home.
            let steps = (cp - 1) as f64;
            (
                Collective::P2p,
                Passes {
                    forward: steps * kv * input,
                    backward: steps * kv * (input + a) + kv * a,
                },
                Passes {
                    forward: steps,
                    backward: steps + 1.0,
                },
            )
        };
        work.comms.push(Comm {
            kind: CommKind::ContextParallel,
            collective,
            group: GroupKind::Cp,
            bytes,
            calls,
        });
        work.stored.push(Stored {
            name: "context_parallel_output",
            bytes: q * a,
        });
        if self.cp_all_to_all {
            work.stored.push(Stored {
                name: "context_parallel_heads",
                bytes: (q + kv) * input,
            });
        }
    }

    /// A tensor-parallel SwiGLU MLP of hidden size `ffn` over the region's tokens; `norm_input`
    /// as for [`WorkInputs::region_comm`] (the shared expert keeps its gathered input).
    fn mlp(&self, work: &mut LayerWork, ffn: usize, names: [&'static str; 4], norm_input: bool) {
        let (tp, a, input) = (
            self.layout.tp as f64,
            self.bytes.activation,
            self.bytes.gemm_input,
        );
        let (h, region) = (self.model.hidden as f64, self.region_tokens());
        let f = ffn as f64 / tp;
        work.gemms.push(Gemm {
            name: names[0],
            m: region,
            k: h,
            n: 2.0 * f,
            count: 1.0,
            grouped: false,
        });
        work.gemms.push(Gemm {
            name: names[1],
            m: region,
            k: f,
            n: h,
            count: 1.0,
            grouped: false,
        });
        // SwiGLU: forward reads gate and up, writes the product; backward reads both and the
        // output gradient, writes both gradients.
        work.memory_bytes.add(Passes {
            forward: 3.0 * f * region * a,
            backward: 5.0 * f * region * a,
        });
        work.selective_redo.memory_bytes += 3.0 * f * region * a;
        work.comms.extend(self.region_comm(norm_input));
        work.stored.extend([
            Stored {
                name: names[2],
                bytes: region * 2.0 * f * a,
            },
            Stored {
                name: names[3],
                bytes: region * f * input,
            },
        ]);
        work.backward_working_bytes = work.backward_working_bytes.max(region * (3.0 * f + h) * a);
    }

    /// The work of a dense layer.
    pub fn dense_layer(&self) -> LayerWork {
        let mut work = LayerWork::default();
        self.attention(&mut work);
        work.stored.push(Stored {
            name: "mlp_norm_output",
            bytes: self.kept_input_tokens() * self.model.hidden as f64 * self.bytes.gemm_input,
        });
        self.mlp(
            &mut work,
            self.model.dense_ffn,
            [
                "mlp_gate_up",
                "mlp_down",
                "mlp_gate_up_output",
                "mlp_activation",
            ],
            true,
        );
        self.recomputed(work)
    }

    /// The work of an MoE layer: router, permutation, dispatch over ep (and etp), grouped
    /// experts, combine, and the shared expert.
    pub fn moe_layer(&self) -> LayerWork {
        let mut work = LayerWork::default();
        self.attention(&mut work);
        let m = self.model;
        let (ep, etp) = (self.layout.ep, self.layout.etp);
        let (a, input) = (self.bytes.activation, self.bytes.gemm_input);
        let (h, slice) = (m.hidden as f64, self.slice_tokens());
        let (e, k) = (m.experts as f64, m.topk as f64);
        let rows = self.expert_rows();
        let local_experts = e / ep as f64;
        let f = m.expert_ffn as f64 / etp as f64;
        work.gemms.push(Gemm {
            name: "router",
            m: slice,
            k: h,
            n: e,
            count: 1.0,
            grouped: false,
        });
        for (name, inner, outer) in [("expert_fc1", h, 2.0 * f), ("expert_fc2", f, h)] {
            work.gemms.push(Gemm {
                name,
                m: rows / local_experts,
                k: inner,
                n: outer,
                count: local_experts,
                grouped: true,
            });
        }
        // SwiGLU over the expert rows. Glue: router scores (softmax, top-k) over E per token;
        // permute and weighted un-permute of each routed copy (read h, write h, both passes);
        // the etp re-sort of the gathered rows.
        let slots = slice * k;
        let resort = if etp > 1 { 2.0 * h * rows } else { 0.0 };
        work.memory_bytes.add(Passes {
            forward: 3.0 * f * rows * a,
            backward: 5.0 * f * rows * a,
        });
        work.selective_redo.memory_bytes += 3.0 * f * rows * a;
        let glue = 3.0 * e * slice * F32 + (4.0 * h * slots + resort) * a;
        work.glue_bytes.add(Passes {
            forward: glue,
            backward: glue,
        });
        // Routed rows: dispatched as GEMM inputs, combined and differentiated as activations.
        let routed = slots * h * self.expert_imbalance;
        let routed_bytes = routed * input;
        work.routed_bytes = routed_bytes;
        if ep > 1 {
            let one = Self::gather(ep, routed);
            work.comms.push(Comm {
                kind: CommKind::ExpertDispatch,
                collective: Collective::AllToAll,
                group: GroupKind::Ep,
                bytes: Passes {
                    forward: one * (input + a),
                    backward: 2.0 * one * a,
                },
                calls: Passes {
                    forward: 2.0,
                    backward: 2.0,
                },
            });
        }
        if etp > 1 {
            // Each rank's received rows go to the other etp − 1 ranks (all-gather) and come
            // back summed (reduce-scatter), in both passes.
            let one = (etp - 1) as f64 * routed;
            work.comms.push(Comm {
                kind: CommKind::ExpertTensorParallel,
                collective: Collective::AllGather,
                group: GroupKind::Etp,
                bytes: Passes {
                    forward: one * (input + a),
                    backward: 2.0 * one * a,
                },
                calls: Passes {
                    forward: 2.0,
                    backward: 2.0,
                },
            });
        }
        work.stored.extend([
            Stored {
                name: "moe_norm_output",
                bytes: slice * h * a,
            },
            Stored {
                name: "router_scores",
                bytes: 2.0 * e * slice * F32,
            },
            Stored {
                name: "routing_indices",
                bytes: slots * INDEX_BYTES_PER_SLOT,
            },
            Stored {
                name: "expert_input",
                bytes: rows * h * input,
            },
            Stored {
                name: "expert_fc1_output",
                bytes: rows * 2.0 * f * a,
            },
            Stored {
                name: "expert_activation",
                bytes: rows * f * input,
            },
            Stored {
                name: "expert_output_combined",
                bytes: slots * h * a * self.expert_imbalance,
            },
        ]);
        // Backward of the experts: gradients of fc1 output, activation and input rows, and the
        // dispatch buffers of the rows on their way back.
        work.backward_working_bytes = work
            .backward_working_bytes
            .max(rows * (3.0 * f + 2.0 * h) * a + routed * a);
        if m.shared_expert_ffn > 0 {
            work.stored.push(Stored {
                name: "shared_expert_input",
                bytes: self.kept_input_tokens() * h * input,
            });
            self.mlp(
                &mut work,
                m.shared_expert_ffn,
                [
                    "shared_gate_up",
                    "shared_down",
                    "shared_gate_up_output",
                    "shared_activation",
                ],
                false,
            );
            if m.shared_expert_gate {
                work.stored.push(Stored {
                    name: "shared_expert_gate",
                    bytes: self.region_tokens() * (h + 1.0) * a,
                });
            }
        }
        self.recomputed(work)
    }

    /// A transformer layer's `work` as the run's recomputation leaves it: what it keeps, and
    /// what its backward runs again.
    fn recomputed(&self, mut work: LayerWork) -> LayerWork {
        let input = self.slice_tokens() * self.model.hidden as f64 * self.bytes.activation;
        self.recompute.apply(&mut work, input);
        work
    }

    /// The final norm, output layer and cross-entropy on the last stage.
    pub fn output_layer(&self) -> LayerWork {
        let mut work = LayerWork::default();
        let m = self.model;
        let (tp, a) = (self.layout.tp as f64, self.bytes.activation);
        let (h, region, slice) = (m.hidden as f64, self.region_tokens(), self.slice_tokens());
        let vocab = (m.vocab as f64 / tp).ceil();
        work.gemms.push(Gemm {
            name: "output",
            m: region,
            k: h,
            n: vocab,
            count: 1.0,
            grouped: false,
        });
        // Cross-entropy in f32: the forward reads the logits twice (max, sum of exponentials),
        // the backward writes the logit gradient from them; the final norm around it.
        work.cross_entropy_bytes.add(Passes {
            forward: 2.0 * vocab * region * F32,
            backward: 2.0 * vocab * region * F32,
        });
        work.memory_bytes.add(Passes {
            forward: 2.0 * h * slice * a,
            backward: 3.0 * h * slice * a,
        });
        work.comms
            .extend(self.sequence_parallel(1.0, 0.0, self.regather));
        work.stored.extend([
            Stored {
                name: "final_norm_input",
                bytes: slice * h * a,
            },
            Stored {
                name: "output_input",
                bytes: self.kept_input_tokens() * h * a,
            },
        ]);
        // Logits and their gradient in f32, for the whole micro-batch or one chunk of rows.
        let rows = self
            .output_chunk_rows
            .map_or(region, |chunk| region.min(chunk as f64));
        work.backward_working_bytes = 2.0 * rows * vocab * F32;
        work
    }

    /// The embedding lookup on the first stage: it keeps only the token ids.
    pub fn embedding_layer(&self) -> LayerWork {
        let (h, a) = (self.model.hidden as f64, self.bytes.activation);
        let mut work = LayerWork::default();
        work.memory_bytes.add(Passes {
            forward: 2.0 * h * self.region_tokens() * a,
            backward: 2.0 * h * self.region_tokens() * a,
        });
        // Vocabulary-parallel lookup: one reduce-scatter forward, one all-gather backward.
        work.comms.extend(self.sequence_parallel(0.0, 1.0, false));
        work.stored.push(Stored {
            name: "token_ids",
            bytes: self.region_tokens() * 8.0,
        });
        work
    }

    /// Bytes of one pipeline transfer: the stage's output slice `[T_loc, h]`.
    pub fn pipeline_transfer_bytes(&self) -> f64 {
        self.slice_tokens() * self.model.hidden as f64 * self.bytes.activation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::tests::small;
    use crate::{MixedPrecision, Precision};

    fn inputs<'a>(model: &'a ModelShape, layout: &'a Layout) -> WorkInputs<'a> {
        WorkInputs {
            model,
            layout,
            seq: 1024,
            bytes: Precision::F32.bytes(MixedPrecision::Origami),
            regather: false,
            cp_all_to_all: false,
            expert_imbalance: 1.0,
            output_chunk_rows: Some(1024),
            recompute: Recompute::None,
        }
    }

    fn total_flops(work: &LayerWork) -> f64 {
        3.0 * work.gemms.iter().map(Gemm::flops).sum::<f64>() + work.attention_flops.total()
    }

    #[test]
    fn one_rank_flops_of_a_layer_match_the_design_formula() {
        // small, one rank, 4 sequences of 1024: a layer's training FLOPs per token are
        // 12·h²·(1 + 4/8) + 12·h·s/2 + 12·h·1.5·(2·1024) plus the router's 6·h·E.
        let model = small();
        let layout: Layout = "mbs=4".parse().unwrap();
        let work = inputs(&model, &layout).moe_layer();
        let h = 512.0;
        let per_token =
            12.0 * h * h * 1.5 + 12.0 * h * 1024.0 / 2.0 + 12.0 * h * 1.5 * 2048.0 + 6.0 * h * 16.0;
        let expected = per_token * 4096.0;
        assert!((total_flops(&work) / expected - 1.0).abs() < 1e-12);
    }

    #[test]
    fn flops_split_evenly_over_a_folded_world() {
        // tp 2 · dp 2 | ep 4 on 4 ranks, 2 sequences per rank: each rank does a quarter of the
        // 4-sequence work (router aside, which every tp rank runs on its own slice).
        let model = small();
        let whole = inputs(&model, &"mbs=4".parse().unwrap()).moe_layer();
        let layout: Layout = "tp=2 ep=4 mbs=2".parse().unwrap();
        let part = inputs(&model, &layout).moe_layer();
        let without_router = |w: &LayerWork| {
            3.0 * w
                .gemms
                .iter()
                .filter(|g| g.name != "router")
                .map(Gemm::flops)
                .sum::<f64>()
                + w.attention_flops.total()
        };
        assert!((without_router(&part) * 4.0 / without_router(&whole) - 1.0).abs() < 1e-12);
        // Each of the 4 local experts gets 1024 · 2 / 4 = 512 rows: T_loc = 2·1024/2 = 1024
        // tokens × top-2 = 2048 rows over 16 / 4 = 4 experts.
        let fc1 = part.gemms.iter().find(|g| g.name == "expert_fc1").unwrap();
        assert_eq!((fc1.m, fc1.count, fc1.n), (512.0, 4.0, 2048.0));
    }

    #[test]
    fn collective_bytes_match_the_bench_traffic_formulas() {
        // tp 2, ep 4, 2 sequences of 1024 per rank, f32. Sequence parallel: 4 collectives per
        // region (attention + nothing else in an MoE layer without shared expert), each
        // sending (2−1)/2 · 2048 · 512 · 4 bytes. Dispatch: 4 all-to-alls each sending
        // 3/4 · 1024 · 2 · 512 · 4 bytes.
        let model = small();
        let layout: Layout = "tp=2 ep=4 mbs=2".parse().unwrap();
        let work = inputs(&model, &layout).moe_layer();
        let sum = |kind| {
            work.comms
                .iter()
                .filter(|c| c.kind == kind)
                .map(|c| c.bytes.total())
                .sum::<f64>()
        };
        assert_eq!(
            sum(CommKind::TensorParallel),
            4.0 * 0.5 * 2048.0 * 512.0 * 4.0
        );
        assert_eq!(
            sum(CommKind::ExpertDispatch),
            4.0 * 0.75 * 1024.0 * 2.0 * 512.0 * 4.0
        );
        // Context-parallel ring, cp 2: one kv block forward, one block with its accumulator
        // and the accumulator home backward: 4 kv blocks of 1024 · 2·4·64 · 4 bytes.
        let layout: Layout = "cp=2 ep=4 mbs=2".parse().unwrap();
        let work = inputs(&model, &layout).moe_layer();
        let cp: f64 = work
            .comms
            .iter()
            .filter(|c| c.kind == CommKind::ContextParallel)
            .map(|c| c.bytes.total())
            .sum();
        assert_eq!(cp, 4.0 * 1024.0 * 2.0 * 4.0 * 64.0 * 4.0);
    }

    #[test]
    fn stored_activations_of_one_rank_by_hand() {
        // small, one rank, one sequence of 1024 tokens, f32, no tp/cp: per token
        // attention block 4·h (norm input, norm output, ffn norm input, moe norm output) +
        // qkv 1024 + context 512 (4 bytes each) + softmax 8 and norm rstd 2 (f32);
        // MoE: router 2·16 f32, indices 2 slots · 20 bytes, expert input 2·512, fc1 out
        // 2·2048, activation 2·1024, combined 2·512.
        let model = small();
        let layout: Layout = "mbs=1".parse().unwrap();
        let work = inputs(&model, &layout).moe_layer();
        let floats = 4.0 * 512.0
            + 1024.0
            + 512.0
            + 8.0
            + 2.0
            + 32.0
            + 2.0 * 512.0
            + 2.0 * 2048.0
            + 2.0 * 1024.0
            + 2.0 * 512.0;
        let expected = 1024.0 * (floats * 4.0 + 2.0 * 20.0);
        assert_eq!(work.stored_bytes(), expected);
    }

    #[test]
    fn expert_tensor_parallel_gathers_rows_and_regathering_adds_one_gather() {
        // ep 2 etp 2 on tp 2 (unfolded): each rank computes T_loc·k·etp rows and sends its
        // routed rows to 1 etp peer, 4 times per layer.
        let model = small();
        let layout: Layout = "tp=2 ep=2 etp=2 mbs=1".parse().unwrap();
        let mut i = inputs(&model, &layout);
        assert_eq!(i.expert_rows(), 512.0 * 2.0 * 2.0);
        let work = i.moe_layer();
        let etp: f64 = work
            .comms
            .iter()
            .filter(|c| c.kind == CommKind::ExpertTensorParallel)
            .map(|c| c.bytes.total())
            .sum();
        assert_eq!(etp, 4.0 * 512.0 * 2.0 * 512.0 * 4.0);
        i.regather = true;
        let tp = i
            .moe_layer()
            .comms
            .iter()
            .find(|c| c.kind == CommKind::TensorParallel)
            .unwrap()
            .calls;
        assert_eq!((tp.forward, tp.backward), (2.0, 3.0));
    }

    #[test]
    fn origami_bf16_sends_the_context_parallel_all_to_alls_kernel_inputs_in_bf16() {
        // small, cp 2 all-to-all, 2 sequences of 1024 per data-parallel rank: 1024 rows on the
        // rank, q and kv 1024 · 512 values each; an all-to-all over 2 ranks sends half of them.
        let model = small();
        let layout: Layout = "cp=2 ep=4 mbs=2".parse().unwrap();
        let work = |precision: Precision| {
            WorkInputs {
                bytes: precision.bytes(MixedPrecision::Origami),
                cp_all_to_all: true,
                ..inputs(&model, &layout)
            }
            .moe_layer()
        };
        let (f32, bf16) = (work(Precision::F32), work(Precision::Bf16));
        let exchange = |work: &LayerWork| {
            let c = work
                .comms
                .iter()
                .find(|c| c.kind == CommKind::ContextParallel)
                .unwrap();
            assert_eq!(c.collective, Collective::AllToAll);
            (c.bytes.forward, c.bytes.backward)
        };
        let (q, kv) = (1024.0 * 512.0, 1024.0 * 512.0);
        // Forward q and kv out, the output back; backward the output gradient out, then the
        // gradients dq and dkv back, which alone stay f32 in bf16.
        assert_eq!(
            exchange(&f32),
            (0.5 * (2.0 * q + kv) * 4.0, 0.5 * (2.0 * q + kv) * 4.0)
        );
        assert_eq!(
            exchange(&bf16),
            (0.5 * (2.0 * q + kv) * 2.0, 0.5 * (q * 2.0 + (q + kv) * 4.0))
        );
        let heads = |work: &LayerWork| {
            work.stored
                .iter()
                .find(|s| s.name == "context_parallel_heads")
                .unwrap()
                .bytes
        };
        assert_eq!(
            (heads(&f32), heads(&bf16)),
            ((q + kv) * 4.0, (q + kv) * 2.0)
        );
    }

    #[test]
    fn origami_bf16_keeps_and_sends_only_gemm_inputs_in_bf16() {
        // small, tp 2 · ep 4, 2 sequences of 1024 per rank (T_reg 2048, T_loc 1024, 2048 routed
        // rows), origami's bf16 against f32: per MoE layer the kept GEMM inputs are the
        // attention norm output (2048 · 512) and the experts' input and activation rows
        // (2048 · 512 and 2048 · 1024), which halve; everything else stays f32.
        let model = small();
        let layout: Layout = "tp=2 ep=4 mbs=2".parse().unwrap();
        let f32 = inputs(&model, &layout).moe_layer();
        let bf16 = WorkInputs {
            bytes: Precision::Bf16.bytes(MixedPrecision::Origami),
            ..inputs(&model, &layout)
        }
        .moe_layer();
        let halved = 2048.0 * 512.0 + 2048.0 * 512.0 + 2048.0 * 1024.0;
        assert_eq!(f32.stored_bytes() - bf16.stored_bytes(), 2.0 * halved);
        let bytes = |work: &LayerWork, kind| {
            let c = work.comms.iter().find(|c| c.kind == kind).unwrap();
            (c.bytes.forward, c.bytes.backward)
        };
        // Sequence parallel: the gather into the region moves bf16, the reduce-scatter out of
        // it and both gradients f32; one collective sends 1/2 · 2048 · 512 values.
        let one = 0.5 * 2048.0 * 512.0;
        assert_eq!(
            bytes(&bf16, CommKind::TensorParallel),
            (one * (2.0 + 4.0), one * 2.0 * 4.0)
        );
        assert_eq!(
            bytes(&f32, CommKind::TensorParallel),
            (one * 2.0 * 4.0, one * 2.0 * 4.0)
        );
        // Dispatch: the experts' rows leave in bf16, the combine and the backward are f32.
        let routed = 0.75 * 2048.0 * 512.0;
        assert_eq!(
            bytes(&bf16, CommKind::ExpertDispatch),
            (routed * (2.0 + 4.0), routed * 2.0 * 4.0)
        );
        // Megatron's bf16 moves and keeps everything in bf16: half of f32 throughout.
        let megatron = WorkInputs {
            bytes: Precision::Bf16.bytes(MixedPrecision::Megatron),
            ..inputs(&model, &layout)
        }
        .moe_layer();
        let indices = 1024.0 * 2.0 * INDEX_BYTES_PER_SLOT;
        let statistics = 2048.0 * 4.0 * 4.0 + 2.0 * 1024.0 * 4.0 + 2.0 * 16.0 * 1024.0 * 4.0;
        assert_eq!(
            megatron.stored_bytes() - indices - statistics,
            (f32.stored_bytes() - indices - statistics) / 2.0
        );
        assert_eq!(
            bytes(&megatron, CommKind::ExpertDispatch),
            (routed * 2.0 * 2.0, routed * 2.0 * 2.0)
        );
    }

    #[test]
    fn recomputation_keeps_what_its_mode_keeps_by_hand() {
        // small, tp 2 · ep 4, 2 sequences of 1024 per rank, f32: T_reg 2048, T_loc 1024, 2048
        // expert rows of 1024, 256 query columns and 4 query heads per rank.
        let model = small();
        let layout: Layout = "tp=2 ep=4 mbs=2".parse().unwrap();
        let with = |recompute| {
            WorkInputs {
                recompute,
                ..inputs(&model, &layout)
            }
            .moe_layer()
        };
        let (none, selective, full) = (
            with(Recompute::None),
            with(Recompute::Selective),
            with(Recompute::Full),
        );
        // Full keeps the layer's input slice, and the rest lives again in its backward.
        let input = 1024.0 * 512.0 * 4.0;
        assert_eq!(full.stored_bytes(), input);
        assert_eq!(
            full.backward_working_bytes,
            none.backward_working_bytes + none.stored_bytes() - input
        );
        // Selective drops the gathered attention norm output (2048 · 512), the attention
        // context (2048 · 256), its statistics (2048 · 4), the MoE norm output (1024 · 512)
        // and the experts' SwiGLU output (2048 · 1024).
        let dropped =
            (2048.0 * 512.0 + 2048.0 * 256.0 + 2048.0 * 4.0 + 1024.0 * 512.0 + 2048.0 * 1024.0)
                * 4.0;
        assert_eq!(none.stored_bytes() - selective.stored_bytes(), dropped);
        assert_eq!(
            selective.backward_working_bytes,
            none.backward_working_bytes + dropped
        );
        // ...and gathers the attention norm output again in the backward.
        let tp_calls = |work: &LayerWork| {
            work.comms
                .iter()
                .find(|c| c.kind == CommKind::TensorParallel)
                .unwrap()
                .calls
                .backward
        };
        assert_eq!(tp_calls(&selective), tp_calls(&none) + 1.0);
        assert_eq!(tp_calls(&full), tp_calls(&none));
        // What selective runs again: the core's forward, the two norms (read 1024 · 512,
        // write as much) and the SwiGLU (read 2 · 1024, write 1024 per expert row).
        let core = 2.0 * 2.0 * 1024f64.powi(2) * 64.0 * 4.0;
        assert_eq!(selective.selective_redo.attention_flops, core);
        assert_eq!(
            selective.selective_redo.memory_bytes,
            (2.0 * 2.0 * 512.0 * 1024.0 + 3.0 * 1024.0 * 2048.0) * 4.0
        );
        assert_eq!(
            (none.recompute, selective.recompute, full.recompute),
            (Recompute::None, Recompute::Selective, Recompute::Full)
        );
        // The output layer and the embedding are never recomputed.
        let output = |recompute| {
            WorkInputs {
                recompute,
                ..inputs(&model, &layout)
            }
            .output_layer()
        };
        assert_eq!(output(Recompute::Full), output(Recompute::None));
    }
}
