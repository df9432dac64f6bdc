//! Run by the MoE MPI test under `mpirun`: one equivalence case of the MoE layer or the whole
//! model against one rank, named by the arguments `layer|model EP ETP alltoall|allgather`;
//! every rank prints its discrepancies and fails above 1e-4.

use origami::equivalence::{self, ModelCase, MoeLayerCase};
use origami::layers::moe::config::DispatcherKind;

const TOLERANCE: f64 = 1e-4;

fn main() -> Result<(), origami_comm::CommError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    origami_comm::mpi::run(|world| -> Result<(), String> {
        let [what, ep, etp, dispatcher] = args.as_slice() else {
            return Err("usage: moe_mpi_check layer|model EP ETP alltoall|allgather".into());
        };
        let ep: usize = ep.parse().map_err(|e| format!("EP {ep:?}: {e}"))?;
        let etp: usize = etp.parse().map_err(|e| format!("ETP {etp:?}: {e}"))?;
        let dispatcher = match dispatcher.as_str() {
            "alltoall" => DispatcherKind::Alltoall,
            "allgather" => DispatcherKind::Allgather,
            other => return Err(format!("unknown dispatcher {other:?}")),
        };
        let discrepancy = match what.as_str() {
            "layer" => equivalence::moe_layer(&world, &MoeLayerCase::new(ep, etp, dispatcher)),
            "model" => equivalence::model(&world, &ModelCase::new(ep, etp, dispatcher)),
            other => return Err(format!("unknown case {other:?}")),
        }
        .map_err(|e| e.to_string())?;
        if discrepancy.max() > TOLERANCE {
            return Err(format!("rank {} differs: {discrepancy:?}", world.rank()));
        }
        println!("rank {} matches one rank: {discrepancy:?}", world.rank());
        Ok(())
    })
}
