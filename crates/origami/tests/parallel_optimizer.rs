//! `ParallelOptimizer` against `AdamW` on the whole model held by one rank.
//!
//! Four ranks emulate tp 2 × dp 2 for the dense parameters (a matrix split by rows, one by
//! columns, a norm and a router held whole, a non-trainable buffer) and ep 2 × edp 2 for the
//! experts, with edp groups unlike both tp and dp groups. Each rank's gradients sum, over the
//! ranks sharing a parameter, to the whole model's gradient.

use std::sync::Arc;

use origami::optim::adamw::{AdamW, AdamWConfig};
use origami::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use origami::params::init::{initialise, normal_at};
use origami::params::{Buffers, Init, ParamGroup, ParamRegistry, Shard};
use origami_comm::local::LocalWorld;
use origami_comm::Communicator;

const STEPS: u64 = 3;
const LR: f32 = 0.05;
const WORLD: usize = 4;
const TOLERANCE: f64 = 1e-5;

/// A clip limit below every step's gradient norm.
fn config() -> AdamWConfig {
    AdamWConfig {
        grad_clip: 1.0,
        ..AdamWConfig::default()
    }
}

/// A rank's coordinates: dense (tp, dp) and expert (ep, edp).
struct Place {
    tp: usize,
    dp: usize,
    ep: usize,
    edp: usize,
}

/// tp groups {0,1} {2,3}; dp groups {0,2} {1,3}; edp groups {0,3} {1,2} (experts 0 and 1).
fn place(rank: usize) -> Place {
    Place {
        tp: rank % 2,
        dp: rank / 2,
        ep: usize::from(rank == 1 || rank == 2),
        edp: rank / 2,
    }
}

/// How a parameter of the test model is held across ranks.
#[derive(Clone, Copy, PartialEq)]
enum Holding {
    /// Split over tp by `Shard::along(shape, dim, ..)`, replicated over dp.
    SplitOverTp(usize),
    /// Whole on every rank (norm, router): each rank saw different tokens.
    Whole,
    /// A non-trainable buffer, whole on every rank.
    Buffer,
    /// Expert `e`'s parameter, replicated over edp.
    Expert(usize),
}

const MODEL: [(&str, &[usize], Holding); 9] = [
    ("embed.weight", &[6, 4], Holding::SplitOverTp(0)),
    ("norm.weight", &[4], Holding::Whole),
    ("router.expert_bias", &[2], Holding::Buffer),
    ("router.weight", &[2, 4], Holding::Whole),
    ("proj.weight", &[4, 5], Holding::SplitOverTp(1)),
    ("experts.0.w1", &[3, 4], Holding::Expert(0)),
    ("experts.0.b1", &[3], Holding::Expert(0)),
    ("experts.1.w1", &[3, 4], Holding::Expert(1)),
    ("experts.1.b1", &[3], Holding::Expert(1)),
];

/// Rows 0..3 | 3..6 of dim 0 (extent 6) and columns 0..2 | 2..5 of dim 1 (extent 5: uneven).
fn tp_split(extent: usize, tp: usize) -> std::ops::Range<usize> {
    let cut = if extent == 5 { 2 } else { extent / 2 };
    [0..cut, cut..extent][tp].clone()
}

/// The model on one rank (`place` None) or the part of it rank `place` holds.
fn registry(place: Option<&Place>) -> ParamRegistry {
    let mut registry = ParamRegistry::default();
    for (name, shape, holding) in MODEL {
        let name = name.to_string();
        let init = match shape.len() {
            1 => Init::Constant(1.0),
            _ => Init::Normal(0.5),
        };
        match (holding, place) {
            (Holding::Buffer, _) => {
                registry.register_buffer(name, shape, ParamGroup::Dense, Init::Constant(0.3));
            }
            (Holding::SplitOverTp(dim), Some(place)) => {
                let shard = Shard::along(shape, dim, vec![tp_split(shape[dim], place.tp)]);
                registry.register_sharded(name, shape, shard, ParamGroup::Dense, init);
            }
            (Holding::Expert(e), Some(place)) if e != place.ep => {}
            (Holding::Expert(_), _) => {
                registry.register(name, shape, ParamGroup::Expert, init);
            }
            _ => {
                registry.register(name, shape, ParamGroup::Dense, init);
            }
        }
    }
    registry
}

/// The whole model's gradient at `step` (zero for the buffer).
fn full_gradient(full: &ParamRegistry, step: u64) -> Buffers {
    let mut grads = full.zeros();
    for (index, (name, _, holding)) in MODEL.iter().enumerate() {
        if *holding == Holding::Buffer {
            continue;
        }
        let id = full.find(name).unwrap().id;
        for (j, g) in grads.get_mut(id).iter_mut().enumerate() {
            *g = normal_at(11, step, (index * 1000 + j) as u64);
        }
    }
    grads
}

/// Rank `rank`'s gradient in the whole model's layout: parts that sum over the ranks sharing
/// each parameter to `full_grads` (whole-tensor parameters split over all four ranks), and
/// large values for the buffer, which the optimizer must ignore.
fn contribution(full: &ParamRegistry, full_grads: &Buffers, step: u64, rank: usize) -> Buffers {
    let at = place(rank);
    let mut grads = full.zeros();
    for (index, (name, _, holding)) in MODEL.iter().enumerate() {
        let id = full.find(name).unwrap().id;
        let noise =
            |part: usize, j: usize| normal_at(20 + part as u64, step, (index * 1000 + j) as u64);
        let shared = |part: usize, j: usize, g: f32| {
            if part == 0 {
                g - noise(0, j)
            } else {
                noise(0, j)
            }
        };
        for (j, (out, &g)) in grads
            .get_mut(id)
            .iter_mut()
            .zip(full_grads.get(id))
            .enumerate()
        {
            *out = match holding {
                Holding::Buffer => 100.0 * noise(7, j),
                Holding::Whole if rank < WORLD - 1 => noise(rank, j),
                Holding::Whole => g - (0..WORLD - 1).map(|k| noise(k, j)).sum::<f32>(),
                Holding::SplitOverTp(_) => shared(at.dp, j, g),
                Holding::Expert(_) => shared(at.edp, j, g),
            };
        }
    }
    grads
}

/// `max |a − b| / max |b|` over both buffers.
fn relative_error(a: &Buffers, b: &Buffers) -> f64 {
    let pairs = || {
        a.dense
            .iter()
            .zip(&b.dense)
            .chain(a.expert.iter().zip(&b.expert))
    };
    let diff = pairs()
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let scale = pairs().map(|(_, y)| y.abs() as f64).fold(1e-30, f64::max);
    diff / scale
}

/// The whole model trained by `AdamW`: parameters, norms, moments.
struct Reference {
    params: Buffers,
    norms: Vec<f64>,
    optimizer: AdamW,
}

fn reference() -> Reference {
    let full = registry(None);
    let mut params = initialise(&full, 7);
    let mut optimizer = AdamW::new(&full, config());
    let norms = (0..STEPS)
        .map(|step| {
            let mut grads = full_gradient(&full, step);
            optimizer.step(&full, &mut params, &mut grads, LR)
        })
        .collect();
    Reference {
        params,
        norms,
        optimizer,
    }
}

/// What one rank ends with.
struct RankResult {
    params: Buffers,
    norms: Vec<f64>,
    moments: (Buffers, Buffers),
    bytes: u64,
}

fn run_parallel(distributed: bool, bucket_elements: usize) -> Vec<RankResult> {
    LocalWorld::new(WORLD)
        .run(|world: Arc<dyn Communicator>| {
            let rank = world.rank();
            let split =
                |lists: [[usize; 2]; 2]| world.split(&lists.map(Vec::from)).map(Option::unwrap);
            let groups = OptimizerGroups {
                tp: split([[0, 1], [2, 3]])?,
                dp_cp: split([[0, 2], [1, 3]])?,
                edp: split([[0, 3], [1, 2]])?,
                world: world.clone(),
            };
            let full = registry(None);
            let local = registry(Some(&place(rank)));
            let mut params = local.shard_of(&full, &initialise(&full, 7));
            let mut optimizer =
                ParallelOptimizer::new(&local, config(), groups, distributed, bucket_elements);
            let mut norms = Vec::new();
            for step in 0..STEPS {
                let full_grads = full_gradient(&full, step);
                let mut grads =
                    local.shard_of(&full, &contribution(&full, &full_grads, step, rank));
                norms.push(optimizer.step(&local, &mut params, &mut grads, LR)?);
            }
            assert_eq!(optimizer.steps(), STEPS);
            Ok::<_, origami_comm::CommError>(RankResult {
                params,
                norms,
                moments: optimizer.moments()?,
                bytes: optimizer.last_step_bytes(),
            })
        })
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn four_ranks_match_adamw_on_the_whole_model() {
    let reference = reference();
    assert!(
        reference
            .norms
            .iter()
            .all(|&n| n > config().grad_clip as f64),
        "every step must clip: {:?}",
        reference.norms
    );
    let full = registry(None);
    for distributed in [false, true] {
        for bucket_elements in [7, 1 << 20] {
            let case = format!("distributed {distributed}, buckets of {bucket_elements}");
            for (rank, result) in run_parallel(distributed, bucket_elements)
                .iter()
                .enumerate()
            {
                let local = registry(Some(&place(rank)));
                let error =
                    relative_error(&result.params, &local.shard_of(&full, &reference.params));
                assert!(
                    error <= TOLERANCE,
                    "{case}, rank {rank}: parameters off by {error:e}"
                );
                for (norm, expected) in result.norms.iter().zip(&reference.norms) {
                    let error = (norm - expected).abs() / expected;
                    assert!(
                        error <= TOLERANCE,
                        "{case}, rank {rank}: norm {norm} vs {expected}"
                    );
                }
                let (m, v) = &result.moments;
                let m_error = relative_error(m, &local.shard_of(&full, &reference.optimizer.m));
                let v_error = relative_error(v, &local.shard_of(&full, &reference.optimizer.v));
                assert!(
                    m_error.max(v_error) <= TOLERANCE,
                    "{case}, rank {rank}: moments off by {m_error:e}, {v_error:e}"
                );
            }
        }
    }
}

#[test]
fn distributed_moments_equal_replicated_moments() {
    let replicated = run_parallel(false, 5);
    let distributed = run_parallel(true, 5);
    for (rank, (a, b)) in replicated.iter().zip(&distributed).enumerate() {
        let error = relative_error(&b.moments.0, &a.moments.0)
            .max(relative_error(&b.moments.1, &a.moments.1));
        assert!(error <= 1e-6, "rank {rank}: moments differ by {error:e}");
        assert_eq!(a.params.dense.len(), b.params.dense.len());
    }
}

#[test]
fn bytes_sent_follow_the_ring_formulas() {
    // Rank 0: dense 12 + 4 + 2 + 8 + 8 = 34 elements, expert 15; whole-over-tp 4 + 8 = 12;
    // every group has 2 ranks, so (n−1)/n = 1/2; the norm is 2 f32s all-reduced over 4 ranks.
    let (dense, expert, whole) = (34u64, 15u64, 12u64);
    let norm = 2 * 3 * 2 * 4 / 4;
    let replicated = run_parallel(false, 7);
    assert_eq!(replicated[0].bytes, (whole + dense + expert) * 4 + norm);
    let distributed = run_parallel(true, 7);
    assert_eq!(
        distributed[0].bytes,
        whole * 4 + (dense + expert) * 4 + norm
    );
}

#[test]
fn one_rank_is_bit_identical_to_adamw() {
    let full = registry(None);
    for distributed in [false, true] {
        let mut params = initialise(&full, 7);
        let mut optimizer =
            ParallelOptimizer::new(&full, config(), OptimizerGroups::single(), distributed, 5);
        let reference = reference();
        for step in 0..STEPS {
            let mut grads = full_gradient(&full, step);
            let norm = optimizer.step(&full, &mut params, &mut grads, LR).unwrap();
            assert_eq!(
                norm, reference.norms[step as usize],
                "distributed {distributed}"
            );
        }
        assert_eq!(params, reference.params, "distributed {distributed}");
        let (m, v) = optimizer.moments().unwrap();
        assert_eq!(
            (m, v),
            (reference.optimizer.m.clone(), reference.optimizer.v.clone())
        );
        assert_eq!(optimizer.last_step_bytes(), 0);
    }
}

#[test]
fn restored_moments_continue_like_uninterrupted_training() {
    let full = registry(None);
    let reference = reference();
    let mut params = initialise(&full, 7);
    let mut first = ParallelOptimizer::new(&full, config(), OptimizerGroups::single(), true, 5);
    for step in 0..STEPS - 1 {
        first
            .step(&full, &mut params, &mut full_gradient(&full, step), LR)
            .unwrap();
    }
    let (m, v) = first.moments().unwrap();
    let mut resumed = ParallelOptimizer::new(&full, config(), OptimizerGroups::single(), true, 5);
    resumed.restore(m, v, first.steps());
    resumed
        .step(&full, &mut params, &mut full_gradient(&full, STEPS - 1), LR)
        .unwrap();
    assert_eq!(resumed.steps(), STEPS);
    assert_eq!(params, reference.params);
}
