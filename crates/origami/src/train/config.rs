//! The run configuration: a TOML file with sections `model`, `parallel`, `train`, `data` and
//! `checkpoint` (the MoE settings live in `model.moe`), every key overridable from the command
//! line as `--set section.key=value` (the value is read as TOML, or as a string if it is not).
//!
//! The embedded `configs/shakespeare.toml` is the one source of defaults: a user's file is
//! merged over it key by key, then the overrides are applied.

use crate::compute::{Compute, PrecisionSetting};
use crate::layers::context_parallel::CpCommType;
use crate::layers::recompute::Recompute;
use crate::model::config::ModelConfig;
use crate::model::gpt::sequence_split;
use crate::model::parallel::{check_split, SplitSizes};
use crate::optim::adamw::AdamWConfig;
use crate::optim::lr_schedule::LrSchedule;
use crate::toml_override::apply_override;
use anyhow::{bail, Context};
use origami_parallel::ParallelConfig;
use origami_schedule::{PipelineConfig, StageLayers};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Parallel layout of the run: the attention side's tp × cp × dp and the MoE side's
/// etp × ep × edp over the same `world` ranks (dp and edp follow from the world).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// Total ranks.
    pub world: usize,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Context-parallel size.
    pub cp: usize,
    /// Pipeline-parallel size (shared by both mappings).
    pub pp: usize,
    /// Model chunks per pipeline stage (virtual stages; > 1 runs the interleaved schedule).
    pub vpp: usize,
    /// Layers of the first pipeline stage, when the split is uneven (the stages without a
    /// count share the rest evenly).
    #[serde(default)]
    pub pp_first_stage_layers: Option<usize>,
    /// Layers of the last pipeline stage, when the split is uneven.
    #[serde(default)]
    pub pp_last_stage_layers: Option<usize>,
    /// Interleaved schedule: micro-batches run on one chunk before the next (default pp).
    #[serde(default)]
    pub microbatch_group_size: Option<usize>,
    /// Expert-parallel size.
    pub ep: usize,
    /// Expert-tensor-parallel size (defaults to `tp`).
    pub etp: Option<usize>,
    /// How context-parallel attention exchanges keys and values: `p2p` (ring) or `a2a`.
    #[serde(default)]
    pub cp_comm_type: CpCommType,
    /// Shard the AdamW state over the data-parallel ranks (reduce-scatter gradients,
    /// all-gather parameters).
    #[serde(default)]
    pub distributed_optimizer: bool,
    /// Gradient reductions are issued in buckets of at most this many elements.
    #[serde(default = "default_bucket_elements")]
    pub bucket_elements: usize,
}

fn default_bucket_elements() -> usize {
    1 << 22
}

impl ParallelSection {
    /// The sizes as the layout code takes them.
    pub fn config(&self) -> ParallelConfig {
        ParallelConfig {
            tp: self.tp,
            cp: self.cp,
            pp: self.pp,
            vpp: self.vpp,
            ep: self.ep,
            etp: self.etp,
            ..ParallelConfig::default()
        }
    }

    /// The pipeline shape of one step with `micro_batches` micro-batches per pipeline.
    pub fn pipeline(&self, micro_batches: usize) -> PipelineConfig {
        PipelineConfig {
            stages: self.pp,
            chunks: self.vpp,
            micro_batches,
            group_size: self.microbatch_group_size,
        }
    }

    /// The two mappings in one line, e.g.
    /// `world 4 | attention TP2 CP1 DP2 | MoE ETP1 EP4 EDP1`; with a pipeline both mappings
    /// show its size, then the schedule, e.g. `… DP2 PP2 | MoE … EDP1 PP2 | pipeline 1F1B`.
    pub fn describe(&self) -> String {
        let etp = self.etp.unwrap_or(self.tp);
        let pp = if self.pp > 1 {
            format!(" PP{}", self.pp)
        } else {
            String::new()
        };
        let mut line = format!(
            "world {} | attention TP{} CP{} DP{}{pp} | MoE ETP{} EP{} EDP{}{pp}",
            self.world,
            self.tp,
            self.cp,
            self.world / (self.tp * self.cp * self.pp).max(1),
            etp,
            self.ep,
            self.world / (etp * self.ep * self.pp).max(1),
        );
        if self.pp > 1 {
            line += &if self.vpp > 1 {
                format!(" | pipeline interleaved, VPP{}", self.vpp)
            } else {
                " | pipeline 1F1B".to_string()
            };
            let count = |n: Option<usize>| n.map_or("even".to_string(), |n| n.to_string());
            if self.pp_first_stage_layers.is_some() || self.pp_last_stage_layers.is_some() {
                line += &format!(
                    ", layers of the first stage {}, of the last {}",
                    count(self.pp_first_stage_layers),
                    count(self.pp_last_stage_layers)
                );
            }
        }
        if self.cp > 1 {
            line += &format!(" | cp_comm_type {:?}", self.cp_comm_type).to_lowercase();
        }
        line
    }
}

/// Training loop settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub steps: u64,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Sequences per optimizer step (a multiple of `micro_batch`; the rest is accumulated).
    pub global_batch: usize,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Learning-rate schedule.
    pub lr: LrSchedule,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    pub eval_interval: u64,
    /// Validation micro-batches per evaluation.
    pub eval_batches: usize,
    /// Kernel threads (0: all cores).
    pub threads: usize,
    /// GEMM precision: `auto` (bf16 where the CPU has AVX512_BF16, else f32), `f32` or `bf16`.
    #[serde(default)]
    pub precision: PrecisionSetting,
    /// Choose the precision as on a CPU without AVX512_BF16 (`auto` then trains in f32; `bf16`
    /// runs the portable kernel).
    #[serde(default)]
    pub disable_avx512_bf16: bool,
    /// What each block's backward recomputes: `none`, `selective` or `full`.
    #[serde(default)]
    pub recompute: Recompute,
}

impl TrainSection {
    /// The precision the run computes in on this CPU.
    pub fn compute(&self) -> Compute {
        Compute::resolve(self.precision, self.disable_avx512_bf16)
    }
}

/// Where the training text comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Prefix of the prepared indexed dataset (`PREFIX.bin` / `PREFIX.idx`).
    pub prefix: PathBuf,
    /// Raw text (`.jsonl` or `.txt`) to prepare into `prefix` when it does not exist yet.
    pub source: Option<PathBuf>,
    /// Tokenizer: `byte` or a path to a HuggingFace `tokenizer.json`.
    pub tokenizer: String,
    /// JSON key of the text in `.jsonl` sources.
    pub json_key: String,
    /// Train/validation/test split weights over documents, e.g. `"90,10,0"`.
    pub split: String,
}

/// Checkpointing and run outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Directory of this run's outputs (checkpoints, metrics, plot).
    pub dir: PathBuf,
    /// Save every this many steps (0: only at the end).
    pub interval: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep: usize,
}

/// A whole run configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Model architecture.
    pub model: ModelConfig,
    /// Parallel layout.
    pub parallel: ParallelSection,
    /// Training loop.
    pub train: TrainSection,
    /// Data.
    pub data: DataSection,
    /// Checkpoints and outputs.
    pub checkpoint: CheckpointSection,
}

/// The quick-start configuration compiled into the binary (`configs/shakespeare.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../../configs/shakespeare.toml");

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig::from_toml("", &[]).expect("the embedded default config is valid")
    }
}

impl RunConfig {
    /// Parses TOML text, applies `section.key=value` overrides, and validates the result.
    pub fn from_toml(text: &str, overrides: &[String]) -> anyhow::Result<Self> {
        let mut tree: toml::Table =
            toml::from_str(DEFAULT_CONFIG).expect("the embedded default config parses");
        let user: toml::Table = toml::from_str(text).context("parsing the TOML config")?;
        merge(&mut tree, user);
        for item in overrides {
            apply_override(&mut tree, item, "train.steps=100")?;
        }
        let config: RunConfig = toml::Value::Table(tree)
            .try_into()
            .context("reading the config")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings that the types cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.model.validate()?;
        let t = &self.train;
        if t.micro_batch == 0 || t.seq_len == 0 || t.steps == 0 {
            bail!("train.micro_batch, train.seq_len and train.steps must be positive");
        }
        if t.global_batch == 0 || !t.global_batch.is_multiple_of(t.micro_batch) {
            bail!(
                "train.global_batch = {} must be a positive multiple of train.micro_batch = {}",
                t.global_batch,
                t.micro_batch
            );
        }
        if t.seq_len > self.model.max_seq_len {
            bail!(
                "train.seq_len = {} exceeds model.max_seq_len = {}",
                t.seq_len,
                self.model.max_seq_len
            );
        }
        let p = &self.parallel;
        let layout = p
            .config()
            .layout(p.world)
            .with_context(|| format!("parallel: {}", p.describe()))?;
        let sizes = SplitSizes {
            tp: p.tp,
            cp: p.cp,
            ep: p.ep,
            etp: layout.etp(),
        };
        check_split(&self.model, &sizes, p.cp_comm_type)?;
        let dp = layout.dp();
        if !t.global_batch.is_multiple_of(t.micro_batch * dp) {
            bail!(
                "train.global_batch = {} must be a multiple of train.micro_batch × data-parallel size = {} × {dp} (each data-parallel rank runs the same number of micro-batches)",
                t.global_batch,
                t.micro_batch
            );
        }
        sequence_split(t.seq_len, p.tp, p.cp).map_err(|e| anyhow::anyhow!("train.seq_len: {e}"))?;
        StageLayers::new(
            self.model.num_layers,
            p.pp,
            p.vpp,
            p.pp_first_stage_layers,
            p.pp_last_stage_layers,
        )?;
        let per_pipeline = t.global_batch / (t.micro_batch * dp);
        p.pipeline(per_pipeline).validate().with_context(|| {
            format!(
                "{per_pipeline} micro-batches per pipeline (train.global_batch {} / (train.micro_batch {} × dp {dp}))",
                t.global_batch, t.micro_batch
            )
        })?;
        if p.bucket_elements == 0 {
            bail!("parallel.bucket_elements must be positive");
        }
        Ok(())
    }

    /// The config as TOML text (stored in checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config serialises")
    }
}

/// Merges `overlay` into `base`: tables key by key, any other value replaced.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        RunConfig::default().validate().unwrap();
    }

    #[test]
    fn a_user_file_overrides_only_what_it_names() {
        let c = RunConfig::from_toml("[train]\nsteps = 5\n[model.moe]\nnum_experts = 4\n", &[])
            .unwrap();
        let d = RunConfig::default();
        assert_eq!((c.train.steps, c.model.moe.num_experts), (5, 4));
        assert_eq!(
            (c.train.seq_len, c.model.moe.topk, c.data.tokenizer.as_str()),
            (d.train.seq_len, d.model.moe.topk, "byte")
        );
    }

    #[test]
    fn overrides_reach_nested_fields_and_typos_are_rejected() {
        let c = RunConfig::from_toml(
            DEFAULT_CONFIG,
            &[
                "train.steps=7".into(),
                "model.moe.topk=1".into(),
                "train.lr.lr=0.01".into(),
                "data.tokenizer=byte".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.train.steps, c.model.moe.topk, c.train.lr.lr),
            (7, 1, 0.01)
        );
        let err = RunConfig::from_toml(DEFAULT_CONFIG, &["train.stepz=7".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("stepz"), "{err:#}");
        assert!(RunConfig::from_toml(DEFAULT_CONFIG, &["train=7".into()]).is_err());
    }

    #[test]
    fn batch_constraints_name_the_numbers() {
        let err = RunConfig::from_toml(
            DEFAULT_CONFIG,
            &["train.global_batch=12".into(), "train.micro_batch=8".into()],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("global_batch = 12")
                && err.to_string().contains("micro_batch = 8"),
            "{err}"
        );
    }
}
