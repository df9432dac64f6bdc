//! `origami bench`: times full training steps (forward, backward, AdamW) of a preset on random
//! tokens, and reports tokens/s, model TFLOP/s (DESIGN.md §5), the peak GEMM rate measured in
//! the same run, MFU against it, and peak resident memory.

use crate::model::config::ModelConfig;
use crate::model::flops::training_flops_per_token;
use crate::model::gpt::{GptModel, MicroBatch};
use crate::optim::adamw::{AdamW, AdamWConfig};
use origami_kernels::matmul::{matmul, Par, View, ViewMut};
use serde::Serialize;
use std::time::Instant;

/// What to benchmark.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// Model preset name.
    pub preset: String,
    /// Timed steps (one more runs first as warm-up).
    pub steps: usize,
    /// Sequences per step (default: the preset's micro-batch).
    pub micro_batch: Option<usize>,
    /// Tokens per sequence (default: the preset's).
    pub seq: Option<usize>,
}

/// One benchmark result, printed as a JSON line.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Always `"model"`.
    pub bench: &'static str,
    /// Preset name.
    pub preset: String,
    /// Kernel threads.
    pub threads: usize,
    /// Parameters of the model.
    pub params: usize,
    /// Tokens per step.
    pub tokens_per_step: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median step time in seconds.
    pub median_step_s: f64,
    /// Trained tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Achieved model TFLOP/s (DESIGN.md §5 FLOPs).
    pub model_tflops: f64,
    /// Best f32 GEMM rate measured in this run, GFLOP/s (the CPU peak for MFU).
    pub peak_gemm_gflops: f64,
    /// Model FLOPs utilisation against that peak.
    pub mfu: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Loss of the last step (random tokens: about ln(vocab)).
    pub loss: f64,
}

/// The micro-batch size of each preset, as in `shared/peers/README.md`.
pub fn preset_micro_batch(preset: &str) -> usize {
    match preset {
        "tiny" => 8,
        _ => 4,
    }
}

/// Runs the benchmark.
pub fn run(settings: &BenchSettings) -> anyhow::Result<BenchReport> {
    let config = ModelConfig::preset(&settings.preset)?;
    let seq = settings.seq.unwrap_or(config.max_seq_len);
    let micro_batch = settings
        .micro_batch
        .unwrap_or(preset_micro_batch(&settings.preset));
    anyhow::ensure!(
        seq <= config.max_seq_len,
        "--seq {seq} exceeds the preset's max_seq_len {}",
        config.max_seq_len
    );
    anyhow::ensure!(
        settings.steps > 0 && micro_batch > 0,
        "--steps and --micro-batch must be positive"
    );
    let model = GptModel::new(config.clone())?;
    let mut params = model.init_params(0);
    let mut grads = model.registry().zeros();
    let mut optimizer = AdamW::new(model.registry(), AdamWConfig::default());
    let batch = random_batch(micro_batch, seq, config.vocab_size);
    let mut times = Vec::with_capacity(settings.steps);
    let mut loss = 0.0;
    for step in 0..=settings.steps {
        let start = Instant::now();
        grads.fill_zero();
        loss = model
            .forward_backward(&params, &mut grads, &batch, 1.0)
            .total();
        optimizer.step(model.registry(), &mut params, &mut grads, 1e-4);
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = micro_batch * seq;
    let tokens_per_s = tokens as f64 / median;
    let model_tflops = tokens_per_s * training_flops_per_token(&config, seq) / 1e12;
    let peak_gemm_gflops = peak_gemm_gflops();
    Ok(BenchReport {
        bench: "model",
        preset: settings.preset.clone(),
        threads: rayon::current_num_threads(),
        params: model.registry().total_len(),
        tokens_per_step: tokens,
        steps: settings.steps,
        median_step_s: median,
        tokens_per_s,
        model_tflops,
        peak_gemm_gflops,
        mfu: model_tflops * 1e3 / peak_gemm_gflops,
        peak_rss_mib: peak_rss_mib(),
        loss,
    })
}

/// Deterministic pseudo-random tokens and next-token targets.
fn random_batch(batch: usize, seq: usize, vocab: usize) -> MicroBatch {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    let stream: Vec<u32> = (0..batch * (seq + 1)).map(|_| next()).collect();
    let mut tokens = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for row in stream.chunks(seq + 1) {
        tokens.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    MicroBatch {
        tokens,
        targets,
        batch,
        seq,
    }
}

/// Best f32 GEMM rate over a few large square products, in GFLOP/s.
pub fn peak_gemm_gflops() -> f64 {
    let mut best = 0.0f64;
    for n in [1024usize, 2048] {
        let a = vec![0.5f32; n * n];
        let b = vec![0.25f32; n * n];
        let mut c = vec![0.0f32; n * n];
        for _ in 0..4 {
            let start = Instant::now();
            matmul(
                ViewMut::new(&mut c, n, n),
                View::new(&a, n, n),
                View::new(&b, n, n),
                false,
                Par::All,
            );
            let rate = 2.0 * (n * n * n) as f64 / start.elapsed().as_secs_f64() / 1e9;
            best = best.max(rate);
        }
    }
    best
}

/// Peak resident set size of this process (Linux `VmHWM`), MiB; 0 where unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
