//! Shared by the MPI test files: runs a check binary under `mpirun` and asserts that every rank
//! reported a match.

use std::process::Command;

/// Runs `binary args…` on `ranks` processes and checks that it succeeded and that each rank
/// printed "matches one rank".
pub fn mpirun_check(binary: &str, ranks: usize, args: &[&str]) {
    let output = Command::new("timeout")
        .args(["-k", "5", "300", "mpirun"])
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "-np",
            &ranks.to_string(),
        ])
        .arg(binary)
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
