//! `LocalComm`: one rank's handle on a group of the local backend, and the frame every
//! collective runs in (publish, opening barrier, checks, reads, closing barrier).

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use super::group::GroupShared;
use super::job::Job;
use super::rendezvous::{Cancelled, Published, Signature};
use crate::{CommError, Op, Result};

/// One rank's communicator on a group of a [`super::LocalWorld`] job.
pub struct LocalComm {
    pub(super) job: Arc<Job>,
    pub(super) group: Arc<GroupShared>,
    /// This rank's index in the group.
    pub(super) me: usize,
    /// How many splits this rank has made of this group (numbers the children).
    pub(super) splits: AtomicU64,
    /// Held for the duration of a call: calls on one rank's handle must not overlap.
    busy: Mutex<()>,
}

impl LocalComm {
    pub(super) fn new(job: Arc<Job>, group: Arc<GroupShared>, me: usize) -> Self {
        LocalComm {
            job,
            group,
            me,
            splits: AtomicU64::new(0),
            busy: Mutex::new(()),
        }
    }

    /// This rank's world rank.
    pub(super) fn world(&self) -> usize {
        self.group.members[self.me]
    }

    /// Starts a call: fails at once if the job failed or another call is running here.
    pub(super) fn enter(&self, op: Op) -> Result<MutexGuard<'_, ()>> {
        if let Some(cause) = self.job.failure() {
            return Err(self.aborted(op, cause));
        }
        match self.busy.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(CommError::Busy {
                rank: self.world(),
                op,
            }),
        }
    }

    pub(super) fn aborted(&self, op: Op, cause: crate::Failure) -> CommError {
        CommError::Aborted {
            rank: self.world(),
            op,
            cause,
        }
    }

    pub(super) fn cancelled(&self, op: Op, cancelled: Cancelled) -> CommError {
        match cancelled {
            Cancelled::Aborted(cause) => self.aborted(op, cause),
            Cancelled::TimedOut(failure) => CommError::TimedOut(failure),
        }
    }

    /// Runs one collective: publishes `published`, waits for every rank, checks that all called
    /// the same thing, runs `body` (which calls [`View::sync`] exactly `syncs` times between its
    /// phases) and waits for every rank to finish reading. A panic in `body` is re-raised only
    /// after the closing barrier, so no peer is left reading freed memory.
    pub(super) fn collective<R>(
        &self,
        published: Published,
        syncs: usize,
        body: impl FnOnce(&View<'_>) -> Result<R>,
    ) -> Result<R> {
        let op = published.signature.op;
        let _busy = self.enter(op)?;
        let rendezvous = &self.group.rendezvous;
        rendezvous.publish(self.me, published);
        rendezvous
            .open(self.me, op, &self.job, &self.group.members)
            .map_err(|cancelled| self.cancelled(op, cancelled))?;
        let view = View {
            comm: self,
            op,
            syncs_left: Cell::new(syncs),
        };
        // Every rank compares all signatures with rank 0's, so all reach the same verdict; on a
        // mismatch the ranks' bodies (and their numbers of phases) differ, so none runs.
        if let Err(mismatch) = view.check_signatures() {
            rendezvous.sync(self.me);
            return Err(mismatch);
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&view)));
        for _ in 0..view.syncs_left.get() {
            rendezvous.sync(self.me);
        }
        rendezvous.sync(self.me);
        outcome.unwrap_or_else(|panic| resume_unwind(panic))
    }
}

/// What a collective's body sees between the opening and closing barriers.
pub(super) struct View<'a> {
    comm: &'a LocalComm,
    op: Op,
    syncs_left: Cell<usize>,
}

impl View<'_> {
    /// This rank's index in the group.
    pub fn me(&self) -> usize {
        self.comm.me
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.comm.group.members.len()
    }

    /// World rank of group rank `rank`.
    pub fn world(&self, rank: usize) -> usize {
        self.comm.group.members[rank]
    }

    /// What rank `rank` published.
    pub fn peer(&self, rank: usize) -> Published {
        self.comm.group.rendezvous.peer(rank)
    }

    /// Waits until every rank finished the current phase.
    pub fn sync(&self) {
        let left = self.syncs_left.get();
        debug_assert!(
            left > 0,
            "a collective body synced more often than declared"
        );
        self.syncs_left.set(left.saturating_sub(1));
        self.comm.group.rendezvous.sync(self.comm.me);
    }

    /// The error for ranks whose arguments disagree.
    pub fn mismatch(&self, detail: String) -> CommError {
        CommError::Mismatch {
            rank: self.comm.world(),
            op: self.op,
            detail,
        }
    }

    /// The job the group belongs to.
    pub fn job(&self) -> &Arc<Job> {
        &self.comm.job
    }

    /// The group's shared state.
    pub fn group(&self) -> &GroupShared {
        &self.comm.group
    }

    /// Every rank called the same operation with the same reduction, root and split lists.
    fn check_signatures(&self) -> Result<()> {
        let first = self.peer(0).signature;
        for rank in 1..self.size() {
            let other = self.peer(rank).signature;
            if other != first {
                return Err(self.mismatch(format!(
                    "rank {} called {} while rank {} called {}",
                    self.world(0),
                    describe(first),
                    self.world(rank),
                    describe(other)
                )));
            }
        }
        Ok(())
    }
}

fn describe(signature: Signature) -> String {
    let mut text = signature.op.to_string();
    if let Some(reduce) = signature.reduce {
        text += &format!(" ({reduce:?})");
    }
    match signature.op {
        Op::Broadcast => text += &format!(" from root {}", signature.root),
        Op::Split => text += &format!(" with lists #{:x}", signature.key),
        _ => {}
    }
    text
}
