//! Helpers for tests of kernels and layers: deterministic random data, closeness assertions and
//! a finite-difference gradient check. Public so that every crate tests its backwards the same way.

/// Deterministic pseudo-random values in `[-1, 1)`, a different stream per `seed`.
pub fn random_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Panics unless every `actual[i]` is within `tol · max(1, |expected[i]|)` of `expected[i]`.
pub fn assert_close(actual: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let bound = tol * e.abs().max(1.0);
        assert!(
            (a - e).abs() <= bound,
            "{what}[{i}]: got {a}, expected {e} (tolerance {bound})"
        );
    }
}

/// Compares an analytic gradient with central finite differences of `loss` around `x`.
///
/// At most 48 elements are probed (spread over the whole vector). It fails when the probed
/// finite differences and the analytic values differ by more than 1% of the largest probed
/// gradient plus a small absolute slack, so a wrong sign, factor or missing term is caught
/// while f32 rounding in the loss is tolerated.
pub fn check_gradient(
    x: &[f32],
    analytic: &[f32],
    mut loss: impl FnMut(&[f32]) -> f64,
    what: &str,
) {
    check_gradient_with(x, analytic, &mut loss, 1e-2, 1e-2, what);
}

/// [`check_gradient`] with an explicit step and relative tolerance, for functions whose
/// curvature needs a smaller step (e.g. through exponentials) or whose loss is noisier.
pub fn check_gradient_with(
    x: &[f32],
    analytic: &[f32],
    loss: &mut dyn FnMut(&[f32]) -> f64,
    step: f32,
    tol: f64,
    what: &str,
) {
    assert_eq!(
        x.len(),
        analytic.len(),
        "{what}: gradient length differs from input"
    );
    let stride = (x.len() / 48).max(1);
    let mut probe = x.to_vec();
    let mut pairs = Vec::new();
    for i in (0..x.len()).step_by(stride) {
        let original = probe[i];
        probe[i] = original + step;
        let plus = loss(&probe);
        probe[i] = original - step;
        let minus = loss(&probe);
        probe[i] = original;
        pairs.push((i, (plus - minus) / (2.0 * step as f64), analytic[i] as f64));
    }
    let scale = pairs
        .iter()
        .map(|p| p.1.abs().max(p.2.abs()))
        .fold(0.0, f64::max);
    assert!(
        scale > 0.0 || pairs.is_empty(),
        "{what}: gradient is identically zero on the probes"
    );
    for (i, numeric, exact) in pairs {
        let bound = tol * scale + 1e-4;
        assert!(
            (numeric - exact).abs() <= bound,
            "{what}[{i}]: finite difference {numeric:.6e}, analytic {exact:.6e} (bound {bound:.2e})"
        );
    }
}

/// Dot product in f64, the usual probe loss `L = Σ y·r` for checking a backward.
pub fn probe_loss(y: &[f32], probe: &[f32]) -> f64 {
    y.iter()
        .zip(probe)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum()
}

/// `γ_n = n·u/(1 − n·u)` with `u = 2⁻²⁴`, the f32 unit roundoff: a sum of `n + 1` terms, or of
/// `n` products and one term, evaluated in f32 in any order (each term rounded at most `n`
/// times on its way to the result) is within `γ_n·Σ|terms|` of the exact sum (Higham, Accuracy
/// and Stability of Numerical Algorithms, §3.1).
pub fn gamma(n: usize) -> f64 {
    let u = 1.0 / (1u64 << 24) as f64;
    n as f64 * u / (1.0 - n as f64 * u)
}
