//! The schedules over a grid of shapes (pp 1–8, vpp 1–4, micro-batches up to 16, every group
//! size the interleaved schedule allows): what each rank computes, that every transfer meets
//! its partner without a deadlock, the warm-up counts, the data dependencies in time, the
//! bubble against its formula and the activations each stage holds.

use std::collections::HashMap;

use origami_schedule::{
    schedule, simulate, Action, Direction, Pass, Payload, PipelineConfig, Schedule, ScheduleError,
    ScheduleKind, SimulationError, StageTimes, Transfer, Work,
};

/// Every shape of the grid that the schedules accept.
fn grid() -> Vec<PipelineConfig> {
    let mut shapes = Vec::new();
    for pp in 1..=8 {
        for vpp in 1..=4 {
            if pp == 1 && vpp > 1 {
                continue;
            }
            for m in 1..=16 {
                let groups: Vec<Option<usize>> = if vpp == 1 {
                    vec![None]
                } else {
                    std::iter::once(None).chain((pp..=m).map(Some)).collect()
                };
                for group_size in groups {
                    let config = PipelineConfig {
                        stages: pp,
                        chunks: vpp,
                        micro_batches: m,
                        group_size,
                    };
                    if config.validate().is_ok() {
                        shapes.push(config);
                    }
                }
            }
        }
    }
    shapes
}

fn schedules(config: &PipelineConfig) -> Vec<Schedule> {
    (0..config.stages)
        .map(|r| schedule(config, r).unwrap())
        .collect()
}

#[test]
fn the_grid_holds_every_kind_of_schedule() {
    let shapes = grid();
    for kind in [
        ScheduleKind::NoPipelining,
        ScheduleKind::OneForwardOneBackward,
        ScheduleKind::Interleaved,
    ] {
        assert!(shapes.iter().filter(|c| c.kind() == kind).count() > 10);
    }
    assert!(shapes.len() > 500, "{} shapes", shapes.len());
}

#[test]
fn each_micro_batch_and_chunk_runs_forward_once_then_backward_once() {
    for config in grid() {
        for s in schedules(&config) {
            let mut seen: HashMap<Work, (usize, usize)> = HashMap::new();
            for (pass, work) in s.computations() {
                assert!(work.chunk < config.chunks && work.micro_batch < config.micro_batches);
                let (forwards, backwards) = seen.entry(work).or_default();
                match pass {
                    Pass::Forward => *forwards += 1,
                    Pass::Backward => {
                        assert_eq!(
                            *forwards, 1,
                            "{config:?} stage {}: backward of {work:?} before its forward",
                            s.stage
                        );
                        *backwards += 1;
                    }
                }
            }
            assert_eq!(
                seen.len(),
                config.micro_batches * config.chunks,
                "{config:?}"
            );
            assert!(seen.values().all(|&counts| counts == (1, 1)), "{config:?}");
        }
    }
}

#[test]
fn warmup_counts_follow_the_formulas() {
    for config in grid() {
        let (p, v, m, n) = (
            config.stages,
            config.chunks,
            config.micro_batches,
            config.group(),
        );
        for s in schedules(&config) {
            let r = s.stage;
            let expected = match config.kind() {
                ScheduleKind::NoPipelining => 0,
                ScheduleKind::OneForwardOneBackward => (p - r - 1).min(m),
                ScheduleKind::Interleaved => (2 * (p - r - 1) + (v - 1) * n).min(m * v),
            };
            assert_eq!(s.warmup, expected, "{config:?} stage {r}");
            let before_first_backward = s
                .computations()
                .take_while(|(pass, _)| *pass == Pass::Forward)
                .count();
            let total = m * v;
            assert_eq!(
                before_first_backward,
                (expected + 1).min(total),
                "{config:?} stage {r}: forwards before the first backward"
            );
        }
    }
}

#[test]
fn every_transfer_meets_its_partner_without_deadlock() {
    for config in grid() {
        let schedules = schedules(&config);
        simulate(&schedules, StageTimes::default()).unwrap_or_else(|e| panic!("{config:?}: {e}"));
        // Each activation and gradient is sent exactly once and received exactly once.
        let mut sent: HashMap<Payload, usize> = HashMap::new();
        let mut received: HashMap<Payload, usize> = HashMap::new();
        for s in &schedules {
            for action in &s.actions {
                if let Action::Exchange(transfers) = action {
                    for t in transfers {
                        let map = match t.direction {
                            Direction::Send => &mut sent,
                            Direction::Recv => &mut received,
                        };
                        *map.entry(t.payload).or_default() += 1;
                    }
                }
            }
        }
        let boundaries = config.virtual_stages() - 1;
        assert_eq!(
            sent.len(),
            2 * boundaries * config.micro_batches,
            "{config:?}"
        );
        assert_eq!(sent, received, "{config:?}");
        assert!(sent.values().all(|&n| n == 1));
    }
}

#[test]
fn a_stage_computes_only_after_its_neighbour_has() {
    for config in grid() {
        let schedules = schedules(&config);
        let sim = simulate(&schedules, StageTimes::default()).unwrap();
        let p = config.stages;
        let mut spans = HashMap::new();
        for (r, run) in sim.stages.iter().enumerate() {
            for span in &run.spans {
                let virtual_stage = span.work.chunk * p + r;
                spans.insert((span.pass, span.work.micro_batch, virtual_stage), *span);
            }
        }
        for (&(pass, m, s), span) in &spans {
            let before = match pass {
                Pass::Forward if s > 0 => spans[&(Pass::Forward, m, s - 1)],
                Pass::Backward if s + 1 < config.virtual_stages() => {
                    spans[&(Pass::Backward, m, s + 1)]
                }
                Pass::Backward => spans[&(Pass::Forward, m, s)],
                Pass::Forward => continue,
            };
            assert!(
                span.start >= before.end,
                "{config:?}: {pass:?} of micro-batch {m} on virtual stage {s} starts at {} before {:?} ends at {}",
                span.start,
                before.pass,
                before.end
            );
        }
    }
}

#[test]
fn bubbles_match_the_formulas() {
    for config in grid() {
        let sim = simulate(&schedules(&config), StageTimes::default()).unwrap();
        let (p, v, m) = (
            config.stages as f64,
            config.chunks as f64,
            config.micro_batches as f64,
        );
        // 1F1B: (pp − 1)/(M + pp − 1). Interleaved: (pp − 1)/(vpp·M + pp − 1), which the
        // simulation meets for every shape the schedule accepts (group sizes above pp and
        // micro-batch counts that are not multiples of pp included), on every stage.
        let formula = match config.kind() {
            ScheduleKind::NoPipelining => 0.0,
            ScheduleKind::OneForwardOneBackward => (p - 1.0) / (m + p - 1.0),
            ScheduleKind::Interleaved => (p - 1.0) / (v * m + p - 1.0),
        };
        for stage in 0..config.stages {
            assert!(
                (sim.bubble_of(stage) - formula).abs() < 1e-9,
                "{config:?} stage {stage}: bubble {} against {formula}",
                sim.bubble_of(stage)
            );
        }
    }
}

#[test]
fn one_f_one_b_holds_at_most_pp_minus_rank_micro_batches() {
    for config in grid() {
        if config.kind() != ScheduleKind::OneForwardOneBackward {
            continue;
        }
        let sim = simulate(&schedules(&config), StageTimes::default()).unwrap();
        for (r, run) in sim.stages.iter().enumerate() {
            assert_eq!(
                run.peak_in_flight,
                (config.stages - r).min(config.micro_batches),
                "{config:?} stage {r}"
            );
        }
    }
}

#[test]
fn the_interleaved_first_stage_holds_its_warmup_plus_one() {
    for config in grid() {
        if config.kind() != ScheduleKind::Interleaved {
            continue;
        }
        let schedules = schedules(&config);
        let sim = simulate(&schedules, StageTimes::default()).unwrap();
        for (s, run) in schedules.iter().zip(&sim.stages) {
            assert_eq!(
                run.peak_in_flight,
                (s.warmup + 1).min(config.micro_batches * config.chunks),
                "{config:?} stage {}",
                s.stage
            );
        }
    }
}

#[test]
fn shapes_the_schedules_refuse_name_the_numbers() {
    let message = |c: PipelineConfig| schedule(&c, 0).unwrap_err().to_string();
    assert_eq!(
        schedule(&PipelineConfig::new(1, 2, 4), 0).unwrap_err(),
        ScheduleError::ChunksWithoutPipeline { vpp: 2 }
    );
    assert!(message(PipelineConfig::new(4, 2, 6)).contains("6 mod 4 = 2"));
    assert!(message(PipelineConfig::new(4, 2, 3)).contains("4 ..= 3"));
    let mut c = PipelineConfig::new(4, 2, 8);
    c.group_size = Some(9);
    assert!(message(c).contains("microbatch_group_size = 9"));
    c.group_size = Some(5);
    assert!(message(c).contains("8 mod 5 = 3"));
    assert!(message(PipelineConfig::new(2, 1, 0)).contains("micro-batches must be at least 1"));
}

#[test]
fn the_simulation_catches_a_deadlock_and_a_wrong_payload() {
    let config = PipelineConfig::new(2, 1, 2);
    let mut broken = schedules(&config);
    // Stage 1 sends its first gradient before it receives the activation it comes from.
    let first_exchange = broken[1]
        .actions
        .iter()
        .position(|a| matches!(a, Action::Exchange(_)))
        .unwrap();
    broken[1].actions.insert(
        first_exchange,
        Action::Exchange(vec![Transfer {
            direction: Direction::Send,
            peer: 0,
            payload: Payload::Gradient {
                micro_batch: 0,
                from: 1,
            },
        }]),
    );
    assert!(matches!(
        simulate(&broken, StageTimes::default()),
        Err(SimulationError::Deadlock { .. })
    ));
    let mut swapped = schedules(&config);
    for action in &mut swapped[0].actions {
        if let Action::Exchange(transfers) = action {
            for t in transfers {
                if let Payload::Activation { micro_batch, .. } = &mut t.payload {
                    *micro_batch = 1 - *micro_batch;
                }
            }
        }
    }
    assert!(matches!(
        simulate(&swapped, StageTimes::default()),
        Err(SimulationError::Mismatch {
            stage: 1,
            peer: 0,
            ..
        })
    ));
}
