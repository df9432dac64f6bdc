//! Lays ranks out over the axes of one mapping and lists the groups over any set of axes,
//! exactly as DESIGN.md §1 and Megatron-Core's `RankGenerator`.
//!
//! With sizes in order-string order and `stride[i] = product(sizes[..i])`, a rank's coordinate
//! on axis i is `(rank / stride[i]) % sizes[i]`. A group over a set of axes holds the ranks that
//! differ only in those axes. Groups are numbered by the remaining axes, first axis fastest, and
//! the ranks inside a group are numbered by the group's own axes, first axis fastest — so the
//! position of a rank in its group is its coordinate there.

use crate::{Axis, Order};

/// The size of each axis in one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisSizes {
    /// Tensor parallel (etp for the expert mapping).
    pub tp: usize,
    /// Context parallel (1 for the expert mapping).
    pub cp: usize,
    /// Expert parallel (1 for the dense mapping).
    pub ep: usize,
    /// Data parallel (edp for the expert mapping).
    pub dp: usize,
    /// Pipeline parallel.
    pub pp: usize,
}

impl AxisSizes {
    /// The size of `axis`.
    pub fn get(&self, axis: Axis) -> usize {
        match axis {
            Axis::Tp => self.tp,
            Axis::Cp => self.cp,
            Axis::Ep => self.ep,
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
        }
    }
}

/// The rank grid of one mapping (dense or expert) along an [`Order`].
#[derive(Clone, Debug)]
pub struct RankGenerator {
    order: Order,
    sizes: AxisSizes,
}

impl RankGenerator {
    /// A grid of `sizes` laid out along `order`; its world is the product of the sizes.
    pub fn new(order: Order, sizes: AxisSizes) -> Self {
        RankGenerator { order, sizes }
    }

    /// Number of ranks in the grid.
    pub fn world(&self) -> usize {
        Axis::ALL.iter().map(|&axis| self.sizes.get(axis)).product()
    }

    /// Distance in ranks between neighbours along `axis`.
    pub fn stride(&self, axis: Axis) -> usize {
        self.order.axes()[..self.order.position(axis)]
            .iter()
            .map(|&before| self.sizes.get(before))
            .product()
    }

    /// The coordinate of `rank` along `axis` (its position in its group over that axis).
    pub fn coordinate(&self, rank: usize, axis: Axis) -> usize {
        (rank / self.stride(axis)) % self.sizes.get(axis)
    }

    /// Every group over `axes` (in any order; members are numbered in order-string order),
    /// in generation order.
    pub fn groups(&self, axes: &[Axis]) -> Vec<Vec<usize>> {
        let (inside, outside): (Vec<Axis>, Vec<Axis>) = self
            .order
            .axes()
            .iter()
            .partition(|axis| axes.contains(axis));
        let group_size: usize = inside.iter().map(|&axis| self.sizes.get(axis)).product();
        let group_count = self.world() / group_size;
        (0..group_count)
            .map(|group| {
                let base = self.offset(group, &outside);
                (0..group_size)
                    .map(|member| base + self.offset(member, &inside))
                    .collect()
            })
            .collect()
    }

    /// The rank offset of mixed-radix number `index` over `axes` (first axis fastest).
    fn offset(&self, mut index: usize, axes: &[Axis]) -> usize {
        let mut offset = 0;
        for &axis in axes {
            let size = self.sizes.get(axis);
            offset += (index % size) * self.stride(axis);
            index /= size;
        }
        offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(
        order: &str,
        tp: usize,
        cp: usize,
        ep: usize,
        dp: usize,
        pp: usize,
    ) -> RankGenerator {
        RankGenerator::new(order.parse().unwrap(), AxisSizes { tp, cp, ep, dp, pp })
    }

    // Hand-derived: order tp-cp-ep-dp-pp with tp2 cp1 ep1 dp3 pp2 has strides tp 1, dp 2, pp 6.
    #[test]
    fn strides_and_coordinates_follow_the_order() {
        let grid = generator("tp-cp-ep-dp-pp", 2, 1, 1, 3, 2);
        assert_eq!(grid.world(), 12);
        assert_eq!(
            [Axis::Tp, Axis::Dp, Axis::Pp].map(|axis| grid.stride(axis)),
            [1, 2, 6]
        );
        // rank 9 = 1·1 + 1·2 + 1·6 → tp 1, dp 1, pp 1
        assert_eq!(
            [Axis::Tp, Axis::Dp, Axis::Pp].map(|axis| grid.coordinate(9, axis)),
            [1, 1, 1]
        );
    }

    #[test]
    fn groups_over_several_axes_list_members_in_order_string_order() {
        let grid = generator("tp-cp-ep-dp-pp", 2, 1, 1, 3, 2);
        // tp-dp groups: base walks pp (stride 6); members walk tp (1) fastest, then dp (2).
        let expected = vec![vec![0, 1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10, 11]];
        assert_eq!(grid.groups(&[Axis::Dp, Axis::Tp]), expected);
        // dp-pp groups: base walks tp; members walk dp (2) then pp (6).
        let expected = vec![vec![0, 2, 4, 6, 8, 10], vec![1, 3, 5, 7, 9, 11]];
        assert_eq!(grid.groups(&[Axis::Pp, Axis::Dp]), expected);
    }

    #[test]
    fn pp_before_dp_puts_pipeline_neighbours_closer() {
        // order tp-cp-ep-pp-dp, tp2 pp2 dp2: strides tp 1, pp 2, dp 4.
        let grid = generator("tp-cp-ep-pp-dp", 2, 1, 1, 2, 2);
        assert_eq!(
            grid.groups(&[Axis::Pp]),
            vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
        assert_eq!(
            grid.groups(&[Axis::Dp]),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
        );
    }

    #[test]
    fn a_group_over_no_axis_is_each_rank_alone_and_over_all_axes_is_the_world() {
        let grid = generator("tp-cp-ep-dp-pp", 2, 1, 1, 1, 2);
        assert_eq!(grid.groups(&[]), vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(grid.groups(&Axis::ALL), vec![vec![0, 1, 2, 3]]);
    }
}
