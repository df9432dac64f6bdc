//! AdamW across ranks: gradient reduction over the groups that replicate each parameter, global
//! norm clipping with every parameter counted once, and optionally a distributed optimizer
//! (ZeRO-1: each replica keeps the moments of, and updates, only its range of a buffer).
//!
//! One step, in order:
//! 1. sum over `tp` the gradients of dense parameters every tp rank holds whole (sequence
//!    parallelism gives each tp rank different tokens for norms, router, gates);
//! 2. sum the dense buffer over `dp_cp` and the expert buffer over `edp`: all-reduce, or, when
//!    distributed, reduce-scatter so each replica keeps the sum of its own range only;
//! 3. global norm: each rank's squares of the elements it owns (its range; the whole buffer on
//!    replica 0 when not distributed; whole-over-tp parameters on tp rank 0; trainable only;
//!    not a pipeline stage's duplicate of a tied parameter), summed over `world` — every stage
//!    of every pipeline, so each parameter counts once;
//! 4. clip and AdamW-update this rank's range (per element: the flags of its parameter);
//! 5. when distributed, all-gather the updated ranges so every replica holds the same values.
//!
//! Reductions are issued in buckets of at most `bucket_elements` elements; a distributed
//! buffer's ranges are contiguous, nearly equal and may cut a parameter in two.

mod collectives;
mod layout;

use std::ops::Range;
use std::sync::Arc;

use origami_comm::{Communicator, Result, SoloComm};
use origami_kernels::adamw::{adamw_update, AdamWStep};
use origami_kernels::grad_norm::{clip_factor, sum_of_squares};
use origami_parallel::ParallelState;

use self::collectives::Buckets;
use self::layout::{block, partition, BufferLayout};
use super::adamw::AdamWConfig;
use crate::params::{Buffers, ParamGroup, ParamRegistry};

/// The groups the optimizer reduces over.
#[derive(Clone)]
pub struct OptimizerGroups {
    /// Tensor-parallel group: whole-tensor dense gradients are summed over it.
    pub tp: Arc<dyn Communicator>,
    /// Data- and context-parallel ranks holding the same dense shards.
    pub dp_cp: Arc<dyn Communicator>,
    /// Expert data-parallel ranks holding the same expert shards.
    pub edp: Arc<dyn Communicator>,
    /// Every rank: the gradient norm is summed over it.
    pub world: Arc<dyn Communicator>,
}

impl OptimizerGroups {
    /// Groups of a single rank.
    pub fn single() -> Self {
        OptimizerGroups {
            tp: SoloComm::shared(0),
            dp_cp: SoloComm::shared(0),
            edp: SoloComm::shared(0),
            world: SoloComm::shared(0),
        }
    }

    /// The groups of `state`; `world` is the communicator over every rank.
    pub fn from_state(state: &ParallelState, world: Arc<dyn Communicator>) -> Self {
        OptimizerGroups {
            tp: state.tp().comm().clone(),
            dp_cp: state.dp_cp().comm().clone(),
            edp: state.edp().comm().clone(),
            world,
        }
    }
}

/// AdamW over parameters reduced across ranks; see the module documentation for one step.
pub struct ParallelOptimizer {
    config: AdamWConfig,
    tp: Arc<dyn Communicator>,
    world: Arc<dyn Communicator>,
    dense: BufferShard,
    expert: BufferShard,
    step: u64,
    bucket_elements: usize,
    last_step_bytes: u64,
}

impl ParallelOptimizer {
    /// Zero moments for `registry`'s layout. `distributed`: shard AdamW moments over the
    /// reduction groups (ZeRO-1 style "distributed optimizer"). `bucket_elements`: gradient
    /// reductions are issued in buckets of at most this many elements.
    pub fn new(
        registry: &ParamRegistry,
        config: AdamWConfig,
        groups: OptimizerGroups,
        distributed: bool,
        bucket_elements: usize,
    ) -> Self {
        assert!(
            bucket_elements > 0,
            "buckets must hold at least one element"
        );
        ParallelOptimizer {
            config,
            dense: BufferShard::new(registry, ParamGroup::Dense, groups.dp_cp, distributed),
            expert: BufferShard::new(registry, ParamGroup::Expert, groups.edp, distributed),
            tp: groups.tp,
            world: groups.world,
            step: 0,
            bucket_elements,
            last_step_bytes: 0,
        }
    }

    /// Reduces the gradients, clips to the global norm and updates `params`; returns the norm
    /// before clipping. Every rank ends with identical replicas. `grads` is used as scratch:
    /// afterwards only this rank's range holds the reduced gradients (not clipped: the clipping
    /// factor is applied inside the update).
    pub fn step(
        &mut self,
        registry: &ParamRegistry,
        params: &mut Buffers,
        grads: &mut Buffers,
        lr: f32,
    ) -> Result<f64> {
        assert_eq!(
            (grads.dense.len(), grads.expert.len()),
            (self.dense.layout.len(), self.expert.layout.len()),
            "gradients of another layout than the optimizer's registry"
        );
        assert_eq!(
            registry.total_len(),
            params.dense.len() + params.expert.len()
        );
        let mut buckets = Buckets {
            elements: self.bucket_elements,
            bytes_sent: 0,
        };
        self.sum_whole_tensors_over_tp(&mut grads.dense, &mut buckets)?;
        self.dense.reduce(&mut grads.dense, &mut buckets)?;
        self.expert.reduce(&mut grads.expert, &mut buckets)?;

        let tp_rank = self.tp.rank();
        let squares = self.dense.sum_of_squares(&mut grads.dense, tp_rank)
            + self.expert.sum_of_squares(&mut grads.expert, tp_rank);
        let norm = self.sum_over_world(squares, &mut buckets)?.sqrt();
        let factor = clip_factor(norm, self.config.grad_clip as f64);

        self.step += 1;
        let hyper = AdamWStep {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            step: self.step,
            grad_scale: factor,
        };
        self.dense.update(&mut params.dense, &grads.dense, hyper);
        self.expert.update(&mut params.expert, &grads.expert, hyper);
        self.dense.share_updates(&mut params.dense, &mut buckets)?;
        self.expert
            .share_updates(&mut params.expert, &mut buckets)?;
        self.last_step_bytes = buckets.bytes_sent;
        Ok(norm)
    }

    /// Full first and second moments in this rank's registry layout (gathered when distributed),
    /// for checkpoints; the step count is [`ParallelOptimizer::steps`].
    pub fn moments(&self) -> Result<(Buffers, Buffers)> {
        let (m_dense, v_dense) = self.dense.full_moments()?;
        let (m_expert, v_expert) = self.expert.full_moments()?;
        Ok((
            Buffers {
                dense: m_dense,
                expert: m_expert,
            },
            Buffers {
                dense: v_dense,
                expert: v_expert,
            },
        ))
    }

    /// Restores moments (this rank's registry layout, whole) and the step count.
    pub fn restore(&mut self, m: Buffers, v: Buffers, step: u64) {
        self.dense.restore(&m.dense, &v.dense);
        self.expert.restore(&m.expert, &v.expert);
        self.step = step;
    }

    /// Updates done so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Whether the moments are sharded over the replicas (the distributed optimizer).
    pub fn is_distributed(&self) -> bool {
        self.dense.counts.is_some()
    }

    fn shard(&self, group: ParamGroup) -> &BufferShard {
        match group {
            ParamGroup::Dense => &self.dense,
            ParamGroup::Expert => &self.expert,
        }
    }

    /// The range of `group`'s buffer whose moments this rank keeps (all of it unless
    /// distributed), and both moments over it: what a checkpoint of this rank holds.
    pub fn owned_moments(&self, group: ParamGroup) -> (std::ops::Range<usize>, &[f32], &[f32]) {
        let shard = self.shard(group);
        (shard.owned.clone(), &shard.m, &shard.v)
    }

    /// Replaces the moments of this rank's owned range of `group` (as [`owned_moments`] gives
    /// the range) and sets the step count.
    ///
    /// [`owned_moments`]: ParallelOptimizer::owned_moments
    pub fn restore_owned(&mut self, group: ParamGroup, m: Vec<f32>, v: Vec<f32>, step: u64) {
        let shard = match group {
            ParamGroup::Dense => &mut self.dense,
            ParamGroup::Expert => &mut self.expert,
        };
        assert_eq!(
            (m.len(), v.len()),
            (shard.owned.len(), shard.owned.len()),
            "moments of another range than the one this rank owns"
        );
        (shard.m, shard.v) = (m, v);
        self.step = step;
    }

    /// Bytes this rank sent in reductions during the last step, as a ring algorithm sends them.
    pub fn last_step_bytes(&self) -> u64 {
        self.last_step_bytes
    }

    /// Step 1: packs the trainable whole-over-tp dense gradients, sums them over tp, unpacks.
    fn sum_whole_tensors_over_tp(&self, dense: &mut [f32], buckets: &mut Buckets) -> Result<()> {
        if self.tp.size() == 1 {
            return Ok(());
        }
        let ranges: Vec<Range<usize>> = self
            .dense
            .layout
            .spans()
            .iter()
            .filter(|span| span.whole_over_tp && span.trainable)
            .map(|span| span.range.clone())
            .collect();
        let mut packed: Vec<f32> = ranges
            .iter()
            .flat_map(|range| dense[range.clone()].iter().copied())
            .collect();
        buckets.all_reduce(self.tp.as_ref(), &mut packed)?;
        let mut rest = packed.as_slice();
        for range in ranges {
            let (values, tail) = rest.split_at(range.len());
            dense[range].copy_from_slice(values);
            rest = tail;
        }
        Ok(())
    }

    /// Step 3's sum over `world` of each rank's squares, carried as two f32s (high and low part)
    /// so the sum keeps about f64 precision.
    fn sum_over_world(&self, squares: f64, buckets: &mut Buckets) -> Result<f64> {
        if self.world.size() == 1 {
            return Ok(squares);
        }
        let high = squares as f32;
        let mut parts = [high, (squares - high as f64) as f32];
        buckets.all_reduce(self.world.as_ref(), &mut parts)?;
        Ok(parts[0] as f64 + parts[1] as f64)
    }
}

/// One group buffer's share of the optimizer: its layout, the replicas it is reduced over, the
/// range this rank updates and that range's moments.
struct BufferShard {
    layout: BufferLayout,
    replicas: Arc<dyn Communicator>,
    /// Elements each replica owns when distributed; `None`: every replica updates everything.
    counts: Option<Vec<usize>>,
    /// The elements this rank updates.
    owned: Range<usize>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl BufferShard {
    fn new(
        registry: &ParamRegistry,
        group: ParamGroup,
        replicas: Arc<dyn Communicator>,
        distributed: bool,
    ) -> Self {
        let layout = BufferLayout::of(registry, group);
        let counts = distributed.then(|| partition(layout.len(), replicas.size()));
        let owned = match &counts {
            Some(counts) => block(counts, replicas.rank()),
            None => 0..layout.len(),
        };
        BufferShard {
            layout,
            replicas,
            counts,
            m: vec![0.0; owned.len()],
            v: vec![0.0; owned.len()],
            owned,
        }
    }

    /// Step 2: leaves the sum over the replicas of this rank's range in `grads[owned]`.
    fn reduce(&self, grads: &mut [f32], buckets: &mut Buckets) -> Result<()> {
        match &self.counts {
            None => buckets.all_reduce(self.replicas.as_ref(), grads),
            Some(counts) => {
                let mut reduced = vec![0.0; self.owned.len()];
                buckets.reduce_scatter(self.replicas.as_ref(), grads, counts, &mut reduced)?;
                grads[self.owned.clone()].copy_from_slice(&reduced);
                Ok(())
            }
        }
    }

    /// Step 3: squares of the reduced gradients this rank counts in the global norm. Gradients
    /// of buffers (not trainable) in its range are zeroed first, so they count nothing while
    /// the sum still runs over maximal contiguous ranges (on one rank: the whole buffer, as
    /// [`super::adamw::global_norm`] sums it).
    fn sum_of_squares(&self, grads: &mut [f32], tp_rank: usize) -> f64 {
        for (_, piece) in self
            .layout
            .pieces(self.owned.clone())
            .filter(|(span, _)| !span.trainable)
        {
            grads[piece].fill(0.0);
        }
        let counted = match self.counts {
            Some(_) => self.owned.clone(),
            None if self.replicas.rank() == 0 => self.owned.clone(),
            None => 0..0,
        };
        self.layout
            .runs(counted, |span| {
                !span.duplicate && (tp_rank == 0 || !span.whole_over_tp)
            })
            .into_iter()
            .map(|run| sum_of_squares(&grads[run]))
            .fold(0.0, |total, part| total + part)
    }

    /// Step 4: applies AdamW to the trainable elements of this rank's range of `params`, with
    /// the gradients clipped by `hyper.grad_scale` inside the update.
    fn update(&mut self, params: &mut [f32], grads: &[f32], hyper: AdamWStep) {
        let start = self.owned.start;
        for (span, piece) in self.layout.pieces(self.owned.clone()) {
            if !span.trainable {
                continue;
            }
            let local = piece.start - start..piece.end - start;
            let weight_decay = if span.weight_decay {
                hyper.weight_decay
            } else {
                0.0
            };
            adamw_update(
                &mut params[piece.clone()],
                &grads[piece],
                &mut self.m[local.clone()],
                &mut self.v[local],
                AdamWStep {
                    weight_decay,
                    ..hyper
                },
            );
        }
    }

    /// Step 5: when distributed, gathers every replica's updated range into `params`.
    fn share_updates(&self, params: &mut [f32], buckets: &mut Buckets) -> Result<()> {
        let Some(counts) = &self.counts else {
            return Ok(());
        };
        let mine = params[self.owned.clone()].to_vec();
        buckets.all_gather(self.replicas.as_ref(), &mine, counts, params)
    }

    /// Both moments of the whole buffer.
    fn full_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(counts) = &self.counts else {
            return Ok((self.m.clone(), self.v.clone()));
        };
        let gather = |moment: &[f32]| -> Result<Vec<f32>> {
            let mut full = vec![0.0; self.layout.len()];
            self.replicas.all_gather_v(moment, counts, &mut full)?;
            Ok(full)
        };
        Ok((gather(&self.m)?, gather(&self.v)?))
    }

    /// Keeps this rank's range of whole-buffer moments.
    fn restore(&mut self, m: &[f32], v: &[f32]) {
        assert_eq!(
            (m.len(), v.len()),
            (self.layout.len(), self.layout.len()),
            "moments of another layout than the optimizer's registry"
        );
        self.m = m[self.owned.clone()].to_vec();
        self.v = v[self.owned.clone()].to_vec();
    }
}
