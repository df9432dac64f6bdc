//! Loads HuggingFace safetensors weights into origami's parameter buffers, one tensor at a
//! time, by the name table of [`super::names`] (either expert layout, either family).

use super::names::{mapped_tensors, ExpertLayout, HfFamily, Mapped};
use super::HfError;
use crate::model::config::ModelConfig;
use crate::model::gpt::GptModel;
use crate::params::region::for_each_row;
use crate::params::Buffers;
use crate::tensor_files::TensorFile;
use std::collections::HashMap;
use std::path::Path;

/// The tensors of a checkpoint (one or more safetensors files), read one at a time on demand
/// and converted to f32, so that memory stays near one tensor.
pub struct HfTensors {
    files: Vec<TensorFile>,
    /// Each tensor's file.
    file_of: HashMap<String, usize>,
}

impl HfTensors {
    /// Opens `model.safetensors`, or every `*.safetensors` shard in `dir` (headers only).
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| HfError::Io(dir.display().to_string(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(HfError::Weights(format!(
                "no .safetensors file in {}",
                dir.display()
            )));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut file_of = HashMap::new();
        for path in paths {
            let file = TensorFile::open(&path)?;
            for (name, _) in file.keys() {
                file_of.insert(name, files.len());
            }
            files.push(file);
        }
        Ok(HfTensors { files, file_of })
    }

    /// The values of tensor `name`, which must have `shape` (an error names the file if not).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, HfError> {
        let &file = self
            .file_of
            .get(name)
            .ok_or_else(|| HfError::MissingTensor(name.to_string()))?;
        Ok(self.files[file].read(name, shape)?)
    }

    /// Checks that tensor `name` exists with `shape` (headers only); the error names the file.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<(), HfError> {
        let &file = self
            .file_of
            .get(name)
            .ok_or_else(|| HfError::MissingTensor(name.to_string()))?;
        let file = &self.files[file];
        match file.shape(name) {
            Some(found) if found == shape => Ok(()),
            found => Err(HfError::Weights(format!(
                "{}: tensor {name} has shape {found:?}, but config.json implies {shape:?}",
                file.path()
            ))),
        }
    }

    /// Whether the checkpoint holds tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.file_of.contains_key(name)
    }
}

/// How the checkpoint in `tensors` names things: the family by its MoE block's name, the
/// expert layout by the first MoE layer's tensors.
pub fn detect_layout(config: &ModelConfig, tensors: &HfTensors) -> (HfFamily, ExpertLayout) {
    let first_moe = (0..config.num_layers).find(|&l| config.is_moe_layer(l));
    let Some(l) = first_moe else {
        return (HfFamily::Qwen2Moe, ExpertLayout::PerExpert);
    };
    let family = if tensors.has(&format!("model.layers.{l}.block_sparse_moe.gate.weight")) {
        HfFamily::Mixtral
    } else {
        HfFamily::Qwen2Moe
    };
    let block = if family == HfFamily::Mixtral {
        "block_sparse_moe"
    } else {
        "mlp"
    };
    let fused = tensors.has(&format!("model.layers.{l}.{block}.experts.gate_up_proj"));
    (
        family,
        if fused {
            ExpertLayout::Fused
        } else {
            ExpertLayout::PerExpert
        },
    )
}

/// The values of origami parameter `name` (global shape `shape`), assembled from the HF
/// tensors the table maps onto it; elements no HF tensor holds (an expert-bias buffer) are 0.
pub fn assemble(
    table: &[Mapped],
    tensors: &HfTensors,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, HfError> {
    let mut values = Vec::new();
    assemble_into(table, tensors, name, shape, &mut values)?;
    Ok(values)
}

/// [`assemble`] into `values` (cleared first), so a caller's buffer is filled without a copy.
pub fn assemble_into(
    table: &[Mapped],
    tensors: &HfTensors,
    name: &str,
    shape: &[usize],
    values: &mut Vec<f32>,
) -> Result<(), HfError> {
    values.clear();
    values.resize(shape.iter().product(), 0.0);
    for m in table.iter().filter(|m| m.origami == name) {
        let part = tensors.get(&m.hf, &m.shape)?;
        let block = m.region.as_block().expect("table regions are blocks");
        for_each_row(&block, &block, shape, &block.offset, |from, to, len| {
            values[to..to + len].copy_from_slice(&part[from..from + len]);
        });
    }
    Ok(())
}

/// Every parameter of `model` (one rank, whole tensors) from the HF tensors.
pub fn load_parameters(model: &GptModel, tensors: &HfTensors) -> Result<Buffers, HfError> {
    let (family, experts) = detect_layout(model.config(), tensors);
    let table = mapped_tensors(model.config(), family, experts);
    let mut params = model.registry().zeros();
    for info in model.registry().params() {
        let values = assemble(&table, tensors, &info.name, &info.shape)?;
        params.get_mut(info.id).copy_from_slice(&values);
    }
    Ok(params)
}
