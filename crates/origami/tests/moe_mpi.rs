//! MoE across expert ranks under `mpirun` (feature `mpi`): three equivalence cases of the
//! layer and the whole model against one rank, one process per rank.
#![cfg(feature = "mpi")]

mod mpirun;

/// Runs one case under `mpirun -np ranks` and checks that every rank matched.
fn mpirun_case(ranks: usize, args: &[&str]) {
    mpirun::mpirun_check(env!("CARGO_BIN_EXE_moe_mpi_check"), ranks, args);
}

#[test]
fn moe_layer_ep2_etp2_alltoall_matches_one_rank() {
    mpirun_case(4, &["layer", "2", "2", "alltoall"]);
}

#[test]
fn moe_layer_ep4_allgather_matches_one_rank() {
    mpirun_case(4, &["layer", "4", "1", "allgather"]);
}

#[test]
fn whole_model_ep8_alltoall_matches_one_rank() {
    mpirun_case(8, &["model", "8", "1", "alltoall"]);
}
