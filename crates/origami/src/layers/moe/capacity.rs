//! Token dropping (DESIGN.md §1): each expert takes at most
//! `capacity = ceil(tokens · topk / experts · capacity_factor)` of a micro-batch's local tokens.
//! An over-full expert keeps the slots with the highest routing weights (`probs`, ties to the
//! earlier token) or the earliest tokens (`position`). Dropped slots contribute nothing to the
//! output, and their routing weights get no gradient.

use super::router::Routing;
use crate::layers::moe::config::DropPolicy;

/// Rows one expert may take from `tokens` local tokens.
pub fn expert_capacity(tokens: usize, topk: usize, experts: usize, factor: f32) -> usize {
    ((tokens * topk) as f64 / experts as f64 * factor as f64).ceil() as usize
}

/// Whether each routed slot (`token·k + j`) is kept under `capacity` per expert.
pub fn kept_slots(
    routing: &Routing,
    experts: usize,
    capacity: usize,
    policy: DropPolicy,
) -> Vec<bool> {
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); experts];
    for (slot, &e) in routing.experts.iter().enumerate() {
        by_expert[e as usize].push(slot);
    }
    let mut kept = vec![false; routing.experts.len()];
    for mut slots in by_expert {
        if policy == DropPolicy::Probs {
            // Stable: among equal weights the earlier slot (token) stays first.
            slots.sort_by(|&a, &b| routing.weights[b].total_cmp(&routing.weights[a]));
        }
        for &slot in slots.iter().take(capacity) {
            kept[slot] = true;
        }
    }
    kept
}
