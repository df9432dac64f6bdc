//! The search: every valid (tp, cp, pp, vpp, ep, etp, mbs) of the inputs, evaluated, split into
//! those that fit and those that do not, each ranked by predicted throughput.

use serde::Serialize;

use crate::{Evaluation, Layout, PlanError, Planner};

/// Every layout tried, evaluated.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SearchResult {
    /// Candidates built from the divisors (valid or not).
    pub candidates: usize,
    /// Candidates rejected by a constraint (world, model, sequence, batch or schedule).
    pub invalid: usize,
    /// Layouts that fit, fastest first.
    pub fitting: Vec<Evaluation>,
    /// Layouts that do not fit, least memory first.
    pub not_fitting: Vec<Evaluation>,
    /// The last constraint a candidate failed, for the error when nothing is valid.
    #[serde(skip)]
    pub last_rejection: Option<String>,
}

impl SearchResult {
    /// The fastest layout that fits and obeys the no-folding rule.
    pub fn best_unfolded(&self, world: usize) -> Option<&Evaluation> {
        self.fitting.iter().find(|e| e.layout.is_unfolded(world))
    }
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Every layout whose sizes divide the world and the model's dims (the finer checks —
/// sequence, batch, schedule — are left to [`Layout::resolve`] and the schedule).
pub fn candidates(planner: &Planner) -> Vec<Layout> {
    let i = planner.inputs();
    let m = &i.model;
    let world = i.gpus;
    let mut layouts = Vec::new();
    let tps: Vec<usize> = divisors(world)
        .into_iter()
        .filter(|tp| m.heads.is_multiple_of(*tp) && m.query_groups.is_multiple_of(*tp))
        .collect();
    let (eps, etps) = if m.has_experts() {
        (divisors(m.experts), divisors(m.expert_ffn))
    } else {
        (vec![1], vec![1])
    };
    for &tp in &tps {
        for cp in divisors(world / tp) {
            for pp in divisors(world / (tp * cp)) {
                if !m.layers.is_multiple_of(pp) {
                    continue;
                }
                let dp = world / (tp * cp * pp);
                if !i.global_batch.is_multiple_of(dp) {
                    continue;
                }
                let vpps = if pp == 1 {
                    vec![1]
                } else {
                    divisors(m.layers / pp)
                };
                for &ep in &eps {
                    for &etp in &etps {
                        if !(world / pp).is_multiple_of(ep * etp) {
                            continue;
                        }
                        for &vpp in &vpps {
                            for mbs in divisors(i.global_batch / dp) {
                                layouts.push(Layout {
                                    tp,
                                    cp,
                                    pp,
                                    vpp,
                                    ep,
                                    etp,
                                    mbs,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    layouts
}

/// Evaluates every candidate; `unfolded_only` keeps only layouts obeying the no-folding rule.
pub fn search(planner: &mut Planner, unfolded_only: bool) -> Result<SearchResult, PlanError> {
    let world = planner.inputs().gpus;
    let mut result = SearchResult::default();
    for layout in candidates(planner) {
        if unfolded_only && !layout.is_unfolded(world) {
            continue;
        }
        result.candidates += 1;
        match planner.evaluate(&layout) {
            Ok(evaluation) if evaluation.fits => result.fitting.push(evaluation),
            Ok(evaluation) => result.not_fitting.push(evaluation),
            Err(error) => {
                result.invalid += 1;
                result.last_rejection = Some(error.to_string());
            }
        }
    }
    result
        .fitting
        .sort_by(|a, b| b.tokens_per_s.total_cmp(&a.tokens_per_s));
    result
        .not_fitting
        .sort_by(|a, b| a.memory_per_rank_gib.total_cmp(&b.memory_per_rank_gib));
    let i = planner.inputs();
    if result.fitting.is_empty() {
        if let Some(smallest) = result.not_fitting.first() {
            return Err(PlanError::NothingFits {
                model: i.model.name.clone(),
                gpus: world,
                memory_gib: i.hardware.device.memory_gib,
                smallest_gib: if i.hardware.device.shared_by_ranks {
                    smallest.memory_per_node_gib
                } else {
                    smallest.memory_per_rank_gib
                },
                layout: smallest.layout.to_string(),
            });
        }
        return Err(PlanError::NoLayout {
            model: i.model.name.clone(),
            gpus: world,
            global_batch: i.global_batch,
            seq: i.seq,
            reason: result
                .last_rejection
                .clone()
                .unwrap_or_else(|| "no candidate layout".to_string()),
        });
    }
    Ok(result)
}
