//! MoE across expert ranks on the local backend, against one rank holding everything
//! (DESIGN.md §2): the layer and a whole small model over EP ∈ {2, 4, 8} × ETP ∈ {1, 2} × both
//! dispatchers; ranks without tokens; every token on one expert; sigmoid and sqrtsoftplus
//! routing with expert bias and groups at every load-balancing scope; token dropping across
//! ranks; the dispatch round trip; and the errors for sizes that do not split.

use origami::compute::{Compute, Weights};
use std::sync::Arc;

use origami::equivalence::{self, relative_error, Discrepancy, ModelCase, MoeLayerCase};
use origami::layers::moe::config::{AuxLossScope, DispatcherKind, MoeConfig, ScoreFunction};
use origami::layers::moe::dispatch::alltoall::AllToAllPlan;
use origami::layers::moe::parallel::MoeParallel;
use origami::layers::moe::permute::{permute, permute_backward, unpermute, Permutation};
use origami::layers::moe::router::{Router, Routing};
use origami::layers::moe::MoeLayer;
use origami::model::config::ModelConfigError;
use origami::model::gpt::GptModel;
use origami::model::parallel::ModelParallel;
use origami::params::init::initialise;
use origami::params::ParamRegistry;
use origami_comm::local::LocalWorld;
use origami_comm::Communicator;
use origami_kernels::matmul::F32Kernel;
use origami_kernels::matmul_bf16::Bf16Kernel;
use origami_kernels::testing::random_vec;
use origami_parallel::ParallelState;

const TOLERANCE: f64 = 1e-4;
/// bf16 against one rank in bf16 on a machine whose f32 GEMM does not give a row the same bits
/// whatever the other rows ([`F32Kernel::rows_independent`]): a value one f32 ulp apart may
/// round to the neighbouring bf16 value, one bf16 ulp (`2⁻⁷` relative at most) in that element
/// and in each product it enters. Where the rows are independent, every rounding sees the same
/// f32 value on both sides (the bf16 kernel packs as the f32 one, or widens into it) and the
/// f32 [`TOLERANCE`] holds.
const BF16_NEIGHBOUR_TOLERANCE: f64 = 1.0 / 128.0;
const DISPATCHERS: [DispatcherKind; 2] = [DispatcherKind::Alltoall, DispatcherKind::Allgather];

fn run_layer(case: &MoeLayerCase) -> Vec<Discrepancy> {
    LocalWorld::new(case.ep * case.etp)
        .run(|world| equivalence::moe_layer(&world, case))
        .unwrap_or_else(|e| panic!("{case:?}: {e}"))
}

fn assert_equivalent(what: &str, results: &[Discrepancy]) {
    assert_within(TOLERANCE, what, results);
}

fn assert_within(tolerance: f64, what: &str, results: &[Discrepancy]) {
    for (rank, d) in results.iter().enumerate() {
        assert!(d.max() <= tolerance, "{what}, rank {rank}: {d:?}");
    }
}

#[test]
fn moe_layer_matches_one_rank_for_every_ep_etp_and_dispatcher() {
    for ep in [2, 4, 8] {
        for etp in [1, 2] {
            for dispatcher in DISPATCHERS {
                let case = MoeLayerCase::new(ep, etp, dispatcher);
                let what = format!("ep {ep} etp {etp} {dispatcher:?}");
                assert_equivalent(&what, &run_layer(&case));
            }
        }
    }
}

#[test]
fn sabotaged_expert_shard_is_detected() {
    // The harness must be able to fail: rank 1 initialises with another seed, so its expert
    // shard disagrees with the other rank's reference, and the comparison must say so.
    let case = MoeLayerCase::new(2, 1, DispatcherKind::Alltoall);
    let results = LocalWorld::new(2)
        .run(|world| {
            let clean = equivalence::moe_layer(&world, &case)?;
            let mut wrong = case.clone();
            wrong.seed = if world.rank() == 1 { 8 } else { 7 };
            let broken = equivalence::moe_layer(&world, &wrong)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((clean, broken))
        })
        .unwrap();
    assert!(results.iter().all(|(clean, _)| clean.max() <= TOLERANCE));
    assert!(
        results.iter().any(|(_, broken)| broken.max() > 1e-2),
        "{results:?}"
    );
}

#[test]
fn ranks_without_tokens_and_experts_without_tokens_work() {
    for dispatcher in DISPATCHERS {
        let mut case = MoeLayerCase::new(4, 2, dispatcher);
        case.tokens_per_rank = vec![5, 0, 7, 0, 0, 3, 9, 0];
        assert_equivalent(
            &format!("zero-token ranks, {dispatcher:?}"),
            &run_layer(&case),
        );
    }
}

#[test]
fn every_token_on_one_expert_works() {
    for dispatcher in DISPATCHERS {
        for topk in [1, 2] {
            let mut case = MoeLayerCase::new(4, 1, dispatcher);
            case.settings.topk = topk;
            case.all_to_expert = Some(5);
            let results = run_layer(&case);
            assert_equivalent(
                &format!("all to expert 5, top-{topk}, {dispatcher:?}"),
                &results,
            );
        }
    }
}

#[test]
fn sigmoid_routing_with_groups_and_scaling_matches_one_rank() {
    for dispatcher in DISPATCHERS {
        let mut case = MoeLayerCase::new(2, 2, dispatcher);
        case.settings.score_function = origami::layers::moe::config::ScoreFunction::Sigmoid;
        case.settings.topk_scaling_factor = Some(2.5);
        case.settings.num_groups = Some(4);
        case.settings.group_topk = Some(2);
        assert_equivalent(
            &format!("sigmoid, groups, {dispatcher:?}"),
            &run_layer(&case),
        );
    }
}

/// An expert bias of the 8 experts that moves some tokens away from their plain top-k.
const EXPERT_BIAS: [f32; 8] = [0.2, -0.1, 0.05, 0.0, -0.15, 0.1, 0.0, 0.25];

/// `settings` routed by `score_function` with expert bias, 4 groups of which each token uses
/// 2, and a scaling factor.
fn biased_grouped(settings: MoeConfig, score_function: ScoreFunction) -> MoeConfig {
    MoeConfig {
        score_function,
        topk_scaling_factor: Some(2.5),
        num_groups: Some(4),
        group_topk: Some(2),
        expert_bias_update_rate: Some(0.01),
        ..settings
    }
}

/// Tokens of `case` (its reference's input, the router initialised as the harness does) whose
/// routed experts differ from the plain top-k that the load-balancing loss counts.
fn deflected_tokens(case: &MoeLayerCase) -> usize {
    let mut registry = ParamRegistry::default();
    let router = Router::new(
        &mut registry,
        "moe.router",
        case.hidden,
        &case.settings,
        0.4,
    );
    let mut params = initialise(&registry, case.seed);
    if let Some(bias) = &case.expert_bias {
        let id = registry.find("moe.router.expert_bias").unwrap().id;
        params.get_mut(id).copy_from_slice(bias);
    }
    let total: usize = case.tokens_per_rank.iter().sum();
    let x = random_vec(total * case.hidden, case.seed + 1);
    let (routing, saved) = router.forward(&Weights::f32(&params), &x);
    let k = case.settings.topk;
    let sorted = |choices: &[u32]| {
        let mut c = choices.to_vec();
        c.sort();
        c
    };
    routing
        .experts
        .chunks(k)
        .zip(saved.balancing_choices().chunks(k))
        .filter(|(routed, plain)| sorted(routed) != sorted(plain))
        .count()
}

#[test]
fn biased_grouped_routing_matches_one_rank_at_every_scope() {
    // Sigmoid and sqrtsoftplus routers with expert bias and groups: tokens go to their biased,
    // group-limited choices while the load-balancing loss counts the plain top-k, over ranks
    // that share the micro-batch (and, at the sequence scope, three sequences split over them).
    for score_function in [ScoreFunction::Sigmoid, ScoreFunction::SqrtSoftplus] {
        for scope in [AuxLossScope::MicroBatch, AuxLossScope::Sequence] {
            for (ep, etp) in [(2, 2), (4, 1)] {
                for dispatcher in DISPATCHERS {
                    let mut case = MoeLayerCase::new(ep, etp, dispatcher);
                    case.settings = biased_grouped(case.settings, score_function);
                    case.settings.aux_loss_scope = scope;
                    case.expert_bias = Some(EXPERT_BIAS.to_vec());
                    if scope == AuxLossScope::Sequence {
                        case.sequences = 3;
                    }
                    let what =
                        format!("{score_function:?} {scope:?} ep {ep} etp {etp} {dispatcher:?}");
                    assert!(
                        deflected_tokens(&case) > 0,
                        "{what}: the bias and groups must move some token off its plain top-k"
                    );
                    assert_equivalent(&what, &run_layer(&case));
                }
            }
        }
    }
}

#[test]
fn biased_grouped_routing_in_a_whole_model_matches_one_rank_at_every_scope() {
    // With data parallelism (world 4, ep 2: edp 2) the global-batch loads are summed over every
    // rank of the batch; micro-batch and sequence loads over each rank's own micro-batch.
    for score_function in [ScoreFunction::Sigmoid, ScoreFunction::SqrtSoftplus] {
        for scope in [
            AuxLossScope::MicroBatch,
            AuxLossScope::Sequence,
            AuxLossScope::GlobalBatch,
        ] {
            for (ep, etp, world) in [(2, 2, 4), (2, 1, 4)] {
                for dispatcher in DISPATCHERS {
                    let mut case = ModelCase::new(ep, etp, dispatcher);
                    case.model.moe = biased_grouped(case.model.moe, score_function);
                    case.model.moe.aux_loss_scope = scope;
                    case.expert_bias = Some(EXPERT_BIAS.to_vec());
                    let results = LocalWorld::new(world)
                        .run(|w| equivalence::model(&w, &case))
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_equivalent(
                        &format!(
                            "{score_function:?} {scope:?}, world {world}, ep {ep} etp {etp} {dispatcher:?}"
                        ),
                        &results,
                    );
                }
            }
        }
    }
}

#[test]
fn dropping_across_ranks_keeps_each_ranks_local_capacity() {
    // Dropping is decided on each rank's own tokens, so the parallel layer equals one rank
    // computing each rank's tokens separately: check against that, per rank, with both
    // policies, padding on and off, and both dispatchers.
    for dispatcher in DISPATCHERS {
        for pad in [false, true] {
            for policy in [
                origami::layers::moe::config::DropPolicy::Probs,
                origami::layers::moe::config::DropPolicy::Position,
            ] {
                let settings = MoeConfig {
                    capacity_factor: Some(0.5),
                    drop_policy: policy,
                    pad_to_capacity: pad,
                    aux_loss_coeff: 0.0,
                    z_loss_coeff: 0.0,
                    ..MoeLayerCase::new(2, 2, dispatcher).settings
                };
                let what = format!("{dispatcher:?} pad {pad} {policy:?}");
                let errors = dropping_against_separate_ranks(&settings);
                assert!(errors.iter().all(|&e| e <= TOLERANCE), "{what}: {errors:?}");
            }
        }
    }
}

/// Per rank: output and input-gradient errors of the 4-rank (ep 2, etp 2) layer against a
/// single-rank layer run on that rank's tokens alone.
fn dropping_against_separate_ranks(settings: &MoeConfig) -> Vec<f64> {
    let (h, tokens) = (16, 12);
    LocalWorld::new(4)
        .run(|world| {
            let mut full_registry = ParamRegistry::default();
            let full = MoeLayer::new(&mut full_registry, "moe", h, settings, 0.4, 0.4);
            let full_params = origami::params::init::initialise(&full_registry, 3);
            let x = random_vec(tokens * h, 100 + world.rank() as u64);
            let dy = random_vec(tokens * h, 200 + world.rank() as u64);
            let (y_ref, saved, stats_ref) = full.forward(&Weights::f32(&full_params), &x);
            let mut g = full_registry.zeros();
            let dx_ref = full.backward(&Weights::f32(&full_params), &mut g, saved, &x, &dy, 1.0);
            assert!(stats_ref.dropped > 0, "the case must drop something");
            let state = layer_state(&world, 2, 2);
            let mut registry = ParamRegistry::default();
            let layer = MoeLayer::new_parallel(
                &mut registry,
                "moe",
                h,
                settings,
                (0.4, 0.4),
                equivalence::moe_only_parallel(&state),
            )?;
            let params = registry.shard_of(&full_registry, &full_params);
            let (y, saved, _) = layer.forward(&Weights::f32(&params), &x);
            let mut grads = registry.zeros();
            let dx = layer.backward(&Weights::f32(&params), &mut grads, saved, &x, &dy, 1.0);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                relative_error(&y, &y_ref).max(relative_error(&dx, &dx_ref)),
            )
        })
        .unwrap()
}

fn layer_state(world: &Arc<dyn Communicator>, ep: usize, etp: usize) -> ParallelState {
    equivalence::moe_only_state(world, ep, etp).unwrap()
}

#[test]
fn whole_model_matches_one_rank() {
    // world = ep·etp (edp 1), and world 4 with ep 2 (edp 2: expert gradients reduced over edp).
    for (ep, etp, world) in [
        (2, 1, 2),
        (4, 1, 4),
        (2, 2, 4),
        (8, 1, 8),
        (4, 2, 8),
        (8, 2, 16),
        (2, 1, 4),
    ] {
        for dispatcher in DISPATCHERS {
            let case = ModelCase::new(ep, etp, dispatcher);
            let results = LocalWorld::new(world)
                .run(|w| equivalence::model(&w, &case))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_equivalent(
                &format!("model, world {world}, ep {ep} etp {etp} {dispatcher:?}"),
                &results,
            );
        }
    }
}

#[test]
fn per_sequence_scope_counts_each_sequence_over_the_ranks_sharing_it() {
    // Three sequences, each split over the 4 ranks (as sequence/context parallelism splits
    // them): the parallel per-sequence loss and gradients must equal one rank's with whole
    // sequences; the micro-batch scope on the same split must too.
    for scope in [AuxLossScope::Sequence, AuxLossScope::MicroBatch] {
        for dispatcher in DISPATCHERS {
            let mut case = MoeLayerCase::new(2, 2, dispatcher);
            case.settings.aux_loss_scope = scope;
            case.sequences = 3;
            case.tokens_per_rank = vec![6; 4];
            assert_equivalent(&format!("{scope:?}, {dispatcher:?}"), &run_layer(&case));
        }
    }
}

#[test]
fn per_sequence_and_global_batch_scopes_match_one_rank() {
    for scope in [AuxLossScope::Sequence, AuxLossScope::GlobalBatch] {
        for (ep, etp, world) in [(2, 2, 4), (2, 1, 4)] {
            for dispatcher in DISPATCHERS {
                let mut case = ModelCase::new(ep, etp, dispatcher);
                case.model.moe.aux_loss_scope = scope;
                let results = LocalWorld::new(world)
                    .run(|w| equivalence::model(&w, &case))
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_equivalent(
                    &format!("{scope:?}, world {world}, ep {ep} etp {etp} {dispatcher:?}"),
                    &results,
                );
            }
        }
    }
}

#[test]
fn dispatch_then_combine_returns_the_input_and_its_gradient() {
    // Identity experts and weights 1/k: combine(dispatch(x)) = x, on 4 ranks (ep 2, etp 2 —
    // the etp reduce-scatter sums two copies, so the experts' side halves them) with uneven
    // token counts. The gradient path (to_experts then from_experts of dy) likewise gives dy.
    let (h, k, experts) = (6, 2, 4);
    let results = LocalWorld::new(4)
        .run(|world| {
            let state = layer_state(&world, 2, 2);
            let parallel = equivalence::moe_only_parallel(&state);
            let tokens = 3 + 2 * world.rank();
            let x = random_vec(tokens * h, 40 + world.rank() as u64);
            let chosen: Vec<u32> = (0..tokens * k)
                .map(|s| ((s * 7 + world.rank()) % experts) as u32)
                .map(|e| if e == 0 { 3 } else { e })
                .collect();
            let routing = routing_of(chosen, k, experts);
            let perm = Permutation::new(&routing, experts);
            let rows_per_expert: Vec<usize> =
                perm.offsets.windows(2).map(|w| w[1] - w[0]).collect();
            let plan = AllToAllPlan::new(&parallel, experts, &rows_per_expert, None, h);
            let at_experts = plan.to_experts(&parallel, permute(&x, &perm, h));
            let halved: Vec<f32> = at_experts.iter().map(|v| v / 2.0).collect();
            let back = plan.from_experts(&parallel, halved);
            let y = unpermute(&back, &routing.weights, &perm, h, tokens);
            let mut dx = vec![0.0; x.len()];
            let d_rows = plan.from_experts(
                &parallel,
                plan.to_experts(&parallel, permute(&x, &perm, h))
                    .iter()
                    .map(|v| v / (2.0 * k as f32))
                    .collect(),
            );
            permute_backward(&mut dx, &d_rows, &perm, h);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                relative_error(&y, &x),
                relative_error(&dx, &x),
                at_experts.len() / h,
            ))
        })
        .unwrap();
    for (rank, &(forward, backward, _)) in results.iter().enumerate() {
        assert!(forward <= 1e-6, "rank {rank}: round trip error {forward}");
        assert!(
            backward <= 1e-6,
            "rank {rank}: gradient round trip error {backward}"
        );
    }
    // Expert 0 is never chosen, so ep rank 0's rows are only expert 1's.
    assert!(results.iter().all(|&(_, _, rows)| rows > 0));
}

fn routing_of(experts_chosen: Vec<u32>, k: usize, experts: usize) -> Routing {
    let mut tokens_per_expert = vec![0; experts];
    experts_chosen
        .iter()
        .for_each(|&e| tokens_per_expert[e as usize] += 1);
    Routing {
        weights: vec![1.0 / k as f32; experts_chosen.len()],
        experts: experts_chosen,
        tokens_per_expert,
        topk: k,
    }
}

#[test]
fn sizes_that_do_not_split_are_clear_errors() {
    let errors = LocalWorld::new(4)
        .run(|world| {
            let state = layer_state(&world, 4, 1);
            let mut model = ModelCase::new(4, 1, DispatcherKind::Alltoall).model;
            model.moe.num_experts = 6;
            let experts = GptModel::new_parallel(
                model.clone(),
                ModelParallel::moe_only(MoeParallel::from_state(&state)),
            )
            .unwrap_err();
            model.moe.num_experts = 8;
            model.moe.ffn_hidden_size = 7;
            let state = layer_state(&world, 2, 2);
            let ffn = GptModel::new_parallel(
                model,
                ModelParallel::moe_only(MoeParallel::from_state(&state)),
            )
            .unwrap_err();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((experts, ffn))
        })
        .unwrap();
    let (experts, ffn): &(ModelConfigError, ModelConfigError) = &errors[0];
    assert_eq!(
        experts.to_string(),
        "model.moe.num_experts = 6 must be divisible by parallel.ep = 4"
    );
    assert_eq!(
        ffn.to_string(),
        "model.moe.ffn_hidden_size = 7 must be divisible by parallel.etp = 2"
    );
}

#[test]
fn moe_layer_in_bf16_matches_one_rank_in_bf16_for_every_ep_etp_and_dispatcher() {
    // The experts' input travels in bf16 (rounded before the dispatch, as the experts would
    // round it after); a width of 15 takes the f32 path and rounds after.
    let compute = Compute::Bf16(Bf16Kernel::detect());
    let tolerance = if F32Kernel::current().rows_independent() {
        TOLERANCE
    } else {
        BF16_NEIGHBOUR_TOLERANCE
    };
    for (ep, etp, hidden) in [
        (2, 1, 16),
        (4, 1, 16),
        (8, 1, 16),
        (2, 2, 16),
        (4, 2, 16),
        (2, 2, 15),
    ] {
        for dispatcher in DISPATCHERS {
            let case = MoeLayerCase {
                compute,
                hidden,
                ..MoeLayerCase::new(ep, etp, dispatcher)
            };
            let what = format!("bf16 ep {ep} etp {etp} hidden {hidden} {dispatcher:?}");
            assert_within(tolerance, &what, &run_layer(&case));
        }
    }
}
