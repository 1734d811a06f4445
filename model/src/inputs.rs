//! Turning token-id sequences into model inputs.

use tch::Tensor;

/// Right-pad sequences of different lengths: ids [B, N] int64 (padded with `pad_id`) and the
/// attention mask [B, N] int64 (1 = real token), N = the longest sequence.
pub fn pad_right(seqs: &[Vec<i64>], pad_id: i64) -> (Tensor, Tensor) {
    let n = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * n);
    let mut mask = Vec::with_capacity(seqs.len() * n);
    for s in seqs {
        for i in 0..n {
            ids.push(s.get(i).copied().unwrap_or(pad_id));
            mask.push(i64::from(i < s.len()));
        }
    }
    let shape = [seqs.len() as i64, n as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_on_the_right_and_masks() {
        let (ids, mask) = pad_right(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!(Vec::<i64>::try_from(ids.reshape([-1])).unwrap(), [5, 6, 7, 8, 0, 0]);
        assert_eq!(Vec::<i64>::try_from(mask.reshape([-1])).unwrap(), [1, 1, 1, 1, 0, 0]);
    }
}
