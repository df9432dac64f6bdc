//! The state one local job shares among its ranks: its timeout, its first failure, and every
//! group created in it (so a failure can wake every rank wherever it waits).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::group::GroupShared;
use crate::Failure;

/// Identifies one group made by a split: (parent group, split number on that parent, list).
pub(super) type SplitKey = (u64, u64, usize);

/// Shared by all ranks of a job.
pub(super) struct Job {
    pub timeout: Duration,
    failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    groups: Mutex<HashMap<SplitKey, Arc<GroupShared>>>,
    next_group_id: AtomicU64,
}

impl Job {
    pub fn new(timeout: Duration) -> Self {
        Job {
            timeout,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            groups: Mutex::new(HashMap::new()),
            next_group_id: AtomicU64::new(0),
        }
    }

    /// The failure that stopped the job, if any.
    pub fn failure(&self) -> Option<Failure> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.failure).clone()
    }

    /// Records `failure` unless an earlier one is recorded. Safe to call holding a group lock;
    /// waiters are woken only by [`Job::wake_all`], which must be called without one.
    pub fn mark_failed(&self, failure: Failure) {
        let mut slot = lock(&self.failure);
        if slot.is_none() {
            *slot = Some(failure);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Wakes every rank waiting anywhere in the job so it can see the failure.
    pub fn wake_all(&self) {
        let groups: Vec<Arc<GroupShared>> = lock(&self.groups).values().cloned().collect();
        for group in groups {
            group.wake_all();
        }
    }

    /// Records `failure` and wakes everyone.
    pub fn fail(&self, failure: Failure) {
        self.mark_failed(failure);
        self.wake_all();
    }

    /// The group under `key`, created with `members` (world ranks) by whichever rank asks first.
    pub fn group(&self, key: SplitKey, members: &[usize]) -> Arc<GroupShared> {
        lock(&self.groups)
            .entry(key)
            .or_insert_with(|| {
                let id = self.next_group_id.fetch_add(1, Ordering::SeqCst);
                Arc::new(GroupShared::new(id, members.to_vec()))
            })
            .clone()
    }
}

/// Locks a mutex; a panic while holding one of ours cannot leave its data inconsistent (every
/// critical section only flips flags and counters), so poisoning is ignored.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
