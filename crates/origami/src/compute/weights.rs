//! The parameters as the compute precision uses them: the f32 master values (what the
//! optimizer updates, what norms, routers and biases read) and, in bf16, a bf16 copy of each
//! buffer made once per optimizer step, after the update ([`WeightCopies::refresh`]).

use super::activation::{round_into, round_to_bf16, Activation};
use super::precision::Compute;
use crate::params::{Buffers, ParamGroup, ParamId};
use crate::profile::{scope, Phase};
use origami_kernels::bf16::Bf16;
use origami_kernels::swiglu::{swiglu_forward, swiglu_forward_bf16};

/// The compute precision's copies of a rank's parameters: bf16 copies of both buffers in bf16,
/// nothing in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightCopies {
    compute: Compute,
    dense: Vec<Bf16>,
    expert: Vec<Bf16>,
}

impl WeightCopies {
    /// The copies `compute` needs of `master`.
    pub fn new(compute: Compute, master: &Buffers) -> Self {
        let mut copies = WeightCopies {
            compute,
            dense: Vec::new(),
            expert: Vec::new(),
        };
        copies.refresh(master);
        copies
    }

    /// Remakes the copies from the updated `master` (call after every optimizer step, and
    /// after parameters are loaded).
    pub fn refresh(&mut self, master: &Buffers) {
        if !self.compute.is_bf16() {
            return;
        }
        for (copy, values) in [
            (&mut self.dense, &master.dense),
            (&mut self.expert, &master.expert),
        ] {
            if copy.len() == values.len() {
                round_into(copy, values);
            } else {
                *copy = round_to_bf16(values);
            }
        }
    }

    /// The precision the copies serve.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// The weights the layers compute with: `master` (from which the copies were last made)
    /// and the copies. Panics if the copies were made for buffers of other sizes.
    pub fn weights<'a>(&'a self, master: &'a Buffers) -> Weights<'a> {
        let copies = self.compute.is_bf16().then(|| {
            assert!(
                self.dense.len() == master.dense.len() && self.expert.len() == master.expert.len(),
                "bf16 weight copies of {} + {} elements for buffers of {} + {}",
                self.dense.len(),
                self.expert.len(),
                master.dense.len(),
                master.expert.len()
            );
            (self.dense.as_slice(), self.expert.as_slice())
        });
        Weights {
            master,
            copies,
            compute: self.compute,
        }
    }
}

/// What the layers receive: a rank's parameters in the compute precision, and the compute
/// interface over them (GEMMs, grouped GEMMs and the attention core, see `compute::linear`).
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    master: &'a Buffers,
    copies: Option<(&'a [Bf16], &'a [Bf16])>,
    compute: Compute,
}

impl<'a> Weights<'a> {
    /// `master` computed with in f32 (evaluation of f32 runs, generation, gradient checks).
    pub fn f32(master: &'a Buffers) -> Self {
        Weights {
            master,
            copies: None,
            compute: Compute::F32,
        }
    }

    /// The same parameters computed with in f32 whatever the precision (the router's logits).
    pub fn in_f32(&self) -> Weights<'a> {
        Weights::f32(self.master)
    }

    /// The precision.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// The f32 master values of one parameter.
    pub fn get(&self, id: ParamId) -> &'a [f32] {
        self.master.get(id)
    }

    /// The bf16 copy of one parameter; panics in f32.
    pub(super) fn copy(&self, id: ParamId) -> &'a [Bf16] {
        let (dense, expert) = self
            .copies
            .expect("bf16 weights are only read when computing in bf16");
        let buffer = match id.group() {
            ParamGroup::Dense => dense,
            ParamGroup::Expert => expert,
        };
        &buffer[id.offset()..id.offset() + id.len()]
    }

    /// `x` as this precision's GEMM input: moved in f32, rounded once to bf16 in bf16.
    pub fn activation(&self, x: Vec<f32>) -> Activation {
        match self.compute {
            Compute::F32 => Activation::F32(x),
            Compute::Bf16(_) => Activation::Bf16(round_to_bf16(&x)),
        }
    }

    /// `silu(gate) ∘ up` of fused `(gate | up)` rows of width `2·ffn`, as the next GEMM's
    /// input: in bf16 each value is rounded as it is computed (one pass, no f32 copy).
    pub fn swiglu(&self, gate_up: &[f32], ffn: usize) -> Activation {
        let _phase = scope(Phase::Elementwise);
        let len = gate_up.len() / 2;
        match self.compute {
            Compute::F32 => {
                let mut h = vec![0.0; len];
                swiglu_forward(&mut h, gate_up, ffn);
                Activation::F32(h)
            }
            Compute::Bf16(_) => {
                let mut h = vec![Bf16::ZERO; len];
                swiglu_forward_bf16(&mut h, gate_up, ffn);
                Activation::Bf16(h)
            }
        }
    }
}
