//! Which link each group's collectives use, from the rank groups of the layout's
//! [`Topology`] (what `origami topology` prints), and what a collective costs on it.
//!
//! A group inside one node uses the intra-node rates. A group across nodes is as slow as its
//! worst member: ring collectives (all-reduce, all-gather, reduce-scatter) run at the
//! inter-node rate, times the group's members on one node when rings aggregate network cards
//! (NCCL runs one ring per card), never above the intra-node rate; an all-to-all sends the
//! share bound for other nodes over the rank's own card while the rest crosses the node's
//! links at the same time; a point-to-point transfer uses the inter-node rate.

use std::cmp::Reverse;

use origami_parallel::{GroupKind, Topology};
use serde::Serialize;

use crate::hardware::{LinkRates, Rate};
use crate::work::{Collective, Comm, Passes};
use crate::Hardware;

/// How the groups of one kind lie over the nodes (the worst group of the kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GroupSpan {
    /// Ranks in a group.
    pub size: usize,
    /// Nodes the widest group touches.
    pub nodes: usize,
    /// Fewest members that group has on any one node.
    pub members_per_node: usize,
}

/// The span of every group kind of a layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Spans {
    spans: Vec<GroupSpan>,
}

impl Spans {
    /// Spans of `topology`'s groups with `devices_per_node` ranks per node.
    pub fn new(topology: &Topology, devices_per_node: usize) -> Self {
        let spans = GroupKind::ALL
            .iter()
            .map(|&kind| {
                topology
                    .groups(kind)
                    .iter()
                    .map(|group| span_of(group, devices_per_node))
                    .max_by_key(|span| (span.nodes, Reverse(span.members_per_node)))
                    .unwrap_or(GroupSpan {
                        size: 1,
                        nodes: 1,
                        members_per_node: 1,
                    })
            })
            .collect();
        Spans { spans }
    }

    /// The span of `kind`'s groups.
    pub fn of(&self, kind: GroupKind) -> GroupSpan {
        self.spans[kind as usize]
    }
}

fn span_of(group: &[usize], devices_per_node: usize) -> GroupSpan {
    let mut nodes: Vec<(usize, usize)> = Vec::new();
    for &rank in group {
        let node = rank / devices_per_node;
        match nodes.iter_mut().find(|(n, _)| *n == node) {
            Some((_, count)) => *count += 1,
            None => nodes.push((node, 1)),
        }
    }
    GroupSpan {
        size: group.len(),
        nodes: nodes.len(),
        members_per_node: nodes.iter().map(|&(_, c)| c).min().unwrap_or(1),
    }
}

fn rate(link: &LinkRates, collective: Collective) -> Rate {
    match collective {
        Collective::AllReduce => link.all_reduce,
        Collective::AllGather => link.all_gather,
        Collective::AllToAll => link.all_to_all,
        Collective::P2p => link.p2p,
    }
}

/// Seconds for `bytes` sent by each rank in `calls` calls of `collective` over a group that
/// lies as `span` says.
pub fn collective_seconds(
    hardware: &Hardware,
    collective: Collective,
    span: GroupSpan,
    bytes: f64,
    calls: f64,
) -> f64 {
    if span.size <= 1 || bytes == 0.0 {
        return 0.0;
    }
    let network = &hardware.network;
    let intra = rate(&network.intra_node, collective);
    let inter = match (&network.inter_node, span.nodes > 1) {
        (Some(link), true) => rate(link, collective),
        _ => return bytes / intra.bandwidth + calls * intra.latency,
    };
    let latency = calls * inter.latency.max(intra.latency);
    match collective {
        Collective::AllReduce | Collective::AllGather => {
            let cards = if network.rings_aggregate_nics {
                span.members_per_node as f64
            } else {
                1.0
            };
            bytes / (inter.bandwidth * cards).min(intra.bandwidth) + latency
        }
        Collective::AllToAll => {
            let peers = (span.size - 1) as f64;
            let off_node = (span.size - span.members_per_node) as f64 / peers;
            let inside = bytes * (1.0 - off_node) / intra.bandwidth;
            let outside = bytes * off_node / inter.bandwidth;
            inside.max(outside) + latency
        }
        Collective::P2p => bytes / inter.bandwidth + latency,
    }
}

/// Seconds of one [`Comm`], forward and backward.
pub fn comm_seconds(hardware: &Hardware, spans: &Spans, comm: &Comm) -> Passes {
    let span = spans.of(comm.group);
    Passes {
        forward: collective_seconds(
            hardware,
            comm.collective,
            span,
            comm.bytes.forward,
            comm.calls.forward,
        ),
        backward: collective_seconds(
            hardware,
            comm.collective,
            span,
            comm.bytes.backward,
            comm.calls.backward,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use origami_parallel::ParallelConfig;

    fn topology(world: usize, tp: usize, pp: usize, ep: usize, etp: usize) -> Topology {
        let config = ParallelConfig {
            tp,
            pp,
            ep,
            etp: Some(etp),
            ..ParallelConfig::default()
        };
        Topology::new(&config.layout(world).unwrap())
    }

    #[test]
    fn folding_keeps_ep_in_a_node_and_unfolded_ep_crosses() {
        // 128 ranks, 8 per node, tp 2 pp 8: dp 8. Folded ep 8 etp 1: ep groups are ranks
        // 0..8, one node. Unfolded ep 8 etp 2: ep groups stride 2, ranks 0, 2, …, 14: two
        // nodes, 4 members on each.
        let folded = Spans::new(&topology(128, 2, 8, 8, 1), 8);
        assert_eq!(
            folded.of(GroupKind::Ep),
            GroupSpan {
                size: 8,
                nodes: 1,
                members_per_node: 8
            }
        );
        let unfolded = Spans::new(&topology(128, 2, 8, 8, 2), 8);
        assert_eq!(
            unfolded.of(GroupKind::Ep),
            GroupSpan {
                size: 8,
                nodes: 2,
                members_per_node: 4
            }
        );
        // dp groups of the folded layout: stride tp = 2 over 16 ranks: two nodes of 4.
        assert_eq!(folded.of(GroupKind::Dp).nodes, 2);
        // tp groups are pairs inside a node.
        assert_eq!(folded.of(GroupKind::Tp).nodes, 1);
    }

    #[test]
    fn link_costs_by_hand() {
        let h100 = Hardware::h100_dgx();
        let intra = h100.network.intra_node;
        let inter = h100.network.inter_node.unwrap();
        let gb = 1e9;
        let inside = GroupSpan {
            size: 8,
            nodes: 1,
            members_per_node: 8,
        };
        let t = collective_seconds(&h100, Collective::AllToAll, inside, gb, 1.0);
        assert_eq!(
            t,
            gb / intra.all_to_all.bandwidth + intra.all_to_all.latency
        );
        // Across two nodes with 4 members each: 4 of 7 peers are remote.
        let across = GroupSpan {
            size: 8,
            nodes: 2,
            members_per_node: 4,
        };
        let t = collective_seconds(&h100, Collective::AllToAll, across, gb, 1.0);
        let expected = (gb * 4.0 / 7.0 / inter.all_to_all.bandwidth)
            .max(gb * 3.0 / 7.0 / intra.all_to_all.bandwidth)
            + inter.all_to_all.latency.max(intra.all_to_all.latency);
        assert!((t / expected - 1.0).abs() < 1e-12);
        // A ring with one member per node runs at one card's rate.
        let sparse = GroupSpan {
            size: 2,
            nodes: 2,
            members_per_node: 1,
        };
        let t = collective_seconds(&h100, Collective::AllGather, sparse, gb, 0.0);
        assert_eq!(t, gb / inter.all_gather.bandwidth);
        // With 8 members per node, eight cards: capped by the intra-node rate.
        let dense = GroupSpan {
            size: 16,
            nodes: 2,
            members_per_node: 8,
        };
        let t = collective_seconds(&h100, Collective::AllGather, dense, gb, 0.0);
        let bandwidth = (8.0 * inter.all_gather.bandwidth).min(intra.all_gather.bandwidth);
        assert_eq!(t, gb / bandwidth);
        let single = GroupSpan {
            size: 1,
            nodes: 1,
            members_per_node: 1,
        };
        assert_eq!(
            collective_seconds(&h100, Collective::AllReduce, single, gb, 1.0),
            0.0
        );
    }
}
