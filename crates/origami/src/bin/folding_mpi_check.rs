//! Run by the folding and pipeline MPI tests under `mpirun`: K = 3 training steps of one folded
//! layout against one rank, named by the arguments
//! `TP CP EP ETP alltoall|allgather p2p|a2a replicated|distributed [PP VPP LAYERS SEQUENCES [tied]]`
//! (dp and edp follow from the number of processes; the pipeline part gives its stages, chunks
//! per stage, the model's layers, the sequences per micro-batch and whether the embedding is
//! tied); every rank prints its discrepancies and fails above 1e-4.

use origami::equivalence::training::{training, TrainingCase};
use origami::layers::context_parallel::CpCommType;
use origami::layers::moe::config::DispatcherKind;

const TOLERANCE: f64 = 1e-4;

const USAGE: &str = "usage: folding_mpi_check TP CP EP ETP alltoall|allgather p2p|a2a replicated|distributed [PP VPP LAYERS SEQUENCES [tied]]";

fn case(args: &[String]) -> Result<TrainingCase, String> {
    let (Some([tp, cp, ep, etp, dispatcher, exchange, optimizer]), pipeline) =
        (args.get(..7), args.get(7..))
    else {
        return Err(USAGE.into());
    };
    let size = |name: &str, value: &String| -> Result<usize, String> {
        value.parse().map_err(|e| format!("{name} {value:?}: {e}"))
    };
    let dispatcher = match dispatcher.as_str() {
        "alltoall" => DispatcherKind::Alltoall,
        "allgather" => DispatcherKind::Allgather,
        other => return Err(format!("unknown dispatcher {other:?}; {USAGE}")),
    };
    let exchange = match exchange.as_str() {
        "p2p" => CpCommType::P2p,
        "a2a" => CpCommType::A2a,
        other => return Err(format!("unknown cp_comm_type {other:?}; {USAGE}")),
    };
    let distributed = match optimizer.as_str() {
        "replicated" => false,
        "distributed" => true,
        other => return Err(format!("unknown optimizer {other:?}; {USAGE}")),
    };
    let case = TrainingCase::new(
        size("TP", tp)?,
        size("CP", cp)?,
        size("EP", ep)?,
        size("ETP", etp)?,
    )
    .dispatcher(dispatcher)
    .cp_comm_type(exchange)
    .distributed_optimizer(distributed);
    match pipeline.unwrap_or_default() {
        [] => Ok(case),
        [pp, vpp, layers, sequences, rest @ ..] => {
            let case = case
                .pipeline(size("PP", pp)?, size("VPP", vpp)?, size("LAYERS", layers)?)
                .sequences_per_micro_batch(size("SEQUENCES", sequences)?);
            match rest {
                [] => Ok(case),
                [tied] if tied == "tied" => Ok(case.tied_embeddings()),
                _ => Err(USAGE.into()),
            }
        }
        _ => Err(USAGE.into()),
    }
}

fn main() -> Result<(), origami_comm::CommError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    origami_comm::mpi::run(|world| -> Result<(), String> {
        let case = case(&args)?;
        let name = case.describe(world.size());
        let discrepancy = training(&world, &case).map_err(|e| format!("{name}: {e}"))?;
        if discrepancy.max() > TOLERANCE {
            return Err(format!(
                "{name}: rank {} differs: {discrepancy:?}",
                world.rank()
            ));
        }
        println!(
            "rank {} matches one rank ({name}): {discrepancy:?}",
            world.rank()
        );
        Ok(())
    })
}
