//! Grouping token rows by expert: a counting sort of the routing table. The result drives the
//! expert compute (one contiguous block of rows per expert, experts with no rows skipped).
//!
//! Contract: for expert `e`, slots `offsets[e]..offsets[e + 1]` hold the token rows routed to
//! it in increasing row order, with the weight of that (row, expert) pair.

use candle_core::DType;
use moe_core::{Error, Result, Routing};

/// Token rows sorted by the expert they were routed to.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGroups {
    /// `n_experts + 1` prefix offsets into `token_rows` / `weights`.
    pub offsets: Vec<usize>,
    /// Token row of each slot, grouped by expert.
    pub token_rows: Vec<u32>,
    /// Routing weight of each slot.
    pub weights: Vec<f32>,
}

impl ExpertGroups {
    /// Groups `routing` (`[n_tokens, top_k]`) for a layer with `n_experts` experts.
    pub fn from_routing(routing: &Routing, n_experts: usize) -> Result<Self> {
        let ids: Vec<u32> = routing
            .expert_ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        let weights: Vec<f32> = routing
            .weights
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        Self::from_slices(&ids, &weights, routing.top_k(), n_experts)
    }

    /// Groups host slices: `ids` and `weights` are `[n_tokens * top_k]` row-major.
    pub fn from_slices(
        ids: &[u32],
        weights: &[f32],
        top_k: usize,
        n_experts: usize,
    ) -> Result<Self> {
        let mut counts = vec![0usize; n_experts + 1];
        for &id in ids {
            if id as usize >= n_experts {
                return Err(Error::InvalidRequest(format!(
                    "routing chose expert {id} of {n_experts}"
                )));
            }
            counts[id as usize + 1] += 1;
        }
        for e in 0..n_experts {
            counts[e + 1] += counts[e];
        }
        let offsets = counts;
        let mut cursor = offsets.clone();
        let mut token_rows = vec![0u32; ids.len()];
        let mut slot_weights = vec![0f32; ids.len()];
        for (pair, (&id, &w)) in ids.iter().zip(weights).enumerate() {
            let slot = &mut cursor[id as usize];
            token_rows[*slot] = (pair / top_k.max(1)) as u32;
            slot_weights[*slot] = w;
            *slot += 1;
        }
        Ok(Self {
            offsets,
            token_rows,
            weights: slot_weights,
        })
    }

    /// Number of experts of the layer.
    pub fn n_experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Rows routed to `expert` and their weights.
    pub fn rows(&self, expert: usize) -> (&[u32], &[f32]) {
        let range = self.offsets[expert]..self.offsets[expert + 1];
        (&self.token_rows[range.clone()], &self.weights[range])
    }

    /// The same grouping with only the slots of `experts` kept (the others get no rows):
    /// one wave of a layer computed a few experts at a time.
    pub fn restricted_to(&self, experts: std::ops::Range<usize>) -> Self {
        let n = self.n_experts();
        let (start, end) = (
            experts.start.min(n),
            experts.end.min(n).max(experts.start.min(n)),
        );
        let (first, last) = (self.offsets[start], self.offsets[end]);
        let offsets = (0..=n)
            .map(|e| self.offsets[e.clamp(start, end)] - first)
            .collect();
        Self {
            offsets,
            token_rows: self.token_rows[first..last].to_vec(),
            weights: self.weights[first..last].to_vec(),
        }
    }

    /// The same grouping with only the slots of the experts in `keep` (any order) kept: the
    /// part of a layer computed in one place when its experts are split between places.
    pub fn restricted_to_set(&self, keep: &[usize]) -> Self {
        let n = self.n_experts();
        let mut kept = vec![false; n];
        for &e in keep {
            if e < n {
                kept[e] = true;
            }
        }
        let mut offsets = Vec::with_capacity(n + 1);
        let (mut token_rows, mut weights) = (Vec::new(), Vec::new());
        offsets.push(0);
        for (e, &keep) in kept.iter().enumerate() {
            if keep {
                let (rows, w) = self.rows(e);
                token_rows.extend_from_slice(rows);
                weights.extend_from_slice(w);
            }
            offsets.push(token_rows.len());
        }
        Self {
            offsets,
            token_rows,
            weights,
        }
    }

    /// Experts that received at least one row, in increasing order.
    pub fn active_experts(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n_experts()).filter(|&e| self.offsets[e + 1] > self.offsets[e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_rows_by_expert_in_row_order() {
        // 3 tokens, top-2, 4 experts; expert 2 gets nothing.
        let ids = [1, 0, 3, 1, 0, 3];
        let w = [0.6, 0.4, 0.7, 0.3, 0.9, 0.1];
        let g = ExpertGroups::from_slices(&ids, &w, 2, 4).unwrap();
        assert_eq!(g.offsets, vec![0, 2, 4, 4, 6]);
        assert_eq!(g.rows(0), (&[0u32, 2][..], &[0.4f32, 0.9][..]));
        assert_eq!(g.rows(1), (&[0u32, 1][..], &[0.6f32, 0.3][..]));
        assert_eq!(g.rows(3), (&[1u32, 2][..], &[0.7f32, 0.1][..]));
        assert_eq!(g.active_experts().collect::<Vec<_>>(), vec![0, 1, 3]);
    }

    #[test]
    fn restriction_keeps_only_the_chosen_experts_slots() {
        let ids = [1, 0, 3, 1, 0, 3];
        let w = [0.6, 0.4, 0.7, 0.3, 0.9, 0.1];
        let g = ExpertGroups::from_slices(&ids, &w, 2, 4).unwrap();
        let r = g.restricted_to(1..3);
        assert_eq!(r.offsets, vec![0, 0, 2, 2, 2]);
        assert_eq!(r.rows(1), g.rows(1));
        assert_eq!(r.active_experts().collect::<Vec<_>>(), vec![1]);
        let r = g.restricted_to(3..4);
        assert_eq!(r.rows(3), g.rows(3));
        assert_eq!(r.active_experts().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn restriction_to_a_set_matches_restriction_to_each_expert() {
        let ids = [1, 0, 3, 1, 0, 3, 2, 0];
        let w = [0.6, 0.4, 0.7, 0.3, 0.9, 0.1, 0.5, 0.5];
        let g = ExpertGroups::from_slices(&ids, &w, 2, 4).unwrap();
        let r = g.restricted_to_set(&[3, 0]);
        assert_eq!(r.active_experts().collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(r.rows(0), g.rows(0));
        assert_eq!(r.rows(3), g.rows(3));
        assert_eq!(r.rows(1), (&[][..], &[][..]));
        assert_eq!(r.token_rows.len(), g.rows(0).0.len() + g.rows(3).0.len());
        let none = g.restricted_to_set(&[]);
        assert_eq!(none.active_experts().count(), 0);
    }

    #[test]
    fn rejects_out_of_range_expert() {
        assert!(ExpertGroups::from_slices(&[4], &[1.0], 1, 4).is_err());
    }
}
