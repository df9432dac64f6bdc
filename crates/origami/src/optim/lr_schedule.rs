//! Learning-rate schedule: linear warm-up from 0 to the peak, then cosine decay to a floor.

use serde::{Deserialize, Serialize};

/// Warm-up then cosine decay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warm-up.
    pub lr: f32,
    /// Floor reached at `decay_steps`.
    pub min_lr: f32,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Step at which the cosine reaches the floor (usually the run's length).
    pub decay_steps: u64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            decay_steps: 1000,
        }
    }
}

impl LrSchedule {
    /// Learning rate of the update numbered `step` (0-based).
    pub fn at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let span = (self.decay_steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * cosine) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_and_floor() {
        let s = LrSchedule {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            decay_steps: 110,
        };
        assert!((s.at(0) - 0.1).abs() < 1e-6);
        assert!((s.at(9) - 1.0).abs() < 1e-6);
        assert!((s.at(10) - 1.0).abs() < 1e-6);
        assert!(
            (s.at(60) - 0.55).abs() < 1e-6,
            "midpoint of the cosine is halfway"
        );
        assert_eq!(s.at(110), 0.1);
        assert_eq!(s.at(500), 0.1);
    }
}
