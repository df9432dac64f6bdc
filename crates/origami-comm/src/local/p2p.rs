//! Tagged point-to-point messages of the local backend (see `mailbox` for the protocol).

use std::time::Instant;

use super::comm::LocalComm;
use super::mailbox::{remaining, Offer};
use crate::communicator::Checks;
use crate::{CommError, Failure, Incoming, Op, Outgoing, Result};

impl LocalComm {
    /// Blocking send: waits until `dest` has copied the message.
    pub(super) fn send_message(&self, buf: &[f32], dest: usize, tag: u32) -> Result<()> {
        let op = Op::Send;
        Checks { comm: self, op }.peer(dest)?;
        let _busy = self.enter(op)?;
        let deadline = Instant::now() + self.job.timeout;
        let id = self.post(buf, dest, tag);
        self.await_delivery(op, id, buf.len(), dest, tag, deadline)
    }

    /// Blocking receive of exactly `buf.len()` elements.
    pub(super) fn recv_message(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<()> {
        let op = Op::Recv;
        Checks { comm: self, op }.peer(src)?;
        let _busy = self.enter(op)?;
        let deadline = Instant::now() + self.job.timeout;
        self.take(op, buf, src, tag, deadline)
    }

    /// Send and receive at once: post the outgoing offer, receive, then wait for delivery.
    pub(super) fn exchange_messages(
        &self,
        send: &[f32],
        dest: usize,
        recv: &mut [f32],
        src: usize,
        tag: u32,
    ) -> Result<()> {
        let op = Op::SendRecv;
        let checks = Checks { comm: self, op };
        checks.peer(dest)?;
        checks.peer(src)?;
        let _busy = self.enter(op)?;
        let deadline = Instant::now() + self.job.timeout;
        let id = self.post(send, dest, tag);
        let received = self.take(op, recv, src, tag, deadline);
        let delivered = self.await_delivery(op, id, send.len(), dest, tag, deadline);
        received.and(delivered)
    }

    /// Batched point-to-point: post every offer, take every receive, then wait for every
    /// delivery. Deliveries are awaited even when a receive failed, so no offer outlives the
    /// buffers it points to.
    pub(super) fn exchange_batch(
        &self,
        sends: &[Outgoing<'_>],
        receives: &mut [Incoming<'_>],
    ) -> Result<()> {
        let op = Op::Exchange;
        let checks = Checks { comm: self, op };
        for peer in sends
            .iter()
            .map(|s| s.peer)
            .chain(receives.iter().map(|r| r.peer))
        {
            checks.peer(peer)?;
        }
        let _busy = self.enter(op)?;
        let deadline = Instant::now() + self.job.timeout;
        let posted: Vec<u64> = sends
            .iter()
            .map(|s| self.post(s.data, s.peer, s.tag))
            .collect();
        let mut received = Ok(());
        for receive in receives.iter_mut() {
            received = received
                .and_then(|()| self.take(op, receive.data, receive.peer, receive.tag, deadline));
        }
        let mut delivered = Ok(());
        for (id, send) in posted.into_iter().zip(sends) {
            let report =
                self.await_delivery(op, id, send.data.len(), send.peer, send.tag, deadline);
            delivered = delivered.and(report);
        }
        received.and(delivered)
    }

    /// Puts an offer of `buf` in `dest`'s mailbox; returns its id.
    fn post(&self, buf: &[f32], dest: usize, tag: u32) -> u64 {
        let id = self.group.message_id();
        let mailbox = &self.group.mailboxes[dest];
        mailbox.lock().offers.push_back(Offer {
            id,
            src: self.me,
            tag,
            data: buf.as_ptr(),
            len: buf.len(),
        });
        mailbox.notify();
        id
    }

    /// Waits for the report on offer `id`. While the offer is still queued, a job failure or the
    /// deadline withdraws it; once taken, the receiver is copying and always reports.
    fn await_delivery(
        &self,
        op: Op,
        id: u64,
        len: usize,
        dest: usize,
        tag: u32,
        deadline: Instant,
    ) -> Result<()> {
        let mailbox = &self.group.mailboxes[dest];
        let mut state = mailbox.lock();
        loop {
            if let Some(report) = state.reports.remove(&id) {
                return report
                    .map_err(|expected| self.length_mismatch(op, len, dest, expected, tag));
            }
            if let Some(position) = state.offers.iter().position(|offer| offer.id == id) {
                if let Some(cause) = self.job.failure() {
                    state.offers.remove(position);
                    return Err(self.aborted(op, cause));
                }
                if remaining(deadline).is_none() {
                    state.offers.remove(position);
                    let failure = self.timed_out(op, dest, deadline);
                    self.job.mark_failed(failure.clone());
                    drop(state);
                    self.job.wake_all();
                    return Err(CommError::TimedOut(failure));
                }
            }
            let limit = remaining(deadline).unwrap_or(self.job.timeout);
            state = mailbox.wait(state, limit);
        }
    }

    /// Takes the first offer from `src` with `tag`, copies it into `buf` and reports back.
    fn take(&self, op: Op, buf: &mut [f32], src: usize, tag: u32, deadline: Instant) -> Result<()> {
        let mailbox = &self.group.mailboxes[self.me];
        let mut state = mailbox.lock();
        let offer = loop {
            let found = state
                .offers
                .iter()
                .position(|offer| offer.src == src && offer.tag == tag);
            if let Some(offer) = found.and_then(|position| state.offers.remove(position)) {
                break offer;
            }
            if let Some(cause) = self.job.failure() {
                return Err(self.aborted(op, cause));
            }
            let Some(limit) = remaining(deadline) else {
                let failure = self.timed_out(op, src, deadline);
                self.job.mark_failed(failure.clone());
                drop(state);
                self.job.wake_all();
                return Err(CommError::TimedOut(failure));
            };
            state = mailbox.wait(state, limit);
        };
        drop(state);
        let report = if offer.len == buf.len() {
            // SAFETY: the sender keeps its buffer of `offer.len` elements alive and unwritten
            // until it receives the report below.
            let source = unsafe { std::slice::from_raw_parts(offer.data, offer.len) };
            buf.copy_from_slice(source);
            Ok(())
        } else {
            Err(buf.len())
        };
        mailbox.lock().reports.insert(offer.id, report);
        mailbox.notify();
        report.map_err(|_| {
            let sender = self.group.members[src];
            let detail = format!(
                "rank {sender} sent {} elements with tag {tag}, rank {} expected {}",
                offer.len,
                self.world(),
                buf.len()
            );
            CommError::Mismatch {
                rank: self.world(),
                op,
                detail,
            }
        })
    }

    fn length_mismatch(
        &self,
        op: Op,
        len: usize,
        dest: usize,
        expected: usize,
        tag: u32,
    ) -> CommError {
        CommError::Mismatch {
            rank: self.world(),
            op,
            detail: format!(
                "rank {} sent {len} elements with tag {tag}, rank {} expected {expected}",
                self.world(),
                self.group.members[dest]
            ),
        }
    }

    fn timed_out(&self, op: Op, peer: usize, deadline: Instant) -> Failure {
        Failure::TimedOut {
            rank: self.world(),
            op,
            waited: self.job.timeout + Instant::now().saturating_duration_since(deadline),
            missing: vec![self.group.members[peer]],
        }
    }
}
