//! How far AdamW may legitimately move a final weight: the allowance of
//! [`super::training::Reference::allowance`].
//!
//! AdamW's update of an element is `u = m̂ / (√v̂ + eps)`. When every gradient element of a
//! tensor moves by at most `D` (the tolerance times the tensor's largest gradient element, over
//! the steps so far), `m̂` and `√v̂` each move by at most `D` (their bias-corrected weights sum
//! to 1, and a weighted root mean square is 1-Lipschitz), so while `D ≤ (√v̂ + eps)/2` the
//! update moves by at most `2·D·(1 + |u|) / (√v̂ + eps)`. It never moves by more than `2·B_k`,
//! `B_k = sqrt(Σ_j w1_j² / w2_j)` being the largest `|u|` any gradients give after k steps
//! (Cauchy–Schwarz over the moments' weights `w1`, `w2`). Times the step's learning rate and
//! summed over the steps, that is the allowance; weight decay only shrinks earlier differences.

use super::training::TrainingCase;
use crate::optim::adamw::AdamWConfig;
use crate::params::{Buffers, ParamRegistry};

/// The running state of [`super::training::Reference::allowance`]: each parameter's gradient bound `D` so far.
pub(super) struct AdamWAllowance {
    /// `tolerance ×` the largest gradient element of each parameter over the steps so far.
    bounds: Vec<f64>,
    adamw: AdamWConfig,
    tolerance: f64,
    steps: u64,
}

impl AdamWAllowance {
    /// No steps yet, for a model of `params` parameters trained as `case`.
    pub(super) fn new(params: usize, case: &TrainingCase) -> Self {
        AdamWAllowance {
            bounds: vec![0.0; params],
            adamw: case.adamw,
            tolerance: case.tolerance,
            steps: 0,
        }
    }

    /// Adds one AdamW step at learning rate `lr` with the gradients it applied and the moments
    /// after it to `allowance`.
    pub(super) fn add_step(
        &mut self,
        registry: &ParamRegistry,
        (grads, m, v): (&Buffers, &Buffers, &Buffers),
        lr: f32,
        allowance: &mut Buffers,
    ) {
        self.steps += 1;
        let (beta1, beta2) = (self.adamw.beta1 as f64, self.adamw.beta2 as f64);
        let t = self.steps as i32;
        let (bias1, bias2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let largest_update = (1..=t)
            .map(|j| {
                let w1 = (1.0 - beta1) * beta1.powi(t - j) / bias1;
                let w2 = (1.0 - beta2) * beta2.powi(t - j) / bias2;
                w1 * w1 / w2
            })
            .sum::<f64>()
            .sqrt();
        let cap = 2.0 * largest_update;
        for (info, bound) in registry.params().iter().zip(&mut self.bounds) {
            if !info.trainable {
                continue;
            }
            let g = grads.get(info.id);
            let largest = g.iter().fold(0.0f64, |a, &x| a.max((x as f64).abs()));
            *bound = bound.max(self.tolerance * largest);
            let d_bound = *bound;
            for ((a, &m), &v) in allowance
                .get_mut(info.id)
                .iter_mut()
                .zip(m.get(info.id))
                .zip(v.get(info.id))
            {
                let denominator = (v as f64 / bias2).sqrt() + self.adamw.eps as f64;
                let update = (m as f64 / bias1).abs() / denominator;
                let moved = if d_bound <= denominator / 2.0 {
                    (2.0 * d_bound * (1.0 + update) / denominator).min(cap)
                } else {
                    cap
                };
                *a += (lr as f64 * moved) as f32;
            }
        }
    }
}
