//! `origami convert`: origami checkpoints to HuggingFace and back, one tensor at a time.
//!
//! To HuggingFace: `config.json` (Mixtral or Qwen2-MoE), `model-0000X-of-0000N.safetensors`
//! with per-expert tensors in f32 or bf16, and `model.safetensors.index.json` mapping every
//! tensor to its file — what `transformers` loads from the Hub. Each HF tensor is read from the
//! checkpoint's pieces as the block of its origami parameter ([`crate::hf::names`]), written,
//! and dropped, so memory stays near one tensor whatever the model's size; a checkpoint of any
//! layout converts. A model HuggingFace cannot express (sigmoid routers, group-limited routing,
//! expert bias, a scaling factor, an ungated shared expert) is refused with the reason.
//!
//! From HuggingFace: both expert layouts the loader reads, into a one-rank origami checkpoint
//! without optimizer state (training continues from it at any layout with fresh moments), each
//! origami tensor assembled from its HF tensors when it is written.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

use crate::hf::names::{mapped_tensors, ExpertLayout, HfFamily};
use crate::hf::weights::{assemble_into, detect_layout, HfTensors};
use crate::layers::moe::config::ScoreFunction;
use crate::model::config::ModelConfig;
use crate::model::gpt::GptModel;
use crate::tensor_files::{write_pieces, write_synced, PieceData, Precision, TensorFile};
use crate::train::checkpoint::shards::Needed;
use crate::train::checkpoint::{self, Checkpoint, TrainingState, WholeTensor};
use crate::train::config::RunConfig;

/// What a conversion wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Converted {
    /// Tensors written.
    pub tensors: usize,
    /// Files written.
    pub files: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// The HF family that can express `config`, or why none can.
pub fn family_for(config: &ModelConfig) -> anyhow::Result<HfFamily> {
    let m = &config.moe;
    let refuse = |what: &str| -> anyhow::Result<HfFamily> {
        bail!(
            "this model cannot be written as a HuggingFace Mixtral or Qwen2-MoE checkpoint: {what}"
        )
    };
    if m.score_function != ScoreFunction::Softmax {
        return refuse(
            "its router scores with sigmoid or sqrtsoftplus (both families use softmax)",
        );
    }
    if m.num_groups.is_some() || m.expert_bias_update_rate.is_some() {
        return refuse("it uses group-limited routing or an expert bias");
    }
    if m.topk_scaling_factor.is_some() {
        return refuse("its routing weights have a scaling factor");
    }
    let all_moe = (0..config.num_layers).all(|l| config.is_moe_layer(l));
    let mixtral =
        all_moe && m.shared_expert_ffn_hidden_size == 0 && !config.qkv_bias && !m.pre_softmax;
    if mixtral {
        return Ok(HfFamily::Mixtral);
    }
    if m.shared_expert_ffn_hidden_size == 0 || !m.shared_expert_gate {
        return refuse(
            "Qwen2-MoE (dense layers, q/k/v biases, un-normalised top-k) needs a shared expert with a sigmoid gate",
        );
    }
    Ok(HfFamily::Qwen2Moe)
}

/// `config.json` of `config` as `family` stored in `dtype`.
fn hf_config(config: &ModelConfig, family: HfFamily, precision: Precision) -> Value {
    let c = config;
    let dtype = match precision {
        Precision::F32 => "float32",
        Precision::Bf16 => "bfloat16",
    };
    let mut json = json!({
        "model_type": family.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "num_experts_per_tok": c.moe.topk,
        "router_aux_loss_coef": c.moe.aux_loss_coeff,
        "output_router_logits": false,
        "use_cache": true,
        "sliding_window": null,
        "dtype": dtype,
        "torch_dtype": dtype,
    });
    let fields = json.as_object_mut().expect("an object");
    if let Some(head_dim) = c.head_dim {
        fields.insert("head_dim".into(), json!(head_dim));
    }
    match family {
        HfFamily::Mixtral => {
            fields.insert("architectures".into(), json!(["MixtralForCausalLM"]));
            fields.insert("num_local_experts".into(), json!(c.moe.num_experts));
            fields.insert("intermediate_size".into(), json!(c.moe.ffn_hidden_size));
        }
        HfFamily::Qwen2Moe => {
            let dense: Vec<usize> = (0..c.num_layers).filter(|&l| !c.is_moe_layer(l)).collect();
            fields.insert("architectures".into(), json!(["Qwen2MoeForCausalLM"]));
            fields.insert("num_experts".into(), json!(c.moe.num_experts));
            fields.insert("moe_intermediate_size".into(), json!(c.moe.ffn_hidden_size));
            fields.insert("intermediate_size".into(), json!(c.ffn_hidden_size));
            fields.insert(
                "shared_expert_intermediate_size".into(),
                json!(c.moe.shared_expert_ffn_hidden_size),
            );
            fields.insert("norm_topk_prob".into(), json!(!c.moe.pre_softmax));
            fields.insert("decoder_sparse_step".into(), json!(1));
            fields.insert("mlp_only_layers".into(), json!(dense));
            fields.insert("qkv_bias".into(), json!(c.qkv_bias));
            fields.insert("use_sliding_window".into(), json!(false));
        }
    }
    json
}

/// Moves `tmp` to `out` once everything is written (or removes it when `result` failed).
fn publish<T>(tmp: &Path, out: &Path, result: anyhow::Result<T>) -> anyhow::Result<T> {
    let result = result.and_then(|value| {
        std::fs::rename(tmp, out)
            .with_context(|| format!("moving the output into {}", out.display()))?;
        Ok(value)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    result
}

fn temporary_beside(out: &Path) -> anyhow::Result<std::path::PathBuf> {
    ensure!(
        !out.exists(),
        "{} already exists; nothing was overwritten (choose another output)",
        out.display()
    );
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map_or("convert".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

/// Writes checkpoint `dir` (any layout, either format) as a HuggingFace directory `out` (which
/// must not exist), in shards of at most `max_shard_bytes` of tensor data.
pub fn to_hf(
    dir: &Path,
    out: &Path,
    precision: Precision,
    max_shard_bytes: u64,
) -> anyhow::Result<Converted> {
    let checkpoint = Checkpoint::open(dir)?;
    let run = RunConfig::from_toml(&checkpoint.state().config_toml, &[])
        .with_context(|| format!("reading the config stored in {}", dir.display()))?;
    let config = run.model;
    let family = family_for(&config)?;
    let table = mapped_tensors(&config, family, ExpertLayout::PerExpert);
    let width = match precision {
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    };
    // Shards in table order, each up to the size limit (a larger tensor gets its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut filled = 0u64;
    for (i, m) in table.iter().enumerate() {
        let bytes = m.shape.iter().product::<usize>() as u64 * width;
        if filled > 0 && filled + bytes > max_shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        shards.last_mut().expect("one shard at least").push(i);
        filled += bytes;
    }
    let tmp = temporary_beside(out)?;
    let result = (|| -> anyhow::Result<Converted> {
        let files = RefCell::new(HashMap::<String, TensorFile>::new());
        let failure = RefCell::new(None::<anyhow::Error>);
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        let count = shards.len();
        for (s, members) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", s + 1);
            let mut pieces = Vec::with_capacity(members.len());
            for &i in members {
                let m = &table[i];
                weight_map.insert(m.hf.clone(), file.clone());
                let (files, failure, checkpoint) = (&files, &failure, &checkpoint);
                let fill = Box::new(move |values: &mut Vec<f32>| {
                    let len: usize = m.shape.iter().product();
                    values.resize(len, 0.0);
                    let need = Needed {
                        tensor: m.origami.clone(),
                        shape: m.origami_shape.clone(),
                        shard: &m.region,
                        flat: 0..len,
                    };
                    if let Err(e) = checkpoint.read(&need, values, &mut files.borrow_mut()) {
                        failure.borrow_mut().get_or_insert(e.into());
                    }
                });
                pieces.push((
                    m.hf.clone(),
                    PieceData {
                        shape: m.shape.clone(),
                        precision,
                        fill,
                    },
                ));
            }
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            let (bytes, _) = write_pieces(&tmp.join(&file), pieces, metadata)?;
            if let Some(error) = failure.borrow_mut().take() {
                return Err(error.context(format!("reading {} for {file}", dir.display())));
            }
            total += bytes;
        }
        let data_bytes: u64 = table
            .iter()
            .map(|m| m.shape.iter().product::<usize>() as u64 * width)
            .sum();
        let index = json!({
            "metadata": {"total_size": data_bytes},
            "weight_map": weight_map,
        });
        write_synced(
            &tmp.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
        write_synced(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&hf_config(&config, family, precision))?.as_bytes(),
        )?;
        Ok(Converted {
            tensors: table.len(),
            files: count,
            bytes: total,
        })
    })();
    publish(&tmp, out, result)
}

/// Writes the HuggingFace Mixtral or Qwen2-MoE directory `hf` as a one-rank origami checkpoint
/// `out` (which must not exist) without optimizer state; its stored config is the embedded
/// default's with this model, on one rank, with sequences no longer than the model's.
pub fn from_hf(hf: &Path, out: &Path) -> anyhow::Result<Converted> {
    let config_path = hf.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let model_config = crate::hf::config::model_config_from_hf(&json)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let model = GptModel::new(model_config.clone())?;
    let tensors = HfTensors::open(hf)?;
    let (family, experts) = detect_layout(&model_config, &tensors);
    let table = mapped_tensors(&model_config, family, experts);
    for m in &table {
        tensors.check(&m.hf, &m.shape)?;
    }
    let mut run = RunConfig {
        model: model_config,
        ..RunConfig::default()
    };
    let p = &mut run.parallel;
    (p.world, p.tp, p.cp, p.pp, p.vpp, p.ep, p.etp) = (1, 1, 1, 1, 1, 1, None);
    run.train.seq_len = run.train.seq_len.min(run.model.max_seq_len);
    run.validate()
        .context("the converted model's run config does not validate")?;
    let failure = RefCell::new(None::<anyhow::Error>);
    let whole: Vec<WholeTensor<'_>> = model
        .registry()
        .params()
        .iter()
        .map(|info| {
            let (table, tensors, failure) = (&table, &tensors, &failure);
            WholeTensor {
                name: info.name.clone(),
                shape: info.shape.clone(),
                fill: Box::new(move |values: &mut Vec<f32>| {
                    if let Err(e) = assemble_into(table, tensors, &info.name, &info.shape, values) {
                        failure.borrow_mut().get_or_insert(e.into());
                    }
                }),
            }
        })
        .collect();
    let count = whole.len();
    let state = TrainingState {
        step: 0,
        consumed_samples: 0,
        config_toml: run.to_toml(),
    };
    let written = checkpoint::write_whole(out, whole, &state);
    if let Some(error) = failure.borrow_mut().take() {
        let _ = std::fs::remove_dir_all(out);
        return Err(error.context(format!("reading {}", hf.display())));
    }
    written?;
    let bytes = Checkpoint::open(out)?
        .index()
        .files
        .values()
        .map(|f| f.bytes)
        .sum();
    Ok(Converted {
        tensors: count,
        files: 1,
        bytes,
    })
}
