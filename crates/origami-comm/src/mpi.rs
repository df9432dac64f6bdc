//! The MPI backend (cargo feature `mpi`): one process per rank under `mpirun`, over rsmpi and
//! the system's MPI library (Open MPI or MPICH).
//!
//! - Group communicators come from `MPI_Comm_split` (color = list, key = position in the list).
//! - all-gather-v and all-to-all-v map to MPI's v-collectives; reduce-scatter-v (which rsmpi
//!   exposes only in fixed-block form) is an all-to-all-v of the blocks followed by a sum in rank
//!   order, and all-reduce is that reduce-scatter followed by an all-gather-v — so sums are added
//!   in rank order and match the local backend bit for bit.
//! - `send` is a synchronous send (it returns once the receiver has started receiving), as on
//!   the local backend, so code that would deadlock under MPI also deadlocks in local tests.
//! - A rank whose code panics or fails aborts the whole job (`MPI_Abort`), so `mpirun` exits
//!   non-zero instead of leaving the other ranks waiting. MPI's own errors are fatal by default.
//!
//! MPI is started with `MPI_THREAD_MULTIPLE` so a [`crate::CommStream`] may call it from its own
//! thread; calls on one communicator must still not overlap ([`CommError::Busy`]). Tags must be
//! below the MPI library's `MPI_TAG_UB` (at least 32767).

use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{
    Communicator as _, CommunicatorCollectives, Destination, Equivalence, Root, Source,
};
use mpi::Threading;

use crate::communicator::{offsets, Checks};
use crate::reduce::{chunk, combine_into, Element};
use crate::{CommError, Communicator, Incoming, Op, Outgoing, ReduceOp, Result};

/// Starts MPI, runs `rank_main` with the world communicator and returns its value. If it returns
/// an error or panics, prints the reason and aborts every rank of the job with exit code 1.
/// Communicators must not outlive `rank_main` (MPI is finalised when this returns).
pub fn run<T, E, F>(rank_main: F) -> Result<T>
where
    E: Display,
    F: FnOnce(Arc<dyn Communicator>) -> std::result::Result<T, E>,
{
    let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| CommError::MpiInit("MPI was already initialised".to_string()))?;
    if threading != Threading::Multiple {
        return Err(CommError::MpiInit(format!(
            "the MPI library offers thread support {threading:?}, origami needs Multiple"
        )));
    }
    let world = universe.world();
    let rank = world.rank() as usize;
    let comm: Arc<dyn Communicator> = Arc::new(MpiComm::new(universe.world(), rank));
    let reason = match catch_unwind(AssertUnwindSafe(|| rank_main(comm))) {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(error)) => format!("failed: {error}"),
        Err(panic) => format!(
            "panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        ),
    };
    eprintln!("origami: rank {rank} {reason}; aborting the MPI job");
    world.abort(1)
}

/// One rank's communicator on an MPI group.
pub struct MpiComm {
    comm: SimpleCommunicator,
    world_rank: usize,
    busy: Mutex<()>,
}

// SAFETY: MPI runs with MPI_THREAD_MULTIPLE (checked in `run`), so any thread may call it; calls
// on one communicator are serialised by `busy`.
unsafe impl Send for MpiComm {}
// SAFETY: as above.
unsafe impl Sync for MpiComm {}

impl MpiComm {
    fn new(comm: SimpleCommunicator, world_rank: usize) -> Self {
        MpiComm {
            comm,
            world_rank,
            busy: Mutex::new(()),
        }
    }

    fn enter(&self, op: Op) -> Result<MutexGuard<'_, ()>> {
        match self.busy.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(CommError::Busy {
                rank: self.world_rank,
                op,
            }),
        }
    }

    /// Counts and displacements as MPI's 32-bit ints.
    fn partition(&self, op: Op, counts: &[usize]) -> Result<(Vec<i32>, Vec<i32>)> {
        let to_int = |value: usize| {
            i32::try_from(value).map_err(|_| CommError::Mpi {
                rank: self.world_rank,
                op,
                detail: format!("{value} elements exceed MPI's 32-bit counts"),
            })
        };
        let counts_int = counts.iter().map(|&c| to_int(c)).collect::<Result<_>>()?;
        let displs = offsets(counts)
            .into_iter()
            .map(to_int)
            .collect::<Result<_>>()?;
        Ok((counts_int, displs))
    }

    /// all-to-all-v without argument checks (callers check).
    fn exchange<T: Equivalence>(
        &self,
        op: Op,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        let (sc, sd) = self.partition(op, send_counts)?;
        let (rc, rd) = self.partition(op, recv_counts)?;
        self.comm.all_to_all_varcount_into(
            &Partition::new(send, sc, sd),
            &mut PartitionMut::new(recv, rc, rd),
        );
        Ok(())
    }

    /// Block `me` of every rank's `send`, summed in rank order into `recv`.
    fn reduce_blocks<T: Element + Equivalence>(
        &self,
        op: Op,
        send: &[T],
        counts: &[usize],
        recv: &mut [T],
        reduce: ReduceOp,
    ) -> Result<()> {
        let (size, mine) = (self.size(), counts[self.rank()]);
        let mut blocks = vec![T::ZERO; mine * size];
        self.exchange(op, send, counts, &mut blocks, &vec![mine; size])?;
        combine_into(recv, blocks.chunks(mine.max(1)).take(size), reduce);
        Ok(())
    }

    fn all_reduce_of<T: Element + Equivalence>(
        &self,
        op: Op,
        buf: &mut [T],
        reduce: ReduceOp,
    ) -> Result<()> {
        let _busy = self.enter(op)?;
        let size = self.size();
        let counts: Vec<usize> = (0..size)
            .map(|rank| chunk(buf.len(), size, rank).1)
            .collect();
        let mut reduced = vec![T::ZERO; counts[self.rank()]];
        self.reduce_blocks(op, buf, &counts, &mut reduced, reduce)?;
        let (c, d) = self.partition(op, &counts)?;
        self.comm
            .all_gather_varcount_into(&reduced[..], &mut PartitionMut::new(buf, c, d));
        Ok(())
    }

    /// The received length reported by `status` equals `expected`.
    fn check_received(
        &self,
        op: Op,
        status: mpi::point_to_point::Status,
        expected: usize,
        tag: u32,
    ) -> Result<()> {
        let received = status.count(f32::equivalent_datatype()) as usize;
        if received == expected {
            return Ok(());
        }
        Err(CommError::Mismatch {
            rank: self.world_rank,
            op,
            detail: format!(
                "rank {} sent {received} elements with tag {tag}, rank {} expected {expected}",
                status.source_rank(),
                self.world_rank
            ),
        })
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn world_rank(&self) -> usize {
        self.world_rank
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.all_reduce_of(Op::AllReduce, buf, op)
    }

    fn all_reduce_u64(&self, buf: &mut [u64], op: ReduceOp) -> Result<()> {
        self.all_reduce_of(Op::AllReduceU64, buf, op)
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let checks = Checks {
            comm: self,
            op: Op::AllGatherV,
        };
        checks.counts("counts", counts)?;
        checks.length("send", send.len(), counts[self.rank()])?;
        checks.length("recv", recv.len(), counts.iter().sum())?;
        let _busy = self.enter(Op::AllGatherV)?;
        let (c, d) = self.partition(Op::AllGatherV, counts)?;
        self.comm
            .all_gather_varcount_into(send, &mut PartitionMut::new(recv, c, d));
        Ok(())
    }

    fn reduce_scatter_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let op = Op::ReduceScatterV;
        let checks = Checks { comm: self, op };
        checks.counts("counts", counts)?;
        checks.length("send", send.len(), counts.iter().sum())?;
        checks.length("recv", recv.len(), counts[self.rank()])?;
        let _busy = self.enter(op)?;
        self.reduce_blocks(op, send, counts, recv, ReduceOp::Sum)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()> {
        let op = Op::AllToAllV;
        let checks = Checks { comm: self, op };
        checks.counts("send_counts", send_counts)?;
        checks.counts("recv_counts", recv_counts)?;
        checks.length("send", send.len(), send_counts.iter().sum())?;
        checks.length("recv", recv.len(), recv_counts.iter().sum())?;
        let _busy = self.enter(op)?;
        self.exchange(op, send, send_counts, recv, recv_counts)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        Checks {
            comm: self,
            op: Op::Broadcast,
        }
        .peer(root)?;
        let _busy = self.enter(Op::Broadcast)?;
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<()> {
        Checks {
            comm: self,
            op: Op::Send,
        }
        .peer(dest)?;
        let _busy = self.enter(Op::Send)?;
        self.comm
            .process_at_rank(dest as i32)
            .synchronous_send_with_tag(buf, tag as i32);
        Ok(())
    }

    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<()> {
        Checks {
            comm: self,
            op: Op::Recv,
        }
        .peer(src)?;
        let _busy = self.enter(Op::Recv)?;
        let expected = buf.len();
        let status = self
            .comm
            .process_at_rank(src as i32)
            .receive_into_with_tag(buf, tag as i32);
        self.check_received(Op::Recv, status, expected, tag)
    }

    fn send_recv(
        &self,
        send: &[f32],
        dest: usize,
        recv: &mut [f32],
        src: usize,
        tag: u32,
    ) -> Result<()> {
        let checks = Checks {
            comm: self,
            op: Op::SendRecv,
        };
        checks.peer(dest)?;
        checks.peer(src)?;
        let _busy = self.enter(Op::SendRecv)?;
        let expected = recv.len();
        let status = mpi::point_to_point::send_receive_into_with_tags(
            send,
            &self.comm.process_at_rank(dest as i32),
            tag as i32,
            recv,
            &self.comm.process_at_rank(src as i32),
            tag as i32,
        );
        self.check_received(Op::SendRecv, status, expected, tag)
    }

    fn exchange(&self, sends: &[Outgoing<'_>], receives: &mut [Incoming<'_>]) -> Result<()> {
        let checks = Checks {
            comm: self,
            op: Op::Exchange,
        };
        for peer in sends
            .iter()
            .map(|s| s.peer)
            .chain(receives.iter().map(|r| r.peer))
        {
            checks.peer(peer)?;
        }
        let _busy = self.enter(Op::Exchange)?;
        let expected: Vec<(usize, u32)> = receives.iter().map(|r| (r.data.len(), r.tag)).collect();
        let statuses = mpi::request::scope(|scope| {
            let sent: Vec<_> = sends
                .iter()
                .map(|s| {
                    self.comm
                        .process_at_rank(s.peer as i32)
                        .immediate_synchronous_send_with_tag(scope, s.data, s.tag as i32)
                })
                .collect();
            let arriving: Vec<_> = receives
                .iter_mut()
                .map(|r| {
                    self.comm
                        .process_at_rank(r.peer as i32)
                        .immediate_receive_into_with_tag(scope, &mut *r.data, r.tag as i32)
                })
                .collect();
            let statuses: Vec<_> = arriving.into_iter().map(|request| request.wait()).collect();
            for request in sent {
                request.wait_without_status();
            }
            statuses
        });
        for (status, (len, tag)) in statuses.into_iter().zip(expected) {
            self.check_received(Op::Exchange, status, len, tag)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _busy = self.enter(Op::Barrier)?;
        self.comm.barrier();
        Ok(())
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Option<Arc<dyn Communicator>>> {
        let mine = Checks {
            comm: self,
            op: Op::Split,
        }
        .split(groups)?;
        let _busy = self.enter(Op::Split)?;
        let (color, key) = match mine {
            Some((index, position)) => (Color::with_value(index as i32), position as i32),
            None => (Color::undefined(), 0),
        };
        let world_rank = self.world_rank;
        Ok(self
            .comm
            .split_by_color_with_key(color, key)
            .map(|comm| Arc::new(MpiComm::new(comm, world_rank)) as Arc<dyn Communicator>))
    }
}
