"""Predicted against measured: `origami plan --hardware local` beside `origami bench` on the same
layouts, in one sitting, interleaved.

For every layout of every round the script calibrates this machine (`origami plan --calibrate`,
into a private directory) and asks the planner for the step time and the process's memory, runs
the benchmark, then calibrates and predicts again: the prediction is the mean of the two, so
that prediction and measurement see the same load. Prints
every run with two gauges of the machine's speed at the time — the GEMM peak the calibration
measured and the one the benchmark measured in its own process — the medians and the ratio
of the medians. This machine's speed changes by up to 2× within a minute (other tenants), so
the medians of predictions and of measurements may come from different rounds: the second table
gives, per round, each prediction over its own measurement (taken in the same minutes) and
their median; the third rescales each prediction by the benchmark's peak over the
calibration's, which cancels a change between the two.

Run from the repository root after `cargo build --release -p origami` (or point ORIGAMI at
another binary):
    python3 scripts/plan_check.py [--rounds 3] [--steps 3] [--preset small] [--precision f32|bf16]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

ORIGAMI = os.environ.get("ORIGAMI", "./target/release/origami")

# (name, bench flags, planner layout, world); bench trains its preset's 4 sequences per step
# over the layout's data-parallel ranks, so each rank's micro-batch is 4 / dp sequences; the
# pipeline runs them as 4 micro-batches of one sequence (1F1B).
LAYOUTS = [
    ("world 1", [], "mbs=4", 1),
    ("TP2·DP2 | EP4", ["--world", "4", "--tp", "2", "--ep", "4"], "tp=2 ep=4 mbs=2", 4),
    ("CP2·DP2 | EP4", ["--world", "4", "--cp", "2", "--ep", "4"], "cp=2 ep=4 mbs=2", 4),
    ("PP2", ["--world", "2", "--pp", "2", "--micro-batch", "1", "--micro-batches", "4"],
     "pp=2 mbs=1", 2),
]


def run(args, env):
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return out.stdout


def calibration_peak(directory, precision):
    key = f"peak_flops_{precision}"
    with open(os.path.join(directory, "local.toml")) as f:
        for line in f:
            if line.startswith(key):
                return float(line.split("=")[1]) / 1e9
    raise RuntimeError(f"no {key} in the local description")


def predict(preset, layout, world, precision, env):
    out = run([ORIGAMI, "plan", "--model", preset, "--gpus", str(world), "--global-batch", "4",
               "--seq", "1024", "--precision", precision, "--hardware", "local",
               "--no-distributed-optimizer", "--layout", layout, "--json"], env)
    row = json.loads(out)
    return row["step_time_s"], row["memory_per_node_gib"] * 1024


def measure(preset, flags, steps, precision, env):
    out = run([ORIGAMI, "bench", "--preset", preset, "--steps", str(steps), "--precision",
               precision] + flags, env)
    row = json.loads(out)
    peak = row["peak_gemm_gflops" if precision == "f32" else "peak_gemm_gflops_bf16"]
    return row["median_step_s"], row["peak_rss_mib"], peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    args = parser.parse_args()
    results = {name: [] for name, *_ in LAYOUTS}
    with tempfile.TemporaryDirectory() as directory:
        env = dict(os.environ, ORIGAMI_HARDWARE_DIR=directory)
        for round_index in range(args.rounds):
            for name, flags, layout, world in LAYOUTS:
                run([ORIGAMI, "plan", "--calibrate"], env)
                peak_before = calibration_peak(directory, args.precision)
                before = predict(args.preset, layout, world, args.precision, env)
                measured = measure(args.preset, flags, args.steps, args.precision, env)
                run([ORIGAMI, "plan", "--calibrate"], env)
                peak_after = calibration_peak(directory, args.precision)
                after = predict(args.preset, layout, world, args.precision, env)
                peak = (peak_before + peak_after) / 2
                predicted = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
                rescaled = predicted[0] * peak / measured[2]
                results[name].append((predicted, measured, rescaled))
                print(f"round {round_index + 1} {name:<15} step predicted {predicted[0]:7.3f} s "
                      f"measured {measured[0]:7.3f} s | memory predicted {predicted[1]:7.0f} MiB "
                      f"measured {measured[1]:7.0f} MiB | peak GEMM calibration {peak:.0f}, "
                      f"bench {measured[2]:.0f} GFLOP/s", flush=True)
    print(f"\nmedians over {args.rounds} rounds ({args.preset}, {args.precision}):")
    print(f"{'layout':<15} {'step pred s':>11} {'step meas s':>11} {'ratio':>6} "
          f"{'mem pred MiB':>12} {'mem meas MiB':>12} {'ratio':>6}")
    for name, rows in results.items():
        step_p = statistics.median(r[0][0] for r in rows)
        step_m = statistics.median(r[1][0] for r in rows)
        mem_p = statistics.median(r[0][1] for r in rows)
        mem_m = statistics.median(r[1][1] for r in rows)
        print(f"{name:<15} {step_p:11.3f} {step_m:11.3f} {step_p / step_m:6.3f} "
              f"{mem_p:12.0f} {mem_m:12.0f} {mem_p / mem_m:6.3f}")
    print("\nper round, each prediction over its own measurement (the same minutes of a machine "
          "whose speed drifts), and their median:")
    for name, rows in results.items():
        ratios = [r[0][0] / r[1][0] for r in rows]
        print(f"{name:<15} " + " ".join(f"{x:6.3f}" for x in ratios)
              + f"   median {statistics.median(ratios):6.3f}")
    print("\nrescaled by the benchmark's GEMM peak over the calibration's:")
    print(f"{'layout':<15} {'step pred s':>11} {'step meas s':>11} {'ratio':>6}")
    for name, rows in results.items():
        step_r = statistics.median(r[2] for r in rows)
        step_m = statistics.median(r[1][0] for r in rows)
        print(f"{name:<15} {step_r:11.3f} {step_m:11.3f} {step_r / step_m:6.3f}")


if __name__ == "__main__":
    main()
