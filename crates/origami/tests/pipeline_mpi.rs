//! Pipelines trained under `mpirun` (feature `mpi`), one process per rank, activations and
//! gradients crossing processes as MPI point-to-point messages: three world-8 layouts of the
//! pipeline issue, K = 3 steps each against one rank.
#![cfg(feature = "mpi")]

mod mpirun;

/// Runs one layout under `mpirun -np 8` and checks that every rank matched.
fn mpirun_layout(args: &[&str]) {
    mpirun::mpirun_check(env!("CARGO_BIN_EXE_folding_mpi_check"), 8, args);
}

#[test]
fn tp2_cp2_pp2_with_ep4_matches_one_rank() {
    mpirun_layout(&[
        "2",
        "2",
        "4",
        "1",
        "alltoall",
        "p2p",
        "replicated",
        "2",
        "1",
        "4",
        "2",
    ]);
}

#[test]
fn tp2_dp2_pp2_with_ep2_etp2_distributed_optimizer_matches_one_rank() {
    mpirun_layout(&[
        "2",
        "1",
        "2",
        "2",
        "allgather",
        "p2p",
        "distributed",
        "2",
        "1",
        "4",
        "2",
    ]);
}

#[test]
fn dp2_pp4_vpp2_with_ep2_and_tied_embeddings_matches_one_rank() {
    mpirun_layout(&[
        "1",
        "1",
        "2",
        "1",
        "alltoall",
        "p2p",
        "replicated",
        "4",
        "2",
        "8",
        "1",
        "tied",
    ]);
}
