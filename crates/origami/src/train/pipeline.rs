//! Executes one rank's pipeline schedule for one step: the forwards and backwards of its
//! micro-batches on its model chunks, and the transfers between stages, in the order the
//! schedule (`origami_schedule`, data computed beforehand) lists them.
//!
//! A forward takes its input from what the exchanges delivered (the first virtual stage embeds
//! the tokens), keeps its saved state until its backward, and leaves its output for the next
//! exchange; a backward takes its output gradient the same way (the last virtual stage starts
//! from its own loss) and leaves its input gradient. An exchange posts every transfer it lists
//! at once over the pipeline group ([`Communicator::exchange`]), activations and gradients on
//! their own tags. Without a pipeline the schedule is forward then backward of each
//! micro-batch, and no exchange happens.
//!
//! Alongside, the run counts what the step's report needs: this rank's parts of the losses,
//! the routing statistics of its MoE layers, the bytes of saved state it held at its peak, and
//! the time it spent computing and waiting in exchanges.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use origami_comm::{Communicator, Incoming, Outgoing};
use origami_schedule::{
    schedule, Action, Direction, Payload, PipelineConfig, Schedule, ScheduleError,
};

use crate::compute::Weights;
use crate::layers::moe::MoeStats;
use crate::layers::stored::Stored;
use crate::model::chunk::{ChunkLosses, ChunkSaved, ForwardMode, LocalBatch};
use crate::model::gpt::{GptModel, MicroBatch};
use crate::params::Buffers;
use crate::profile::{scope, timed, Phase};

/// What one rank's run of a step's schedule produced besides its gradients.
#[derive(Clone, Debug, Default)]
pub struct PipelineRun {
    /// This rank's parts of the step's losses, summed over its micro-batches:
    /// `[cross-entropy, load-balancing, z]`. Summed over every rank they are the sums over the
    /// global batch's micro-batches of each micro-batch's loss.
    pub loss_parts: [f64; 3],
    /// Statistics of this rank's MoE layers (in [`GptModel::moe_layer_numbers`] order), summed
    /// over its micro-batches.
    pub moe: Vec<MoeStats>,
    /// Largest total of saved states (bytes) held at once.
    pub peak_stored_bytes: usize,
    /// Largest saved state of one (micro-batch, chunk): one micro-batch's worth on a stage of
    /// one chunk.
    pub largest_saved_bytes: usize,
    /// Most forwards held at once, awaiting their backward.
    pub peak_in_flight: usize,
    /// Time in forwards and backwards.
    pub compute: Duration,
    /// Time in exchanges (waiting for the neighbouring stages included).
    pub exchange: Duration,
}

/// The schedule of this rank's stage for `micro_batches` micro-batches per pipeline, the
/// interleaved schedule in groups of `group_size` (default: the stage count).
pub fn stage_schedule(
    model: &GptModel,
    micro_batches: usize,
    group_size: Option<usize>,
) -> Result<Schedule, ScheduleError> {
    let placement = &model.parallel().pipeline;
    let config = PipelineConfig {
        stages: placement.stages,
        chunks: placement.chunks,
        micro_batches,
        group_size,
    };
    schedule(&config, placement.stage)
}

/// Forward only (evaluation): runs each micro-batch of `batches` through every virtual stage
/// in turn, each stage passing its output to the next. Returns this rank's parts of the
/// cross-entropy summed over counted positions and of the counted positions; summed over the
/// pipeline's ranks (and its tp rank 0s) they are the batches' totals.
pub fn evaluate_pipeline(
    model: &GptModel,
    params: &Weights,
    batches: &[MicroBatch],
    pipeline: &Arc<dyn Communicator>,
) -> origami_comm::Result<(f64, usize)> {
    let placement = &model.parallel().pipeline;
    let (stages, virtual_stages) = (placement.stages, placement.stages * placement.chunks);
    let counts_cross_entropy = model.parallel().tensor.rank() == 0;
    let (mut total, mut rows) = (0.0, 0);
    for batch in batches {
        let local = model.local_batch(batch);
        for stage in (0..virtual_stages).filter(|s| s % stages == placement.stage) {
            let input = (stage > 0).then(|| {
                let mut data = vec![0.0; model.boundary_len(&local)];
                let mut receive = [Incoming {
                    data: &mut data,
                    peer: (stage - 1) % stages,
                    tag: 0,
                }];
                timed(Phase::CommPipeline, || pipeline.exchange(&[], &mut receive)).map(|()| data)
            });
            let input = input.transpose()?;
            let forward =
                model.forward_chunk(stage / stages, params, &local, input, ForwardMode::Evaluate);
            if let Some(output) = forward.output {
                let send = [Outgoing {
                    data: &output,
                    peer: (stage + 1) % stages,
                    tag: 0,
                }];
                timed(Phase::CommPipeline, || pipeline.exchange(&send, &mut []))?;
            } else if counts_cross_entropy {
                total += forward.losses.cross_entropy * forward.losses.counted as f64;
                rows += forward.losses.rows;
            }
        }
    }
    Ok((total, rows))
}

/// Runs `schedule` on this rank: `batches[m]` is micro-batch `m` of this pipeline, every loss
/// entering with `loss_scale`; `pipeline` is the pipeline group (this rank's stage is its rank
/// there). Gradients accumulate into `grads`.
pub fn run_schedule(
    model: &GptModel,
    params: &Weights,
    grads: &mut Buffers,
    schedule: &Schedule,
    batches: &[MicroBatch],
    loss_scale: f32,
    pipeline: &Arc<dyn Communicator>,
) -> origami_comm::Result<PipelineRun> {
    assert_eq!(
        batches.len(),
        schedule.config.micro_batches,
        "the schedule was made for another number of micro-batches"
    );
    let mut state = RunState::new(model, batches);
    for action in &schedule.actions {
        match action {
            Action::Forward(work) => {
                let started = Instant::now();
                let stage = virtual_stage(schedule, work.chunk);
                let input = (stage > 0).then(|| {
                    state.take(Payload::Activation {
                        micro_batch: work.micro_batch,
                        from: stage - 1,
                    })
                });
                let forward = model.forward_chunk(
                    work.chunk,
                    params,
                    &state.locals[work.micro_batch],
                    input,
                    ForwardMode::Train { grads, loss_scale },
                );
                if let Some(output) = forward.output {
                    state.outbox.insert(
                        Payload::Activation {
                            micro_batch: work.micro_batch,
                            from: stage,
                        },
                        output,
                    );
                }
                state.count_losses(model, work.chunk, forward.losses);
                state.keep(work.micro_batch, work.chunk, forward.saved);
                state.run.compute += started.elapsed();
            }
            Action::Backward(work) => {
                let started = Instant::now();
                let stage = virtual_stage(schedule, work.chunk);
                let last = schedule.config.virtual_stages() - 1;
                let d_output = (stage < last).then(|| {
                    state.take(Payload::Gradient {
                        micro_batch: work.micro_batch,
                        from: stage + 1,
                    })
                });
                let saved = state.release(work.micro_batch, work.chunk);
                let d_input = model.backward_chunk(
                    work.chunk,
                    params,
                    grads,
                    &state.locals[work.micro_batch],
                    saved,
                    d_output,
                    loss_scale,
                );
                if let Some(d_input) = d_input {
                    state.outbox.insert(
                        Payload::Gradient {
                            micro_batch: work.micro_batch,
                            from: stage,
                        },
                        d_input,
                    );
                }
                state.run.compute += started.elapsed();
            }
            Action::Exchange(transfers) => {
                let started = Instant::now();
                state.exchange(model, transfers, pipeline)?;
                state.run.exchange += started.elapsed();
            }
        }
    }
    assert!(
        state.saved.is_empty() && state.inbox.is_empty() && state.outbox.is_empty(),
        "the schedule left work unfinished"
    );
    Ok(state.run)
}

/// The virtual stage of this rank's chunk `chunk`.
fn virtual_stage(schedule: &Schedule, chunk: usize) -> usize {
    chunk * schedule.config.stages + schedule.stage
}

struct RunState {
    locals: Vec<LocalBatch>,
    /// Saved state of each (micro-batch, chunk) between its forward and backward.
    saved: HashMap<(usize, usize), ChunkSaved>,
    stored_bytes: usize,
    /// Tensors received, awaiting their computation.
    inbox: HashMap<Payload, Vec<f32>>,
    /// Tensors computed, awaiting their exchange.
    outbox: HashMap<Payload, Vec<f32>>,
    run: PipelineRun,
}

impl RunState {
    fn new(model: &GptModel, batches: &[MicroBatch]) -> Self {
        RunState {
            locals: batches.iter().map(|b| model.local_batch(b)).collect(),
            saved: HashMap::new(),
            stored_bytes: 0,
            inbox: HashMap::new(),
            outbox: HashMap::new(),
            run: PipelineRun::default(),
        }
    }

    fn take(&mut self, payload: Payload) -> Vec<f32> {
        self.inbox.remove(&payload).unwrap_or_else(|| {
            panic!("the schedule runs a computation before receiving its {payload}")
        })
    }

    fn keep(&mut self, micro_batch: usize, chunk: usize, saved: ChunkSaved) {
        let bytes = saved.stored_bytes();
        self.stored_bytes += bytes;
        self.run.largest_saved_bytes = self.run.largest_saved_bytes.max(bytes);
        self.saved.insert((micro_batch, chunk), saved);
        self.run.peak_stored_bytes = self.run.peak_stored_bytes.max(self.stored_bytes);
        self.run.peak_in_flight = self.run.peak_in_flight.max(self.saved.len());
    }

    fn release(&mut self, micro_batch: usize, chunk: usize) -> ChunkSaved {
        let saved = self
            .saved
            .remove(&(micro_batch, chunk))
            .expect("a backward follows its forward");
        self.stored_bytes -= saved.stored_bytes();
        saved
    }

    /// Adds one forward's losses and statistics (of chunk `chunk`) to the run's.
    fn count_losses(&mut self, model: &GptModel, chunk: usize, losses: ChunkLosses) {
        if model.parallel().tensor.rank() == 0 {
            self.run.loss_parts[0] += losses.cross_entropy;
        }
        if self.run.moe.is_empty() {
            self.run.moe = vec![MoeStats::default(); model.moe_layer_numbers().len()];
        }
        // This rank's MoE layers are listed chunk after chunk.
        let first: usize = (0..chunk).map(|c| model.moe_layers_in_chunk(c)).sum();
        for (total, stats) in self.run.moe[first..].iter_mut().zip(losses.moe) {
            self.run.loss_parts[1] += stats.losses.load_balancing;
            self.run.loss_parts[2] += stats.losses.z;
            if total.tokens_per_expert.is_empty() {
                total.tokens_per_expert = vec![0; stats.tokens_per_expert.len()];
            }
            for (t, c) in total
                .tokens_per_expert
                .iter_mut()
                .zip(&stats.tokens_per_expert)
            {
                *t += c;
            }
            total.dropped += stats.dropped;
            total.tokens += stats.tokens;
        }
    }

    /// Sends what `transfers` send from the outbox and receives what they receive into the
    /// inbox, in one exchange over `pipeline`.
    fn exchange(
        &mut self,
        model: &GptModel,
        transfers: &[origami_schedule::Transfer],
        pipeline: &Arc<dyn Communicator>,
    ) -> origami_comm::Result<()> {
        let _phase = scope(Phase::CommPipeline);
        let mut outgoing = Vec::new();
        let mut incoming = Vec::new();
        for t in transfers {
            match t.direction {
                Direction::Send => {
                    let data = self.outbox.remove(&t.payload).unwrap_or_else(|| {
                        panic!("the schedule sends {} before computing it", t.payload)
                    });
                    outgoing.push((t.peer, t.payload.tag(), data));
                }
                Direction::Recv => {
                    let micro_batch = match t.payload {
                        Payload::Activation { micro_batch, .. }
                        | Payload::Gradient { micro_batch, .. } => micro_batch,
                    };
                    let len = model.boundary_len(&self.locals[micro_batch]);
                    incoming.push((t.peer, t.payload, vec![0.0f32; len]));
                }
            }
        }
        let sends: Vec<Outgoing<'_>> = outgoing
            .iter()
            .map(|(peer, tag, data)| Outgoing {
                data,
                peer: *peer,
                tag: *tag,
            })
            .collect();
        let mut receives: Vec<Incoming<'_>> = incoming
            .iter_mut()
            .map(|(peer, payload, data)| Incoming {
                data,
                peer: *peer,
                tag: payload.tag(),
            })
            .collect();
        pipeline.exchange(&sends, &mut receives)?;
        drop(receives);
        for (_, payload, data) in incoming {
            self.inbox.insert(payload, data);
        }
        Ok(())
    }
}
