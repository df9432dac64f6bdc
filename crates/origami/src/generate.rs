//! Sampling text from a model with its key/value cache: the prompt is fed token by token, then
//! each new token is drawn from `softmax(logits / temperature)` restricted to the `top_k` most
//! likely tokens (greedy when the temperature is 0).

use crate::model::gpt::{DecodeState, GptModel};
use crate::params::Buffers;

/// How to draw tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingSettings {
    /// Tokens to generate after the prompt.
    pub max_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Sample among this many most likely tokens (0: all).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
}

/// A small deterministic generator (xorshift64*) for sampling.
struct Sampler(u64);

impl Sampler {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn pick(logits: &[f32], settings: &SamplingSettings, sampler: &mut Sampler) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if settings.temperature <= 0.0 {
        return order[0] as u32;
    }
    let keep = if settings.top_k == 0 {
        order.len()
    } else {
        settings.top_k.min(order.len())
    };
    let best = logits[order[0]];
    let weights: Vec<f64> = order[..keep]
        .iter()
        .map(|&i| (((logits[i] - best) / settings.temperature) as f64).exp())
        .collect();
    let mut target = sampler.uniform() * weights.iter().sum::<f64>();
    for (w, &i) in weights.iter().zip(&order) {
        target -= w;
        if target <= 0.0 {
            return i as u32;
        }
    }
    order[keep - 1] as u32
}

/// Generates up to `settings.max_tokens` tokens after `prompt` (stopping early at `stop_token`),
/// never past the model's `max_seq_len`. Returns the new tokens.
pub fn generate(
    model: &GptModel,
    params: &Buffers,
    prompt: &[u32],
    settings: &SamplingSettings,
    stop_token: Option<u32>,
) -> Vec<u32> {
    assert!(
        !prompt.is_empty(),
        "generation needs at least one prompt token"
    );
    let limit = model.config().max_seq_len;
    let mut state = DecodeState::default();
    let mut sampler = Sampler(settings.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut logits = Vec::new();
    for &t in prompt.iter().take(limit) {
        logits = model.decode_step(params, &mut state, t);
    }
    let mut out = Vec::new();
    while out.len() < settings.max_tokens && state.len() < limit {
        let next = pick(&logits, settings, &mut sampler);
        if Some(next) == stop_token {
            break;
        }
        out.push(next);
        logits = model.decode_step(params, &mut state, next);
    }
    if out.len() < settings.max_tokens && state.len() >= limit {
        let next = pick(&logits, settings, &mut sampler);
        if Some(next) != stop_token {
            out.push(next);
        }
    }
    out
}
