//! `origami convert`: an origami checkpoint (any layout) to a HuggingFace directory, or a
//! HuggingFace Mixtral / Qwen2-MoE directory to an origami checkpoint.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use origami::convert::{from_hf, to_hf};
use origami::tensor_files::Precision;

/// Arguments of `origami convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// origami checkpoint (or run directory) to export.
    #[arg(long, requires = "to_hf", conflicts_with_all = ["hf", "to_checkpoint"])]
    pub checkpoint: Option<PathBuf>,
    /// HuggingFace directory to write (must not exist).
    #[arg(long)]
    pub to_hf: Option<PathBuf>,
    /// Precision of the exported tensors: bf16 or f32.
    #[arg(long, default_value = "bf16", value_parser = parse_precision)]
    pub dtype: Precision,
    /// Largest shard of the export, in bytes of tensor data.
    #[arg(long, default_value_t = 2 << 30)]
    pub max_shard_bytes: u64,
    /// HuggingFace Mixtral or Qwen2-MoE directory to import.
    #[arg(long, requires = "to_checkpoint")]
    pub hf: Option<PathBuf>,
    /// origami checkpoint directory to write (must not exist).
    #[arg(long)]
    pub to_checkpoint: Option<PathBuf>,
}

fn parse_precision(value: &str) -> Result<Precision, String> {
    match value {
        "bf16" => Ok(Precision::Bf16),
        "f32" => Ok(Precision::F32),
        other => Err(format!("unknown dtype {other:?} (bf16 or f32)")),
    }
}

/// Converts and prints one JSON line: what was written and how long it took.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let converted = match (args.checkpoint, args.to_hf, args.hf, args.to_checkpoint) {
        (Some(checkpoint), Some(out), None, None) => {
            let dir = origami::train::checkpoint::resolve(&checkpoint)?;
            to_hf(&dir, &out, args.dtype, args.max_shard_bytes)?
        }
        (None, None, Some(hf), Some(out)) => from_hf(&hf, &out)?,
        _ => anyhow::bail!(
            "give either --checkpoint DIR --to-hf OUT, or --hf DIR --to-checkpoint OUT"
        ),
    };
    let mut line = serde_json::to_value(&converted)?;
    line["seconds"] = started.elapsed().as_secs_f64().into();
    println!("{line}");
    Ok(())
}
