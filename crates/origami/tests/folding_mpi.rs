//! Folded layouts trained under `mpirun` (feature `mpi`), one process per rank: three world-8
//! layouts of the issue, K = 3 steps each against one rank.
#![cfg(feature = "mpi")]

mod mpirun;

/// Runs one layout under `mpirun -np 8` and checks that every rank matched.
fn mpirun_layout(args: &[&str]) {
    mpirun::mpirun_check(env!("CARGO_BIN_EXE_folding_mpi_check"), 8, args);
}

#[test]
fn tp2_cp2_dp2_with_ep8_ring_attention_matches_one_rank() {
    mpirun_layout(&["2", "2", "8", "1", "alltoall", "p2p", "replicated"]);
}

#[test]
fn tp2_dp4_with_ep4_etp2_distributed_optimizer_matches_one_rank() {
    mpirun_layout(&["2", "1", "4", "2", "allgather", "p2p", "distributed"]);
}

#[test]
fn tp2_cp2_dp2_with_ep2_etp2_edp2_all_to_all_attention_matches_one_rank() {
    mpirun_layout(&["2", "2", "2", "2", "alltoall", "a2a", "distributed"]);
}
