//! `origami bench moe`: where one MoE layer's time goes across expert-parallel ranks —
//! dispatch + combine (plans, permutations, collectives, sorts) against the grouped expert
//! computation, forward and backward, for each dispatcher, on the local backend.
//!
//! The micro-batch of a preset (its sequences × sequence length) is split evenly over the
//! ranks, as attention's tensor/context/data parallelism leaves the tokens, and every rank
//! runs one MoE layer of the preset on its share.

use std::time::{Duration, Instant};

use serde::Serialize;

use origami_comm::local::LocalWorld;
use origami_comm::ReduceOp;
use origami_kernels::testing::random_vec;

use crate::bench::preset_micro_batch;
use crate::compute::Weights;
use crate::equivalence::{self, moe_only_state};
use crate::layers::moe::config::DispatcherKind;
use crate::layers::moe::dispatch::PhaseTimes;
use crate::layers::moe::MoeLayer;
use crate::model::config::ModelConfig;
use crate::params::init::initialise;
use crate::params::ParamRegistry;

/// What to measure.
#[derive(Clone, Debug)]
pub struct MoeBenchSettings {
    /// Model preset whose MoE layer is timed.
    pub preset: String,
    /// Expert-parallel size (ranks = ep · etp).
    pub ep: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
    /// Timed iterations (one warm-up runs first).
    pub steps: usize,
}

/// Per-rank mean milliseconds of one forward + backward of the layer, for one dispatcher.
#[derive(Clone, Debug, Serialize)]
pub struct MoeBenchReport {
    /// `alltoall` or `allgather`.
    pub dispatcher: String,
    /// Preset.
    pub preset: String,
    /// Expert-parallel size.
    pub ep: usize,
    /// Expert tensor-parallel size.
    pub etp: usize,
    /// Tokens each rank holds.
    pub tokens_per_rank: usize,
    /// Dispatch + combine, forward, ms.
    pub forward_dispatch_ms: f64,
    /// Experts, forward, ms.
    pub forward_experts_ms: f64,
    /// Dispatch + combine, backward, ms.
    pub backward_dispatch_ms: f64,
    /// Experts, backward, ms.
    pub backward_experts_ms: f64,
    /// Whole layer forward + backward (router, losses and shared expert included), ms.
    pub layer_ms: f64,
    /// Dispatch + combine over dispatch + combine + experts, forward and backward together.
    pub dispatch_share: f64,
}

/// Times both dispatchers; one report each.
pub fn run(settings: &MoeBenchSettings) -> anyhow::Result<Vec<MoeBenchReport>> {
    anyhow::ensure!(settings.steps > 0, "--steps must be positive");
    let model = ModelConfig::preset(&settings.preset)?;
    let ranks = settings.ep * settings.etp;
    let tokens = preset_micro_batch(&settings.preset) * model.max_seq_len;
    anyhow::ensure!(
        tokens.is_multiple_of(ranks),
        "the preset's {tokens} tokens do not split over {ranks} ranks"
    );
    let per_rank = tokens / ranks;
    [DispatcherKind::Alltoall, DispatcherKind::Allgather]
        .into_iter()
        .map(|dispatcher| {
            let mut config = model.moe.clone();
            config.dispatcher = dispatcher;
            let times = LocalWorld::new(ranks)
                .run(|world| {
                    let state = moe_only_state(&world, settings.ep, settings.etp)?;
                    let mut registry = ParamRegistry::default();
                    let std = model.init_std;
                    let layer = MoeLayer::new_parallel(
                        &mut registry,
                        "moe",
                        model.hidden_size,
                        &config,
                        (std, std),
                        equivalence::moe_only_parallel(&state),
                    )?;
                    let params = initialise(&registry, 1);
                    let h = model.hidden_size;
                    let x = random_vec(per_rank * h, 10 + world.rank() as u64);
                    let dy = random_vec(per_rank * h, 20 + world.rank() as u64);
                    let mut grads = registry.zeros();
                    let mut sums = [0.0f64; 5];
                    for step in 0..=settings.steps {
                        world.barrier()?;
                        let started = Instant::now();
                        let (_, saved, stats) = layer.forward(&Weights::f32(&params), &x);
                        let (_, backward) = layer.backward_timed(
                            &Weights::f32(&params),
                            &mut grads,
                            saved,
                            &x,
                            &dy,
                            1.0,
                        );
                        let total = started.elapsed();
                        if step > 0 {
                            add(&mut sums, stats.forward_times, backward, total);
                        }
                    }
                    let mut means = sums.map(|s| (s / settings.steps as f64) as f32);
                    world.all_reduce(&mut means, ReduceOp::Sum)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        means.map(|m| m as f64 / ranks as f64),
                    )
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let [fd, fe, bd, be, layer] = times[0];
            Ok(MoeBenchReport {
                dispatcher: format!("{dispatcher:?}").to_lowercase(),
                preset: settings.preset.clone(),
                ep: settings.ep,
                etp: settings.etp,
                tokens_per_rank: per_rank,
                forward_dispatch_ms: fd,
                forward_experts_ms: fe,
                backward_dispatch_ms: bd,
                backward_experts_ms: be,
                layer_ms: layer,
                dispatch_share: (fd + bd) / (fd + bd + fe + be),
            })
        })
        .collect()
}

/// Adds one iteration's milliseconds to `sums` (forward dispatch, forward experts, backward
/// dispatch, backward experts, whole layer).
fn add(sums: &mut [f64; 5], forward: PhaseTimes, backward: PhaseTimes, total: Duration) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    sums[0] += ms(forward.dispatch);
    sums[1] += ms(forward.experts);
    sums[2] += ms(backward.dispatch);
    sums[3] += ms(backward.experts);
    sums[4] += ms(total);
}
