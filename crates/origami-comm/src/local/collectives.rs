//! The collectives of the local backend, each reading its peers' published buffers directly.
//!
//! all-reduce is a reduce-scatter then an all-gather over shared memory: rank r combines chunk r
//! of every rank's buffer (in rank order, so all ranks get bitwise the same sums), writes it back
//! into its own buffer, and then every rank copies the other chunks from their owners.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::comm::{LocalComm, View};
use super::rendezvous::{Published, RawSlice, Signature};
use crate::communicator::{offsets, Checks};
use crate::reduce::{chunk, combine_into, Element};
use crate::{Communicator, Incoming, Op, Outgoing, ReduceOp, Result};

/// Every rank published the same counts in `field`.
fn same_counts(view: &View<'_>, what: &str, field: fn(&Published) -> RawSlice) -> Result<()> {
    let size = view.size();
    // SAFETY: counts were published with `size` usize entries (checked before publishing).
    let reference = unsafe { field(&view.peer(0)).range::<usize>(0, size) };
    for rank in 1..size {
        let other = unsafe { field(&view.peer(rank)).range::<usize>(0, size) };
        if other != reference {
            return Err(view.mismatch(format!(
                "rank {} passes {what} {reference:?}, rank {} passes {other:?}",
                view.world(0),
                view.world(rank)
            )));
        }
    }
    Ok(())
}

impl LocalComm {
    fn all_reduce_of<T: Element>(&self, op: Op, buf: &mut [T], reduce: ReduceOp) -> Result<()> {
        let mut published = Published::new(Signature {
            reduce: Some(reduce),
            ..Signature::new(op)
        });
        published.recv = RawSlice::of_mut(buf);
        self.collective(published, 2, |view| {
            let (size, me) = (view.size(), view.me());
            let len = view.peer(me).recv.len;
            for rank in 0..size {
                let other = view.peer(rank).recv.len;
                if other != len {
                    return Err(view.mismatch(format!(
                        "rank {} passes {len} elements, rank {} passes {other}",
                        view.world(me),
                        view.world(rank)
                    )));
                }
            }
            let own = view.peer(me).recv;
            let (start, count) = chunk(len, size, me);
            let mut combined = vec![T::ZERO; count];
            // SAFETY: in this phase every rank only reads; chunk `me` of each buffer is in range.
            let blocks =
                (0..size).map(|rank| unsafe { view.peer(rank).recv.range::<T>(start, count) });
            combine_into(&mut combined, blocks, reduce);
            view.sync();
            // SAFETY: in this phase each rank writes only its own chunk of its own buffer.
            unsafe { own.range_mut::<T>(start, count) }.copy_from_slice(&combined);
            view.sync();
            for rank in (0..size).filter(|&rank| rank != me) {
                let (start, count) = chunk(len, size, rank);
                // SAFETY: chunk `rank` of rank `rank` is final and nobody writes it now; each
                // rank writes only chunks of its own buffer that it does not own.
                let source = unsafe { view.peer(rank).recv.range::<T>(start, count) };
                unsafe { own.range_mut::<T>(start, count) }.copy_from_slice(source);
            }
            Ok(())
        })
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.me
    }

    fn size(&self) -> usize {
        self.group.members.len()
    }

    fn world_rank(&self) -> usize {
        self.world()
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
        checks.length("send", send.len(), counts[self.me])?;
        checks.length("recv", recv.len(), counts.iter().sum())?;
        let mut published = Published::new(Signature::new(Op::AllGatherV));
        published.send = RawSlice::of(send);
        published.send_counts = RawSlice::of(counts);
        self.collective(published, 0, |view| {
            same_counts(view, "counts", |p| p.send_counts)?;
            for (rank, start) in offsets(counts).into_iter().enumerate() {
                // SAFETY: rank `rank` published `counts[rank]` elements it does not write now.
                let source = unsafe { view.peer(rank).send.range::<f32>(0, counts[rank]) };
                recv[start..start + counts[rank]].copy_from_slice(source);
            }
            Ok(())
        })
    }

    fn reduce_scatter_v(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let checks = Checks {
            comm: self,
            op: Op::ReduceScatterV,
        };
        checks.counts("counts", counts)?;
        checks.length("send", send.len(), counts.iter().sum())?;
        checks.length("recv", recv.len(), counts[self.me])?;
        let mut published = Published::new(Signature {
            reduce: Some(ReduceOp::Sum),
            ..Signature::new(Op::ReduceScatterV)
        });
        published.send = RawSlice::of(send);
        published.send_counts = RawSlice::of(counts);
        self.collective(published, 0, |view| {
            same_counts(view, "counts", |p| p.send_counts)?;
            let (start, count) = (offsets(counts)[view.me()], recv.len());
            // SAFETY: every rank's send holds `counts.sum()` elements nobody writes now.
            let blocks = (0..view.size())
                .map(|rank| unsafe { view.peer(rank).send.range::<f32>(start, count) });
            combine_into(recv, blocks, ReduceOp::Sum);
            Ok(())
        })
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()> {
        let checks = Checks {
            comm: self,
            op: Op::AllToAllV,
        };
        checks.counts("send_counts", send_counts)?;
        checks.counts("recv_counts", recv_counts)?;
        checks.length("send", send.len(), send_counts.iter().sum())?;
        checks.length("recv", recv.len(), recv_counts.iter().sum())?;
        let mut published = Published::new(Signature::new(Op::AllToAllV));
        published.send = RawSlice::of(send);
        published.send_counts = RawSlice::of(send_counts);
        published.recv_counts = RawSlice::of(recv_counts);
        self.collective(published, 0, |view| {
            let size = view.size();
            // SAFETY: every rank published `size` send and receive counts (checked above).
            let sends: Vec<&[usize]> = (0..size)
                .map(|rank| unsafe { view.peer(rank).send_counts.range(0, size) })
                .collect();
            let recvs: Vec<&[usize]> = (0..size)
                .map(|rank| unsafe { view.peer(rank).recv_counts.range(0, size) })
                .collect();
            for (from, to) in (0..size).flat_map(|from| (0..size).map(move |to| (from, to))) {
                if sends[from][to] != recvs[to][from] {
                    return Err(view.mismatch(format!(
                        "rank {} sends {} elements to rank {}, which expects {}",
                        view.world(from),
                        sends[from][to],
                        view.world(to),
                        recvs[to][from]
                    )));
                }
            }
            let me = view.me();
            for (from, start) in offsets(recv_counts).into_iter().enumerate() {
                let source_start: usize = sends[from][..me].iter().sum();
                // SAFETY: rank `from` published its send buffer, which nobody writes now.
                let source = unsafe {
                    view.peer(from)
                        .send
                        .range::<f32>(source_start, recv_counts[from])
                };
                recv[start..start + recv_counts[from]].copy_from_slice(source);
            }
            Ok(())
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        Checks {
            comm: self,
            op: Op::Broadcast,
        }
        .peer(root)?;
        let mut published = Published::new(Signature {
            root,
            ..Signature::new(Op::Broadcast)
        });
        published.recv = RawSlice::of_mut(buf);
        self.collective(published, 0, |view| {
            let len = view.peer(root).recv.len;
            for rank in 0..view.size() {
                let other = view.peer(rank).recv.len;
                if other != len {
                    return Err(view.mismatch(format!(
                        "root {} broadcasts {len} elements, rank {} passes {other}",
                        view.world(root),
                        view.world(rank)
                    )));
                }
            }
            if view.me() != root {
                // SAFETY: only non-root ranks write, each its own buffer; the root's is read.
                let source = unsafe { view.peer(root).recv.range::<f32>(0, len) };
                unsafe { view.peer(view.me()).recv.range_mut::<f32>(0, len) }
                    .copy_from_slice(source);
            }
            Ok(())
        })
    }

    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<()> {
        self.send_message(buf, dest, tag)
    }

    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<()> {
        self.recv_message(buf, src, tag)
    }

    fn send_recv(
        &self,
        send: &[f32],
        dest: usize,
        recv: &mut [f32],
        src: usize,
        tag: u32,
    ) -> Result<()> {
        self.exchange_messages(send, dest, recv, src, tag)
    }

    fn exchange(&self, sends: &[Outgoing<'_>], receives: &mut [Incoming<'_>]) -> Result<()> {
        self.exchange_batch(sends, receives)
    }

    fn barrier(&self) -> Result<()> {
        self.collective(Published::new(Signature::new(Op::Barrier)), 0, |_| Ok(()))
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Option<Arc<dyn Communicator>>> {
        let mine = Checks {
            comm: self,
            op: Op::Split,
        }
        .split(groups)?;
        let number = self.splits.fetch_add(1, Ordering::SeqCst);
        let mut hasher = DefaultHasher::new();
        (number, groups).hash(&mut hasher);
        let published = Published::new(Signature {
            key: hasher.finish(),
            ..Signature::new(Op::Split)
        });
        let parent = self.group.id;
        self.collective(published, 0, |view| {
            Ok(mine.map(|(index, position)| {
                let members = view.group().world_ranks(groups[index].iter().copied());
                let group = view.job().group((parent, number, index), &members);
                Arc::new(LocalComm::new(view.job().clone(), group, position))
                    as Arc<dyn Communicator>
            }))
        })
    }
}
