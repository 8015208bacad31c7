//! Packed rows → one flat token stream with per-document positions and shifted loss weights.
//!
//! Loss convention (pinned by `shift_alignment_is_pinned`): the mask has one entry per token,
//! aligned with the token itself, as the packer writes it (`mask[i] = 1` when token `i` is a
//! training target, e.g. an assistant token). Position `t` predicts token `t + 1` of the same
//! document with weight `mask[t + 1]`; the last token of a document predicts nothing, so no loss
//! crosses a document boundary and the first token of a document is never a target.
use crate::{Error, Result};

/// One packed bin: its documents back to back, with their loss mask.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub mask: Vec<u8>,
    /// Length of every document in order; they sum to `tokens.len()`.
    pub doc_lens: Vec<usize>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A training batch: rows concatenated into one stream of `len()` tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    pub ids: Vec<u32>,
    /// Position within the token's document (restarts at 0 on every document).
    pub positions: Vec<u32>,
    /// The token each position predicts (meaningless where `weights` is 0).
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// (start, len) of every document in the stream.
    pub docs: Vec<(usize, usize)>,
    /// Stream offset of every row's first token.
    pub row_starts: Vec<usize>,
}

impl Batch {
    pub fn from_rows(rows: &[Row]) -> Result<Batch> {
        let mut b = Batch::default();
        for (r, row) in rows.iter().enumerate() {
            if row.mask.len() != row.tokens.len() {
                return Err(Error::Batch(format!(
                    "row {r}: {} mask entries for {} tokens",
                    row.mask.len(),
                    row.tokens.len()
                )));
            }
            let sum: usize = row.doc_lens.iter().sum();
            if sum != row.tokens.len() || row.doc_lens.contains(&0) {
                return Err(Error::Batch(format!(
                    "row {r}: document lengths {:?} do not tile its {} tokens",
                    row.doc_lens,
                    row.tokens.len()
                )));
            }
            b.row_starts.push(b.ids.len());
            let mut at = 0;
            for &n in &row.doc_lens {
                let base = b.ids.len();
                b.docs.push((base, n));
                for j in 0..n {
                    b.ids.push(row.tokens[at + j]);
                    b.positions.push(j as u32);
                    if j + 1 < n {
                        b.targets.push(row.tokens[at + j + 1]);
                        b.weights.push(f32::from(row.mask[at + j + 1]));
                    } else {
                        b.targets.push(0);
                        b.weights.push(0.0);
                    }
                }
                at += n;
            }
        }
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Positions that carry loss.
    pub fn loss_tokens(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }

    /// Largest token id, to check against the vocabulary before training.
    pub fn max_id(&self) -> Option<u32> {
        self.ids.iter().copied().max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_alignment_is_pinned() {
        // Two documents in one bin: [10 11 12] (mask 0 1 1) and [20 21] (mask 1 0).
        let row = Row {
            tokens: vec![10, 11, 12, 20, 21],
            mask: vec![0, 1, 1, 1, 0],
            doc_lens: vec![3, 2],
        };
        let b = Batch::from_rows(&[row]).unwrap();
        assert_eq!(b.positions, [0, 1, 2, 0, 1]);
        // position t predicts token t+1 with the mask entry of token t+1 ...
        assert_eq!(&b.targets[..2], &[11, 12]);
        assert_eq!(&b.weights[..2], &[1.0, 1.0]);
        // ... nothing crosses from 12 to 20, and 20 → 21 is masked by 21's entry.
        assert_eq!(b.weights[2], 0.0);
        assert_eq!((b.targets[3], b.weights[3]), (21, 0.0));
        assert_eq!(b.weights[4], 0.0);
        assert_eq!(b.docs, [(0, 3), (3, 2)]);
        assert_eq!(b.loss_tokens(), 2.0);
    }

    #[test]
    fn refuses_rows_that_do_not_tile() {
        let row = Row {
            tokens: vec![1, 2, 3],
            mask: vec![1, 1, 1],
            doc_lens: vec![2],
        };
        assert!(
            Batch::from_rows(&[row])
                .unwrap_err()
                .to_string()
                .contains("tile")
        );
    }
}
