//! `ParallelState` on the local backend: every rank's groups match the topology and their
//! communicators reach exactly those ranks.

use origami_comm::local::LocalWorld;
use origami_comm::ReduceOp;
use origami_parallel::{GroupKind, ParallelConfig, ParallelState, Topology};

#[test]
fn every_group_communicator_spans_exactly_its_ranks() {
    let config = ParallelConfig {
        tp: 2,
        cp: 2,
        pp: 2,
        ep: 4,
        etp: Some(1),
        ..Default::default()
    };
    let layout = config.layout(16).unwrap();
    let topology = Topology::new(&layout);
    LocalWorld::new(16)
        .run(|world| {
            let state = ParallelState::new(&layout, world.as_ref())?;
            for kind in GroupKind::ALL {
                let expected = topology.group_of(kind, state.rank());
                let Some(group) = state.group(kind) else {
                    assert_eq!(expected, None);
                    continue;
                };
                assert_eq!(Some(group.ranks()), expected, "{}", kind.name());
                assert_eq!(group.ranks()[group.rank()], state.rank());
                // Summing the world ranks over the communicator gives the sum of the listed ranks.
                let mut sum = [state.rank() as u64];
                group.comm().all_reduce_u64(&mut sum, ReduceOp::Sum)?;
                assert_eq!(sum[0], group.ranks().iter().map(|&r| r as u64).sum::<u64>());
            }
            assert_eq!(state.ep().size(), 4);
            assert_eq!(state.coordinates().pp, state.rank() / 8);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .unwrap();
}

#[test]
fn a_communicator_of_the_wrong_size_is_refused() {
    let layout = ParallelConfig::default().layout(4).unwrap();
    let errors = LocalWorld::new(2)
        .run(|world| {
            Ok::<_, origami_comm::CommError>(
                ParallelState::new(&layout, world.as_ref())
                    .err()
                    .map(|e| e.to_string()),
            )
        })
        .unwrap();
    assert_eq!(
        errors[0].as_deref(),
        Some("communicator has 2 ranks but the parallel layout is for world 4")
    );
}
