//! The shared expert: a SwiGLU MLP every token passes through, optionally scaled per token by
//! `g = σ(x·w_gate)` (Qwen2-MoE). Backward of the gate: `dz = ⟨mlp(x), dy⟩ · g(1 − g)`,
//! `dx += dz·w_gate`, `dw_gate += Σ dz·x`.

use crate::layers::mlp::{Mlp, MlpSaved};
use crate::model::params::{Buffers, Init, ParamGroup, ParamId, ParamRegistry};

/// Parameters of the shared expert.
#[derive(Clone, Debug)]
pub struct SharedExpert {
    mlp: Mlp,
    gate: Option<ParamId>,
    hidden: usize,
}

/// What the forward keeps for the backward.
pub struct SharedExpertSaved {
    mlp: MlpSaved,
    mlp_out: Vec<f32>,
    gates: Vec<f32>,
}

impl SharedExpert {
    /// Registers the MLP under `{prefix}` and, if `gated`, `{prefix}.gate.weight` `[1, hidden]`.
    pub fn new(
        registry: &mut ParamRegistry,
        prefix: &str,
        hidden: usize,
        ffn: usize,
        gated: bool,
        std: f32,
        out_std: f32,
    ) -> Self {
        let mlp = Mlp::new(registry, prefix, hidden, ffn, std, out_std);
        let gate = gated.then(|| {
            registry.register(
                format!("{prefix}.gate.weight"),
                &[1, hidden],
                ParamGroup::Dense,
                Init::Normal(std),
            )
        });
        SharedExpert { mlp, gate, hidden }
    }

    /// Output `[tokens, hidden]`.
    pub fn forward(&self, params: &Buffers, x: &[f32]) -> (Vec<f32>, SharedExpertSaved) {
        let (mlp_out, mlp) = self.mlp.forward(params, x);
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
                mlp_out,
                gates,
            },
        )
    }

    /// Accumulates parameter gradients and adds the input gradient into `dx`.
    pub fn backward(
        &self,
        params: &Buffers,
        grads: &mut Buffers,
        saved: SharedExpertSaved,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
    ) {
        let Some(gate_id) = self.gate else {
            self.mlp.backward(params, grads, saved.mlp, x, dy, dx, true);
            return;
        };
        let h = self.hidden;
        let mut d_mlp_out = dy.to_vec();
        let mut dz = vec![0.0f32; saved.gates.len()];
        for (t, g) in saved.gates.iter().enumerate() {
            let out = &saved.mlp_out[t * h..(t + 1) * h];
            let d = &mut d_mlp_out[t * h..(t + 1) * h];
            dz[t] = out.iter().zip(d.iter()).map(|(a, b)| a * b).sum::<f32>() * g * (1.0 - g);
            d.iter_mut().for_each(|v| *v *= g);
        }
        self.mlp
            .backward(params, grads, saved.mlp, x, &d_mlp_out, dx, true);
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

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
