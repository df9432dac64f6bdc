//! `origami check` under `mpirun` (feature `mpi`), one process per rank: rank 0 trains the
//! single-rank reference first and sends it to the others; the default config passes with one
//! report printed, and a broken rank makes it fail with exit status 1.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output};

/// `mpirun -np 4 origami check` on the default config with short sequences over a freshly
/// prepared copy of the shipped corpus, with `extra` arguments.
fn mpirun_check(extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let corpus =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare/shakespeare.jsonl");
    Command::new("timeout")
        .args(["-k", "5", "300", "mpirun"])
        .args(["--oversubscribe", "--allow-run-as-root", "-np", "4"])
        .arg(env!("CARGO_BIN_EXE_origami"))
        .args(["check", "--set", "train.seq_len=32", "--set"])
        .arg(format!("data.prefix={}", dir.path().join("data").display()))
        .arg("--set")
        .arg(format!("data.source={}", corpus.display()))
        .args(extra)
        // Containers often run as root; Open MPI refuses that unless told twice.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (Open MPI's openmpi-bin) must be installed")
}

#[test]
fn the_default_config_passes_under_mpirun() {
    let output = mpirun_check(&[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches("\nPASS: ").count(), 1, "{stdout}");
    assert!(
        stdout.contains("check: world 4 | attention TP2 CP1 DP2 | MoE ETP1 EP4 EDP1"),
        "{stdout}"
    );
}

#[test]
fn a_broken_rank_fails_under_mpirun() {
    let output = mpirun_check(&["--break-rank", "2"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("\nFAIL: "), "{stdout}");
    assert!(
        stdout.contains("parameters beyond the tolerance"),
        "{stdout}"
    );
}
