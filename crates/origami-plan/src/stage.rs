//! What each pipeline stage holds: its layers (through `origami-schedule`'s split), their
//! parameters on one rank, and the work of one micro-batch on them.

use origami_schedule::StageLayers;

use crate::work::{LayerWork, WorkInputs};
use crate::{Layout, ModelShape};

/// Parameter elements one rank of a stage holds, by how they are reduced.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankParams {
    /// Dense parameters split over tp (reduced over dp-cp).
    pub tensor_parallel: f64,
    /// Dense parameters every tp rank holds whole (also summed over tp).
    pub replicated: f64,
    /// Expert parameters (reduced over edp).
    pub experts: f64,
}

impl RankParams {
    /// Dense parameters (reduced over dp-cp).
    pub fn dense(&self) -> f64 {
        self.tensor_parallel + self.replicated
    }

    /// Every parameter.
    pub fn total(&self) -> f64 {
        self.dense() + self.experts
    }
}

/// One stage: its layer counts and one rank's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// Stage index.
    pub index: usize,
    /// Dense layers it holds (all chunks).
    pub dense_layers: usize,
    /// MoE layers it holds (all chunks).
    pub moe_layers: usize,
    /// It holds the embedding.
    pub first: bool,
    /// It holds the final norm, output layer and loss.
    pub last: bool,
    /// One rank's parameters.
    pub params: RankParams,
}

/// The stages of `model` split evenly over `layout`'s pipeline.
pub fn stages(model: &ModelShape, layout: &Layout, split: &StageLayers) -> Vec<Stage> {
    let (tp, experts_split) = (layout.tp as f64, (layout.ep * layout.etp) as f64);
    let vocab_rows = (model.vocab as f64 / tp).ceil();
    let h = model.hidden as f64;
    (0..layout.pp)
        .map(|index| {
            let mut stage = Stage {
                index,
                dense_layers: 0,
                moe_layers: 0,
                first: index == 0,
                last: index + 1 == layout.pp,
                params: RankParams::default(),
            };
            for chunk in 0..layout.vpp {
                for layer in split.layers(index, chunk) {
                    let p = model.layer_params(layer);
                    stage.params.tensor_parallel += p.tensor_parallel / tp;
                    stage.params.replicated += p.replicated;
                    stage.params.experts += p.experts / experts_split;
                    if model.moe_layers[layer] {
                        stage.moe_layers += 1;
                    } else {
                        stage.dense_layers += 1;
                    }
                }
            }
            if stage.first {
                stage.params.tensor_parallel += vocab_rows * h;
            }
            if stage.last {
                stage.params.replicated += h;
                // Untied: its own output layer; tied across stages: the last stage's copy.
                if !model.tied_embeddings || layout.pp > 1 {
                    stage.params.tensor_parallel += vocab_rows * h;
                }
            }
            stage
        })
        .collect()
}

/// The work of one micro-batch of every kind of layer a stage may hold.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerKinds {
    /// A dense layer.
    pub dense: LayerWork,
    /// An MoE layer.
    pub moe: LayerWork,
    /// The embedding (first stage).
    pub embedding: LayerWork,
    /// Final norm, output layer and loss (last stage).
    pub output: LayerWork,
}

impl LayerKinds {
    /// Every kind's work under `inputs`.
    pub fn new(inputs: &WorkInputs) -> Self {
        LayerKinds {
            dense: inputs.dense_layer(),
            moe: inputs.moe_layer(),
            embedding: inputs.embedding_layer(),
            output: inputs.output_layer(),
        }
    }

    /// The layers of `stage` with how many times each runs per micro-batch.
    pub fn of<'a>(&'a self, stage: &Stage) -> Vec<(&'a LayerWork, f64)> {
        let mut parts = vec![
            (&self.dense, stage.dense_layers as f64),
            (&self.moe, stage.moe_layers as f64),
        ];
        if stage.first {
            parts.push((&self.embedding, 1.0));
        }
        if stage.last {
            parts.push((&self.output, 1.0));
        }
        parts.retain(|(_, count)| *count > 0.0);
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::tests::small;

    #[test]
    fn parameters_per_stage_add_up_to_the_model() {
        // small over pp 2 · vpp 2, tp 2, ep 4 etp 1: each rank of the four stages' worth
        // of parameters, scaled back by the splits, is the whole model.
        let model = small();
        let layout: Layout = "tp=2 pp=2 vpp=2 ep=4".parse().unwrap();
        let split = StageLayers::new(8, 2, 2, None, None).unwrap();
        let stages = stages(&model, &layout, &split);
        assert_eq!((stages[0].moe_layers, stages[1].moe_layers), (4, 4));
        let whole: f64 = stages
            .iter()
            .map(|s| s.params.tensor_parallel * 2.0 + s.params.replicated + s.params.experts * 4.0)
            .sum();
        assert_eq!(whole, model.total_params());
        // The first stage holds the embedding: 8192 / 2 vocabulary rows of 512.
        let layer = model.layer_params(0);
        let expected = 4.0 * layer.tensor_parallel / 2.0 + 4096.0 * 512.0;
        assert_eq!(stages[0].params.tensor_parallel, expected);
    }
}
