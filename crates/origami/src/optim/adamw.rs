//! AdamW over a model's parameter buffers: moments in the same dense/expert layout as the
//! parameters, weight decay only on matrices (not norms or biases), global-norm clipping first.

use crate::params::{Buffers, ParamRegistry};
use origami_kernels::adamw::{adamw_update, AdamWStep};
use origami_kernels::grad_norm::{clip_factor, sum_of_squares};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (the learning rate comes from the schedule each step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator floor.
    pub eps: f32,
    /// Decoupled weight decay of matrices.
    pub weight_decay: f32,
    /// Global gradient-norm limit (0 disables clipping).
    pub grad_clip: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// AdamW state: both moments and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// First moments.
    pub m: Buffers,
    /// Second moments.
    pub v: Buffers,
    /// Updates done so far.
    pub step: u64,
}

impl AdamW {
    /// Zero moments in `registry`'s layout.
    pub fn new(registry: &ParamRegistry, config: AdamWConfig) -> Self {
        AdamW {
            config,
            m: registry.zeros(),
            v: registry.zeros(),
            step: 0,
        }
    }

    /// Applies one update with `grads` clipped to the global norm limit (the clipping factor
    /// is applied inside the update; `grads` is left as it is); returns the norm before
    /// clipping.
    pub fn step(
        &mut self,
        registry: &ParamRegistry,
        params: &mut Buffers,
        grads: &mut Buffers,
        lr: f32,
    ) -> f64 {
        let norm = global_norm(grads);
        let factor = clip_factor(norm, self.config.grad_clip as f64);
        self.step += 1;
        for info in registry.params().iter().filter(|p| p.trainable) {
            let id = info.id;
            let hyper = AdamWStep {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: if info.weight_decay {
                    self.config.weight_decay
                } else {
                    0.0
                },
                step: self.step,
                grad_scale: factor,
            };
            adamw_update(
                params.get_mut(id),
                grads.get(id),
                self.m.get_mut(id),
                self.v.get_mut(id),
                hyper,
            );
        }
        norm
    }
}

/// L2 norm of all gradients, each parameter counted once.
pub fn global_norm(grads: &Buffers) -> f64 {
    (sum_of_squares(&grads.dense) + sum_of_squares(&grads.expert)).sqrt()
}
