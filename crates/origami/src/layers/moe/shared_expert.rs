//! The shared expert: a SwiGLU MLP every token passes through, optionally scaled per token by
//! `g = σ(x·w_gate)` (Qwen2-MoE). Backward of the gate: `dz = ⟨mlp(x), dy⟩ · g(1 − g)`,
//! `dx += dz·w_gate`, `dw_gate += Σ dz·x`.
//!
//! Under tensor parallelism the MLP is split over tp like a dense MLP: the layer's
//! sequence-parallel tokens are all-gathered, each rank computes its slice of the hidden units
//! and the partial outputs are reduce-scattered back. The gate (one row) stays whole.

use crate::compute::{Activation, Weights};
use crate::layers::mlp::{Mlp, MlpSaved};
use crate::layers::stored::Stored;
use crate::layers::tensor_parallel::TensorParallel;
use crate::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry};
use crate::profile::{scope, Phase};

/// Parameters of the shared expert.
#[derive(Clone, Debug)]
pub struct SharedExpert {
    mlp: Mlp,
    gate: Option<ParamId>,
    hidden: usize,
    tp: TensorParallel,
}

/// What the forward keeps for the backward.
pub struct SharedExpertSaved {
    mlp: MlpSaved,
    gathered_input: Activation,
    sequences: usize,
    mlp_out: Vec<f32>,
    gates: Vec<f32>,
}

impl SharedExpert {
    /// Registers the MLP under `{prefix}` (this rank's slice over `tp`) and, if `gated`,
    /// `{prefix}.gate.weight` `[1, hidden]`.
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        (hidden, ffn): (usize, usize),
        gated: bool,
        stds: (f32, f32),
        tp: TensorParallel,
    ) -> Self {
        let mlp = Mlp::new(registry, prefix, (hidden, ffn), stds, &tp);
        let std = stds.0;
        let gate = gated.then(|| {
            registry.register(
                format!("{prefix}.gate.weight"),
                &[1, hidden],
                ParamGroup::Dense,
                Init::Normal(std),
            )
        });
        SharedExpert {
            mlp,
            gate,
            hidden,
            tp,
        }
    }

    /// Whether the backward recomputes the MLP's SwiGLU output instead of keeping it.
    pub fn set_recompute_activation(&mut self, on: bool) {
        self.mlp.set_recompute_activation(on);
    }

    /// Output `[tokens, hidden]` for this rank's tokens `x`, which are `sequences` equal runs.
    pub fn forward(
        &self,
        params: &Weights,
        x: &[f32],
        sequences: usize,
    ) -> (Vec<f32>, SharedExpertSaved) {
        let gathered_input = self
            .tp
            .gather_activation(params, x.to_vec(), sequences, self.hidden);
        let (partial, mlp) = self.mlp.forward(params, &gathered_input);
        let mlp_out = self.tp.scatter_sequence(partial, sequences, self.hidden);
        let _phase = scope(Phase::Elementwise);
        let gates: Vec<f32> = match self.gate {
            Some(id) => {
                let w = params.get(id);
                x.chunks(self.hidden)
                    .map(|row| sigmoid(row.iter().zip(w).map(|(a, b)| a * b).sum()))
                    .collect()
            }
            None => Vec::new(),
        };
        let mut y = mlp_out.clone();
        if !gates.is_empty() {
            for (row, g) in y.chunks_mut(self.hidden).zip(&gates) {
                row.iter_mut().for_each(|v| *v *= g);
            }
        }
        (
            y,
            SharedExpertSaved {
                mlp,
                gathered_input,
                sequences,
                mlp_out,
                gates,
            },
        )
    }

    /// Accumulates parameter gradients and adds the input gradient into `dx`.
    pub fn backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: SharedExpertSaved,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
    ) {
        let Some(gate_id) = self.gate else {
            self.mlp_backward(
                params,
                grads,
                saved.mlp,
                &saved.gathered_input,
                dy,
                saved.sequences,
                dx,
            );
            return;
        };
        let h = self.hidden;
        let gate_phase = scope(Phase::Elementwise);
        let mut d_mlp_out = dy.to_vec();
        let mut dz = vec![0.0f32; saved.gates.len()];
        for (t, g) in saved.gates.iter().enumerate() {
            let out = &saved.mlp_out[t * h..(t + 1) * h];
            let d = &mut d_mlp_out[t * h..(t + 1) * h];
            dz[t] = out.iter().zip(d.iter()).map(|(a, b)| a * b).sum::<f32>() * g * (1.0 - g);
            d.iter_mut().for_each(|v| *v *= g);
        }
        drop(gate_phase);
        self.mlp_backward(
            params,
            grads,
            saved.mlp,
            &saved.gathered_input,
            &d_mlp_out,
            saved.sequences,
            dx,
        );
        let _phase = scope(Phase::Elementwise);
        let w = params.get(gate_id).to_vec();
        let dw = grads.get_mut(gate_id);
        for (t, &z) in dz.iter().enumerate() {
            let row = &x[t * h..(t + 1) * h];
            dx[t * h..(t + 1) * h]
                .iter_mut()
                .zip(&w)
                .for_each(|(d, wi)| *d += z * wi);
            dw.iter_mut().zip(row).for_each(|(d, xi)| *d += z * xi);
        }
    }
}

impl SharedExpert {
    /// The MLP's backward from this rank's output gradient `dy`; adds into `dx`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        params: &Weights,
        grads: &mut Buffers,
        saved: MlpSaved,
        gathered_input: &Activation,
        dy: &[f32],
        sequences: usize,
        dx: &mut [f32],
    ) {
        let dy_gathered = self.tp.gather_sequence(dy.to_vec(), sequences, self.hidden);
        let mut dx_partial = vec![0.0; gathered_input.len()];
        self.mlp.backward(
            params,
            grads,
            saved,
            gathered_input,
            &dy_gathered,
            &mut dx_partial,
            false,
        );
        let local = self.tp.scatter_sequence(dx_partial, sequences, self.hidden);
        dx.iter_mut().zip(local).for_each(|(d, v)| *d += v);
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Stored for SharedExpertSaved {
    fn stored_bytes(&self) -> usize {
        self.mlp.stored_bytes()
            + self.gathered_input.stored_bytes()
            + self.mlp_out.stored_bytes()
            + self.gates.stored_bytes()
    }
}
