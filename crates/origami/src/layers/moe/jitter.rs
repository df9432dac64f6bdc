//! Router input jitter (Switch Transformer, arXiv 2101.03961; Megatron-Core's
//! `moe_input_jitter_eps`): in training the router computes its logits from its input multiplied
//! elementwise by noise drawn uniformly from `[1 − eps, 1 + eps]`. Only the logits see the
//! jittered input; the experts and the shared expert take the input as it is.
//!
//! The noise of element `j` of a token is a counter-based hash ([`crate::params::init::mix`])
//! of (seed, step, the token's sequence in the step's global batch, its position in that
//! sequence, the layer's stream id, `j`). None of these depend on the rank that holds the token,
//! so every layout draws the same noise for the same token and the equivalence of layouts
//! (DESIGN.md §2) holds with jitter on.
//!
//! Backward: `x̃ = x ⊙ n` with `n` fixed, so `∂L/∂x = n ⊙ ∂L/∂x̃`; the router weight's gradient
//! takes `x̃` as its input. The noise is kept for the backward (one value per input element).

use crate::params::init::mix;

/// Where one token sits in the run, independently of the layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenKey {
    /// Index of the token's sequence in the step's global batch.
    pub sequence: u64,
    /// The token's position in its sequence.
    pub position: u64,
}

/// The keys of a run of MoE input rows: the run's seed and step, and each row's token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenKeys {
    /// The run's seed.
    pub seed: u64,
    /// The optimizer step the rows are trained in.
    pub step: u64,
    /// One key per row, in row order.
    pub tokens: Vec<TokenKey>,
}

/// The noise multipliers `[rows, hidden]` of the rows keyed by `keys` in the layer whose stream
/// id is `layer`, uniform in `[1 − eps, 1 + eps]`.
pub fn jitter_noise(eps: f32, layer: u64, keys: &TokenKeys, hidden: usize) -> Vec<f32> {
    let base = mix(keys.seed ^ mix(keys.step ^ mix(layer)));
    let mut noise = Vec::with_capacity(keys.tokens.len() * hidden);
    for token in &keys.tokens {
        let row = mix(base ^ mix(token.sequence ^ mix(token.position)));
        noise.extend((0..hidden as u64).map(|j| {
            // 24 random bits: a uniform in [0, 1) that f32 holds exactly.
            let unit = (mix(row ^ mix(j)) >> 40) as f32 / (1u64 << 24) as f32;
            1.0 + eps * (2.0 * unit - 1.0)
        }));
    }
    noise
}

/// `x ⊙ noise`.
pub fn jittered(x: &[f32], noise: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), noise.len(), "one noise value per input element");
    x.iter().zip(noise).map(|(v, n)| v * n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(step: u64, tokens: &[(u64, u64)]) -> TokenKeys {
        TokenKeys {
            seed: 3,
            step,
            tokens: tokens
                .iter()
                .map(|&(sequence, position)| TokenKey { sequence, position })
                .collect(),
        }
    }

    #[test]
    fn noise_lies_in_the_band_and_averages_one() {
        let tokens: Vec<(u64, u64)> = (0..64).flat_map(|s| (0..32).map(move |p| (s, p))).collect();
        let noise = jitter_noise(0.1, 7, &keys(0, &tokens), 16);
        assert_eq!(noise.len(), 64 * 32 * 16);
        assert!(noise.iter().all(|&n| (0.9..=1.1).contains(&n)));
        let mean = noise.iter().map(|&n| n as f64).sum::<f64>() / noise.len() as f64;
        // Uniform on [0.9, 1.1]: standard deviation 0.2/√12 ≈ 0.058, so the mean of 32768
        // draws lies within 0.001 of 1 with overwhelming probability.
        assert!((mean - 1.0).abs() < 1e-3, "mean {mean}");
        let below = noise.iter().filter(|&&n| n < 0.95).count() as f64 / noise.len() as f64;
        assert!((below - 0.25).abs() < 0.01, "fraction below 0.95: {below}");
    }

    #[test]
    fn a_token_draws_by_its_key_not_by_its_row() {
        let forward = jitter_noise(0.2, 1, &keys(4, &[(0, 5), (2, 9)]), 8);
        let reversed = jitter_noise(0.2, 1, &keys(4, &[(2, 9), (0, 5)]), 8);
        assert_eq!(forward[..8], reversed[8..]);
        assert_eq!(forward[8..], reversed[..8]);
        let other_step = jitter_noise(0.2, 1, &keys(5, &[(0, 5)]), 8);
        let other_layer = jitter_noise(0.2, 2, &keys(4, &[(0, 5)]), 8);
        let other_position = jitter_noise(0.2, 1, &keys(4, &[(0, 6)]), 8);
        for other in [other_step, other_layer, other_position] {
            assert!(other.iter().zip(&forward[..8]).all(|(a, b)| a != b));
        }
    }
}
