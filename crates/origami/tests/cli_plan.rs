//! `origami plan` end to end: the JSON of one layout, the ranked table with the no-folding
//! comparison, the errors for bad input, recomputation, and `--calibrate` writing the `local`
//! description that `--hardware local` reads.

use std::process::{Command, Output};

fn origami() -> Command {
    Command::new(env!("CARGO_BIN_EXE_origami"))
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command's error message; it must fail with status 1 and no panic.
fn error_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn plan(model: &str, gpus: &str) -> Command {
    let mut command = origami();
    command.args([
        "plan",
        "--model",
        model,
        "--gpus",
        gpus,
        "--global-batch",
        "256",
        "--seq",
        "4096",
    ]);
    command
}

#[test]
fn one_layout_as_json_has_the_keys_scripts_read() {
    let out = plan("mixtral-8x22b", "128")
        .args([
            "--layout",
            "tp=2 cp=1 pp=8 vpp=1 ep=8 etp=1 mbs=1",
            "--json",
        ])
        .output()
        .unwrap();
    let row: serde_json::Value = serde_json::from_str(stdout_of(&out).trim()).unwrap();
    assert_eq!(row["layout"], "tp=2 cp=1 pp=8 vpp=1 ep=8 etp=1 mbs=1");
    for key in [
        "fits",
        "memory_per_rank_gib",
        "step_time_s",
        "tokens_per_s",
        "mfu",
    ] {
        assert!(!row[key].is_null(), "{key} missing: {row}");
    }
    assert_eq!(row["fits"], true);
    assert!(row["time"]["compute"]["expert_gemm"].as_f64().unwrap() > 0.0);
    assert!(row["memory"]["optimizer_states"].as_f64().unwrap() > 0.0);
    assert_eq!(row["unfolded"], false);
}

#[test]
fn the_table_ranks_layouts_and_compares_with_no_folding() {
    let out = plan("qwen2-57b-a14b", "64")
        .args(["--top", "3", "--no-folding"])
        .output()
        .unwrap();
    let text = stdout_of(&out);
    assert!(text.contains("fastest layouts that fit"), "{text}");
    assert!(text.contains("best without folding"), "{text}");
    assert!(text.contains("folding gains"), "{text}");
    assert!(text.contains("assumptions:"), "{text}");
}

#[test]
fn bad_input_names_the_numbers() {
    let message = error_of(plan("mixtral-8x22b", "128").args(["--layout", "tp=3 pp=8"]));
    assert!(
        message.contains("128") && message.contains("3"),
        "{message}"
    );
    let message = error_of(&mut plan("mixtral-8x22b", "1"));
    assert!(
        message.contains("no layout of mixtral-8x22b fits on 1 devices") && message.contains("GiB"),
        "{message}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("odd.toml");
    let text = format!("{}\nwarp_drive = 1\n", origami_plan::hardware::H100_DGX);
    std::fs::write(&file, text).unwrap();
    let message =
        error_of(plan("mixtral-8x22b", "128").args(["--hardware", file.to_str().unwrap()]));
    assert!(message.contains("warp_drive"), "{message}");
    let message = error_of(
        plan("small", "4")
            .env("ORIGAMI_HARDWARE_DIR", dir.path())
            .args(["--hardware", "local"]),
    );
    assert!(message.contains("origami plan --calibrate"), "{message}");
    let message = error_of(plan("mixtral-8x22b", "128").args([
        "--layout",
        "tp=2 pp=8 ep=8 etp=1",
        "--no-folding",
    ]));
    assert!(
        message.contains("etp = 1") && message.contains("tp = 2"),
        "{message}"
    );
    let message = error_of(plan("mixtral-8x22b", "128").args(["--recompute", "sometimes"]));
    assert!(
        message.contains("\"sometimes\"") && message.contains("none, selective, full"),
        "{message}"
    );
}

#[test]
fn recomputation_trades_activations_for_backward_time() {
    let row = |mode: &str| -> serde_json::Value {
        let out = plan("mixtral-8x22b", "128")
            .args([
                "--layout",
                "tp=2 pp=8 vpp=7 ep=8 etp=1 mbs=1",
                "--recompute",
                mode,
                "--json",
            ])
            .output()
            .unwrap();
        serde_json::from_str(stdout_of(&out).trim()).unwrap()
    };
    let rows: Vec<serde_json::Value> = ["none", "selective", "full"].map(row).into();
    let of = |i: usize, path: [&str; 2]| rows[i][path[0]][path[1]].as_f64().unwrap();
    for (i, mode) in ["none", "selective", "full"].iter().enumerate() {
        assert_eq!(rows[i]["recompute"], *mode);
    }
    let activations = [0, 1, 2].map(|i| of(i, ["memory", "activations"]));
    assert!(
        activations[0] > activations[1] && activations[1] > activations[2],
        "{activations:?}"
    );
    let steps = [0, 1, 2].map(|i| rows[i]["step_time_s"].as_f64().unwrap());
    assert!(steps[0] < steps[1] && steps[1] < steps[2], "{steps:?}");
    // Full recomputation runs every expert GEMM's forward again: 4 forwards' time, not 3.
    let expert_gemm = [0, 2].map(|i| rows[i]["time"]["compute"]["expert_gemm"].as_f64().unwrap());
    assert!(
        (expert_gemm[1] / expert_gemm[0] - 4.0 / 3.0).abs() < 1e-9,
        "{expert_gemm:?}"
    );
}

#[test]
fn set_overrides_a_key_of_the_hardware_for_one_run() {
    let layout = ["--layout", "tp=2 pp=4 vpp=7 ep=4 etp=1 mbs=1", "--json"];
    let row = |extra: &[&str]| -> serde_json::Value {
        let out = plan("qwen2-57b-a14b", "64")
            .args(layout)
            .args(extra)
            .output()
            .unwrap();
        serde_json::from_str(stdout_of(&out).trim()).unwrap()
    };
    let overlapped = row(&[]);
    let exposed = row(&["--set", "engine.overlap_tensor_parallel=false"]);
    let tp = |row: &serde_json::Value, part: &str| row["time"][part]["tp"].as_f64().unwrap();
    // h100-dgx hides the sequence-parallel collectives under the GEMMs; without the overlap
    // the same seconds are exposed and the step grows by about them (the longer stages hide a
    // little more of the gradient traffic).
    assert_eq!(tp(&overlapped, "communication"), 0.0);
    let hidden = tp(&overlapped, "hidden_communication");
    assert!(hidden > 0.0, "{overlapped}");
    assert!(
        (tp(&exposed, "communication") / hidden - 1.0).abs() < 1e-9,
        "{exposed}"
    );
    let grown =
        exposed["step_time_s"].as_f64().unwrap() - overlapped["step_time_s"].as_f64().unwrap();
    assert!(
        grown > 0.9 * hidden && grown <= hidden,
        "{grown} against {hidden}"
    );
    let text = stdout_of(
        &plan("qwen2-57b-a14b", "64")
            .args([
                "--top",
                "1",
                "--set",
                "engine.overlap_tensor_parallel=false",
            ])
            .output()
            .unwrap(),
    );
    assert!(
        text.contains("h100-dgx (--set engine.overlap_tensor_parallel=false)")
            && text.contains("sequence-parallel (tp) communication is exposed"),
        "{text}"
    );
    for (item, says) in [
        ("engine.warp_drive=1", "warp_drive"),
        ("efficiency.gemm=1.5", "efficiency.gemm"),
        ("engine", "section.key=value"),
    ] {
        let message = error_of(plan("qwen2-57b-a14b", "64").args(["--set", item]));
        assert!(message.contains(says), "{item}: {message}");
    }
}

#[test]
fn calibration_writes_the_local_description_that_plans_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = origami()
        .env("ORIGAMI_HARDWARE_DIR", dir.path())
        .args(["plan", "--calibrate"])
        .output()
        .unwrap();
    assert!(stdout_of(&out).contains("local.toml"));
    // Written beside its place and moved in: nothing else is left in the directory.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, ["local.toml"]);
    let local = origami_plan::Hardware::from_file(&dir.path().join("local.toml")).unwrap();
    assert!(local.device.shared_by_ranks && local.peak_flops(origami_plan::Precision::F32).is_ok());
    // Both precisions are measured, bf16 with the kernel this CPU runs it on, and the engine
    // keeps origami's mixed-precision layout.
    assert!(local.peak_flops(origami_plan::Precision::Bf16).is_ok());
    assert!(local.efficiency.bf16.is_some());
    assert_eq!(
        local.engine.mixed_precision,
        origami_plan::MixedPrecision::Origami
    );
    for precision in ["f32", "bf16"] {
        let out = origami()
            .env("ORIGAMI_HARDWARE_DIR", dir.path())
            .args([
                "plan",
                "--model",
                "tiny",
                "--gpus",
                "4",
                "--global-batch",
                "8",
                "--seq",
                "256",
                "--precision",
                precision,
                "--hardware",
                "local",
                "--layout",
                "tp=2 ep=4 mbs=4",
            ])
            .output()
            .unwrap();
        let text = stdout_of(&out);
        assert!(
            text.contains("the node's ranks together"),
            "{precision}: {text}"
        );
    }
}
