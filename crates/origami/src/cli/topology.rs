//! `origami topology`: shows which ranks form which group under a parallel configuration — the
//! dense and expert mappings side by side per pipeline stage, and which groups cross a node
//! boundary — or, with `--json`, every group as data.

use std::fmt::Write as _;

use clap::Args;
use origami_parallel::{GroupKind, Mapping, ModelDims, ParallelConfig, ParallelLayout, Topology};

/// Arguments of `origami topology`.
#[derive(Args, Debug)]
pub struct TopologyArgs {
    /// Number of ranks.
    #[arg(long)]
    pub world: usize,
    /// Tensor-parallel size of attention layers.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Context-parallel size.
    #[arg(long, default_value_t = 1)]
    pub cp: usize,
    /// Pipeline-parallel size.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Virtual pipeline stages per rank.
    #[arg(long, default_value_t = 1)]
    pub vpp: usize,
    /// Expert-parallel size.
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Expert tensor-parallel size (default: tp).
    #[arg(long)]
    pub etp: Option<usize>,
    /// Axis order, fastest-varying first.
    #[arg(long, default_value = "tp-cp-ep-dp-pp")]
    pub order: String,
    /// Ranks per node, to show which groups cross a node boundary (default: all on one node).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ranks_per_node: Option<u64>,
    /// Also check that the sizes divide a model: its number of experts.
    #[arg(long)]
    pub num_experts: Option<usize>,
    /// Also check: number of attention heads.
    #[arg(long)]
    pub num_heads: Option<usize>,
    /// Also check: number of key/value heads (query groups; default: the number of heads).
    #[arg(long)]
    pub num_query_groups: Option<usize>,
    /// Also check: number of layers.
    #[arg(long)]
    pub num_layers: Option<usize>,
    /// Print one JSON object: every group kind's groups and the derived sizes.
    #[arg(long)]
    pub json: bool,
}

/// Validates the configuration and prints the topology.
pub fn run(args: TopologyArgs) -> anyhow::Result<()> {
    let config = ParallelConfig {
        tp: args.tp,
        cp: args.cp,
        pp: args.pp,
        vpp: args.vpp,
        ep: args.ep,
        etp: args.etp,
        order: args.order.parse()?,
    };
    let layout = config.layout(args.world)?;
    layout.check_model(&model_dims(&args, &layout))?;
    let topology = Topology::new(&layout);
    if args.json {
        println!("{}", serde_json::to_string(&topology)?);
    } else {
        let ranks_per_node = args.ranks_per_node.map_or(args.world, |n| n as usize);
        print!("{}", render(&topology, ranks_per_node));
    }
    Ok(())
}

/// The model dimensions given on the command line; those not given take values that pass.
fn model_dims(args: &TopologyArgs, layout: &ParallelLayout) -> ModelDims {
    let num_heads = args.num_heads.unwrap_or(layout.tp());
    ModelDims {
        num_layers: args.num_layers.unwrap_or(layout.pp() * layout.vpp()),
        num_heads,
        num_query_groups: args.num_query_groups.unwrap_or(num_heads),
        num_experts: args.num_experts.unwrap_or(layout.ep()),
    }
}

/// Groups listed in full up to this many per kind; more are elided.
const GROUPS_SHOWN: usize = 8;

/// The readable layout: header, one table per pipeline stage, then every group kind.
fn render(topology: &Topology, ranks_per_node: usize) -> String {
    let layout = topology.layout();
    let nodes = layout.world().div_ceil(ranks_per_node);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "world {}, order {}, {ranks_per_node} ranks per node ({nodes} node{})",
        layout.world(),
        layout.order(),
        if nodes == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "dense  (attention): tp {} · cp {} · dp {} · pp {}{}",
        layout.tp(),
        layout.cp(),
        layout.dp(),
        layout.pp(),
        if layout.vpp() > 1 {
            format!(" (vpp {})", layout.vpp())
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "expert (MoE):       etp {} · ep {} · edp {} · pp {}",
        layout.etp(),
        layout.ep(),
        layout.edp(),
        layout.pp()
    );
    for stage in 0..layout.pp() {
        let _ = writeln!(out, "\npipeline stage {stage}");
        let _ = writeln!(out, "  rank  node |  tp  cp  dp |  etp  ep  edp");
        for rank in (0..layout.world()).filter(|&rank| layout.coordinates(rank).pp == stage) {
            let c = layout.coordinates(rank);
            let _ = writeln!(
                out,
                "  {rank:>4}  {:>4} | {:>3} {:>3} {:>3} | {:>4} {:>3} {:>4}",
                rank / ranks_per_node,
                c.tp,
                c.cp,
                c.dp,
                c.etp,
                c.ep,
                c.edp
            );
        }
    }
    let _ = writeln!(
        out,
        "\n  group            size  count  crossing nodes  groups"
    );
    for kind in GroupKind::ALL {
        let groups = topology.groups(kind);
        let crossing = groups
            .iter()
            .filter(|group| crosses_nodes(group, ranks_per_node))
            .count();
        let mapping = match kind.mapping() {
            Mapping::Dense => "dense ",
            Mapping::Expert => "expert",
        };
        let size = groups.first().map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "  {mapping} {:<9} {size:>4} {:>6} {crossing:>15}  {}",
            kind.name(),
            groups.len(),
            list(groups)
        );
    }
    let _ = writeln!(out, "\n{}", verdict(topology, ranks_per_node));
    out
}

/// Whether a group's ranks lie on more than one node.
fn crosses_nodes(group: &[usize], ranks_per_node: usize) -> bool {
    group
        .iter()
        .any(|&rank| rank / ranks_per_node != group[0] / ranks_per_node)
}

/// The first groups of a kind as `[0,1] [2,3] …`.
fn list(groups: &[Vec<usize>]) -> String {
    let mut text: Vec<String> = groups
        .iter()
        .take(GROUPS_SHOWN)
        .map(|group| {
            let ranks: Vec<String> = group.iter().map(usize::to_string).collect();
            format!("[{}]", ranks.join(","))
        })
        .collect();
    if groups.len() > GROUPS_SHOWN {
        text.push(format!("… ({} more)", groups.len() - GROUPS_SHOWN));
    }
    text.join(" ")
}

/// One line on where the expert all-to-all runs.
fn verdict(topology: &Topology, ranks_per_node: usize) -> String {
    let ep = topology.groups(GroupKind::Ep);
    let crossing = ep
        .iter()
        .filter(|group| crosses_nodes(group, ranks_per_node))
        .count();
    if crossing == 0 {
        "expert all-to-all (ep groups) stays inside a node".to_string()
    } else {
        format!(
            "expert all-to-all crosses nodes: {crossing} of {} ep groups span more than one node",
            ep.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(world: usize, config: ParallelConfig) -> Topology {
        Topology::new(&config.layout(world).unwrap())
    }

    #[test]
    fn json_has_every_group_kind_and_the_sizes() {
        let config = ParallelConfig {
            tp: 2,
            cp: 2,
            pp: 2,
            ep: 4,
            etp: Some(1),
            ..Default::default()
        };
        let json = serde_json::to_value(topology(16, config)).unwrap();
        let keys = [
            "tp",
            "cp",
            "dp",
            "dp_cp",
            "pp",
            "tp_pp",
            "tp_cp",
            "tp_dp_cp",
            "embedding",
            "ep",
            "etp",
            "edp",
            "tp_ep",
            "tp_ep_pp",
            "sizes",
        ];
        let object = json.as_object().unwrap();
        assert_eq!(object.len(), keys.len());
        assert!(keys.iter().all(|key| object.contains_key(*key)));
        assert_eq!(json["cp"][0], serde_json::json!([0, 2]));
        assert_eq!(json["sizes"]["edp"], 2);
        assert_eq!(json["sizes"]["dp"], 2);
    }

    #[test]
    fn the_readable_layout_shows_stages_and_node_crossings() {
        let config = ParallelConfig {
            tp: 2,
            cp: 2,
            pp: 2,
            ep: 4,
            etp: Some(1),
            ..Default::default()
        };
        let text = render(&topology(16, config), 4);
        assert!(text.contains("world 16, order tp-cp-ep-dp-pp, 4 ranks per node (4 nodes)"));
        assert!(text.contains("pipeline stage 1"));
        // dp groups [0,4] … join nodes 0 and 1: all 8 cross; ep groups are whole nodes.
        assert!(
            text.contains("  dense  dp           2      8               8  [0,4]"),
            "{text}"
        );
        assert!(
            text.contains("  expert ep           4      4               0  [0,1,2,3]"),
            "{text}"
        );
        assert!(text.contains("expert all-to-all (ep groups) stays inside a node"));
        let text = render(
            &topology(
                16,
                ParallelConfig {
                    ep: 8,
                    ..Default::default()
                },
            ),
            4,
        );
        assert!(
            text.contains("2 of 2 ep groups span more than one node"),
            "{text}"
        );
    }
}
