//! Runs every stage's schedule against the others, with time.
//!
//! Semantics are those of blocking batched point-to-point calls: a stage that reaches an
//! [`Action::Exchange`] posts all its transfers and waits until every one of them has met its
//! partner — a transfer of the opposite direction, on the same tag, in the peer's exchange that
//! the peer has reached. Nothing is buffered, so a schedule that completes here completes under
//! any transport that buffers more (MPI's eager sends). A partner that carries another payload
//! than the one expected, or stages that all wait, are errors.
//!
//! Time: computing a micro-batch's forward (backward) on one chunk takes `1 / vpp` of the
//! stage's forward (backward) time; transfers take no time, so a stage's idle time is the wait
//! for its inputs and for its partners — the bubble.

use crate::action::{Action, Direction, Pass, Payload, Transfer, Work};
use crate::order::{input, Schedule};

/// Time one micro-batch takes on a whole stage (all its chunks together).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTimes {
    /// Forward.
    pub forward: f64,
    /// Backward.
    pub backward: f64,
}

impl Default for StageTimes {
    /// Unit forward, backward twice as long.
    fn default() -> Self {
        StageTimes {
            forward: 1.0,
            backward: 2.0,
        }
    }
}

/// When one computation ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// Forward or backward.
    pub pass: Pass,
    /// Micro-batch and chunk.
    pub work: Work,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
}

/// One stage's run.
#[derive(Clone, Debug, PartialEq)]
pub struct StageRun {
    /// Computations in the order they ran.
    pub spans: Vec<Span>,
    /// Time spent computing.
    pub busy: f64,
    /// Most (micro-batch, chunk) forwards whose backward had not yet run, at any moment.
    pub peak_in_flight: usize,
}

/// The outcome of a simulated step.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    /// Time at which the last stage finished.
    pub makespan: f64,
    /// Each stage's run, by stage.
    pub stages: Vec<StageRun>,
}

impl Simulation {
    /// Stage `stage`'s idle share of the step: `1 − busy / makespan`.
    pub fn bubble_of(&self, stage: usize) -> f64 {
        1.0 - self.stages[stage].busy / self.makespan
    }

    /// The largest idle share over the stages.
    pub fn bubble_fraction(&self) -> f64 {
        (0..self.stages.len())
            .map(|s| self.bubble_of(s))
            .fold(0.0, f64::max)
    }
}

/// A schedule that cannot run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SimulationError {
    /// Every unfinished stage waits on a transfer no peer will match.
    #[error("deadlock: {}", waiting.join("; "))]
    Deadlock {
        /// What each waiting stage waits in.
        waiting: Vec<String>,
    },
    /// Two transfers met but carry different payloads.
    #[error("stage {stage} expects {expected} from stage {peer}, which sends {actual}")]
    Mismatch {
        /// The receiving stage.
        stage: usize,
        /// The sending stage.
        peer: usize,
        /// What the receiver expects.
        expected: String,
        /// What the sender sends.
        actual: String,
    },
    /// A computation whose input has not arrived when it runs.
    #[error("stage {stage} runs the {pass:?} of micro-batch {micro_batch} on chunk {chunk} before receiving its input")]
    InputMissing {
        /// The stage.
        stage: usize,
        /// Forward or backward.
        pass: Pass,
        /// Micro-batch.
        micro_batch: usize,
        /// Chunk.
        chunk: usize,
    },
    /// A received tensor that no computation used.
    #[error("stage {stage} receives {payload} and never uses it")]
    Unused {
        /// The stage.
        stage: usize,
        /// What it received.
        payload: String,
    },
    /// The schedules do not form one pipeline (one per stage, in stage order, same shape).
    #[error("the schedules must be those of stages 0..{0} of one pipeline, in order")]
    NotOnePipeline(usize),
}

struct Cursor {
    next: usize,
    clock: f64,
    /// For the exchange at `next`: when each transfer met its partner.
    met: Vec<Option<f64>>,
    in_flight: usize,
    /// Received payloads not yet used.
    inbox: Vec<Payload>,
    run: StageRun,
}

/// Simulates one step of the pipeline whose stages run `schedules` (stage order).
pub fn simulate(schedules: &[Schedule], times: StageTimes) -> Result<Simulation, SimulationError> {
    let stages = schedules.len();
    if schedules
        .iter()
        .enumerate()
        .any(|(r, s)| s.stage != r || s.config != schedules[0].config || s.config.stages != stages)
    {
        return Err(SimulationError::NotOnePipeline(stages));
    }
    let chunks = schedules.first().map_or(1, |s| s.config.chunks) as f64;
    let duration = |pass| match pass {
        Pass::Forward => times.forward / chunks,
        Pass::Backward => times.backward / chunks,
    };
    let mut cursors: Vec<Cursor> = schedules
        .iter()
        .map(|s| Cursor {
            next: 0,
            clock: 0.0,
            met: exchange_slots(s.actions.first()),
            in_flight: 0,
            inbox: Vec::new(),
            run: StageRun {
                spans: Vec::new(),
                busy: 0.0,
                peak_in_flight: 0,
            },
        })
        .collect();
    loop {
        let mut progressed = false;
        for r in 0..stages {
            match_transfers(schedules, &mut cursors, r)?;
            while let Some(action) = schedules[r].actions.get(cursors[r].next) {
                let cursor = &mut cursors[r];
                match action {
                    Action::Exchange(_) => {
                        if cursor.met.iter().any(Option::is_none) {
                            break;
                        }
                        let met = cursor
                            .met
                            .iter()
                            .flatten()
                            .fold(cursor.clock, |a, &b| a.max(b));
                        cursor.clock = met;
                    }
                    _ => {
                        let (pass, work) = action.work().expect("a computation");
                        if let Some(needed) = input(&schedules[r].config, r, pass, work) {
                            let Some(at) = cursor.inbox.iter().position(|p| *p == needed.payload)
                            else {
                                return Err(SimulationError::InputMissing {
                                    stage: r,
                                    pass,
                                    micro_batch: work.micro_batch,
                                    chunk: work.chunk,
                                });
                            };
                            cursor.inbox.swap_remove(at);
                        }
                        let start = cursor.clock;
                        cursor.clock += duration(pass);
                        cursor.run.busy += duration(pass);
                        cursor.run.spans.push(Span {
                            pass,
                            work,
                            start,
                            end: cursor.clock,
                        });
                        match pass {
                            Pass::Forward => cursor.in_flight += 1,
                            Pass::Backward => cursor.in_flight -= 1,
                        }
                        cursor.run.peak_in_flight = cursor.run.peak_in_flight.max(cursor.in_flight);
                    }
                }
                cursor.next += 1;
                cursor.met = exchange_slots(schedules[r].actions.get(cursor.next));
                progressed = true;
                match_transfers(schedules, &mut cursors, r)?;
            }
        }
        let done = cursors
            .iter()
            .zip(schedules)
            .all(|(c, s)| c.next == s.actions.len());
        if done {
            break;
        }
        if !progressed {
            return Err(SimulationError::Deadlock {
                waiting: cursors
                    .iter()
                    .zip(schedules)
                    .filter(|(c, s)| c.next < s.actions.len())
                    .map(|(c, s)| format!("stage {} in {}", s.stage, s.actions[c.next]))
                    .collect(),
            });
        }
    }
    if let Some((stage, cursor)) = cursors
        .iter()
        .enumerate()
        .find(|(_, c)| !c.inbox.is_empty())
    {
        return Err(SimulationError::Unused {
            stage,
            payload: cursor.inbox[0].to_string(),
        });
    }
    Ok(Simulation {
        makespan: cursors.iter().map(|c| c.clock).fold(0.0, f64::max),
        stages: cursors.into_iter().map(|c| c.run).collect(),
    })
}

fn exchange_slots(action: Option<&Action>) -> Vec<Option<f64>> {
    match action {
        Some(Action::Exchange(transfers)) => vec![None; transfers.len()],
        _ => Vec::new(),
    }
}

fn current_exchange<'a>(schedule: &'a Schedule, cursor: &Cursor) -> Option<&'a [Transfer]> {
    match schedule.actions.get(cursor.next) {
        Some(Action::Exchange(transfers)) => Some(transfers),
        _ => None,
    }
}

/// Pairs the unmatched transfers of stage `r`'s current exchange with those of its peers'.
fn match_transfers(
    schedules: &[Schedule],
    cursors: &mut [Cursor],
    r: usize,
) -> Result<(), SimulationError> {
    let Some(mine) = current_exchange(&schedules[r], &cursors[r]) else {
        return Ok(());
    };
    for (i, transfer) in mine.iter().enumerate() {
        if cursors[r].met[i].is_some() {
            continue;
        }
        let q = transfer.peer;
        let Some(theirs) = current_exchange(&schedules[q], &cursors[q]) else {
            continue;
        };
        let partner = theirs.iter().enumerate().position(|(j, t)| {
            cursors[q].met[j].is_none()
                && t.peer == r
                && t.direction != transfer.direction
                && t.payload.tag() == transfer.payload.tag()
        });
        let Some(j) = partner else {
            continue;
        };
        if theirs[j].payload != transfer.payload {
            let (receiver, sender, expected, actual) = match transfer.direction {
                Direction::Recv => (r, q, transfer.payload, theirs[j].payload),
                Direction::Send => (q, r, theirs[j].payload, transfer.payload),
            };
            return Err(SimulationError::Mismatch {
                stage: receiver,
                peer: sender,
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        let at = cursors[r].clock.max(cursors[q].clock);
        cursors[r].met[i] = Some(at);
        cursors[q].met[j] = Some(at);
        let receiver = match transfer.direction {
            Direction::Recv => r,
            Direction::Send => q,
        };
        cursors[receiver].inbox.push(transfer.payload);
    }
    Ok(())
}
