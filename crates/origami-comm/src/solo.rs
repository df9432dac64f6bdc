//! A group of one rank: every collective is a copy (or nothing), with the same argument checks
//! as the real backends. Layers written against [`Communicator`] use it on a single rank, so
//! the world=1 run takes exactly the code path of a parallel run with trivial groups.

use std::sync::Arc;

use crate::communicator::Checks;
use crate::error::{CommError, Op, Result};
use crate::{Communicator, Incoming, Outgoing, ReduceOp};

/// The communicator of a group that holds only this rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoloComm {
    world_rank: usize,
}

impl SoloComm {
    /// A one-rank group; `world_rank` is the rank errors name.
    pub fn new(world_rank: usize) -> Self {
        SoloComm { world_rank }
    }

    /// The same, shared as the trait object layers hold.
    pub fn shared(world_rank: usize) -> Arc<dyn Communicator> {
        Arc::new(SoloComm::new(world_rank))
    }

    fn checks(&self, op: Op) -> Checks<'_, Self> {
        Checks { comm: self, op }
    }

    fn copy(&self, op: Op, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let checks = self.checks(op);
        checks.counts("counts", counts)?;
        checks.length("send", send.len(), counts[0])?;
        checks.length("recv", recv.len(), counts[0])?;
        recv.copy_from_slice(send);
        Ok(())
    }
}

impl Communicator for SoloComm {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn world_rank(&self) -> usize {
        self.world_rank
    }

    fn all_reduce(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_reduce_u64(&self, _buf: &mut [u64], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        self.copy(Op::AllGatherV, send, counts, recv)
    }

    fn reduce_scatter_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        self.copy(Op::ReduceScatterV, send, counts, recv)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()> {
        let checks = self.checks(Op::AllToAllV);
        checks.counts("recv_counts", recv_counts)?;
        checks.length("recv", recv.len(), recv_counts[0])?;
        self.copy(Op::AllToAllV, send, send_counts, recv)
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        self.checks(Op::Broadcast).peer(root)
    }

    fn send(&self, _buf: &[f32], dest: usize, _tag: u32) -> Result<()> {
        self.checks(Op::Send).peer(dest)?;
        Err(self.no_partner(Op::Send))
    }

    fn recv(&self, _buf: &mut [f32], src: usize, _tag: u32) -> Result<()> {
        self.checks(Op::Recv).peer(src)?;
        Err(self.no_partner(Op::Recv))
    }

    fn send_recv(
        &self,
        send: &[f32],
        dest: usize,
        recv: &mut [f32],
        src: usize,
        _tag: u32,
    ) -> Result<()> {
        let checks = self.checks(Op::SendRecv);
        checks.peer(dest)?;
        checks.peer(src)?;
        checks.length("recv", recv.len(), send.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }

    fn exchange(&self, sends: &[Outgoing<'_>], receives: &mut [Incoming<'_>]) -> Result<()> {
        let checks = self.checks(Op::Exchange);
        for peer in sends
            .iter()
            .map(|s| s.peer)
            .chain(receives.iter().map(|r| r.peer))
        {
            checks.peer(peer)?;
        }
        let mut taken = vec![false; sends.len()];
        for receive in receives.iter_mut() {
            let Some(index) = (0..sends.len()).find(|&i| !taken[i] && sends[i].tag == receive.tag)
            else {
                return Err(self.no_partner(Op::Exchange));
            };
            taken[index] = true;
            checks.length("receive", receive.data.len(), sends[index].data.len())?;
            receive.data.copy_from_slice(sends[index].data);
        }
        if taken.iter().any(|&t| !t) {
            return Err(self.no_partner(Op::Exchange));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Option<Arc<dyn Communicator>>> {
        let mine = self.checks(Op::Split).split(groups)?;
        Ok(mine.map(|_| SoloComm::shared(self.world_rank)))
    }
}

impl SoloComm {
    fn no_partner(&self, op: Op) -> CommError {
        CommError::Mismatch {
            rank: self.world_rank,
            op,
            detail: "a one-rank group cannot send to or receive from itself alone; \
                     use send_recv, or an exchange that both sends and receives each message"
                .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_copy_and_check_lengths() {
        let comm = SoloComm::new(3);
        let mut out = [0.0; 2];
        comm.all_gather_v(&[1.0, 2.0], &[2], &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0]);
        comm.all_to_all_v(&[3.0, 4.0], &[2], &mut out, &[2])
            .unwrap();
        assert_eq!(out, [3.0, 4.0]);
        let error = comm
            .reduce_scatter_v(&[1.0], &[2], &mut out)
            .unwrap_err()
            .to_string();
        assert!(error.contains("rank 3"), "{error}");
        assert!(comm.send(&[1.0], 1, 0).is_err());
        assert!(comm.split(&[vec![0]]).unwrap().is_some());
        assert!(comm.split(&[]).unwrap().is_none());
    }
}
