//! Parameter initialisation that depends only on (seed, parameter name, global element index),
//! never on how a tensor is sharded: each element's value comes from a counter-based hash, so
//! any rank can produce exactly its own slice of any parameter. The same hash keys the other
//! draws that must not depend on the layout (the router's input jitter).

use super::{Buffers, Init, ParamRegistry, Shard};
use rayon::prelude::*;

/// 64-bit FNV-1a of a name, the per-parameter (or per-layer) stream id.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64 finaliser: a strong 64-bit mixing function, the counter-based generator's core.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Standard normal value for element `index` of stream `stream` (Box–Muller on two hashed uniforms).
pub fn normal_at(seed: u64, stream: u64, index: u64) -> f32 {
    let base = mix(seed ^ mix(stream ^ mix(index)));
    let u1 = ((mix(base) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((mix(base ^ 0x5851_f42d_4c95_7f2d) >> 11) as f64) / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Value of element `index` (global, row-major) of the parameter `name` under `init`.
pub fn init_value(seed: u64, name: &str, init: Init, index: u64) -> f32 {
    value_in_stream(seed, name_hash(name), init, index)
}

/// [`init_value`] with the name already hashed (`stream = name_hash(name)`): filling a tensor
/// hashes its name once, not once per element (FNV-1a over a 25-byte name is 25 dependent
/// multiplies; hashing once took a one-step `small` benchmark's whole process from 44.0 to
/// 40.5 s on a 2-core Zen 3).
fn value_in_stream(seed: u64, stream: u64, init: Init, index: u64) -> f32 {
    match init {
        Init::Constant(v) => v,
        Init::Normal(std) => std * normal_at(seed, stream, index),
    }
}

/// Buffers with every registered parameter initialised.
pub fn initialise(registry: &ParamRegistry, seed: u64) -> Buffers {
    let mut buffers = registry.zeros();
    for info in registry.params() {
        let values = buffers.get_mut(info.id);
        let stream = name_hash(&info.name);
        let fill =
            |(v, i): (&mut f32, usize)| *v = value_in_stream(seed, stream, info.init, i as u64);
        if info.shard == Shard::full(&info.shape) {
            let len = values.len();
            values.par_iter_mut().zip(0..len).for_each(fill);
        } else {
            let global = info.shard.global_indices(&info.shape);
            values.par_iter_mut().zip(global).for_each(fill);
        }
    }
    buffers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamGroup;

    #[test]
    fn values_depend_on_seed_name_and_index_only() {
        let a = init_value(1, "w", Init::Normal(1.0), 17);
        assert_eq!(a, init_value(1, "w", Init::Normal(1.0), 17));
        assert_ne!(a, init_value(2, "w", Init::Normal(1.0), 17));
        assert_ne!(a, init_value(1, "v", Init::Normal(1.0), 17));
        assert_ne!(a, init_value(1, "w", Init::Normal(1.0), 18));
    }

    #[test]
    fn initialise_fills_every_element_with_its_init_value_whole_or_sharded() {
        let shape = [6, 10];
        let mut registry = ParamRegistry::default();
        let whole = registry.register(
            "layers.0.w".into(),
            &shape,
            ParamGroup::Dense,
            Init::Normal(0.02),
        );
        // Two ranges of columns, as a fused [gate; up] projection keeps over expert-tensor ranks.
        let shard = Shard::along(&shape, 1, vec![0..2, 7..10]);
        let global = shard.global_indices(&shape);
        let half = registry.register_sharded(
            "layers.1.w".into(),
            &shape,
            shard,
            ParamGroup::Dense,
            Init::Normal(0.5),
        );
        let buffers = initialise(&registry, 4);
        for (i, &v) in buffers.get(whole).iter().enumerate() {
            assert_eq!(v, init_value(4, "layers.0.w", Init::Normal(0.02), i as u64));
        }
        assert_eq!(buffers.get(half).len(), 6 * 5);
        for (&v, &i) in buffers.get(half).iter().zip(&global) {
            assert_eq!(v, init_value(4, "layers.1.w", Init::Normal(0.5), i as u64));
        }
    }

    #[test]
    fn normal_values_have_unit_moments() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| normal_at(7, 3, i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }
}
