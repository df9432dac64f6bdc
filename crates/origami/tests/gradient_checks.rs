//! Finite-difference gradient checks of every layer and of the whole model, over the router's
//! score functions, the auxiliary losses, expert bias and group-limited routing, the (gated)
//! shared expert, biases, tied embeddings and the router's input jitter.

use origami::compute::{Activation, Weights};
use origami::layers::attention::{Attention, AttentionDims, Positions};
use origami::layers::block::{Block, FeedForward};
use origami::layers::mlp::Mlp;
use origami::layers::moe::config::{AuxLossScope, DropPolicy, MoeConfig, ScoreFunction};
use origami::layers::moe::jitter::{TokenKey, TokenKeys};
use origami::layers::moe::MoeLayer;
use origami::layers::tensor_parallel::TensorParallel;
use origami::model::config::ModelConfig;
use origami::model::gpt::{GptModel, MicroBatch, SequenceKeys};
use origami::params::init::initialise;
use origami::params::{Buffers, ParamRegistry};
use origami_kernels::cross_entropy::IGNORE_TARGET;
use origami_kernels::rope::RopeTable;
use origami_kernels::testing::{check_gradient_with, probe_loss, random_vec};

const STEP: f32 = 2e-3;
const TOLERANCE: f64 = 2e-2;

/// Checks `d(loss)/d(input)` and `d(loss)/d(every parameter)` by finite differences, where
/// `loss(params, x)` is evaluated in f64 and `analytic` gives `(dx, grads)`.
fn check_layer(
    what: &str,
    registry: &ParamRegistry,
    params: &Buffers,
    x: &[f32],
    loss: &dyn Fn(&Buffers, &[f32]) -> f64,
    analytic: (Vec<f32>, Buffers),
) {
    let (dx, grads) = analytic;
    check_gradient_with(
        x,
        &dx,
        &mut |x| loss(params, x),
        STEP,
        TOLERANCE,
        &format!("{what} input"),
    );
    for info in registry.params().iter().filter(|p| p.trainable) {
        let mut perturbed = params.clone();
        check_gradient_with(
            params.get(info.id),
            grads.get(info.id),
            &mut |v| {
                perturbed.get_mut(info.id).copy_from_slice(v);
                loss(&perturbed, x)
            },
            STEP,
            TOLERANCE,
            &format!("{what} {}", info.name),
        );
    }
}

fn moe_settings(
    score_function: ScoreFunction,
    pre_softmax: bool,
    shared: usize,
    gated: bool,
) -> MoeConfig {
    MoeConfig {
        num_experts: 4,
        ffn_hidden_size: 12,
        topk: 2,
        score_function,
        pre_softmax,
        topk_scaling_factor: if score_function == ScoreFunction::Softmax {
            None
        } else {
            Some(2.5)
        },
        aux_loss_coeff: 0.1,
        z_loss_coeff: 0.05,
        shared_expert_ffn_hidden_size: shared,
        shared_expert_gate: gated,
        ..MoeConfig::default()
    }
}

const HIDDEN: usize = 16;
const BATCH: usize = 2;
const SEQ: usize = 5;

fn attention_dims() -> AttentionDims {
    AttentionDims {
        hidden: HIDDEN,
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
    }
}

fn positions() -> Vec<usize> {
    (0..BATCH * SEQ).map(|r| r % SEQ).collect()
}

#[test]
fn attention_layer_with_qkv_bias() {
    let mut registry = ParamRegistry::default();
    let layer = Attention::new(
        &mut registry,
        "attention",
        attention_dims(),
        true,
        (0.3, 0.3),
        &TensorParallel::single(),
        None,
    );
    let params = initialise(&registry, 1);
    let rope = RopeTable::new(6, SEQ, 10000.0);
    let rows = positions();
    let pos = Positions {
        of_row: &rows,
        in_sequence: &rows[..SEQ],
        rope: &rope,
    };
    let x = random_vec(BATCH * SEQ * HIDDEN, 2);
    let probe = random_vec(x.len(), 3);
    let loss = |p: &Buffers, x: &[f32]| {
        probe_loss(
            &layer
                .forward(
                    &Weights::f32(p),
                    &Activation::F32(x.to_vec()),
                    BATCH,
                    SEQ,
                    &pos,
                )
                .0,
            &probe,
        )
    };
    let (_, saved) = layer.forward(
        &Weights::f32(&params),
        &Activation::F32(x.clone()),
        BATCH,
        SEQ,
        &pos,
    );
    let mut grads = registry.zeros();
    let dx = layer.backward(
        &Weights::f32(&params),
        &mut grads,
        saved,
        &Activation::F32(x.clone()),
        &probe,
        BATCH,
        SEQ,
        &pos,
    );
    check_layer("attention", &registry, &params, &x, &loss, (dx, grads));
}

#[test]
fn dense_mlp() {
    let mut registry = ParamRegistry::default();
    let layer = Mlp::new(
        &mut registry,
        "mlp",
        (HIDDEN, 20),
        (0.3, 0.3),
        &TensorParallel::single(),
    );
    let params = initialise(&registry, 4);
    let x = random_vec(BATCH * SEQ * HIDDEN, 5);
    let probe = random_vec(x.len(), 6);
    let loss = |p: &Buffers, x: &[f32]| {
        probe_loss(
            &layer
                .forward(&Weights::f32(p), &Activation::F32(x.to_vec()))
                .0,
            &probe,
        )
    };
    let (_, saved) = layer.forward(&Weights::f32(&params), &Activation::F32(x.clone()));
    let mut grads = registry.zeros();
    let mut dx = vec![0.0; x.len()];
    layer.backward(
        &Weights::f32(&params),
        &mut grads,
        saved,
        &Activation::F32(x.clone()),
        &probe,
        &mut dx,
        false,
    );
    check_layer("mlp", &registry, &params, &x, &loss, (dx, grads));
}

/// MoE layer output probed, plus its auxiliary losses scaled by `loss_scale`.
fn check_moe(what: &str, settings: MoeConfig) {
    check_moe_with(what, settings, &|_, _| {});
}

/// [`check_moe`] with the parameters changed by `prepare` after initialisation.
fn check_moe_with(what: &str, settings: MoeConfig, prepare: &dyn Fn(&ParamRegistry, &mut Buffers)) {
    let mut registry = ParamRegistry::default();
    let layer = MoeLayer::new(&mut registry, "moe", HIDDEN, &settings, 0.4, 0.4);
    let mut params = initialise(&registry, 7);
    prepare(&registry, &mut params);
    let x = random_vec(BATCH * SEQ * HIDDEN, 8);
    let probe = random_vec(x.len(), 9);
    let loss_scale = 0.7;
    let loss = |p: &Buffers, x: &[f32]| {
        let (y, _, stats) = layer.forward(&Weights::f32(p), x);
        probe_loss(&y, &probe) + loss_scale as f64 * (stats.losses.load_balancing + stats.losses.z)
    };
    let (_, saved, stats) = layer.forward(&Weights::f32(&params), &x);
    assert!(
        stats.losses.load_balancing > 0.0 && stats.losses.z > 0.0,
        "{what}: auxiliary losses are on"
    );
    assert_eq!(
        stats.tokens_per_expert.iter().sum::<usize>(),
        BATCH * SEQ * settings.topk
    );
    let mut grads = registry.zeros();
    let dx = layer.backward(
        &Weights::f32(&params),
        &mut grads,
        saved,
        &x,
        &probe,
        loss_scale,
    );
    check_layer(what, &registry, &params, &x, &loss, (dx, grads));
}

#[test]
fn moe_layer_softmax_topk_then_softmax() {
    check_moe(
        "moe softmax",
        moe_settings(ScoreFunction::Softmax, false, 0, false),
    );
}

#[test]
fn moe_layer_softmax_before_topk_with_gated_shared_expert() {
    check_moe(
        "moe pre-softmax shared",
        moe_settings(ScoreFunction::Softmax, true, 10, true),
    );
}

#[test]
fn moe_layer_sigmoid_with_scaling_and_ungated_shared_expert() {
    check_moe(
        "moe sigmoid",
        moe_settings(ScoreFunction::Sigmoid, false, 10, false),
    );
}

#[test]
fn moe_layer_sqrtsoftplus_with_scaling_and_ungated_shared_expert() {
    check_moe(
        "moe sqrtsoftplus",
        moe_settings(ScoreFunction::SqrtSoftplus, false, 10, false),
    );
}

/// Sets the router's expert bias of the layer `moe`.
fn set_expert_bias(registry: &ParamRegistry, params: &mut Buffers) {
    let id = registry.find("moe.router.expert_bias").unwrap().id;
    params.get_mut(id).copy_from_slice(&[0.3, -0.2, 0.0, 0.15]);
}

/// Tokens per expert under the plain top-k of the logits `x·Wᵀ` (no bias, no groups), the
/// counts the load-balancing loss uses.
fn plain_top_k_loads(
    registry: &ParamRegistry,
    params: &Buffers,
    x: &[f32],
    topk: usize,
) -> Vec<usize> {
    let weight = params.get(registry.find("moe.router.weight").unwrap().id);
    let experts = weight.len() / HIDDEN;
    let mut loads = vec![0; experts];
    for row in x.chunks(HIDDEN) {
        let logits: Vec<f64> = weight
            .chunks(HIDDEN)
            .map(|w| w.iter().zip(row).map(|(a, b)| *a as f64 * *b as f64).sum())
            .collect();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        order[..topk].iter().for_each(|&e| loads[e] += 1);
    }
    loads
}

#[test]
fn moe_layer_with_expert_bias_and_groups_for_each_elementwise_score() {
    for score_function in [ScoreFunction::Sigmoid, ScoreFunction::SqrtSoftplus] {
        let settings = MoeConfig {
            num_groups: Some(2),
            group_topk: Some(1),
            expert_bias_update_rate: Some(0.01),
            ..moe_settings(score_function, false, 0, false)
        };
        let mut registry = ParamRegistry::default();
        let layer = MoeLayer::new(&mut registry, "moe", HIDDEN, &settings, 0.4, 0.4);
        let mut params = initialise(&registry, 7);
        set_expert_bias(&registry, &mut params);
        let x = random_vec(BATCH * SEQ * HIDDEN, 8);
        let (_, _, stats) = layer.forward(&Weights::f32(&params), &x);
        assert_ne!(
            stats.tokens_per_expert,
            plain_top_k_loads(&registry, &params, &x, settings.topk),
            "{score_function:?}: the bias and groups must move some tokens off their plain top-k for this test to mean anything"
        );
        check_moe_with(
            &format!("moe {score_function:?} bias groups"),
            settings,
            &set_expert_bias,
        );
    }
}

#[test]
fn moe_layer_per_sequence_balancing_scope() {
    let settings = MoeConfig {
        aux_loss_scope: AuxLossScope::Sequence,
        ..moe_settings(ScoreFunction::Softmax, false, 0, false)
    };
    let mut registry = ParamRegistry::default();
    let layer = MoeLayer::new(&mut registry, "moe", HIDDEN, &settings, 0.4, 0.4);
    let params = initialise(&registry, 7);
    let x = random_vec(BATCH * SEQ * HIDDEN, 8);
    // The per-sequence loss is the mean over sequences of each one's micro-batch loss.
    let (_, _, stats) = layer.forward_batch(&Weights::f32(&params), &x, BATCH);
    let mean: f64 = x
        .chunks(SEQ * HIDDEN)
        .map(|sequence| {
            layer
                .forward(&Weights::f32(&params), sequence)
                .2
                .losses
                .load_balancing
        })
        .sum::<f64>()
        / BATCH as f64;
    let whole = layer
        .forward(&Weights::f32(&params), &x)
        .2
        .losses
        .load_balancing;
    assert!((stats.losses.load_balancing - mean).abs() < 1e-9 * mean.abs().max(1.0));
    assert!(
        (whole - mean).abs() > 1e-6,
        "the two scopes must differ here"
    );
    let probe = random_vec(x.len(), 9);
    let loss = |p: &Buffers, x: &[f32]| {
        let (y, _, stats) = layer.forward_batch(&Weights::f32(p), x, BATCH);
        probe_loss(&y, &probe) + stats.losses.load_balancing + stats.losses.z
    };
    let (_, saved, _) = layer.forward_batch(&Weights::f32(&params), &x, BATCH);
    let mut grads = registry.zeros();
    let dx = layer.backward(&Weights::f32(&params), &mut grads, saved, &x, &probe, 1.0);
    check_layer(
        "moe per-sequence",
        &registry,
        &params,
        &x,
        &loss,
        (dx, grads),
    );
}

#[test]
fn moe_layer_with_token_dropping_with_and_without_padding() {
    for (policy, pad) in [(DropPolicy::Probs, false), (DropPolicy::Position, true)] {
        let settings = MoeConfig {
            capacity_factor: Some(0.6),
            drop_policy: policy,
            pad_to_capacity: pad,
            ..moe_settings(ScoreFunction::Softmax, false, 10, true)
        };
        let mut registry = ParamRegistry::default();
        let layer = MoeLayer::new(&mut registry, "moe", HIDDEN, &settings, 0.4, 0.4);
        let (_, _, stats) = layer.forward(
            &Weights::f32(&initialise(&registry, 7)),
            &random_vec(BATCH * SEQ * HIDDEN, 8),
        );
        assert!(
            stats.dropped > 0,
            "{policy:?}: the capacity must drop some slots for this test to mean anything"
        );
        check_moe(&format!("moe dropping {policy:?} pad={pad}"), settings);
    }
}

#[test]
fn moe_layer_with_group_limited_routing() {
    let settings = MoeConfig {
        num_groups: Some(2),
        group_topk: Some(1),
        ..moe_settings(ScoreFunction::Sigmoid, false, 0, false)
    };
    check_moe("moe group-limited", settings);
}

#[test]
fn transformer_block_with_moe() {
    let mut registry = ParamRegistry::default();
    let attention = Attention::new(
        &mut registry,
        "block.attention",
        attention_dims(),
        false,
        (0.3, 0.3),
        &TensorParallel::single(),
        None,
    );
    let moe = MoeLayer::new(
        &mut registry,
        "block.moe",
        HIDDEN,
        &moe_settings(ScoreFunction::Softmax, false, 0, false),
        0.3,
        0.3,
    );
    let block = Block::new(
        &mut registry,
        "block",
        (HIDDEN, 1e-5),
        attention,
        FeedForward::Moe(Box::new(moe)),
        TensorParallel::single(),
    );
    let params = initialise(&registry, 10);
    let rope = RopeTable::new(6, SEQ, 10000.0);
    let rows = positions();
    let pos = Positions {
        of_row: &rows,
        in_sequence: &rows[..SEQ],
        rope: &rope,
    };
    let x = random_vec(BATCH * SEQ * HIDDEN, 11);
    let probe = random_vec(x.len(), 12);
    let loss = |p: &Buffers, x: &[f32]| {
        let (y, _, stats) = block.forward(&Weights::f32(p), x.to_vec(), BATCH, SEQ, &pos, None);
        let stats = stats.expect("moe block reports stats");
        probe_loss(&y, &probe) + stats.losses.load_balancing + stats.losses.z
    };
    let (_, saved, _) = block.forward(&Weights::f32(&params), x.clone(), BATCH, SEQ, &pos, None);
    let mut grads = registry.zeros();
    let dx = block.backward(
        &Weights::f32(&params),
        &mut grads,
        saved,
        probe.clone(),
        1.0,
        BATCH,
        SEQ,
        &pos,
        None,
    );
    check_layer("block", &registry, &params, &x, &loss, (dx, grads));
}

fn small_model(
    moe: MoeConfig,
    tie_embeddings: bool,
    qkv_bias: bool,
    pattern: Option<Vec<u8>>,
) -> ModelConfig {
    ModelConfig {
        vocab_size: 24,
        hidden_size: HIDDEN,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: Some(6),
        ffn_hidden_size: 20,
        max_seq_len: 8,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        qkv_bias,
        tie_embeddings,
        init_std: 0.3,
        moe: MoeConfig {
            layer_pattern: pattern,
            ..moe
        },
    }
}

fn check_model(what: &str, config: ModelConfig) {
    check_model_with(what, config, STEP, &|_, _| {});
}

/// [`check_model`] with finite-difference `step` and the parameters changed by `prepare` after
/// initialisation.
fn check_model_with(
    what: &str,
    config: ModelConfig,
    step: f32,
    prepare: &dyn Fn(&ParamRegistry, &mut Buffers),
) {
    let model = GptModel::new(config).expect("valid config");
    let mut params = model.init_params(13);
    prepare(model.registry(), &mut params);
    let tokens: Vec<u32> = random_vec(BATCH * SEQ, 14)
        .iter()
        .map(|v| ((v + 1.0) * 12.0) as u32 % 24)
        .collect();
    let mut targets: Vec<u32> = tokens.iter().map(|t| (t * 7 + 3) % 24).collect();
    targets[3] = IGNORE_TARGET;
    let batch = MicroBatch {
        tokens,
        targets,
        batch: BATCH,
        seq: SEQ,
        keys: SequenceKeys::default(),
    };
    let mut grads = model.registry().zeros();
    let report = model.forward_backward(&params, &mut grads, &batch, 1.0);
    let forward_only = model.loss(&params, &batch);
    assert_eq!(
        report.tokens,
        BATCH * SEQ - 1,
        "{what}: ignored target not counted"
    );
    assert!(
        (report.total() - forward_only.total()).abs() < 1e-5,
        "{what}: training and evaluation losses differ"
    );
    for info in model.registry().params().iter().filter(|p| p.trainable) {
        let mut perturbed = params.clone();
        check_gradient_with(
            params.get(info.id),
            grads.get(info.id),
            &mut |v| {
                perturbed.get_mut(info.id).copy_from_slice(v);
                model.loss(&perturbed, &batch).total()
            },
            step,
            TOLERANCE,
            &format!("{what} {}", info.name),
        );
    }
}

#[test]
fn whole_model_mixtral_style() {
    check_model(
        "mixtral-style",
        small_model(
            moe_settings(ScoreFunction::Softmax, false, 0, false),
            false,
            false,
            None,
        ),
    );
}

#[test]
fn whole_model_qwen2_moe_style_dense_first_layer_tied() {
    let moe = moe_settings(ScoreFunction::Softmax, true, 10, true);
    check_model(
        "qwen2-moe-style",
        small_model(moe, true, true, Some(vec![0, 1])),
    );
}

#[test]
fn whole_model_with_expert_bias_and_groups_for_each_elementwise_score() {
    // Group-limited routing switches a token's group where two groups score alike; the smaller
    // step keeps every probe of this model on one side of such a switch.
    let step = 5e-4;
    let set_biases = |registry: &ParamRegistry, params: &mut Buffers| {
        for layer in 0..2 {
            let name = format!("layers.{layer}.moe.router.expert_bias");
            let id = registry.find(&name).unwrap().id;
            params.get_mut(id).copy_from_slice(&[0.1, -0.05, 0.0, 0.05]);
        }
    };
    for score_function in [ScoreFunction::Sigmoid, ScoreFunction::SqrtSoftplus] {
        let moe = MoeConfig {
            num_groups: Some(2),
            group_topk: Some(1),
            expert_bias_update_rate: Some(0.01),
            ..moe_settings(score_function, false, 0, false)
        };
        check_model_with(
            &format!("{score_function:?} bias groups"),
            small_model(moe, false, false, None),
            step,
            &set_biases,
        );
    }
}

#[test]
fn whole_model_sqrtsoftplus_router() {
    check_model(
        "sqrtsoftplus",
        small_model(
            moe_settings(ScoreFunction::SqrtSoftplus, false, 0, false),
            false,
            false,
            None,
        ),
    );
}

#[test]
fn whole_model_sigmoid_router() {
    check_model(
        "sigmoid",
        small_model(
            moe_settings(ScoreFunction::Sigmoid, false, 0, false),
            false,
            false,
            None,
        ),
    );
}

/// Keys of `BATCH` sequences of `SEQ` tokens, one after the other.
fn jitter_keys() -> TokenKeys {
    TokenKeys {
        seed: 21,
        step: 3,
        tokens: (0..BATCH * SEQ)
            .map(|r| TokenKey {
                sequence: (r / SEQ) as u64,
                position: (r % SEQ) as u64,
            })
            .collect(),
    }
}

#[test]
fn moe_layer_with_router_input_jitter() {
    // The jitter multiplies the router's input only: the router weight's gradient takes the
    // jittered input, the input's gradient through the router is multiplied by the noise, and
    // the experts' path is untouched.
    for score_function in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        let settings = MoeConfig {
            input_jitter_eps: Some(0.3),
            ..moe_settings(score_function, false, 10, true)
        };
        let mut registry = ParamRegistry::default();
        let layer = MoeLayer::new(&mut registry, "moe", HIDDEN, &settings, 0.4, 0.4);
        let params = initialise(&registry, 7);
        let x = random_vec(BATCH * SEQ * HIDDEN, 8);
        let probe = random_vec(x.len(), 9);
        let keys = jitter_keys();
        let loss_scale = 0.7;
        let loss = |p: &Buffers, x: &[f32]| {
            let (y, _, stats) = layer.forward_with_jitter(&Weights::f32(p), x, BATCH, Some(&keys));
            probe_loss(&y, &probe)
                + loss_scale as f64 * (stats.losses.load_balancing + stats.losses.z)
        };
        let (y, saved, _) =
            layer.forward_with_jitter(&Weights::f32(&params), &x, BATCH, Some(&keys));
        let (plain, _, _) = layer.forward_batch(&Weights::f32(&params), &x, BATCH);
        assert!(
            y.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-4),
            "{score_function:?}: the jitter must change the output for this test to mean anything"
        );
        let mut grads = registry.zeros();
        let dx = layer.backward(
            &Weights::f32(&params),
            &mut grads,
            saved,
            &x,
            &probe,
            loss_scale,
        );
        check_layer(
            &format!("moe {score_function:?} jitter"),
            &registry,
            &params,
            &x,
            &loss,
            (dx, grads),
        );
    }
}

#[test]
fn whole_model_with_router_input_jitter_in_training() {
    // Evaluation does not jitter, so the finite differences take the training forward's loss.
    let config = small_model(
        MoeConfig {
            input_jitter_eps: Some(0.2),
            ..moe_settings(ScoreFunction::Softmax, false, 0, false)
        },
        false,
        false,
        None,
    );
    let model = GptModel::new(config).expect("valid config");
    let params = model.init_params(13);
    let tokens: Vec<u32> = random_vec(BATCH * SEQ, 14)
        .iter()
        .map(|v| ((v + 1.0) * 12.0) as u32 % 24)
        .collect();
    let batch = MicroBatch {
        targets: tokens.iter().map(|t| (t * 7 + 3) % 24).collect(),
        tokens,
        batch: BATCH,
        seq: SEQ,
        keys: SequenceKeys::consecutive(21, 3, 4, BATCH),
    };
    let mut grads = model.registry().zeros();
    let report = model.forward_backward(&params, &mut grads, &batch, 1.0);
    assert!(
        (report.total() - model.loss(&params, &batch).total()).abs() > 1e-6,
        "training jitters, evaluation does not"
    );
    let mut scratch = model.registry().zeros();
    for info in model.registry().params().iter().filter(|p| p.trainable) {
        let mut perturbed = params.clone();
        check_gradient_with(
            params.get(info.id),
            grads.get(info.id),
            &mut |v| {
                perturbed.get_mut(info.id).copy_from_slice(v);
                model
                    .forward_backward(&perturbed, &mut scratch, &batch, 1.0)
                    .total()
            },
            STEP,
            TOLERANCE,
            &format!("jitter {}", info.name),
        );
    }
}
