//! Rank groups against hand-derived expectations (DESIGN.md §1), validation errors, and
//! properties over many layouts.

use origami_parallel::{
    Axis, GroupKind, ModelDims, Order, ParallelConfig, ParallelError, Topology,
};
use proptest::prelude::*;

fn topology(world: usize, config: ParallelConfig) -> Topology {
    Topology::new(&config.layout(world).expect("a valid layout"))
}

fn consecutive(size: usize, count: usize) -> Vec<Vec<usize>> {
    (0..count)
        .map(|g| (g * size..(g + 1) * size).collect())
        .collect()
}

/// DESIGN.md §1's worked example: world 16, tp2 cp2 pp2, etp1 ep4, default order. Dense strides
/// tp 1, cp 2, dp 4, pp 8; expert strides etp 1, ep 1, edp 4, pp 8.
#[test]
fn worked_example_of_the_design_matches_by_hand() {
    let config = ParallelConfig {
        tp: 2,
        cp: 2,
        pp: 2,
        ep: 4,
        etp: Some(1),
        ..Default::default()
    };
    let t = topology(16, config);
    let expected: [(GroupKind, Vec<Vec<usize>>); 14] = [
        (GroupKind::Tp, consecutive(2, 8)),
        (
            GroupKind::Cp,
            vec![
                vec![0, 2],
                vec![1, 3],
                vec![4, 6],
                vec![5, 7],
                vec![8, 10],
                vec![9, 11],
                vec![12, 14],
                vec![13, 15],
            ],
        ),
        (
            GroupKind::Dp,
            vec![
                vec![0, 4],
                vec![1, 5],
                vec![2, 6],
                vec![3, 7],
                vec![8, 12],
                vec![9, 13],
                vec![10, 14],
                vec![11, 15],
            ],
        ),
        (
            GroupKind::DpCp,
            vec![
                vec![0, 2, 4, 6],
                vec![1, 3, 5, 7],
                vec![8, 10, 12, 14],
                vec![9, 11, 13, 15],
            ],
        ),
        (GroupKind::Pp, (0..8).map(|r| vec![r, r + 8]).collect()),
        (
            GroupKind::TpPp,
            vec![
                vec![0, 1, 8, 9],
                vec![2, 3, 10, 11],
                vec![4, 5, 12, 13],
                vec![6, 7, 14, 15],
            ],
        ),
        (GroupKind::TpCp, consecutive(4, 4)),
        (GroupKind::TpDpCp, consecutive(8, 2)),
        (
            GroupKind::Embedding,
            (0..8).map(|r| vec![r, r + 8]).collect(),
        ),
        (GroupKind::Ep, consecutive(4, 4)),
        (GroupKind::Etp, consecutive(1, 16)),
        (
            GroupKind::Edp,
            vec![
                vec![0, 4],
                vec![1, 5],
                vec![2, 6],
                vec![3, 7],
                vec![8, 12],
                vec![9, 13],
                vec![10, 14],
                vec![11, 15],
            ],
        ),
        (GroupKind::TpEp, consecutive(4, 4)),
        (
            GroupKind::TpEpPp,
            vec![
                vec![0, 1, 2, 3, 8, 9, 10, 11],
                vec![4, 5, 6, 7, 12, 13, 14, 15],
            ],
        ),
    ];
    for (kind, groups) in expected {
        assert_eq!(t.groups(kind), groups.as_slice(), "{}", kind.name());
    }
}

/// Order tp-cp-ep-pp-dp, world 8, tp2 pp2 ep2 etp1 (dp = edp = 2). Dense strides tp 1, pp 2,
/// dp 4; expert strides ep 1, pp 2, edp 4.
#[test]
fn pp_before_dp_order_matches_by_hand() {
    let config = ParallelConfig {
        tp: 2,
        pp: 2,
        ep: 2,
        etp: Some(1),
        order: "tp-cp-ep-pp-dp".parse().unwrap(),
        ..Default::default()
    };
    let t = topology(8, config);
    let pipelines = vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]];
    let halves = vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]];
    assert_eq!(t.groups(GroupKind::Tp), consecutive(2, 4).as_slice());
    assert_eq!(t.groups(GroupKind::Pp), pipelines.as_slice());
    assert_eq!(t.groups(GroupKind::Embedding), pipelines.as_slice());
    assert_eq!(t.groups(GroupKind::Dp), halves.as_slice());
    assert_eq!(t.groups(GroupKind::Ep), consecutive(2, 4).as_slice());
    assert_eq!(t.groups(GroupKind::Edp), halves.as_slice());
    assert_eq!(
        t.groups(GroupKind::TpEpPp),
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]].as_slice()
    );
}

/// Without folding (etp defaults to tp = 2, ep 4 over world 8): edp = 1, and ep groups are the
/// dense dp groups (tp stride 1, then ep/dp stride 2).
#[test]
fn etp_defaults_to_tp_and_unfolded_ep_equals_dp() {
    let config = ParallelConfig {
        tp: 2,
        ep: 4,
        ..Default::default()
    };
    let layout = config.layout(8).unwrap();
    assert_eq!((layout.etp(), layout.edp(), layout.dp()), (2, 1, 4));
    let t = Topology::new(&layout);
    let strided = vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]];
    assert_eq!(t.groups(GroupKind::Ep), strided.as_slice());
    assert_eq!(t.groups(GroupKind::Dp), strided.as_slice());
    assert_eq!(
        t.groups(GroupKind::TpEp),
        vec![(0..8).collect::<Vec<_>>()].as_slice()
    );
    assert_eq!(t.groups(GroupKind::Edp), consecutive(1, 8).as_slice());
}

#[test]
fn embedding_groups_are_first_and_last_stage() {
    let t = topology(
        4,
        ParallelConfig {
            pp: 4,
            ..Default::default()
        },
    );
    assert_eq!(t.groups(GroupKind::Embedding), [vec![0, 3]].as_slice());
    assert_eq!(t.group_of(GroupKind::Embedding, 1), None);
    let t = topology(3, ParallelConfig::default());
    assert_eq!(t.groups(GroupKind::Embedding), consecutive(1, 3).as_slice());
}

#[test]
fn coordinates_are_positions_in_groups() {
    let config = ParallelConfig {
        tp: 2,
        cp: 2,
        pp: 2,
        ep: 4,
        etp: Some(1),
        ..Default::default()
    };
    let layout = config.layout(16).unwrap();
    // rank 13 = tp 1 + cp 0·2 + dp 1·4 + pp 1·8; expert: ep 13 % 4 = 1, edp (13 / 4) % 2 = 1.
    let c = layout.coordinates(13);
    assert_eq!(
        [c.tp, c.cp, c.dp, c.pp, c.ep, c.etp, c.edp],
        [1, 0, 1, 1, 1, 0, 1]
    );
}

fn error(world: usize, config: ParallelConfig) -> String {
    config.layout(world).unwrap_err().to_string()
}

#[test]
fn every_constraint_violation_names_its_numbers() {
    assert_eq!(
        error(
            12,
            ParallelConfig {
                tp: 2,
                cp: 2,
                pp: 2,
                ..Default::default()
            }
        ),
        "world size 12 is not divisible by tp·cp·pp = 2·2·2 = 8 (dense mapping)"
    );
    assert_eq!(
        error(
            8,
            ParallelConfig {
                ep: 3,
                ..Default::default()
            }
        ),
        "world size 8 is not divisible by etp·ep·pp = 1·3·1 = 3 (expert mapping)"
    );
    assert_eq!(
        error(
            8,
            ParallelConfig {
                tp: 0,
                ..Default::default()
            }
        ),
        "parallel size tp must be at least 1, got 0"
    );
    assert_eq!(
        error(
            8,
            ParallelConfig {
                vpp: 2,
                ..Default::default()
            }
        ),
        "virtual pipeline size vpp = 2 needs pp > 1, got pp = 1"
    );
    let pp_before_dp: Order = "tp-cp-ep-pp-dp".parse().unwrap();
    assert_eq!(
        error(16, ParallelConfig { tp: 2, pp: 2, ep: 4, etp: Some(1), order: pp_before_dp, ..Default::default() }),
        "order `tp-cp-ep-pp-dp` does not end in pp and pp = 2 > 1, so edp must equal dp; got edp = 2, dp = 4"
    );
    // tp-pp-cp-ep-dp with tp2 cp2 pp2 (dp 2) and etp1 ep4 pp2 (edp 2): pp strides 2 vs 1.
    let pp_second: Order = "tp-pp-cp-ep-dp".parse().unwrap();
    assert_eq!(
        error(16, ParallelConfig { tp: 2, cp: 2, pp: 2, ep: 4, etp: Some(1), order: pp_second, ..Default::default() }),
        "order `tp-pp-cp-ep-dp` gives dense and expert mappings different pipeline groups: pp steps \
         over 2 ranks in the dense mapping but 1 in the expert mapping"
    );
}

#[test]
fn model_constraints_name_their_numbers() {
    let layout = ParallelConfig {
        tp: 2,
        pp: 2,
        vpp: 2,
        ep: 4,
        ..Default::default()
    }
    .layout(16)
    .unwrap();
    let model = ModelDims {
        num_layers: 8,
        num_heads: 8,
        num_query_groups: 2,
        num_experts: 8,
    };
    assert!(layout.check_model(&model).is_ok());
    let cases = [
        (
            ModelDims {
                num_experts: 6,
                ..model
            },
            "number of experts 6 is not divisible by ep = 4",
        ),
        (
            ModelDims {
                num_heads: 7,
                ..model
            },
            "number of attention heads 7 is not divisible by tp = 2",
        ),
        (
            ModelDims {
                num_query_groups: 1,
                ..model
            },
            "number of query groups 1 is not divisible by tp = 2",
        ),
        (
            ModelDims {
                num_layers: 6,
                ..model
            },
            "number of layers 6 is not divisible by pp·vpp = 2·2 = 4",
        ),
    ];
    for (dims, message) in cases {
        assert_eq!(layout.check_model(&dims).unwrap_err().to_string(), message);
    }
}

#[test]
fn configs_deserialize_with_default_etp_and_order() {
    let config: ParallelConfig = from_json(r#"{"tp": 2, "ep": 4}"#);
    assert_eq!(
        (config.etp(), config.order.to_string()),
        (2, "tp-cp-ep-dp-pp".to_string())
    );
    let config: ParallelConfig = from_json(r#"{"order": "tp-cp-ep-pp-dp", "etp": 1}"#);
    assert_eq!(
        (config.etp(), config.order.to_string()),
        (1, "tp-cp-ep-pp-dp".to_string())
    );
}

fn from_json(json: &str) -> ParallelConfig {
    serde_json::from_str(json).unwrap()
}

/// Every size a group of `kind` must have.
fn expected_size(kind: GroupKind, layout: &origami_parallel::ParallelLayout) -> usize {
    let (tp, cp, dp, pp) = (layout.tp(), layout.cp(), layout.dp(), layout.pp());
    let (ep, etp, edp) = (layout.ep(), layout.etp(), layout.edp());
    match kind {
        GroupKind::Tp => tp,
        GroupKind::Cp => cp,
        GroupKind::Dp => dp,
        GroupKind::DpCp => dp * cp,
        GroupKind::Pp => pp,
        GroupKind::TpPp => tp * pp,
        GroupKind::TpCp => tp * cp,
        GroupKind::TpDpCp => tp * dp * cp,
        GroupKind::Embedding => pp.min(2),
        GroupKind::Ep => ep,
        GroupKind::Etp => etp,
        GroupKind::Edp => edp,
        GroupKind::TpEp => etp * ep,
        GroupKind::TpEpPp => etp * ep * pp,
    }
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

/// (config, world): dense sizes at random, then etp·ep dividing world / pp, any order.
fn layouts() -> impl Strategy<Value = (ParallelConfig, usize)> {
    (
        1usize..=4,
        1usize..=3,
        1usize..=4,
        1usize..=4,
        Just(Axis::ALL).prop_shuffle(),
    )
        .prop_flat_map(|(tp, cp, dp, pp, axes)| {
            let per_stage = tp * cp * dp;
            let pairs: Vec<(usize, usize)> = divisors(per_stage)
                .into_iter()
                .flat_map(|etp| {
                    divisors(per_stage / etp)
                        .into_iter()
                        .map(move |ep| (etp, ep))
                })
                .collect();
            let order: Order = axes.map(Axis::name).join("-").parse().unwrap();
            proptest::sample::select(pairs).prop_map(move |(etp, ep)| {
                let config = ParallelConfig {
                    tp,
                    cp,
                    pp,
                    ep,
                    etp: Some(etp),
                    order: order.clone(),
                    ..Default::default()
                };
                (config, per_stage * pp)
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Every kind but embedding partitions the world into groups of the right size; the
    /// embedding groups hold the ends of each pipeline group; dense and expert pipeline groups
    /// coincide; a rank's position in each single-axis group is its coordinate.
    #[test]
    fn groups_partition_the_world_and_pipelines_coincide((config, world) in layouts()) {
        let layout = match config.layout(world) {
            Ok(layout) => layout,
            Err(ParallelError::EdpMustEqualDp { .. } | ParallelError::PipelineGroupsDiffer { .. }) => {
                prop_assert!(!config.order.ends_in_pp() && config.pp > 1);
                return Ok(());
            }
            Err(other) => return Err(TestCaseError::fail(other.to_string())),
        };
        let t = Topology::new(&layout);
        for kind in GroupKind::ALL {
            let size = expected_size(kind, &layout);
            let groups = t.groups(kind);
            prop_assert!(groups.iter().all(|g| g.len() == size), "{} sizes", kind.name());
            if kind == GroupKind::Embedding {
                prop_assert_eq!(groups.len(), world / layout.pp());
                continue;
            }
            prop_assert_eq!(groups.len(), world / size);
            let mut seen: Vec<usize> = groups.concat();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..world).collect::<Vec<_>>(), "{} partition", kind.name());
        }
        let expert_pipelines = layout.expert_generator().groups(&[Axis::Pp]);
        prop_assert_eq!(t.groups(GroupKind::Pp), expert_pipelines.as_slice());
        for rank in 0..world {
            let c = layout.coordinates(rank);
            for (kind, coordinate) in [
                (GroupKind::Tp, c.tp), (GroupKind::Cp, c.cp), (GroupKind::Dp, c.dp), (GroupKind::Pp, c.pp),
                (GroupKind::Ep, c.ep), (GroupKind::Etp, c.etp), (GroupKind::Edp, c.edp),
            ] {
                let group = t.group_of(kind, rank).unwrap();
                prop_assert_eq!(group.iter().position(|&r| r == rank), Some(coordinate));
            }
        }
    }
}
