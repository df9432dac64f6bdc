//! Run by the MPI tests under `mpirun`: `conformance` runs the conformance suite on the world
//! and on its two halves; `panic-in-all-to-all` makes rank 1 panic between two all-to-alls.

use std::sync::Arc;

use origami_comm::{conformance, CommError, Communicator};

fn main() -> Result<(), CommError> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    origami_comm::mpi::run(|world| match mode.as_str() {
        "conformance" => conformance_on_world_and_halves(world),
        "panic-in-all-to-all" => panic_in_all_to_all(world),
        other => Err(format!("unknown mode `{other}`")),
    })
}

fn conformance_on_world_and_halves(world: Arc<dyn Communicator>) -> Result<(), String> {
    let checks = conformance::run_all(world.as_ref()).map_err(|e| e.to_string())?;
    let size = world.size();
    let halves = [(0..size / 2).collect(), (size / 2..size).collect()];
    let half = world
        .split(&halves)
        .map_err(|e| e.to_string())?
        .ok_or("not in a half")?;
    conformance::run_all(half.as_ref()).map_err(|e| e.to_string())?;
    println!("rank {} passed {checks} checks", world.rank());
    Ok(())
}

fn panic_in_all_to_all(world: Arc<dyn Communicator>) -> Result<(), String> {
    let counts = vec![3; world.size()];
    let send = vec![1.0; 3 * world.size()];
    let mut recv = send.clone();
    for round in 0..2 {
        if round == 1 && world.rank() == 1 {
            panic!("injected failure on rank 1");
        }
        world
            .all_to_all_v(&send, &counts, &mut recv, &counts)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
