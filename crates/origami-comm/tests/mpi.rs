//! The MPI backend under `mpirun` (feature `mpi`): the conformance suite on 1..8 processes, and a
//! rank panicking mid all-to-all ending the whole job with a non-zero status instead of a hang.
#![cfg(feature = "mpi")]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs the check binary under `mpirun` with `ranks` processes, killed after `limit`.
fn mpirun(ranks: usize, mode: &str, limit: Duration) -> Output {
    Command::new("timeout")
        .args(["-k", "5", &limit.as_secs().to_string(), "mpirun"])
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "-np",
            &ranks.to_string(),
        ])
        .arg(env!("CARGO_BIN_EXE_mpi_check"))
        .arg(mode)
        // Containers often run as root; Open MPI refuses that unless told twice.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (Open MPI's openmpi-bin) must be installed")
}

#[test]
fn conformance_suite_passes_on_one_to_eight_processes() {
    for ranks in 1..=8 {
        let output = mpirun(ranks, "conformance", Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{ranks} ranks: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            stdout.matches("passed 11 checks").count(),
            ranks,
            "{stdout}"
        );
    }
}

#[test]
fn a_rank_panicking_mid_all_to_all_ends_the_job_with_an_error() {
    let started = Instant::now();
    let output = mpirun(4, "panic-in-all-to-all", Duration::from_secs(60));
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the job must fail");
    assert_ne!(
        output.status.code(),
        Some(124),
        "timed out instead of aborting: {stderr}"
    );
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    assert!(
        stderr.contains("rank 1 panicked: injected failure on rank 1; aborting the MPI job"),
        "{stderr}"
    );
}
