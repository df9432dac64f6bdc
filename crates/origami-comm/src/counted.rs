//! A communicator that counts the bytes its rank sends, for the traffic reports of the
//! benchmarks. It wraps any backend; the groups split from it count into the same counter, so
//! one counter per rank sees every collective of every group.
//!
//! Bytes are counted as the usual bandwidth-optimal algorithms send them, so the figures
//! compare with what a layout needs in theory, whatever the backend does internally:
//! all-reduce (ring) `2·(n−1)/n` of the buffer, all-gather and reduce-scatter (ring) every block
//! but the rank's own once, all-to-all what goes to the other ranks, point-to-point the message,
//! broadcast the buffer once per other rank from the root.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{Communicator, Incoming, Outgoing, ReduceOp, Result};

/// Counts the bytes sent by one rank over every group split from it.
pub struct CountedComm {
    inner: Arc<dyn Communicator>,
    sent: Arc<AtomicU64>,
}

impl CountedComm {
    /// Wraps `inner`; returns the counting communicator and its byte counter.
    pub fn wrap(inner: Arc<dyn Communicator>) -> (Arc<dyn Communicator>, Arc<AtomicU64>) {
        let sent = Arc::new(AtomicU64::new(0));
        let comm = Arc::new(CountedComm {
            inner,
            sent: sent.clone(),
        });
        (comm, sent)
    }

    fn add(&self, elements: usize, bytes_per_element: usize) {
        self.sent
            .fetch_add((elements * bytes_per_element) as u64, Ordering::Relaxed);
    }

    /// What a ring all-reduce of `len` elements sends from one rank.
    fn ring_all_reduce(&self, len: usize, bytes_per_element: usize) {
        let n = self.inner.size();
        self.add(2 * (n - 1) * len / n, bytes_per_element);
    }
}

impl Communicator for CountedComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn world_rank(&self) -> usize {
        self.inner.world_rank()
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.ring_all_reduce(buf.len(), 4);
        self.inner.all_reduce(buf, op)
    }

    fn all_reduce_u64(&self, buf: &mut [u64], op: ReduceOp) -> Result<()> {
        self.ring_all_reduce(buf.len(), 8);
        self.inner.all_reduce_u64(buf, op)
    }

    fn all_gather_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let own = counts.get(self.rank()).copied().unwrap_or(0);
        self.add(counts.iter().sum::<usize>() - own, 4);
        self.inner.all_gather_v(send, counts, recv)
    }

    fn reduce_scatter_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let own = counts.get(self.rank()).copied().unwrap_or(0);
        self.add(counts.iter().sum::<usize>() - own, 4);
        self.inner.reduce_scatter_v(send, counts, recv)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()> {
        let own = send_counts.get(self.rank()).copied().unwrap_or(0);
        self.add(send_counts.iter().sum::<usize>() - own, 4);
        self.inner
            .all_to_all_v(send, send_counts, recv, recv_counts)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if self.rank() == root {
            self.add(buf.len() * (self.size() - 1), 4);
        }
        self.inner.broadcast(buf, root)
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<()> {
        self.add(buf.len(), 4);
        self.inner.send(buf, dest, tag)
    }

    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<()> {
        self.inner.recv(buf, src, tag)
    }

    fn send_recv(
        &self,
        send: &[f32],
        dest: usize,
        recv: &mut [f32],
        src: usize,
        tag: u32,
    ) -> Result<()> {
        self.add(send.len(), 4);
        self.inner.send_recv(send, dest, recv, src, tag)
    }

    fn exchange(&self, sends: &[Outgoing<'_>], receives: &mut [Incoming<'_>]) -> Result<()> {
        self.add(sends.iter().map(|s| s.data.len()).sum(), 4);
        self.inner.exchange(sends, receives)
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Option<Arc<dyn Communicator>>> {
        Ok(self.inner.split(groups)?.map(|inner| {
            Arc::new(CountedComm {
                inner,
                sent: self.sent.clone(),
            }) as Arc<dyn Communicator>
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalWorld;

    #[test]
    fn counts_follow_the_algorithms_and_include_split_groups() {
        let sent = LocalWorld::new(4)
            .run(|world| {
                let (comm, sent) = CountedComm::wrap(world);
                let mut buf = vec![1.0f32; 8];
                comm.all_reduce(&mut buf, ReduceOp::Sum)?;
                let mut gathered = vec![0.0; 8];
                comm.all_gather_v(&buf[..2], &[2, 2, 2, 2], &mut gathered)?;
                let half = comm
                    .split(&[vec![0, 1], vec![2, 3]])?
                    .expect("every rank is in a half");
                let mut pair = vec![0.0; 3];
                half.all_reduce(&mut pair, ReduceOp::Sum)?;
                Ok::<_, crate::CommError>(sent.load(Ordering::Relaxed))
            })
            .unwrap();
        // 2·3/4·8 = 12 elements, then 6, then 2·1/2·3 = 3: 21 elements of 4 bytes.
        assert_eq!(sent, vec![84; 4]);
    }
}
