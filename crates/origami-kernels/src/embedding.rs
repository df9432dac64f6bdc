//! Token embedding lookup: `out[t] = table[token[t]]`; backward scatter-adds `dout[t]` into
//! `dtable[token[t]]` (accumulated, as every parameter gradient).

use rayon::prelude::*;

/// Gathers the rows of `table[vocab, width]` for `tokens` into `out[tokens, width]`.
pub fn embedding_forward(out: &mut [f32], table: &[f32], tokens: &[u32], width: usize) {
    out.par_chunks_mut(width)
        .zip(tokens.par_iter())
        .for_each(|(row, &t)| {
            row.copy_from_slice(&table[t as usize * width..(t as usize + 1) * width]);
        });
}

/// Accumulates `dout` into the rows of `dtable` picked by `tokens`.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], tokens: &[u32], width: usize) {
    for (row, &t) in dout.chunks(width).zip(tokens) {
        for (d, g) in dtable[t as usize * width..(t as usize + 1) * width]
            .iter_mut()
            .zip(row)
        {
            *d += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, probe_loss, random_vec};

    #[test]
    fn gradient_matches_finite_differences_with_repeated_tokens() {
        let (vocab, width) = (5, 3);
        let table = random_vec(vocab * width, 1);
        let tokens = [4, 0, 4, 2];
        let probe = random_vec(tokens.len() * width, 2);
        let mut dtable = vec![0.0; table.len()];
        embedding_backward(&mut dtable, &probe, &tokens, width);
        assert!(
            dtable[width..2 * width].iter().all(|&v| v == 0.0),
            "unused row got a gradient"
        );
        check_gradient(
            &table,
            &dtable,
            |t| {
                let mut out = vec![0.0; tokens.len() * width];
                embedding_forward(&mut out, t, &tokens, width);
                probe_loss(&out, &probe)
            },
            "embedding",
        );
    }
}
