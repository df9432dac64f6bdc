//! MoE across expert ranks under `mpirun` (feature `mpi`): three equivalence cases of the
//! layer and the whole model against one rank, one process per rank.
#![cfg(feature = "mpi")]

use std::process::Command;

/// Runs one case under `mpirun -np ranks` and checks that every rank matched.
fn mpirun_case(ranks: usize, args: &[&str]) {
    let output = Command::new("timeout")
        .args(["-k", "5", "300", "mpirun"])
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "-np",
            &ranks.to_string(),
        ])
        .arg(env!("CARGO_BIN_EXE_moe_mpi_check"))
        .args(args)
        // Containers often run as root; Open MPI refuses that unless told twice.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (Open MPI's openmpi-bin) must be installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?} on {ranks} processes: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.matches("matches one rank").count(),
        ranks,
        "{stdout}"
    );
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
