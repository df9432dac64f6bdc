//! Sharded checkpoints across layouts: a run saved at layout A and continued at layout B matches
//! an uninterrupted one-rank run (losses and final weights within 1e-5), for the layout pairs of
//! the checkpoint issue; the pieces of a world-8 checkpoint are disjoint and add up to the model
//! and optimizer state once.

use std::path::Path;

use origami::compute::PrecisionSetting;
use origami::equivalence::relative_error;
use origami::layers::moe::config::MoeConfig;
use origami::model::config::ModelConfig;
use origami::model::gpt::GptModel;
use origami::model::parallel::ModelParallel;
use origami::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use origami::params::{Buffers, ParamGroup};
use origami::train::checkpoint::shards::{
    Contribution, MomentShards, OwnedMoments, Ownership, Targets,
};
use origami::train::checkpoint::{self, Checkpoint, TrainingState};
use origami::train::config::RunConfig;
use origami::train::trainer::{train, SampleSource, TrainOptions};
use origami_comm::local::LocalWorld;
use origami_comm::Communicator;
use origami_parallel::{ParallelConfig, ParallelState};
use std::sync::Arc;

const TOLERANCE: f64 = 1e-5;

/// Deterministic pseudo-text: sample `i` is a window of a fixed token stream.
struct Synthetic;

impl SampleSource for Synthetic {
    fn len(&self) -> u64 {
        1000
    }
    fn sample_into(&self, index: u64, out: &mut [u32]) -> anyhow::Result<()> {
        let start = (index % self.len()) * 7;
        for (j, o) in out.iter_mut().enumerate() {
            let x = start + j as u64;
            *o = ((x * x + 3 * x) % 251) as u32;
        }
        Ok(())
    }
}

/// The sizes of a layout: world, tp, cp, pp, vpp, ep, etp, distributed optimizer.
#[derive(Clone, Copy, Debug)]
struct Layout {
    world: usize,
    tp: usize,
    cp: usize,
    pp: usize,
    vpp: usize,
    ep: usize,
    etp: usize,
    distributed: bool,
}

const ONE: Layout = Layout {
    world: 1,
    tp: 1,
    cp: 1,
    pp: 1,
    vpp: 1,
    ep: 1,
    etp: 1,
    distributed: false,
};

/// A 4-layer model with 8 experts (so EP up to 8 and PP up to 4 split it), 8 sequences of 16
/// tokens per step in micro-batches of one.
fn run_config(dir: &Path, steps: u64, layout: Layout) -> RunConfig {
    let mut config = RunConfig::default();
    config.model = ModelConfig {
        vocab_size: 256,
        hidden_size: 32,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        ffn_hidden_size: 48,
        max_seq_len: 16,
        moe: MoeConfig {
            num_experts: 8,
            ffn_hidden_size: 24,
            layer_pattern: Some(vec![1, 0, 1, 1]),
            ..config.model.moe
        },
        ..config.model
    };
    // Layouts compute the same run up to reassociation in f32 (in bf16 the roundings differ).
    config.train.precision = PrecisionSetting::F32;
    config.train.steps = steps;
    config.train.seq_len = 16;
    config.train.micro_batch = 1;
    config.train.global_batch = 8;
    config.train.eval_interval = 0;
    // AdamW normalises each update, so the last-bit differences of a parallel layout's gradient
    // sums (the equivalence harness's ≤ 1e-4) reach the weights in proportion to the learning
    // rate: a small one keeps them under this test's 1e-5, which is about the checkpoint.
    config.train.lr.lr = 1e-4;
    config.train.lr.min_lr = 1e-5;
    config.train.lr.decay_steps = steps;
    config.train.lr.warmup_steps = 1;
    config.checkpoint.dir = dir.to_path_buf();
    config.checkpoint.interval = 0;
    config.checkpoint.keep = 2;
    let p = &mut config.parallel;
    (p.world, p.tp, p.cp, p.pp, p.vpp, p.ep, p.etp) = (
        layout.world,
        layout.tp,
        layout.cp,
        layout.pp,
        layout.vpp,
        layout.ep,
        Some(layout.etp),
    );
    p.distributed_optimizer = layout.distributed;
    config
        .validate()
        .unwrap_or_else(|e| panic!("{layout:?}: {e:#}"));
    config
}

/// Trains 2 steps at `a`, saves, continues 2 steps at `b`, and compares with 4 steps at one rank.
fn save_at_load_at(a: Layout, b: Layout) {
    let tmp = tempfile::tempdir().unwrap();
    let straight = train(
        &run_config(&tmp.path().join("straight"), 4, ONE),
        &Synthetic,
        None,
        &TrainOptions::default(),
    )
    .unwrap();
    let dir = tmp.path().join("moved");
    let first = train(
        &run_config(&dir, 4, a),
        &Synthetic,
        None,
        &TrainOptions {
            stop_after: Some(2),
            ..TrainOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{a:?}: {e:#}"));
    let second = train(
        &run_config(&dir, 4, b),
        &Synthetic,
        None,
        &TrainOptions {
            resume: Some(dir.clone()),
            ..TrainOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{a:?} → {b:?}: {e:#}"));
    let losses: Vec<f32> = first
        .records
        .iter()
        .chain(&second.records)
        .map(|r| r.loss as f32)
        .collect();
    let expected: Vec<f32> = straight.records.iter().map(|r| r.loss as f32).collect();
    let loss_error = relative_error(&losses, &expected);
    let mut worst = (0.0, String::new());
    for info in straight.model.registry().params() {
        let error = relative_error(second.params.get(info.id), straight.params.get(info.id));
        if error > worst.0 {
            worst = (error, info.name.clone());
        }
    }
    eprintln!(
        "{a:?} → {b:?}: losses {loss_error:.2e}, weights {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        loss_error <= TOLERANCE,
        "{a:?} → {b:?}: losses differ by {loss_error}"
    );
    assert!(
        worst.0 <= TOLERANCE,
        "{a:?} → {b:?}: {} differs by {}",
        worst.1,
        worst.0
    );
}

#[test]
fn tp2_dp2_ep4_to_one_rank() {
    save_at_load_at(
        Layout {
            world: 4,
            tp: 2,
            ep: 4,
            ..ONE
        },
        ONE,
    );
}

#[test]
fn one_rank_to_tp2_cp2_dp2_ep8_with_the_distributed_optimizer() {
    save_at_load_at(
        ONE,
        Layout {
            world: 8,
            tp: 2,
            cp: 2,
            ep: 8,
            distributed: true,
            ..ONE
        },
    );
}

#[test]
fn pp2_tp2_ep2_to_dp4_ep2_edp2() {
    save_at_load_at(
        Layout {
            world: 4,
            tp: 2,
            pp: 2,
            ep: 2,
            ..ONE
        },
        Layout {
            world: 4,
            ep: 2,
            ..ONE
        },
    );
}

#[test]
fn dp4_ep4_distributed_to_pp4() {
    save_at_load_at(
        Layout {
            world: 4,
            ep: 4,
            distributed: true,
            ..ONE
        },
        Layout {
            world: 4,
            pp: 4,
            ..ONE
        },
    );
}

#[test]
fn pp2_vpp2_dp2_ep2_to_tp2_cp2_dp2_ep2_etp2_edp2() {
    save_at_load_at(
        Layout {
            world: 4,
            pp: 2,
            vpp: 2,
            ep: 2,
            ..ONE
        },
        Layout {
            world: 8,
            tp: 2,
            cp: 2,
            ep: 2,
            etp: 2,
            ..ONE
        },
    );
}

#[test]
fn world_8_pieces_are_disjoint_and_add_up_to_the_state_once() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout {
        world: 8,
        tp: 2,
        pp: 2,
        ep: 2,
        etp: 2,
        distributed: true,
        ..ONE
    };
    let mut config = run_config(tmp.path(), 1, layout);
    config.model = ModelConfig {
        max_seq_len: 16,
        ..ModelConfig::preset("tiny").unwrap()
    };
    let outcome = train(&config, &Synthetic, None, &TrainOptions::default()).unwrap();
    let checkpoint = Checkpoint::open(&outcome.checkpoint).unwrap();
    let index = checkpoint.index();
    let params: usize = outcome.model.registry().total_len();
    let mut elements = 0;
    for name in index.tensors.keys() {
        // Disjoint pieces that cover the tensor exactly, whichever files hold them.
        let entry = index.check_tensor(name, &outcome.checkpoint).unwrap();
        elements += entry.pieces.iter().map(|p| p.block.len()).sum::<usize>();
    }
    assert_eq!(
        elements,
        3 * params,
        "parameters and both moments, each once"
    );
    let bytes: u64 = index.files.values().map(|f| f.bytes).sum();
    let data = 4 * elements as u64;
    // Each file adds only its safetensors header (a few hundred bytes per piece).
    let pieces: usize = index.tensors.values().map(|t| t.pieces.len()).sum();
    assert!(
        bytes >= data && bytes <= data + 300 * pieces as u64 + 4096 * index.files.len() as u64,
        "{bytes} bytes for {data} bytes of tensors in {pieces} pieces"
    );
    let on_disk: u64 = index
        .files
        .keys()
        .map(|f| std::fs::metadata(outcome.checkpoint.join(f)).unwrap().len())
        .sum();
    assert_eq!(on_disk, bytes);
    assert!(index.files.len() > 1 && index.files.len() <= 8);
}

/// One rank of `layout` with `full`'s values: its model, parameters and an optimizer whose
/// owned moments are its part of `full_m`, `full_v`.
fn rank_state(
    world: &Arc<dyn Communicator>,
    config: &RunConfig,
    full: (&GptModel, &Buffers, &Buffers, &Buffers),
) -> (ParallelState, GptModel, Buffers, ParallelOptimizer) {
    let p = &config.parallel;
    let layout = ParallelConfig {
        tp: p.tp,
        cp: p.cp,
        pp: p.pp,
        vpp: p.vpp,
        ep: p.ep,
        etp: p.etp,
        ..ParallelConfig::default()
    }
    .layout(p.world)
    .unwrap();
    let state = ParallelState::new(&layout, world.as_ref()).unwrap();
    let model = GptModel::new_parallel(
        config.model.clone(),
        ModelParallel::from_state(&state, p.cp_comm_type),
    )
    .unwrap();
    let (full_model, params, m, v) = full;
    let shard = |b: &Buffers| model.registry().shard_of(full_model.registry(), b);
    let mut optimizer = ParallelOptimizer::new(
        model.registry(),
        config.train.adamw,
        OptimizerGroups::from_state(&state, world.clone()),
        p.distributed_optimizer,
        1 << 20,
    );
    let (local_m, local_v) = (shard(m), shard(v));
    for group in [ParamGroup::Dense, ParamGroup::Expert] {
        let (range, _, _) = optimizer.owned_moments(group);
        let part = |b: &Buffers| b.buffer(group)[range.clone()].to_vec();
        optimizer.restore_owned(group, part(&local_m), part(&local_v), 3);
    }
    let params = shard(params);
    (state, model, params, optimizer)
}

/// A save at `a` loaded at `b` gives every rank of `b` exactly — bit for bit — its part of the
/// parameters and moments `a` saved (tied embeddings on, so a pipeline's copy is checked too).
fn transfer_is_exact(a: Layout, b: Layout) {
    let tmp = tempfile::tempdir().unwrap();
    let mut config_a = run_config(tmp.path(), 4, a);
    let mut config_b = run_config(tmp.path(), 4, b);
    config_a.model.tie_embeddings = true;
    config_b.model.tie_embeddings = true;
    let full = GptModel::new(config_a.model.clone()).unwrap();
    let (params, m, v) = (
        full.init_params(3),
        full.init_params(4),
        full.init_params(5),
    );
    let values = (&full, &params, &m, &v);
    let state = TrainingState {
        step: 3,
        consumed_samples: 24,
        config_toml: config_a.to_toml(),
    };
    LocalWorld::new(a.world)
        .run(|world: Arc<dyn Communicator>| -> anyhow::Result<()> {
            let (state_a, model, params, optimizer) = rank_state(&world, &config_a, values);
            let owned = |group| {
                let (range, m, v) = optimizer.owned_moments(group);
                OwnedMoments { range, m, v }
            };
            let contribution = Contribution {
                registry: model.registry(),
                params: &params,
                moments: MomentShards {
                    dense: owned(ParamGroup::Dense),
                    expert: owned(ParamGroup::Expert),
                    distributed: optimizer.is_distributed(),
                },
                ownership: Ownership::of(&state_a),
            };
            checkpoint::save(
                &world,
                tmp.path(),
                &contribution,
                full.registry(),
                &state,
                2,
            )?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("saving at {a:?}: {e}"));
    let dir = checkpoint::resolve(tmp.path()).unwrap();
    LocalWorld::new(b.world)
        .run(|world: Arc<dyn Communicator>| -> anyhow::Result<()> {
            let (_, model, expected, optimizer) = rank_state(&world, &config_b, values);
            let ranges =
                [ParamGroup::Dense, ParamGroup::Expert].map(|g| optimizer.owned_moments(g).0);
            let loaded = checkpoint::load(
                &world,
                &dir,
                &Targets {
                    registry: model.registry(),
                    moments: Some(ranges),
                },
            )?;
            anyhow::ensure!(loaded.params == expected, "parameters differ");
            let moments = loaded.moments.expect("the checkpoint holds moments");
            for (k, group) in [ParamGroup::Dense, ParamGroup::Expert]
                .into_iter()
                .enumerate()
            {
                let (_, m, v) = optimizer.owned_moments(group);
                anyhow::ensure!(
                    moments[k].0 == m && moments[k].1 == v,
                    "{group:?} moments differ"
                );
            }
            anyhow::ensure!(loaded.state == state, "the training state differs");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{a:?} → {b:?}: {e}"));
}

#[test]
fn every_layout_change_transfers_the_state_exactly() {
    let pipeline_interleaved = Layout {
        world: 4,
        pp: 2,
        vpp: 2,
        ep: 2,
        distributed: true,
        ..ONE
    };
    let everything = Layout {
        world: 8,
        tp: 2,
        cp: 2,
        ep: 2,
        etp: 2,
        distributed: true,
        ..ONE
    };
    let pipeline_tensor = Layout {
        world: 8,
        tp: 2,
        pp: 4,
        ep: 2,
        ..ONE
    };
    for (a, b) in [
        (pipeline_interleaved, everything),
        (everything, pipeline_tensor),
        (pipeline_tensor, ONE),
        (ONE, pipeline_interleaved),
    ] {
        transfer_is_exact(a, b);
    }
}
