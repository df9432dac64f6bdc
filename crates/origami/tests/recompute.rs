//! Activation recomputation (`train.recompute`): `selective` and `full` train bit for bit the
//! run that keeps everything — on one rank (f32 and bf16) and on folded layouts (tensor,
//! context and expert parallel, the recomputation re-running their communication) — with the
//! router's input jitter and the global-batch load-balancing loss over two accumulated
//! micro-batches (which a replay must not count twice: a replay that counts the loads again
//! fails both tests from the first step on), while holding fewer stored bytes.

use std::sync::Arc;

use origami::compute::{Compute, WeightCopies};
use origami::layers::moe::config::AuxLossScope;
use origami::layers::recompute::Recompute;
use origami::model::config::ModelConfig;
use origami::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use origami::model::parallel::ModelParallel;
use origami::optim::adamw::AdamWConfig;
use origami::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use origami::params::Buffers;
use origami::train::pipeline::stage_schedule;
use origami::train::step::{train_step, StepGroups};
use origami_comm::local::LocalWorld;
use origami_comm::{Communicator, SoloComm};
use origami_kernels::matmul_bf16::Bf16Kernel;
use origami_parallel::{ParallelConfig, ParallelState};

const STEPS: usize = 3;
const SEQUENCES: usize = 4;
const SEQ: usize = 16;

/// Three layers (MoE, dense, MoE with a gated shared expert), jittered routers, the
/// global-batch load-balancing loss and the z-loss.
fn model() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.hidden_size = 32;
    c.num_layers = 3;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.ffn_hidden_size = 40;
    c.max_seq_len = SEQ;
    c.qkv_bias = true;
    c.moe.num_experts = 4;
    c.moe.ffn_hidden_size = 24;
    c.moe.layer_pattern = Some(vec![1, 0, 1]);
    c.moe.shared_expert_ffn_hidden_size = 16;
    c.moe.shared_expert_gate = true;
    c.moe.aux_loss_coeff = 0.01;
    c.moe.z_loss_coeff = 0.001;
    c.moe.aux_loss_scope = AuxLossScope::GlobalBatch;
    c.moe.input_jitter_eps = Some(0.05);
    c
}

/// Micro-batch `index` (of two) of step `step`: `SEQUENCES / 2` sequences of token ids.
fn micro_batch(step: usize, index: usize) -> MicroBatch {
    let batch = SEQUENCES / 2;
    let ids: Vec<u32> = (0..batch * (SEQ + 1))
        .map(|i| ((i * 31 + step * 97 + index * 13) % 251) as u32)
        .collect();
    let (mut tokens, mut targets) = (Vec::new(), Vec::new());
    for row in ids.chunks(SEQ + 1) {
        tokens.extend_from_slice(&row[..SEQ]);
        targets.extend_from_slice(&row[1..]);
    }
    MicroBatch {
        tokens,
        targets,
        batch,
        seq: SEQ,
        keys: SequenceKeys::consecutive(7, step as u64, (index * batch) as u64, batch),
    }
}

/// What one rank's run produced: each step's loss, its final parameters, and its largest
/// stored activations.
struct Run {
    losses: Vec<f64>,
    params: Buffers,
    peak_stored_bytes: usize,
}

/// `STEPS` steps of two accumulated micro-batches on this rank of `world` laid out by
/// `parallel` (dp 1: every rank reads both micro-batches).
fn train(
    world: Arc<dyn Communicator>,
    parallel: &ParallelConfig,
    recompute: Recompute,
    compute: Compute,
) -> Run {
    let state =
        ParallelState::new(&parallel.layout(world.size()).unwrap(), world.as_ref()).unwrap();
    assert_eq!(
        state.dp().size(),
        1,
        "every rank reads the same micro-batches"
    );
    let model = GptModel::new_parallel(
        model(),
        ModelParallel::from_state(&state, Default::default()),
    )
    .unwrap()
    .with_recompute(recompute);
    let mut params = model.init_params(3);
    let mut copies = WeightCopies::new(compute, &params);
    let mut grads = model.registry().zeros();
    let mut optimizer = ParallelOptimizer::new(
        model.registry(),
        AdamWConfig::default(),
        OptimizerGroups::from_state(&state, world.clone()),
        false,
        1 << 20,
    );
    let schedule = stage_schedule(&model, 2, None).unwrap();
    let groups = StepGroups::from_state(&state, world);
    let mut run = Run {
        losses: Vec::new(),
        params: model.registry().zeros(),
        peak_stored_bytes: 0,
    };
    for step in 0..STEPS {
        let batches = [micro_batch(step, 0), micro_batch(step, 1)];
        let outcome = train_step(
            &model,
            &mut params,
            &mut copies,
            &mut grads,
            &mut optimizer,
            &batches,
            &schedule,
            2,
            &groups,
            3e-3,
        )
        .unwrap();
        run.losses.push(outcome.loss);
        run.peak_stored_bytes = run.peak_stored_bytes.max(outcome.peak_stored_bytes);
    }
    run.params = params;
    run
}

fn one_rank(recompute: Recompute, compute: Compute) -> Run {
    train(
        SoloComm::shared(0),
        &ParallelConfig::default(),
        recompute,
        compute,
    )
}

/// Every rank's run of `parallel` on `world` local ranks.
fn layout(world: usize, parallel: ParallelConfig, recompute: Recompute) -> Vec<Run> {
    LocalWorld::new(world)
        .run(|comm| Ok::<_, String>(train(comm, &parallel, recompute, Compute::F32)))
        .unwrap()
}

fn assert_same(run: &Run, reference: &Run, what: &str) {
    let bits = |v: &[f64]| v.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&run.losses), bits(&reference.losses), "{what}: losses");
    assert!(
        run.params == reference.params,
        "{what}: final parameters differ"
    );
}

#[test]
fn recomputation_trains_the_same_run_bit_for_bit_on_one_rank() {
    let computes = [
        Compute::F32,
        Compute::Bf16(Bf16Kernel::detect()),
        Compute::Bf16(Bf16Kernel::Portable),
    ];
    for compute in computes {
        let none = one_rank(Recompute::None, compute);
        let selective = one_rank(Recompute::Selective, compute);
        let full = one_rank(Recompute::Full, compute);
        assert_same(&selective, &none, &format!("selective {compute:?}"));
        assert_same(&full, &none, &format!("full {compute:?}"));
        assert!(
            full.peak_stored_bytes < selective.peak_stored_bytes
                && selective.peak_stored_bytes < none.peak_stored_bytes,
            "{compute:?}: stored bytes none {} selective {} full {}",
            none.peak_stored_bytes,
            selective.peak_stored_bytes,
            full.peak_stored_bytes
        );
    }
}

#[test]
fn recomputation_replays_the_communication_of_folded_layouts_bit_for_bit() {
    let layouts = [
        // attention TP2 | MoE EP2: the norm outputs are re-gathered over tp.
        ParallelConfig {
            tp: 2,
            ep: 2,
            etp: Some(1),
            ..ParallelConfig::default()
        },
        // attention CP2 (ring) | MoE EP2: the core's ring exchange runs again.
        ParallelConfig {
            cp: 2,
            ep: 2,
            etp: Some(1),
            ..ParallelConfig::default()
        },
    ];
    for parallel in layouts {
        let none = layout(2, parallel.clone(), Recompute::None);
        for mode in [Recompute::Selective, Recompute::Full] {
            for (rank, (run, reference)) in layout(2, parallel.clone(), mode)
                .iter()
                .zip(&none)
                .enumerate()
            {
                assert_same(
                    run,
                    reference,
                    &format!("{parallel:?} {mode:?} rank {rank}"),
                );
            }
        }
    }
}
