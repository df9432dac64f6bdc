//! One group's shared state: who is in it, its rendezvous for collectives and its mailboxes
//! for point-to-point messages.

use std::sync::atomic::{AtomicU64, Ordering};

use super::mailbox::Mailbox;
use super::rendezvous::Rendezvous;

/// Shared by the ranks of one group.
pub(super) struct GroupShared {
    /// Unique within the job; names the group as a parent in split keys.
    pub id: u64,
    /// World rank of each group rank.
    pub members: Vec<usize>,
    pub rendezvous: Rendezvous,
    /// One per destination rank.
    pub mailboxes: Box<[Mailbox]>,
    next_message_id: AtomicU64,
}

impl GroupShared {
    pub fn new(id: u64, members: Vec<usize>) -> Self {
        let size = members.len();
        GroupShared {
            id,
            rendezvous: Rendezvous::new(size),
            mailboxes: (0..size).map(|_| Mailbox::default()).collect(),
            members,
            next_message_id: AtomicU64::new(0),
        }
    }

    /// A fresh identifier for a point-to-point message.
    pub fn message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    /// World ranks of the group ranks `ranks`.
    pub fn world_ranks(&self, ranks: impl IntoIterator<Item = usize>) -> Vec<usize> {
        ranks.into_iter().map(|rank| self.members[rank]).collect()
    }

    /// Wakes every rank waiting in this group.
    pub fn wake_all(&self) {
        self.rendezvous.wake_all();
        for mailbox in self.mailboxes.iter() {
            mailbox.wake_all();
        }
    }
}
