//! The routed experts of one MoE layer as a grouped SwiGLU: rows grouped by expert pass through
//! `W_fc1[e]` (`[2·ffn, hidden]`, gate rows then up rows), SwiGLU, and `W_fc2[e]` (`[hidden, ffn]`).
//! Expert parameters live in the expert buffer (reduced over expert-data-parallel ranks).
//! Saved state: the rows (fc1's input) and the SwiGLU output (fc2's input), both in the
//! compute precision, and the fc1 output (f32); the SwiGLU output is recomputed from the fc1
//! output in the backward when [`GroupedExperts::set_recompute_activation`] says so.

use super::parallel::ExpertSharding;
use crate::compute::{Activation, Weights};
use crate::layers::stored::Stored;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry, Shard};
use crate::profile::{timed, Phase};
use origami_kernels::swiglu::swiglu_backward;

/// Parameters of the local experts.
#[derive(Clone, Debug)]
pub struct GroupedExperts {
    experts: usize,
    hidden: usize,
    ffn: usize,
    fc1: ParamId,
    fc2: ParamId,
    recompute_activation: bool,
}

/// What the forward keeps for the backward.
pub struct ExpertsSaved {
    input: Activation,
    fc1_out: Vec<f32>,
    activated: Option<Activation>,
}

impl GroupedExperts {
    /// Registers `{prefix}.fc1.weight` (global `[experts, 2·ffn, hidden]`) and
    /// `{prefix}.fc2.weight` (global `[experts, hidden, ffn]`), of which this rank holds its
    /// experts and its slice of their hidden units: fc1's gate and up rows of the slice
    /// (column-parallel), fc2's columns of the slice (row-parallel).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        experts: usize,
        hidden: usize,
        ffn: usize,
        std: f32,
        out_std: f32,
        sharding: ExpertSharding,
    ) -> Self {
        let owned = sharding.local_experts(experts);
        let slice = sharding.local_ffn(ffn);
        let fc1_shape = [experts, 2 * ffn, hidden];
        let fc1 = registry.register_sharded(
            format!("{prefix}.fc1.weight"),
            &fc1_shape,
            Shard::along(&fc1_shape, 0, vec![owned.clone()])
                .and(1, vec![slice.clone(), ffn + slice.start..ffn + slice.end]),
            ParamGroup::Expert,
            Init::Normal(std),
        );
        let fc2_shape = [experts, hidden, ffn];
        let fc2 = registry.register_sharded(
            format!("{prefix}.fc2.weight"),
            &fc2_shape,
            Shard::along(&fc2_shape, 0, vec![owned.clone()]).and(2, vec![slice.clone()]),
            ParamGroup::Expert,
            Init::Normal(out_std),
        );
        GroupedExperts {
            experts: owned.len(),
            hidden,
            ffn: slice.len(),
            fc1,
            fc2,
            recompute_activation: false,
        }
    }

    /// Whether the backward recomputes the SwiGLU output instead of keeping it.
    pub fn set_recompute_activation(&mut self, on: bool) {
        self.recompute_activation = on;
    }

    /// The SwiGLU output of the fc1 rows, as fc2's input.
    fn activate(&self, params: &Weights, fc1_out: &[f32]) -> Activation {
        params.swiglu(fc1_out, self.ffn)
    }

    /// Number of local experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Width of the rows.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// `y[rows, hidden]` for expert-grouped rows `x` (`offsets` has `experts + 1` entries), f32
    /// or already rounded to bf16 where the experts compute in bf16.
    pub fn forward(
        &self,
        params: &Weights,
        x: Activation,
        offsets: &[usize],
    ) -> (Vec<f32>, ExpertsSaved) {
        let rows = x.len() / self.hidden;
        let input = match x {
            Activation::F32(x) => params.activation(x),
            rounded => rounded,
        };
        let mut fc1_out = vec![0.0; rows * 2 * self.ffn];
        params.grouped_linear_forward(
            &mut fc1_out,
            &input,
            self.fc1,
            offsets,
            (self.hidden, 2 * self.ffn),
        );
        let activated = self.activate(params, &fc1_out);
        let mut y = vec![0.0; rows * self.hidden];
        params.grouped_linear_forward(
            &mut y,
            &activated,
            self.fc2,
            offsets,
            (self.ffn, self.hidden),
        );
        let saved = ExpertsSaved {
            input,
            fc1_out,
            activated: (!self.recompute_activation).then_some(activated),
        };
        (y, saved)
    }

    /// Accumulates parameter gradients and returns the row gradients `dx`.
    pub fn backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: ExpertsSaved,
        dy: &[f32],
        offsets: &[usize],
    ) -> Vec<f32> {
        let rows = saved.input.len() / self.hidden;
        let activated = saved
            .activated
            .unwrap_or_else(|| self.activate(params, &saved.fc1_out));
        let mut dactivated = vec![0.0; rows * self.ffn];
        params.grouped_linear_backward(
            Some(&mut dactivated),
            grads.get_mut(self.fc2),
            dy,
            &activated,
            self.fc2,
            offsets,
            (self.ffn, self.hidden),
        );
        drop(activated);
        let mut dfc1 = vec![0.0; saved.fc1_out.len()];
        timed(Phase::Elementwise, || {
            swiglu_backward(&mut dfc1, &dactivated, &saved.fc1_out, self.ffn)
        });
        drop(saved.fc1_out);
        let mut dx = vec![0.0; rows * self.hidden];
        params.grouped_linear_backward(
            Some(&mut dx),
            grads.get_mut(self.fc1),
            &dfc1,
            &saved.input,
            self.fc1,
            offsets,
            (self.hidden, 2 * self.ffn),
        );
        dx
    }
}

impl Stored for ExpertsSaved {
    fn stored_bytes(&self) -> usize {
        self.input.stored_bytes() + self.fc1_out.stored_bytes() + self.activated.stored_bytes()
    }
}
