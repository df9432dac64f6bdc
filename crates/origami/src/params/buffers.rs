//! Two flat buffers (dense, expert) in a registry's layout: parameters, gradients or moments.

use super::{ParamGroup, ParamId};
use rayon::prelude::*;

/// Elements zeroed per task by [`Buffers::fill_zero`] (1 MiB).
const ZERO_CHUNK: usize = 1 << 18;

/// Two flat buffers (dense, expert) in a registry's layout: parameters, gradients or moments.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffers {
    /// Dense parameters' values.
    pub dense: Vec<f32>,
    /// Expert parameters' values.
    pub expert: Vec<f32>,
}

impl Buffers {
    /// The values of one parameter.
    pub fn get(&self, id: ParamId) -> &[f32] {
        &self.buffer(id.group)[id.offset..id.offset + id.len]
    }

    /// The values of one parameter, mutably.
    pub fn get_mut(&mut self, id: ParamId) -> &mut [f32] {
        let buffer = match id.group {
            ParamGroup::Dense => &mut self.dense,
            ParamGroup::Expert => &mut self.expert,
        };
        &mut buffer[id.offset..id.offset + id.len]
    }

    /// One whole buffer.
    pub fn buffer(&self, group: ParamGroup) -> &[f32] {
        match group {
            ParamGroup::Dense => &self.dense,
            ParamGroup::Expert => &self.expert,
        }
    }

    /// Sets every element to zero (e.g. gradients before a step).
    /// Over the thread pool: one thread does not reach the memory bandwidth.
    pub fn fill_zero(&mut self) {
        for buffer in [&mut self.dense, &mut self.expert] {
            buffer
                .par_chunks_mut(ZERO_CHUNK)
                .for_each(|chunk| chunk.fill(0.0));
        }
    }

    /// Both buffers, mutably, for whole-buffer kernels.
    pub fn buffers_mut(&mut self) -> [&mut Vec<f32>; 2] {
        [&mut self.dense, &mut self.expert]
    }
}
