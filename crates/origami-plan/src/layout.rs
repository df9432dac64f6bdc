//! One candidate layout: the parallel sizes of both folded mappings and the micro-batch size,
//! written `tp=2 cp=1 pp=8 vpp=1 ep=8 etp=1 mbs=1`, and where the pipeline's first or last
//! stage holds its own number of layers (`first=… last=…`, as the trainer's
//! `parallel.pp_first_stage_layers` and `pp_last_stage_layers`).

use std::fmt;
use std::str::FromStr;

use origami_parallel::{ModelDims, ParallelConfig, ParallelError, ParallelLayout};
use serde::{Serialize, Serializer};

use crate::{ModelShape, PlanError};

/// Parallel sizes and micro-batch size; dp and edp follow from the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Layout {
    /// Tensor parallel of attention and dense layers.
    pub tp: usize,
    /// Context parallel.
    pub cp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Model chunks per stage (interleaved schedule when > 1).
    pub vpp: usize,
    /// Expert parallel.
    pub ep: usize,
    /// Expert tensor parallel.
    pub etp: usize,
    /// Sequences per micro-batch.
    pub mbs: usize,
    /// Layers of the first pipeline stage, when not the even share.
    pub first: Option<usize>,
    /// Layers of the last pipeline stage, when not the even share.
    pub last: Option<usize>,
}

const KEYS: [&str; 9] = ["tp", "cp", "pp", "vpp", "ep", "etp", "mbs", "first", "last"];

impl Layout {
    /// The parallel configuration (default order `tp-cp-ep-dp-pp`).
    pub fn parallel_config(&self) -> ParallelConfig {
        ParallelConfig {
            tp: self.tp,
            cp: self.cp,
            pp: self.pp,
            vpp: self.vpp,
            ep: self.ep,
            etp: Some(self.etp),
            ..ParallelConfig::default()
        }
    }

    /// Resolves the sizes over `world` ranks and checks them against the model, the sequence
    /// and the global batch; returns the validated parallel layout and the micro-batches per
    /// step on each pipeline.
    pub fn resolve(
        &self,
        model: &ModelShape,
        world: usize,
        global_batch: usize,
        seq: usize,
    ) -> Result<(ParallelLayout, usize), PlanError> {
        let parallel = self.parallel_config().layout(world)?;
        let checked = parallel.check_model(&ModelDims {
            num_layers: model.layers,
            num_heads: model.heads,
            num_query_groups: model.query_groups,
            num_experts: if model.has_experts() {
                model.experts
            } else {
                1
            },
        });
        match checked {
            // An uneven split need not divide; the split itself checks it.
            Err(ParallelError::LayersNotDivisible { .. }) if self.is_uneven() => {}
            other => other?,
        }
        let dense_layers = model.moe_layer_count() < model.layers;
        for (what, ffn) in [
            ("dense FFN", if dense_layers { model.dense_ffn } else { 0 }),
            ("shared-expert FFN", model.shared_expert_ffn),
        ] {
            if !ffn.is_multiple_of(self.tp) {
                return Err(PlanError::FfnNotDivisible {
                    what,
                    ffn,
                    tp: self.tp,
                });
            }
        }
        if model.has_experts() && !model.expert_ffn.is_multiple_of(self.etp) {
            return Err(PlanError::ExpertFfnNotDivisible {
                ffn: model.expert_ffn,
                etp: self.etp,
            });
        }
        if self.cp > 1 && !seq.is_multiple_of(2 * self.cp) {
            return Err(PlanError::SequenceNotDivisible {
                seq,
                what: "2·cp",
                parts: 2 * self.cp,
            });
        }
        if !seq.is_multiple_of(self.cp * self.tp) {
            return Err(PlanError::SequenceNotDivisible {
                seq,
                what: "tp·cp",
                parts: self.tp * self.cp,
            });
        }
        let dp = parallel.dp();
        if self.mbs == 0 || !global_batch.is_multiple_of(self.mbs * dp) {
            return Err(PlanError::BatchNotDivisible {
                global_batch,
                micro_batch: self.mbs,
                dp,
            });
        }
        Ok((parallel, global_batch / (self.mbs * dp)))
    }

    /// Whether the first or the last stage holds its own number of layers.
    pub fn is_uneven(&self) -> bool {
        self.first.is_some() || self.last.is_some()
    }

    /// Whether this layout is possible without folding (Megatron-Core before it): experts
    /// tensor-parallel like attention (etp = tp) and every ep group a sub-group of a dp group.
    /// With pp the slowest axis, dp groups step over ranks `tp·cp` apart and ep groups `etp`
    /// apart, so ep > 1 also needs cp = 1, and ep must divide dp.
    pub fn is_unfolded(&self, world: usize) -> bool {
        let dp = world / (self.tp * self.cp * self.pp);
        self.etp == self.tp && (self.ep == 1 || (self.cp == 1 && dp.is_multiple_of(self.ep)))
    }

    /// The no-folding rule as an error naming the numbers.
    pub fn check_unfolded(&self, world: usize) -> Result<(), PlanError> {
        if self.is_unfolded(world) {
            return Ok(());
        }
        Err(PlanError::NotUnfolded {
            tp: self.tp,
            etp: self.etp,
            cp: self.cp,
            ep: self.ep,
            dp: world / (self.tp * self.cp * self.pp),
        })
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tp={} cp={} pp={} vpp={} ep={} etp={} mbs={}",
            self.tp, self.cp, self.pp, self.vpp, self.ep, self.etp, self.mbs
        )?;
        if let Some(first) = self.first {
            write!(f, " first={first}")?;
        }
        if let Some(last) = self.last {
            write!(f, " last={last}")?;
        }
        Ok(())
    }
}

impl Serialize for Layout {
    /// As its `key=value` text.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl FromStr for Layout {
    type Err = PlanError;

    /// `key=value` pairs separated by spaces or commas; sizes left out are 1, `first` and
    /// `last` the even share.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let problem = |problem: String| PlanError::LayoutSyntax {
            text: text.to_string(),
            problem,
        };
        let mut values = [None::<usize>; 9];
        for pair in text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| problem(format!("`{pair}` is not key=value")))?;
            let slot = KEYS.iter().position(|k| *k == key.trim()).ok_or_else(|| {
                problem(format!("unknown key `{key}` (known: {})", KEYS.join(" ")))
            })?;
            if values[slot].is_some() {
                return Err(problem(format!("`{key}` given twice")));
            }
            let value: usize = value
                .trim()
                .parse()
                .map_err(|_| problem(format!("`{value}` is not a whole number (for {key})")))?;
            if value == 0 {
                return Err(problem(format!("{key} must be at least 1")));
            }
            values[slot] = Some(value);
        }
        let [tp, cp, pp, vpp, ep, etp, mbs, first, last] = values;
        let [tp, cp, pp, vpp, ep, etp, mbs] =
            [tp, cp, pp, vpp, ep, etp, mbs].map(|v| v.unwrap_or(1));
        Ok(Layout {
            tp,
            cp,
            pp,
            vpp,
            ep,
            etp,
            mbs,
            first,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::tests::small;

    #[test]
    fn parses_prints_and_defaults_missing_keys_to_one() {
        let text = "tp=2 cp=1 pp=8 vpp=1 ep=8 etp=1 mbs=1";
        let layout: Layout = text.parse().unwrap();
        assert_eq!(layout.to_string(), text);
        let layout: Layout = "ep=4, tp=2".parse().unwrap();
        assert_eq!((layout.tp, layout.ep, layout.pp, layout.mbs), (2, 4, 1, 1));
        assert!(!layout.is_uneven());
        let uneven: Layout = "pp=4 last=6 first=8".parse().unwrap();
        assert_eq!(
            uneven.to_string(),
            "tp=1 cp=1 pp=4 vpp=1 ep=1 etp=1 mbs=1 first=8 last=6"
        );
        assert_eq!((uneven.first, uneven.last), (Some(8), Some(6)));
        assert!(uneven.is_uneven());
        for (bad, says) in [
            ("tp=2 xp=3", "unknown key `xp`"),
            ("tp=two", "`two` is not a whole number"),
            ("tp=2 tp=4", "given twice"),
            ("tp", "is not key=value"),
            ("ep=0", "ep must be at least 1"),
        ] {
            let message = bad.parse::<Layout>().unwrap_err().to_string();
            assert!(message.contains(says), "{bad}: {message}");
        }
    }

    #[test]
    fn resolving_checks_world_model_sequence_and_batch() {
        let model = small();
        let layout: Layout = "tp=2 ep=4 mbs=2".parse().unwrap();
        let (parallel, micro_batches) = layout.resolve(&model, 4, 4, 1024).unwrap();
        assert_eq!((parallel.dp(), parallel.edp(), micro_batches), (2, 1, 1));
        let message = |l: &str, world, batch, seq| {
            l.parse::<Layout>()
                .unwrap()
                .resolve(&model, world, batch, seq)
                .unwrap_err()
                .to_string()
        };
        assert!(message("tp=3", 6, 2, 1024).contains("heads"));
        assert!(message("tp=2 ep=4 mbs=3", 4, 4, 1024).contains("global batch 4"));
        assert!(message("cp=3", 3, 3, 1024).contains("2·cp = 6"));
        assert!(message("ep=3", 3, 3, 1024).contains("16 is not divisible by ep = 3"));
        assert!(message("tp=3 cp=1", 5, 5, 1024).contains("world size 5"));
        assert!(message("etp=3", 3, 3, 1023).contains("expert FFN 1024"));
        // small's 8 layers do not divide by 3 stages, unless the first or last has its own.
        assert!(message("pp=3", 3, 3, 1024).contains("layers 8 is not divisible by pp·vpp = 3·1"));
        assert!("pp=3 first=2"
            .parse::<Layout>()
            .unwrap()
            .resolve(&model, 3, 3, 1024)
            .is_ok());
        let mut dense = model.clone();
        dense.moe_layers[0] = false;
        dense.dense_ffn = 1002;
        let message = "tp=4"
            .parse::<Layout>()
            .unwrap()
            .resolve(&dense, 4, 4, 1024)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("dense FFN 1002 is not divisible by tp = 4"),
            "{message}"
        );
    }

    #[test]
    fn no_folding_keeps_experts_inside_data_parallel() {
        // 128 ranks, tp 2, pp 8: dp 8. ep 4 with etp 2 is unfolded; ep 8 with etp 1 is not;
        // ep 16 does not fit inside dp 8.
        let unfolded: Layout = "tp=2 pp=8 ep=4 etp=2".parse().unwrap();
        assert!(unfolded.is_unfolded(128));
        let folded: Layout = "tp=2 pp=8 ep=8 etp=1".parse().unwrap();
        assert!(!folded.is_unfolded(128));
        let too_wide: Layout = "tp=2 pp=8 ep=16 etp=2".parse().unwrap();
        assert!(too_wide
            .check_unfolded(128)
            .unwrap_err()
            .to_string()
            .contains("ep = 16, dp = 8"));
        // With cp > 1 the ep groups would lie over the cp axis: folding.
        let over_cp: Layout = "tp=1 cp=2 pp=8 ep=8 etp=1".parse().unwrap();
        assert!(!over_cp.is_unfolded(128));
        let no_experts: Layout = "tp=2 cp=2 pp=8 ep=1 etp=2".parse().unwrap();
        assert!(no_experts.is_unfolded(128));
    }
}
