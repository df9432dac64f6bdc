//! The engine can learn: 300 AdamW steps of the `tiny` preset on one fixed batch of real text
//! drive the training loss (cross-entropy + aux + z) below 0.1.

use origami::model::config::ModelConfig;
use origami::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use origami::optim::adamw::{AdamW, AdamWConfig};
use origami::optim::lr_schedule::LrSchedule;

#[test]
fn tiny_preset_memorises_one_batch_in_300_steps() {
    let text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
                must be in want of a wife. However little known the feelings or views of such a man may be.";
    let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
    let (batch, seq) = (2, 64);
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    for b in 0..batch {
        let window = &bytes[b * 50..b * 50 + seq + 1];
        tokens.extend_from_slice(&window[..seq]);
        targets.extend_from_slice(&window[1..]);
    }
    let micro_batch = MicroBatch {
        tokens,
        targets,
        batch,
        seq,
        keys: SequenceKeys::default(),
    };
    let model = GptModel::new(ModelConfig::preset("tiny").unwrap()).unwrap();
    let mut params = model.init_params(42);
    let mut grads = model.registry().zeros();
    let mut optimizer = AdamW::new(
        model.registry(),
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    );
    let schedule = LrSchedule {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 10,
        decay_steps: 300,
    };
    let mut first = 0.0;
    let mut last = 0.0;
    for step in 0..300 {
        grads.fill_zero();
        let report = model.forward_backward(&params, &mut grads, &micro_batch, 1.0);
        optimizer.step(model.registry(), &mut params, &mut grads, schedule.at(step));
        if step == 0 {
            first = report.total();
        }
        last = report.total();
    }
    assert!(first > 5.0, "starts near ln(256): {first}");
    assert!(last < 0.1, "loss after 300 steps: {last}");
}
