//! `origami check` end to end on the shipped Shakespeare slice: it passes on the default config
//! (folded TP2·DP2 | EP4) and on other folded layouts, one with a pipeline; it fails with exit
//! status 1 and names the parameters when one rank is broken on purpose; it explains a dropping
//! config and the global-batch loss with data parallelism; config errors exit with status 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The shipped corpus, prepared once for every test of this file.
fn dataset() -> &'static Path {
    static PREPARED: OnceLock<tempfile::TempDir> = OnceLock::new();
    PREPARED
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../data/shakespeare/shakespeare.jsonl");
            let out = Command::new(env!("CARGO_BIN_EXE_origami"))
                .args(["prepare", "--append-eod", "--input"])
                .arg(&corpus)
                .arg("--output-prefix")
                .arg(dir.path().join("shakespeare"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .path()
}

/// `origami check` on the default config with `settings` (`section.key=value`) and `extra`
/// arguments, short sequences for speed; its exit status and stdout (stderr appended).
fn check(settings: &[&str], extra: &[&str]) -> (Option<i32>, String) {
    let prefix: PathBuf = dataset().join("shakespeare");
    let mut command = Command::new(env!("CARGO_BIN_EXE_origami"));
    command
        .arg("check")
        .args(["--set", "train.seq_len=32"])
        .arg("--set")
        .arg(format!("data.prefix={}", prefix.display()));
    for setting in settings {
        command.args(["--set", setting]);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = command.args(extra).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code(), text)
}

/// Asserts a PASS with exit status 0 and returns the output.
fn passes(settings: &[&str], layout: &str) -> String {
    let (code, out) = check(settings, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(layout), "{out}");
    assert!(out.contains("\nPASS: "), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    out
}

#[test]
fn passes_on_the_default_config() {
    let out = passes(
        &[],
        "check: world 4 | attention TP2 CP1 DP2 | MoE ETP1 EP4 EDP1 against world 1, 3 steps",
    );
    // Per step, then the loads, the gradients and the worst weights by name.
    assert_eq!(
        out.lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        3,
        "{out}"
    );
    for part in [
        "expert loads: equal at every step",
        "first-step gradients: largest relative error",
        "final weights, the 5 largest errors of 31 parameters",
        "layers.",
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
}

#[test]
fn passes_on_other_folded_layouts() {
    // CP2·DP2 | EP2·ETP2.
    passes(
        &[
            "parallel.tp=1",
            "parallel.cp=2",
            "parallel.ep=2",
            "parallel.etp=2",
        ],
        "attention TP1 CP2 DP2 | MoE ETP2 EP2 EDP1",
    );
    // TP2·PP2 | EP2·PP2, 1F1B, with router input jitter on.
    let out = passes(
        &[
            "parallel.pp=2",
            "parallel.ep=2",
            "model.moe.input_jitter_eps=0.1",
        ],
        "attention TP2 CP1 DP1 PP2 | MoE ETP1 EP2 EDP1 PP2",
    );
    assert!(out.contains("note: router input jitter is on"), "{out}");
    // TP2·CP2·DP2 | EP8 with the all-gather dispatcher and the distributed optimizer.
    let out = passes(
        &[
            "parallel.world=8",
            "parallel.cp=2",
            "parallel.ep=8",
            "parallel.distributed_optimizer=true",
            "model.moe.dispatcher=allgather",
        ],
        "attention TP2 CP2 DP2 | MoE ETP1 EP8 EDP1",
    );
    assert!(out.contains("first-step gradients: not compared"), "{out}");
}

#[test]
fn fails_and_names_the_parameters_when_a_rank_is_broken() {
    let (code, out) = check(&[], &["--break-rank", "1"]);
    assert_eq!(code, Some(1), "{out}");
    let verdict = out
        .lines()
        .find(|l| l.starts_with("FAIL: "))
        .unwrap_or_else(|| panic!("no FAIL line: {out}"));
    assert!(verdict.contains("parameters layers."), "{verdict}");
    // Rank 1 holds the second tensor-parallel half of attention and the second of the four
    // blocks of experts: both are named among the parameters beyond the tolerance.
    let listed = out
        .split("parameters beyond the tolerance")
        .nth(1)
        .unwrap_or_else(|| panic!("no list of parameters: {out}"));
    for name in [
        "layers.0.attention.qkv.weight",
        "layers.0.moe.experts.fc1.weight",
    ] {
        assert!(listed.contains(name), "{name}: {out}");
    }
}

#[test]
fn explains_a_dropping_config_and_judges_it_dropless() {
    let (code, out) = check(&["model.moe.capacity_factor=1.0"], &[]);
    assert_eq!(code, Some(0), "{out}");
    for part in [
        "note: model.moe.capacity_factor = 1 drops tokens by a capacity computed from each rank's own tokens",
        "splits each micro-batch's tokens over 2 ranks",
        "for information, the config as it is (dropping tokens)",
        "PASS: with dropless routing, the layout trains the same model as one rank",
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
    // With whole micro-batches on every rank the dropping run itself is judged.
    let (code, out) = check(
        &[
            "model.moe.capacity_factor=1.0",
            "parallel.world=2",
            "parallel.tp=1",
            "parallel.ep=2",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("every rank holds whole micro-batches (TP1 · CP1)"),
        "{out}"
    );
    assert!(!out.contains("for information"), "{out}");
}

#[test]
fn explains_the_global_batch_loss_with_data_parallelism() {
    let (code, out) = check(&["model.moe.aux_loss_scope=global_batch"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("takes those 2 micro-batches as one micro-batch of 16 sequences"),
        "{out}"
    );
}

#[test]
fn config_errors_exit_with_status_2() {
    for (settings, extra, message) in [
        (
            &["parallel.tp=3"][..],
            &[][..],
            "world size 4 is not divisible by tp·cp·pp",
        ),
        (&["train.stepz=3"], &[], "stepz"),
        (&[], &["--steps", "0"], "--steps"),
        (&[], &["--tolerance", "0"], "--tolerance"),
        (&[], &["--break-rank", "4"], "--break-rank 4"),
        (
            &["model.moe.input_jitter_eps=1.5"],
            &[],
            "input_jitter_eps = 1.5",
        ),
    ] {
        let (code, out) = check(settings, extra);
        assert_eq!(code, Some(2), "{settings:?} {extra:?}: {out}");
        assert!(out.contains(message), "{message}: {out}");
    }
}
