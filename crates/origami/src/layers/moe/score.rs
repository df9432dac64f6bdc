//! The router's elementwise score functions, each logit scored on its own: `σ(x)` and
//! `sqrt(softplus(x))`, with their derivatives. Softmax, which couples the experts, lives in the
//! router itself.
//!
//! `softplus(x) = max(x, 0) + ln(1 + e^{−|x|})` never overflows. Its square root's derivative
//! `σ(x) / (2·sqrt(softplus(x)))` is `e^{x/2}/2` to f32 precision below −20, which avoids the
//! 0/0 where `softplus` underflows.

use super::config::ScoreFunction;

/// A score function that scores each expert's logit on its own (normalised afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementwiseScore {
    /// `σ(x)`.
    Sigmoid,
    /// `sqrt(softplus(x))`.
    SqrtSoftplus,
}

/// Added to every sum of elementwise scores before dividing by it, so that a sum that
/// underflowed to 0 gives weights 0 (as Megatron-Core's `1e-20`).
pub const NORMALISATION_EPS: f32 = 1e-20;

impl ElementwiseScore {
    /// The elementwise score function of `function` (`None` for softmax).
    pub fn of(function: ScoreFunction) -> Option<Self> {
        match function {
            ScoreFunction::Softmax => None,
            ScoreFunction::Sigmoid => Some(ElementwiseScore::Sigmoid),
            ScoreFunction::SqrtSoftplus => Some(ElementwiseScore::SqrtSoftplus),
        }
    }

    /// The score of `logit`.
    pub fn value(self, logit: f32) -> f32 {
        match self {
            ElementwiseScore::Sigmoid => sigmoid(logit),
            ElementwiseScore::SqrtSoftplus => softplus(logit).sqrt(),
        }
    }

    /// The derivative of the score at `logit`.
    pub fn derivative(self, logit: f32) -> f32 {
        match self {
            ElementwiseScore::Sigmoid => {
                let s = sigmoid(logit);
                s * (1.0 - s)
            }
            ElementwiseScore::SqrtSoftplus if logit < -20.0 => 0.5 * (0.5 * logit).exp(),
            ElementwiseScore::SqrtSoftplus => sigmoid(logit) / (2.0 * softplus(logit).sqrt()),
        }
    }
}

/// `1 / (1 + e^{−x})`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 + e^x)`, without overflow for large `x` or loss of precision for very negative `x`.
pub fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}
