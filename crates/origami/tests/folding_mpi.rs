//! Folded layouts trained under `mpirun` (feature `mpi`), one process per rank: three world-8
//! layouts of the issue, K = 3 steps each against one rank.
#![cfg(feature = "mpi")]

use std::process::Command;

/// Runs one layout under `mpirun -np 8` and checks that every rank matched.
fn mpirun_layout(args: &[&str]) {
    let ranks = 8;
    let output = Command::new("timeout")
        .args(["-k", "5", "300", "mpirun"])
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "-np",
            &ranks.to_string(),
        ])
        .arg(env!("CARGO_BIN_EXE_folding_mpi_check"))
        .args(args)
        // Containers often run as root; Open MPI refuses that unless told twice.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (Open MPI's openmpi-bin) must be installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?}: {}\n{stdout}\n{}",
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
