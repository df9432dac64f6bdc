//! Each rank's schedule: the order of its computations (the part that differs between the
//! schedules), then the transfers around them (the same rule for all).
//!
//! - **No pipelining**: forward then backward of each micro-batch in turn.
//! - **1F1B**: `W = min(pp − r − 1, M)` warm-up forwards, then `M − W` steady steps of one
//!   forward (micro-batch `W + i`) and one backward (micro-batch `i`), then `W` cool-down
//!   backwards. Stage `r` holds at most `W + 1` micro-batches' activations.
//! - **Interleaved** (Megatron-Core's order): micro-batches in groups of `N`
//!   (`microbatch_group_size`, default `pp`), the last group taking the rest; the forward table
//!   lists, group after group, every chunk `0..V` of every micro-batch of the group. Forward step
//!   `k` runs `table[k]`; backward step `k` runs the micro-batch of `table[k]` on chunk
//!   `V − 1 − table[k].chunk`. Warm-up `W = min(2(pp − r − 1) + (V − 1)·N, M·V)` forwards, then
//!   steady steps of forward `W + k` and backward `k`, then the remaining backwards.
//!
//! Transfers: under 1F1B, before each computation one [`Action::Exchange`] sends the output of
//! the computation just done (an activation to the next stage, an input gradient to the
//! previous one) and receives the input of the next one; a last exchange sends the last output.
//! The interleaved schedule exchanges as Megatron-Core does, once per step (a warm-up forward,
//! a steady pair, a cool-down backward): the step's outputs leave, and a stage receives what its
//! neighbour sends in the same step — the input of its next step, except on the stage that
//! leads the ring (stage 0 for activations, the last stage for gradients), which receives what
//! the far end of the ring made `pp − 1` steps earlier and keeps it until its chunk runs it.
//! Receiving only what the next computation needs deadlocks there: a stage would block sending
//! to a neighbour that receives only after a forward that waits for this stage.

use crate::action::{Action, Direction, Pass, Payload, Transfer, Work};
use crate::config::{PipelineConfig, ScheduleError, ScheduleKind};

/// One rank's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The pipeline's shape.
    pub config: PipelineConfig,
    /// This rank's stage.
    pub stage: usize,
    /// Forwards of the warm-up phase (before the first steady step).
    pub warmup: usize,
    /// Every action, in order.
    pub actions: Vec<Action>,
}

impl Schedule {
    /// The computations alone, in order.
    pub fn computations(&self) -> impl Iterator<Item = (Pass, Work)> + '_ {
        self.actions.iter().filter_map(Action::work)
    }
}

/// The schedule of `stage` for `config` (checked first).
pub fn schedule(config: &PipelineConfig, stage: usize) -> Result<Schedule, ScheduleError> {
    config.validate()?;
    assert!(
        stage < config.stages,
        "stage {stage} outside a pipeline of {} stages",
        config.stages
    );
    let (actions, warmup) = match config.kind() {
        ScheduleKind::NoPipelining => (
            with_transfers(config, stage, &no_pipelining(config.micro_batches)),
            0,
        ),
        ScheduleKind::OneForwardOneBackward => {
            let (order, warmup) = one_forward_one_backward(config, stage);
            (with_transfers(config, stage, &order), warmup)
        }
        ScheduleKind::Interleaved => interleaved(config, stage),
    };
    Ok(Schedule {
        config: *config,
        stage,
        warmup,
        actions,
    })
}

fn no_pipelining(micro_batches: usize) -> Vec<(Pass, Work)> {
    (0..micro_batches)
        .flat_map(|micro_batch| {
            let work = Work {
                micro_batch,
                chunk: 0,
            };
            [(Pass::Forward, work), (Pass::Backward, work)]
        })
        .collect()
}

fn one_forward_one_backward(config: &PipelineConfig, stage: usize) -> (Vec<(Pass, Work)>, usize) {
    let m = config.micro_batches;
    let warmup = (config.stages - stage - 1).min(m);
    let work = |micro_batch| Work {
        micro_batch,
        chunk: 0,
    };
    let mut order = Vec::with_capacity(2 * m);
    order.extend((0..warmup).map(|k| (Pass::Forward, work(k))));
    for k in 0..m - warmup {
        order.push((Pass::Forward, work(warmup + k)));
        order.push((Pass::Backward, work(k)));
    }
    order.extend((m - warmup..m).map(|k| (Pass::Backward, work(k))));
    (order, warmup)
}

fn interleaved(config: &PipelineConfig, stage: usize) -> (Vec<Action>, usize) {
    let (p, v, m, n) = (
        config.stages,
        config.chunks,
        config.micro_batches,
        config.group(),
    );
    let ring = Ring {
        config,
        stage,
        table: forward_table(m, v, n),
    };
    let total = m * v;
    let warmup = (2 * (p - stage - 1) + (v - 1) * n).min(total);
    let steady = total - warmup;
    let mut actions = Vec::with_capacity(4 * total);
    let exchange = |transfers: Vec<Option<Transfer>>, actions: &mut Vec<Action>| {
        let transfers: Vec<Transfer> = transfers.into_iter().flatten().collect();
        if !transfers.is_empty() {
            actions.push(Action::Exchange(transfers));
        }
    };
    exchange(
        vec![input(config, stage, Pass::Forward, ring.forward(0))],
        &mut actions,
    );
    for k in 0..warmup {
        actions.push(Action::Forward(ring.forward(k)));
        let first_backward = (k + 1 == warmup && steady > 0)
            .then(|| input(config, stage, Pass::Backward, ring.backward(0)))
            .flatten();
        exchange(
            vec![
                output(config, stage, Pass::Forward, ring.forward(k)),
                ring.receive(Pass::Forward, k),
                first_backward,
            ],
            &mut actions,
        );
    }
    for k in 0..steady {
        actions.push(Action::Forward(ring.forward(warmup + k)));
        actions.push(Action::Backward(ring.backward(k)));
        exchange(
            vec![
                output(config, stage, Pass::Forward, ring.forward(warmup + k)),
                output(config, stage, Pass::Backward, ring.backward(k)),
                ring.receive(Pass::Forward, warmup + k)
                    .filter(|_| k + 1 < steady),
                ring.receive(Pass::Backward, k),
            ],
            &mut actions,
        );
    }
    if steady == 0 {
        exchange(
            vec![input(config, stage, Pass::Backward, ring.backward(0))],
            &mut actions,
        );
    }
    for k in steady..total {
        actions.push(Action::Backward(ring.backward(k)));
        exchange(
            vec![
                output(config, stage, Pass::Backward, ring.backward(k)),
                ring.receive(Pass::Backward, k),
            ],
            &mut actions,
        );
    }
    (actions, warmup)
}

/// One stage's view of the interleaved schedule's tables and its receives.
struct Ring<'a> {
    config: &'a PipelineConfig,
    stage: usize,
    table: Vec<Work>,
}

impl Ring<'_> {
    /// Forward step `k`.
    fn forward(&self, k: usize) -> Work {
        self.table[k]
    }

    /// Backward step `k`: the micro-batch of forward step `k`, on the mirrored chunk.
    fn backward(&self, k: usize) -> Work {
        Work {
            micro_batch: self.table[k].micro_batch,
            chunk: self.config.chunks - 1 - self.table[k].chunk,
        }
    }

    fn step(&self, pass: Pass, k: usize) -> Work {
        match pass {
            Pass::Forward => self.forward(k),
            Pass::Backward => self.backward(k),
        }
    }

    /// What this stage receives in the `pass` direction in the exchange after step `k` (nothing
    /// after the last): the input of step `k + 1` from its neighbour, or, on the stage that
    /// leads the ring in that direction, what the far end made in its step `k − (pp − 1)`.
    fn receive(&self, pass: Pass, k: usize) -> Option<Transfer> {
        if k + 1 == self.table.len() {
            return None;
        }
        let p = self.config.stages;
        let leads = match pass {
            Pass::Forward => self.stage == 0,
            Pass::Backward => self.stage == p - 1,
        };
        if !leads {
            let next = self.step(pass, k + 1);
            return input(self.config, self.stage, pass, next);
        }
        let made = self.step(pass, k.checked_sub(p - 1)?);
        let far_end = p - 1 - self.stage;
        let from = made.chunk * p + far_end;
        let last = self.config.virtual_stages() - 1;
        let micro_batch = made.micro_batch;
        let payload = match pass {
            Pass::Forward if from < last => Payload::Activation { micro_batch, from },
            Pass::Backward if from > 0 => Payload::Gradient { micro_batch, from },
            _ => return None,
        };
        Some(Transfer {
            direction: Direction::Recv,
            peer: far_end,
            payload,
        })
    }
}

/// Megatron-Core's forward order: groups of `group` micro-batches (the last one the rest), each
/// group run on chunk 0, then chunk 1, … before the next group.
fn forward_table(micro_batches: usize, chunks: usize, group: usize) -> Vec<Work> {
    (0..micro_batches)
        .step_by(group)
        .flat_map(|first| {
            let end = (first + group).min(micro_batches);
            (0..chunks).flat_map(move |chunk| {
                (first..end).map(move |micro_batch| Work { micro_batch, chunk })
            })
        })
        .collect()
}

/// Inserts before each computation the exchange of the previous one's output and this one's
/// input, and a final exchange of the last output.
fn with_transfers(config: &PipelineConfig, stage: usize, order: &[(Pass, Work)]) -> Vec<Action> {
    let mut actions = Vec::with_capacity(order.len() * 2 + 1);
    let mut outputs: Vec<Transfer> = Vec::new();
    for &(pass, work) in order {
        let mut batch = std::mem::take(&mut outputs);
        batch.extend(input(config, stage, pass, work));
        if !batch.is_empty() {
            actions.push(Action::Exchange(batch));
        }
        actions.push(match pass {
            Pass::Forward => Action::Forward(work),
            Pass::Backward => Action::Backward(work),
        });
        outputs.extend(output(config, stage, pass, work));
    }
    if !outputs.is_empty() {
        actions.push(Action::Exchange(outputs));
    }
    actions
}

/// Virtual stage of `chunk` on `stage`.
fn virtual_stage(config: &PipelineConfig, stage: usize, chunk: usize) -> usize {
    chunk * config.stages + stage
}

/// What a computation receives before it runs.
pub(crate) fn input(
    config: &PipelineConfig,
    stage: usize,
    pass: Pass,
    work: Work,
) -> Option<Transfer> {
    let s = virtual_stage(config, stage, work.chunk);
    let last = config.virtual_stages() - 1;
    let micro_batch = work.micro_batch;
    let (from, payload) = match pass {
        Pass::Forward if s > 0 => (
            s - 1,
            Payload::Activation {
                micro_batch,
                from: s - 1,
            },
        ),
        Pass::Backward if s < last => (
            s + 1,
            Payload::Gradient {
                micro_batch,
                from: s + 1,
            },
        ),
        _ => return None,
    };
    Some(Transfer {
        direction: Direction::Recv,
        peer: from % config.stages,
        payload,
    })
}

/// What a computation sends once it has run.
fn output(config: &PipelineConfig, stage: usize, pass: Pass, work: Work) -> Option<Transfer> {
    let s = virtual_stage(config, stage, work.chunk);
    let last = config.virtual_stages() - 1;
    let micro_batch = work.micro_batch;
    let to = match pass {
        Pass::Forward if s < last => s + 1,
        Pass::Backward if s > 0 => s - 1,
        _ => return None,
    };
    let payload = match pass {
        Pass::Forward => Payload::Activation {
            micro_batch,
            from: s,
        },
        Pass::Backward => Payload::Gradient {
            micro_batch,
            from: s,
        },
    };
    Some(Transfer {
        direction: Direction::Send,
        peer: to % config.stages,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forward_table_matches_megatrons_example() {
        // P = 2, N = 3, M = 5, V = 2 (shared/research/pipeline.md §2).
        let table = forward_table(5, 2, 3);
        let mbs: Vec<usize> = table.iter().map(|w| w.micro_batch).collect();
        let chunks: Vec<usize> = table.iter().map(|w| w.chunk).collect();
        assert_eq!(mbs, [0, 1, 2, 0, 1, 2, 3, 4, 3, 4]);
        assert_eq!(chunks, [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]);
    }

    #[test]
    fn interleaved_warmup_matches_megatrons_example() {
        // P = 4, V = 2, N = 4, M = 8: W = 10, 8, 6, 4.
        let config = PipelineConfig::new(4, 2, 8);
        let warmups: Vec<usize> = (0..4)
            .map(|r| schedule(&config, r).unwrap().warmup)
            .collect();
        assert_eq!(warmups, [10, 8, 6, 4]);
    }
}
