//! Shared by the planner's memory tests (one test binary per precision, so that the peak
//! resident set, `VmHWM`, is one step's, and one for recomputation): trains the `tiny` preset
//! for two steps in this process and asks the planner, on a description of this machine's
//! engine, what the process should hold at its peak and what the step stores for its backward.

use origami::bench::peak_rss_mib;
use origami::compute::{Compute, WeightCopies};
use origami::layers::recompute::Recompute as EngineRecompute;
use origami::model::config::ModelConfig;
use origami::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use origami::optim::adamw::AdamWConfig;
use origami::optim::parallel::{OptimizerGroups, ParallelOptimizer};
use origami::plan::calibrate::{origami_engine, resident_mib, GLIBC_HEAP_RETENTION_CAP_MIB};
use origami::plan::shape::model_shape;
use origami::train::pipeline::stage_schedule;
use origami::train::step::{train_step, StepGroups};
use origami_plan::{Hardware, Layout, PlanInputs, Planner, Precision, Recompute};

/// Two training steps of `tiny` in `compute` with `recompute`, then the planner's prediction
/// for `precision`: returns the process's peak (measured, predicted) in MiB and the step's
/// stored activations (measured at their peak, predicted) in MiB.
pub fn tiny_step_and_prediction(
    compute: Compute,
    precision: Precision,
    recompute: Recompute,
) -> ((f64, f64), (f64, f64)) {
    let (sequences, seq) = (8, 256);
    let baseline = resident_mib();
    let config = ModelConfig::preset("tiny").unwrap();
    let model = GptModel::new(config.clone())
        .unwrap()
        .with_recompute(match recompute {
            Recompute::None => EngineRecompute::None,
            Recompute::Selective => EngineRecompute::Selective,
            Recompute::Full => EngineRecompute::Full,
        });
    let mut params = model.init_params(0);
    let mut copies = WeightCopies::new(compute, &params);
    let mut grads = model.registry().zeros();
    let mut optimizer = ParallelOptimizer::new(
        model.registry(),
        AdamWConfig::default(),
        OptimizerGroups::single(),
        false,
        1 << 22,
    );
    let tokens: Vec<u32> = (0..sequences * (seq + 1))
        .map(|i| (i * 7919 % config.vocab_size) as u32)
        .collect();
    let batch = MicroBatch {
        tokens: tokens
            .chunks(seq + 1)
            .flat_map(|r| r[..seq].to_vec())
            .collect(),
        targets: tokens
            .chunks(seq + 1)
            .flat_map(|r| r[1..].to_vec())
            .collect(),
        batch: sequences,
        seq,
        keys: SequenceKeys::consecutive(0, 0, 0, sequences),
    };
    let schedule = stage_schedule(&model, 1, None).unwrap();
    let mut stored = 0;
    for _ in 0..2 {
        let outcome = train_step(
            &model,
            &mut params,
            &mut copies,
            &mut grads,
            &mut optimizer,
            std::slice::from_ref(&batch),
            &schedule,
            1,
            &StepGroups::single(),
            1e-4,
        )
        .unwrap();
        stored = stored.max(outcome.peak_stored_bytes);
    }
    let measured = peak_rss_mib();

    let mut hardware = Hardware::h100_dgx();
    hardware.device.shared_by_ranks = true;
    hardware.device.devices_per_node = None;
    hardware.engine = origami_engine();
    hardware.device.cores = Some(2);
    hardware.device.core_memory_bandwidth = Some(10e9);
    hardware.runtime.per_rank_mib = 0.0;
    hardware.runtime.per_process_mib = baseline;
    hardware.runtime.heap_retention_cap_mib = GLIBC_HEAP_RETENTION_CAP_MIB;
    let mut planner = Planner::new(PlanInputs {
        model: model_shape("tiny", &config),
        hardware,
        gpus: 1,
        global_batch: sequences,
        seq,
        precision,
        distributed_optimizer: false,
        cp_all_to_all: false,
        expert_imbalance: 1.0,
        recompute,
        uneven_stages: false,
    })
    .unwrap();
    let layout: Layout = format!("mbs={sequences}").parse().unwrap();
    let evaluation = planner.evaluate(&layout).unwrap();
    let predicted = evaluation.memory_per_node_gib * 1024.0;
    let m = &evaluation.memory;
    let stored = stored as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{precision}, recompute {recompute}: baseline {baseline:.1} MiB, measured peak {measured:.1} MiB, predicted {predicted:.1} MiB, stored {stored:.2} MiB: {m:?}"
    );
    ((measured, predicted), (stored, m.activations * 1024.0))
}
