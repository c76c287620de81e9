//! Aligning a routing table to the grouped GEMM's row tile (vLLM's `moe_align_block_size`):
//! the (token, slot) pairs grouped by expert, each expert's group padded to a multiple of the
//! tile, and the expert of every row tile. The CPU twin of `kernels/moe_align.cu`, built on
//! [`ExpertGroups`]; used to check that kernel and to plan GPU launches. Loads nothing.
//!
//! Contract: a pair is `token * top_k + slot` of the `[n_tokens, top_k]` routing table.
//! Inside an expert the pairs are in increasing order; padding rows hold `n_pairs`; tiles past
//! the padded total have expert `-1`. Every buffer is `capacity` long (see [`align_capacity`]).

use moe_core::Result;

use crate::grouping::ExpertGroups;

/// Rows the aligned table is allocated with: enough for any routing of `n_pairs` pairs over
/// `n_experts` experts padded to `tile` (the kernel fills all of them).
pub fn align_capacity(n_pairs: usize, n_experts: usize, tile: usize) -> usize {
    (n_pairs + n_pairs.min(n_experts) * (tile - 1)).div_ceil(tile) * tile
}

/// A routing table sorted by expert and padded to the GEMM tile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlignedGroups {
    /// `n_experts + 1` padded row offsets; the last one is the padded total.
    pub offsets: Vec<i32>,
    /// `[capacity]` pair of each row, `n_pairs` for padding.
    pub sorted_pairs: Vec<u32>,
    /// `[capacity / tile]` expert of each row tile, `-1` past the padded total.
    pub tile_expert: Vec<i32>,
    /// `[n_pairs]` row of `sorted_pairs` holding each pair.
    pub pair_slot: Vec<i32>,
}

impl AlignedGroups {
    /// Aligns the routing table `ids` (`[n_tokens * top_k]`, row-major) for `n_experts`
    /// experts to row tiles of `tile` rows.
    pub fn from_ids(ids: &[u32], top_k: usize, n_experts: usize, tile: usize) -> Result<Self> {
        let n_pairs = ids.len();
        let groups = ExpertGroups::from_slices(ids, &vec![0.0; n_pairs], top_k, n_experts)?;
        let capacity = align_capacity(n_pairs, n_experts, tile);
        let mut offsets = vec![0i32; n_experts + 1];
        let mut sorted_pairs = vec![n_pairs as u32; capacity];
        let mut tile_expert = vec![-1i32; capacity / tile];
        let mut pair_slot = vec![0i32; n_pairs];
        let mut row = 0usize;
        for expert in 0..n_experts {
            offsets[expert] = row as i32;
            let (token_rows, _) = groups.rows(expert);
            for (i, &token) in token_rows.iter().enumerate() {
                let token = token as usize;
                let slot = ids[token * top_k..(token + 1) * top_k]
                    .iter()
                    .position(|&e| e as usize == expert)
                    .expect("grouping put the token under an expert it chose");
                let pair = token * top_k + slot;
                sorted_pairs[row + i] = pair as u32;
                pair_slot[pair] = (row + i) as i32;
            }
            let padded = token_rows.len().div_ceil(tile) * tile;
            for t in row / tile..(row + padded) / tile {
                tile_expert[t] = expert as i32;
            }
            row += padded;
        }
        offsets[n_experts] = row as i32;
        Ok(Self {
            offsets,
            sorted_pairs,
            tile_expert,
            pair_slot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_each_expert_to_the_tile() {
        // 3 tokens, top-2, 4 experts; expert 2 gets nothing; tile 4.
        let ids = [1, 0, 3, 1, 0, 3];
        let a = AlignedGroups::from_ids(&ids, 2, 4, 4).unwrap();
        assert_eq!(a.offsets, vec![0, 4, 8, 8, 12]);
        assert_eq!(&a.sorted_pairs[..12], &[1, 4, 6, 6, 0, 3, 6, 6, 2, 5, 6, 6]);
        assert!(a.sorted_pairs[12..].iter().all(|&p| p == 6));
        assert_eq!(&a.tile_expert[..3], &[0, 1, 3]);
        assert!(a.tile_expert[3..].iter().all(|&e| e == -1));
        assert_eq!(a.pair_slot, vec![4, 0, 8, 5, 1, 9]);
        assert_eq!(a.sorted_pairs.len(), align_capacity(6, 4, 4));
    }
}
