//! The search: every valid (tp, cp, pp, vpp, ep, etp, mbs) of the inputs, evaluated, split into
//! those that fit and those that do not, each ranked by predicted throughput. With
//! `PlanInputs::uneven_stages` it also tries pipelines whose first or last stage holds its own
//! number of layers, within two layers of the even share.

use origami_schedule::StageLayers;
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

/// A pipeline split: the first and last stage's own layer counts (`None`: the even share), and
/// the chunk counts (vpp) that every stage's layers divide by.
type Split = (Option<usize>, Option<usize>, Vec<usize>);

/// How `layers` may split over `pp` stages: the even split when it divides, and with `uneven`
/// every (first, last) stage count within two layers of the even share that leaves the other
/// stages an even share, each arrangement of the stages once.
fn splits(layers: usize, pp: usize, uneven: bool) -> Vec<Split> {
    let mut found = Vec::new();
    let even = layers.is_multiple_of(pp);
    if even {
        let vpps = if pp == 1 {
            vec![1]
        } else {
            divisors(layers / pp)
        };
        found.push((None, None, vpps));
    }
    if !uneven || pp == 1 {
        return found;
    }
    let mut seen: Vec<Vec<usize>> = if even {
        vec![vec![layers / pp; pp]]
    } else {
        Vec::new()
    };
    let near = (layers / pp).saturating_sub(2).max(1)..=layers.div_ceil(pp) + 2;
    let options = || std::iter::once(None).chain(near.clone().map(Some));
    for first in options() {
        for last in options() {
            if first.is_none() && last.is_none() {
                continue;
            }
            let Ok(split) = StageLayers::new(layers, pp, 1, first, last) else {
                continue;
            };
            if split.per_stage().contains(&0) || seen.iter().any(|s| s == split.per_stage()) {
                continue;
            }
            seen.push(split.per_stage().to_vec());
            let common = split.per_stage().iter().fold(0, |g, &n| gcd(g, n));
            found.push((first, last, divisors(common)));
        }
    }
    found
}

/// Greatest common divisor (`gcd(0, n) = n`).
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
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
                let dp = world / (tp * cp * pp);
                if !i.global_batch.is_multiple_of(dp) {
                    continue;
                }
                let splits = splits(m.layers, pp, i.uneven_stages);
                for &ep in &eps {
                    for &etp in &etps {
                        if !(world / pp).is_multiple_of(ep * etp) {
                            continue;
                        }
                        for (first, last, vpps) in &splits {
                            for &vpp in vpps {
                                for mbs in divisors(i.global_batch / dp) {
                                    layouts.push(Layout {
                                        tp,
                                        cp,
                                        pp,
                                        vpp,
                                        ep,
                                        etp,
                                        mbs,
                                        first: *first,
                                        last: *last,
                                    });
                                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::tests::small;
    use crate::{Hardware, PlanInputs, Precision, Recompute};

    #[test]
    fn uneven_splits_lie_around_the_even_share_once_each() {
        // 30 layers over 4 stages split only unevenly: 9 7 7 7, 6 8 8 8 (chunks of 2 too), …
        assert!(splits(30, 4, false).is_empty());
        let found = splits(30, 4, true);
        assert!(found.contains(&(Some(9), None, vec![1])), "{found:?}");
        assert!(found.contains(&(Some(6), None, vec![1, 2])), "{found:?}");
        assert!(found.contains(&(None, Some(9), vec![1])), "{found:?}");
        // 6 8 8 8 again as first 6, last 8: listed once.
        assert!(
            !found.contains(&(Some(6), Some(8), vec![1, 2])),
            "{found:?}"
        );
        let all: Vec<Vec<usize>> = found.iter().map(|s| stages_of(30, s)).collect();
        for (i, split) in all.iter().enumerate() {
            assert_eq!(split.iter().sum::<usize>(), 30);
            assert!(split.iter().all(|&n| (5..=10).contains(&n)), "{split:?}");
            assert!(!all[..i].contains(split), "{split:?} twice");
        }
        // An even split stays the only one without `uneven`, and is not repeated with it.
        assert_eq!(splits(28, 4, false), vec![(None, None, vec![1, 7])]);
        let with = splits(28, 4, true);
        assert_eq!(with[0], (None, None, vec![1, 7]));
        assert!(!with[1..].iter().any(|s| stages_of(28, s) == vec![7; 4]));
    }

    /// The stages' layers of one of [`splits`]'s findings over 4 stages.
    fn stages_of(layers: usize, found: &Split) -> Vec<usize> {
        let (first, last, _) = found;
        StageLayers::new(layers, 4, 1, *first, *last)
            .unwrap()
            .per_stage()
            .to_vec()
    }

    #[test]
    fn the_search_pipelines_layers_that_do_not_divide_only_when_asked() {
        // small's 8 layers on 3 devices: pp 3 exists only with uneven stages (2 3 3, 3 3 2, …).
        let planner = |uneven_stages| {
            Planner::new(PlanInputs {
                model: small(),
                hardware: Hardware::h100_dgx(),
                gpus: 3,
                global_batch: 6,
                seq: 1024,
                precision: Precision::Bf16,
                distributed_optimizer: true,
                cp_all_to_all: false,
                expert_imbalance: 1.0,
                recompute: Recompute::None,
                uneven_stages,
            })
            .unwrap()
        };
        let even = search(&mut planner(false), false).unwrap();
        assert!(even.fitting.iter().all(|e| e.layout.pp == 1));
        let uneven = search(&mut planner(true), false).unwrap();
        let piped: Vec<&Evaluation> = uneven.fitting.iter().filter(|e| e.layout.pp == 3).collect();
        assert!(!piped.is_empty());
        for e in piped {
            let layers: Vec<usize> = e.stages.iter().map(|s| s.layers).collect();
            assert_eq!(layers.iter().sum::<usize>(), 8, "{}", e.layout);
            assert!(e.layout.is_uneven(), "{}", e.layout);
            if let Some(first) = e.layout.first {
                assert_eq!(layers[0], first, "{}", e.layout);
            }
            if let Some(last) = e.layout.last {
                assert_eq!(layers[2], last, "{}", e.layout);
            }
        }
        let text = "pp=3 first=2";
        let mut planner = planner(false);
        let e = planner.evaluate(&text.parse().unwrap()).unwrap();
        assert_eq!(
            e.layout.to_string(),
            "tp=1 cp=1 pp=3 vpp=1 ep=1 etp=1 mbs=1 first=2"
        );
        let layers: Vec<usize> = e.stages.iter().map(|s| s.layers).collect();
        assert_eq!(layers, vec![2, 3, 3]);
    }
}
