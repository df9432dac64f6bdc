//! Hardware descriptions: what a device computes and holds, how fast its links move bytes, and
//! what the training engine on it overlaps. Read from TOML; `h100-dgx` is embedded, `local` is
//! written by `origami plan --calibrate`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{MixedPrecision, PlanError, Precision};

/// The shipped description of a DGX H100 node running Megatron-Core (sources in the file).
pub const H100_DGX: &str = include_str!("../hardware/h100-dgx.toml");

/// A cluster: devices, their links, the engine's overlap and its fixed memory costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// Short name (`h100-dgx`, `local`).
    pub name: String,
    /// One line on what this describes and where its numbers come from.
    pub description: String,
    /// One device (a rank).
    pub device: Device,
    /// Achieved fractions of the peaks.
    pub efficiency: Efficiency,
    /// Links inside a node and between nodes.
    pub network: Network,
    /// What the engine overlaps and how it stores sequence-parallel inputs.
    pub engine: Engine,
    /// Fixed memory costs.
    pub runtime: Runtime,
}

/// What one device computes and holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Dense peak FLOP/s in bf16 (absent: the device cannot train in bf16).
    pub peak_flops_bf16: Option<f64>,
    /// Dense peak FLOP/s in f32 (absent: the device cannot train in f32).
    pub peak_flops_f32: Option<f64>,
    /// Memory of one device, GiB.
    pub memory_gib: f64,
    /// Memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Devices per node (absent: every rank on one node).
    pub devices_per_node: Option<usize>,
    /// Whether the ranks of a node share one pool of cores and one memory (the local backend:
    /// threads of one process): the rates above are then the node's, shared by its ranks.
    pub shared_by_ranks: bool,
    /// Cores of a node whose ranks share them (absent: one device per rank).
    pub cores: Option<usize>,
    /// Memory bandwidth of one core, bytes/s, for work that runs on one thread (absent: none
    /// does).
    pub core_memory_bandwidth: Option<f64>,
}

/// Achieved fractions of the device's peaks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Efficiency {
    /// Dense GEMMs: fraction of peak FLOP/s once the operands are streamed.
    pub gemm: f64,
    /// Grouped expert GEMMs: the same fraction for one expert's GEMM of the group.
    pub grouped_gemm: f64,
    /// Attention core (scores, softmax, weighted values), forward and backward together.
    pub attention: f64,
    /// The attention core under context parallelism: masked blocks, one per key/value block
    /// of the ring, and their merges.
    pub context_attention: f64,
    /// Element-wise and memory-bound kernels: fraction of the memory bandwidth.
    pub memory: f64,
    /// The optimizer step (gradient norm, clipping and AdamW over a rank's shard): fraction of
    /// the memory bandwidth for the bytes the update is charged; `memory` where absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<f64>,
    /// The cross-entropy over the vocabulary (an exponential per logit, which a CPU computes
    /// slower than it streams the bytes): fraction of the memory bandwidth for the bytes it is
    /// charged; `memory` where absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_entropy: Option<f64>,
    /// The bf16 kernels' own fractions of the bf16 peak, where they differ from the ones above
    /// (`local`: the fields above are the f32 kernels', these the bf16 ones'); absent, the
    /// fields above serve both precisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16: Option<KernelEfficiency>,
}

/// The compute kernels' achieved fractions of one precision's peak.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelEfficiency {
    /// Dense GEMMs.
    pub gemm: f64,
    /// Grouped expert GEMMs.
    pub grouped_gemm: f64,
    /// Attention core, forward and backward.
    pub attention: f64,
    /// The attention core under context parallelism.
    pub context_attention: f64,
    /// The optimizer step, as a fraction of the memory bandwidth (see
    /// [`Efficiency::optimizer`]); absent, the one above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<f64>,
}

/// Bandwidth and latency of one collective on one kind of link.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Bus bandwidth per rank (nccl-tests' busbw), bytes/s.
    pub bandwidth: f64,
    /// Fixed cost of one call, seconds.
    pub latency: f64,
}

/// The rates of every collective on one kind of link.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRates {
    /// All-reduce.
    pub all_reduce: Rate,
    /// All-gather and reduce-scatter.
    pub all_gather: Rate,
    /// All-to-all.
    pub all_to_all: Rate,
    /// Point-to-point send/receive.
    pub p2p: Rate,
}

/// Links inside a node and between nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Between the devices of one node.
    pub intra_node: LinkRates,
    /// Between nodes, per device (its own network card); absent on a single node.
    pub inter_node: Option<LinkRates>,
    /// Whether a ring collective across nodes gains one network card per group member on a
    /// node (NCCL's rings, one per card); all-to-all never aggregates cards.
    pub rings_aggregate_nics: bool,
}

/// What the training engine overlaps, and how it keeps sequence-parallel inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engine {
    /// Tensor-parallel (SP) all-gathers and reduce-scatters run under the layer's GEMMs.
    pub overlap_tensor_parallel: bool,
    /// Context-parallel ring exchanges run under the attention core.
    pub overlap_context_parallel: bool,
    /// Gradient reduction runs under the backward of the last micro-batch.
    pub overlap_gradient_reduce: bool,
    /// The distributed optimizer's parameter all-gather runs under the next forward.
    pub overlap_param_gather: bool,
    /// The interleaved schedule's pipeline transfers run under the next chunk's compute.
    pub overlap_interleaved_pipeline: bool,
    /// Sequence-parallel GEMM inputs are kept as this rank's slice and gathered again in the
    /// backward (Megatron-Core); otherwise the gathered input is kept (origami).
    pub regather_sequence_parallel_inputs: bool,
    /// Cost of the MoE token dispatcher beyond its collectives and copies, seconds per byte of
    /// routed tokens (forward and backward together): host synchronisation on split sizes,
    /// unfused permutation and sorting, all-to-all-v below the link's collective rate.
    pub dispatch_overhead_per_byte: f64,
    /// The element-wise glue between kernels (residual adds, router scores, permutation) runs
    /// on each rank's own thread, one core, rather than as parallel kernels.
    pub serial_glue: bool,
    /// Rows of the output layer whose logits exist at once (origami computes them in chunks);
    /// absent: the whole micro-batch's logits (Megatron-Core).
    pub output_chunk_rows: Option<usize>,
    /// How bf16 mixed precision keeps weights, optimizer state and activations (absent:
    /// Megatron-Core's).
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
}

/// Fixed memory costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Per device: context, communication buffers, workspaces, allocator reserve. MiB.
    pub per_rank_mib: f64,
    /// Per process holding the ranks of a node (binary, libraries, thread pools). MiB.
    pub per_process_mib: f64,
    /// Heap the allocator keeps after freeing, per rank, at most this many MiB: glibc's malloc
    /// raises its mmap threshold to the largest block freed (up to 32 MiB) and keeps up to
    /// twice that at the top of the heap, so a rank retains `min(2 × largest tensor, cap)`;
    /// 64 for glibc, 0 where a caching allocator's reserve is in `per_rank_mib`.
    pub heap_retention_cap_mib: f64,
}

impl Hardware {
    /// Parses a description; unknown keys are errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Self, PlanError> {
        let hardware: Hardware = toml::from_str(text).map_err(|e| PlanError::HardwareFile {
            source_name: source.to_string(),
            message: e.to_string(),
        })?;
        hardware.validate(source)?;
        Ok(hardware)
    }

    /// Reads a description from a file.
    pub fn from_file(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::HardwareRead {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The embedded DGX H100 description.
    pub fn h100_dgx() -> Self {
        Self::from_toml(H100_DGX, "h100-dgx").expect("the shipped description parses")
    }

    /// The description as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a hardware description serialises")
    }

    /// Peak FLOP/s of one device in `precision`.
    pub fn peak_flops(&self, precision: Precision) -> Result<f64, PlanError> {
        let peak = match precision {
            Precision::Bf16 => self.device.peak_flops_bf16,
            Precision::F32 => self.device.peak_flops_f32,
        };
        peak.ok_or_else(|| PlanError::NoPeak {
            hardware: self.name.clone(),
            precision: precision.name(),
        })
    }

    /// The compute kernels' fractions of `precision`'s peak: `[efficiency.bf16]` in bf16 where
    /// the description has it, else the top-level fields.
    pub fn kernel_efficiency(&self, precision: Precision) -> KernelEfficiency {
        let e = &self.efficiency;
        let top = KernelEfficiency {
            gemm: e.gemm,
            grouped_gemm: e.grouped_gemm,
            attention: e.attention,
            context_attention: e.context_attention,
            optimizer: e.optimizer,
        };
        match (precision, e.bf16) {
            (Precision::Bf16, Some(bf16)) => KernelEfficiency {
                optimizer: bf16.optimizer.or(top.optimizer),
                ..bf16
            },
            _ => top,
        }
    }

    /// Devices per node for a world of `world` ranks.
    pub fn devices_per_node(&self, world: usize) -> usize {
        self.device.devices_per_node.unwrap_or(world).max(1)
    }

    fn validate(&self, source: &str) -> Result<(), PlanError> {
        let positive = |key: &'static str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(PlanError::HardwareValue {
                    source_name: source.to_string(),
                    key,
                    value,
                })
            }
        };
        let fraction = |key: &'static str, value: f64| {
            if value > 0.0 && value <= 1.0 {
                Ok(())
            } else {
                Err(PlanError::HardwareValue {
                    source_name: source.to_string(),
                    key,
                    value,
                })
            }
        };
        if let Some(peak) = self.device.peak_flops_bf16 {
            positive("device.peak_flops_bf16", peak)?;
        }
        if let Some(peak) = self.device.peak_flops_f32 {
            positive("device.peak_flops_f32", peak)?;
        }
        positive("device.memory_gib", self.device.memory_gib)?;
        positive("device.memory_bandwidth", self.device.memory_bandwidth)?;
        if let Some(rate) = self.device.core_memory_bandwidth {
            positive("device.core_memory_bandwidth", rate)?;
        }
        if self.engine.serial_glue && self.device.core_memory_bandwidth.is_none() {
            return Err(PlanError::HardwareValue {
                source_name: source.to_string(),
                key: "device.core_memory_bandwidth (needed by engine.serial_glue)",
                value: 0.0,
            });
        }
        if self.device.cores == Some(0) {
            return Err(PlanError::HardwareValue {
                source_name: source.to_string(),
                key: "device.cores",
                value: 0.0,
            });
        }
        fraction("efficiency.gemm", self.efficiency.gemm)?;
        fraction("efficiency.grouped_gemm", self.efficiency.grouped_gemm)?;
        fraction("efficiency.attention", self.efficiency.attention)?;
        fraction(
            "efficiency.context_attention",
            self.efficiency.context_attention,
        )?;
        fraction("efficiency.memory", self.efficiency.memory)?;
        if let Some(bf16) = &self.efficiency.bf16 {
            fraction("efficiency.bf16.gemm", bf16.gemm)?;
            fraction("efficiency.bf16.grouped_gemm", bf16.grouped_gemm)?;
            fraction("efficiency.bf16.attention", bf16.attention)?;
            fraction("efficiency.bf16.context_attention", bf16.context_attention)?;
            if let Some(optimizer) = bf16.optimizer {
                positive("efficiency.bf16.optimizer", optimizer)?;
            }
        }
        let links = std::iter::once(("network.intra_node", &self.network.intra_node)).chain(
            self.network
                .inter_node
                .as_ref()
                .map(|l| ("network.inter_node", l)),
        );
        for (_, link) in links {
            for rate in [link.all_reduce, link.all_gather, link.all_to_all, link.p2p] {
                positive("network bandwidth", rate.bandwidth)?;
                if rate.latency < 0.0 || !rate.latency.is_finite() {
                    return Err(PlanError::HardwareValue {
                        source_name: source.to_string(),
                        key: "network latency",
                        value: rate.latency,
                    });
                }
            }
        }
        if self.engine.dispatch_overhead_per_byte < 0.0 {
            return Err(PlanError::HardwareValue {
                source_name: source.to_string(),
                key: "engine.dispatch_overhead_per_byte",
                value: self.engine.dispatch_overhead_per_byte,
            });
        }
        if self.runtime.per_rank_mib < 0.0
            || self.runtime.per_process_mib < 0.0
            || self.runtime.heap_retention_cap_mib < 0.0
        {
            return Err(PlanError::HardwareValue {
                source_name: source.to_string(),
                key: "runtime",
                value: self.runtime.per_rank_mib.min(self.runtime.per_process_mib),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_h100_description_parses_with_the_issue_constants() {
        let h = Hardware::h100_dgx();
        assert_eq!(h.peak_flops(Precision::Bf16).unwrap(), 989.5e12);
        assert_eq!(h.device.devices_per_node, Some(8));
        assert!((h.device.memory_gib - 80.0).abs() < 0.5);
        // 400 Gb/s InfiniBand per GPU is 50 GB/s of line rate; achieved is below it.
        let ib = h.network.inter_node.unwrap();
        assert!(ib.all_to_all.bandwidth < 50e9);
        // NVLink 4: 450 GB/s per direction; achieved bus bandwidth is below it.
        assert!(h.network.intra_node.all_gather.bandwidth < 450e9);
        // The description round-trips through TOML.
        assert_eq!(Hardware::from_toml(&h.to_toml(), "again").unwrap(), h);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_them() {
        let with_extra = format!("{H100_DGX}\nwarp_speed = 9\n");
        let message = Hardware::from_toml(&with_extra, "extra.toml")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("extra.toml") && message.contains("warp_speed"),
            "{message}"
        );
        let bad = H100_DGX.replace("gemm = 0.", "gemm = 1.");
        let message = Hardware::from_toml(&bad, "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(message.contains("efficiency.gemm"), "{message}");
        assert!(Hardware::h100_dgx().peak_flops(Precision::F32).is_ok());
    }

    #[test]
    fn bf16_kernels_take_their_own_efficiencies_where_the_description_has_them() {
        let h = Hardware::h100_dgx();
        // Without [efficiency.bf16], both precisions read the top-level fields.
        assert_eq!(
            h.kernel_efficiency(Precision::Bf16),
            h.kernel_efficiency(Precision::F32)
        );
        assert_eq!(h.kernel_efficiency(Precision::Bf16).gemm, h.efficiency.gemm);
        assert_eq!(h.engine.mixed_precision, MixedPrecision::Megatron);
        let text = format!(
            "{H100_DGX}\n[efficiency.bf16]\ngemm = 0.51\ngrouped_gemm = 0.4\nattention = 0.3\ncontext_attention = 0.2\n"
        );
        let with = Hardware::from_toml(&text, "with-bf16.toml").unwrap();
        let bf16 = with.kernel_efficiency(Precision::Bf16);
        assert_eq!(
            (
                bf16.gemm,
                bf16.grouped_gemm,
                bf16.attention,
                bf16.context_attention
            ),
            (0.51, 0.4, 0.3, 0.2)
        );
        // The optimizer falls back to the top-level one; f32 is untouched.
        assert_eq!(bf16.optimizer, with.efficiency.optimizer);
        assert_eq!(
            with.kernel_efficiency(Precision::F32),
            h.kernel_efficiency(Precision::F32)
        );
        assert_eq!(Hardware::from_toml(&with.to_toml(), "again").unwrap(), with);
        let bad = text.replace("\ngemm = 0.51", "\ngemm = 1.51");
        let message = Hardware::from_toml(&bad, "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(message.contains("efficiency.bf16.gemm"), "{message}");
    }
}
