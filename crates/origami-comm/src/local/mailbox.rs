//! Point-to-point messages: a sender posts an offer (a pointer to its buffer) in the receiver's
//! mailbox and waits; the receiver takes the first matching offer, copies straight from the
//! sender's buffer and reports back. One copy, and the sender's buffer outlives the read because
//! the sender leaves only after the report, or after withdrawing an offer nobody took.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::job::lock;

/// A message waiting to be received.
pub(super) struct Offer {
    pub id: u64,
    /// Group rank of the sender.
    pub src: usize,
    pub tag: u32,
    pub data: *const f32,
    pub len: usize,
}

// SAFETY: `data` is read only by the receiver while the sender waits for the report.
unsafe impl Send for Offer {}

/// How a taken offer ended: delivered, or refused because the receiver expected this length.
pub(super) type Report = Result<(), usize>;

/// The offers waiting for one rank, and the reports owed to their senders.
#[derive(Default)]
pub(super) struct MailboxState {
    pub offers: VecDeque<Offer>,
    pub reports: HashMap<u64, Report>,
}

/// One rank's incoming messages.
#[derive(Default)]
pub(super) struct Mailbox {
    state: Mutex<MailboxState>,
    wake: Condvar,
}

impl Mailbox {
    pub fn lock(&self) -> MutexGuard<'_, MailboxState> {
        lock(&self.state)
    }

    /// Waits for a change, at most `limit`.
    pub fn wait<'a>(
        &self,
        state: MutexGuard<'a, MailboxState>,
        limit: Duration,
    ) -> MutexGuard<'a, MailboxState> {
        self.wake
            .wait_timeout(state, limit)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Wakes every rank waiting on this mailbox (sender or receiver).
    pub fn wake_all(&self) {
        let _state = self.lock();
        self.wake.notify_all();
    }

    /// Wakes waiters after a change made under the lock.
    pub fn notify(&self) {
        self.wake.notify_all();
    }
}

/// Time left before `deadline`, or `None` once it passed.
pub(super) fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
}
