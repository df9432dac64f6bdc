//! SwiGLU MLP: `y = W_down · (silu(W_gate·x) ∘ W_up·x)`, with gate and up fused into one weight
//! `[2·ffn, hidden]` (gate rows first). Used for dense layers and shared experts.
//! Saved state: the fused gate/up activations (f32) and the SwiGLU output (the second GEMM's
//! input, in the compute precision; recomputed from gate/up in the backward when
//! [`Mlp::set_recompute_activation`] says so). The caller keeps the input.
//!
//! Under tensor parallelism a rank holds a slice of the hidden units and its output is a
//! partial sum (the caller reduce-scatters it, see [`crate::layers::tensor_parallel`]).

use crate::compute::{Activation, LinearGrads, LinearShape, Weights};
use crate::layers::stored::Stored;
use crate::layers::tensor_parallel::TensorParallel;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry, Shard};
use crate::profile::{timed, Phase};
use origami_kernels::swiglu::swiglu_backward;

/// Parameters and sizes of one SwiGLU MLP.
#[derive(Clone, Debug)]
pub struct Mlp {
    hidden: usize,
    ffn: usize,
    gate_up: ParamId,
    down: ParamId,
    recompute_activation: bool,
}

/// What the forward keeps for the backward.
pub struct MlpSaved {
    gate_up: Vec<f32>,
    activated: Option<Activation>,
}

impl Mlp {
    /// Registers `{prefix}.gate_up.weight` and `{prefix}.down.weight`, of which this rank of
    /// `tp` holds its slice of the hidden units: gate/up column-parallel (the same rows of the
    /// gate and of the up block), down row-parallel. The caller checks that `tp` divides `ffn`.
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        (hidden, ffn): (usize, usize),
        (std, out_std): (f32, f32),
        tp: &TensorParallel,
    ) -> Self {
        let gate_up_shape = [2 * ffn, hidden];
        let gate_up = registry.register_sharded(
            format!("{prefix}.gate_up.weight"),
            &gate_up_shape,
            Shard::along(&gate_up_shape, 0, vec![tp.part(ffn), tp.part_at(ffn, ffn)]),
            ParamGroup::Dense,
            Init::Normal(std),
        );
        let down_shape = [hidden, ffn];
        let down = registry.register_sharded(
            format!("{prefix}.down.weight"),
            &down_shape,
            Shard::along(&down_shape, 1, vec![tp.part(ffn)]),
            ParamGroup::Dense,
            Init::Normal(out_std),
        );
        Mlp {
            hidden,
            ffn: ffn / tp.size(),
            gate_up,
            down,
            recompute_activation: false,
        }
    }

    /// Whether the backward recomputes the SwiGLU output instead of keeping it.
    pub fn set_recompute_activation(&mut self, on: bool) {
        self.recompute_activation = on;
    }

    /// The SwiGLU output of the fused `gate_up` rows, as the down projection's input.
    fn activate(&self, params: &Weights, gate_up: &[f32]) -> Activation {
        params.swiglu(gate_up, self.ffn)
    }

    /// `y[rows, hidden]` (this rank's partial sum under tensor parallelism) from `x[rows, hidden]`.
    pub fn forward(&self, params: &Weights, x: &Activation) -> (Vec<f32>, MlpSaved) {
        let rows = x.len() / self.hidden;
        let mut gate_up = vec![0.0; rows * 2 * self.ffn];
        params.linear_forward(
            &mut gate_up,
            x,
            self.gate_up,
            None,
            LinearShape::new(rows, self.hidden, 2 * self.ffn),
        );
        let activated = self.activate(params, &gate_up);
        let mut y = vec![0.0; rows * self.hidden];
        params.linear_forward(
            &mut y,
            &activated,
            self.down,
            None,
            LinearShape::new(rows, self.ffn, self.hidden),
        );
        let activated = (!self.recompute_activation).then_some(activated);
        (y, MlpSaved { gate_up, activated })
    }

    /// Accumulates parameter gradients; writes (or adds, with `accumulate`) the input gradient into `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: MlpSaved,
        x: &Activation,
        dy: &[f32],
        dx: &mut [f32],
        accumulate: bool,
    ) {
        let rows = x.len() / self.hidden;
        let activated = saved
            .activated
            .unwrap_or_else(|| self.activate(params, &saved.gate_up));
        let mut dactivated = vec![0.0; rows * self.ffn];
        params.linear_backward(
            LinearGrads {
                input: Some(&mut dactivated),
                accumulate_input: false,
                weight: Some(grads.get_mut(self.down)),
                bias: None,
            },
            dy,
            &activated,
            self.down,
            LinearShape::new(rows, self.ffn, self.hidden),
        );
        drop(activated);
        let mut dgate_up = vec![0.0; saved.gate_up.len()];
        timed(Phase::Elementwise, || {
            swiglu_backward(&mut dgate_up, &dactivated, &saved.gate_up, self.ffn)
        });
        params.linear_backward(
            LinearGrads {
                input: Some(dx),
                accumulate_input: accumulate,
                weight: Some(grads.get_mut(self.gate_up)),
                bias: None,
            },
            &dgate_up,
            x,
            self.gate_up,
            LinearShape::new(rows, self.hidden, 2 * self.ffn),
        );
    }
}

impl Stored for MlpSaved {
    fn stored_bytes(&self) -> usize {
        self.gate_up.stored_bytes() + self.activated.stored_bytes()
    }
}
