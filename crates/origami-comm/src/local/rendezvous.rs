//! Where the ranks of a group meet for a collective: each publishes pointers to its buffers in
//! its slot, then all wait at a barrier; after it each reads what it needs straight from its
//! peers' buffers (one copy per element, no staging).
//!
//! Safety rule: a rank's buffers must outlive every peer's reads. Reads happen only between the
//! opening barrier (which a failure or timeout may cancel, before anyone reads) and the closing
//! barrier (which nothing cancels: every rank past the opening barrier is running straight-line
//! copy code, so it always arrives). A rank leaves a collective only through the closing barrier,
//! or through a cancelled opening barrier that no rank passed.

use std::cell::UnsafeCell;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::job::{lock, Job};
use crate::{Failure, Op, ReduceOp};

/// What a rank calls, compared across ranks before any data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Signature {
    pub op: Op,
    pub reduce: Option<ReduceOp>,
    /// Broadcast root, or 0.
    pub root: usize,
    /// Split number and fingerprint of the split lists, or 0.
    pub key: u64,
}

impl Signature {
    pub fn new(op: Op) -> Self {
        Signature {
            op,
            reduce: None,
            root: 0,
            key: 0,
        }
    }
}

/// A buffer published for peers to read (or, for the owner, to write).
#[derive(Clone, Copy, Debug)]
pub(super) struct RawSlice {
    ptr: *mut (),
    pub len: usize,
}

impl RawSlice {
    pub const EMPTY: RawSlice = RawSlice {
        ptr: std::ptr::null_mut(),
        len: 0,
    };

    pub fn of<T>(slice: &[T]) -> Self {
        RawSlice {
            ptr: slice.as_ptr() as *mut (),
            len: slice.len(),
        }
    }

    pub fn of_mut<T>(slice: &mut [T]) -> Self {
        RawSlice {
            ptr: slice.as_mut_ptr() as *mut (),
            len: slice.len(),
        }
    }

    /// Elements `start..start + len` for reading.
    ///
    /// # Safety
    /// The slice was published with element type `T`, the range is inside it, the owner is
    /// inside the same collective, and nobody writes the range until the next barrier.
    pub unsafe fn range<'a, T>(self, start: usize, len: usize) -> &'a [T] {
        debug_assert!(start + len <= self.len);
        if len == 0 {
            return &[];
        }
        std::slice::from_raw_parts((self.ptr as *const T).add(start), len)
    }

    /// Elements `start..start + len` for writing.
    ///
    /// # Safety
    /// As [`RawSlice::range`], and nobody else reads or writes the range until the next barrier.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut<'a, T>(self, start: usize, len: usize) -> &'a mut [T] {
        debug_assert!(start + len <= self.len);
        if len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut((self.ptr as *mut T).add(start), len)
    }
}

/// Everything one rank publishes for a collective.
#[derive(Clone, Copy, Debug)]
pub(super) struct Published {
    pub signature: Signature,
    pub send: RawSlice,
    pub recv: RawSlice,
    pub send_counts: RawSlice,
    pub recv_counts: RawSlice,
}

impl Published {
    pub fn new(signature: Signature) -> Self {
        Published {
            signature,
            send: RawSlice::EMPTY,
            recv: RawSlice::EMPTY,
            send_counts: RawSlice::EMPTY,
            recv_counts: RawSlice::EMPTY,
        }
    }
}

struct Slot(UnsafeCell<Published>);

// SAFETY: a slot is written only by its owner before the opening barrier and read by peers only
// between the opening and closing barriers; the barrier's mutex orders the two.
unsafe impl Sync for Slot {}
// SAFETY: the raw pointers inside are only dereferenced under the rule above.
unsafe impl Send for Slot {}

struct BarrierState {
    arrived: Vec<bool>,
    count: usize,
    generation: u64,
}

/// How a barrier wait ended without completing.
pub(super) enum Cancelled {
    /// The job had already failed.
    Aborted(Failure),
    /// This rank waited too long and failed the job; the failure is recorded.
    TimedOut(Failure),
}

/// Slots and a reusable barrier for one group.
pub(super) struct Rendezvous {
    barrier: Mutex<BarrierState>,
    wake: Condvar,
    slots: Box<[Slot]>,
}

impl Rendezvous {
    pub fn new(size: usize) -> Self {
        Rendezvous {
            barrier: Mutex::new(BarrierState {
                arrived: vec![false; size],
                count: 0,
                generation: 0,
            }),
            wake: Condvar::new(),
            slots: (0..size)
                .map(|_| Slot(UnsafeCell::new(Published::new(Signature::new(Op::Barrier)))))
                .collect(),
        }
    }

    /// Stores this rank's buffers; call only outside a collective (before the opening barrier).
    pub fn publish(&self, me: usize, published: Published) {
        // SAFETY: only the owner writes its slot, and no peer reads it outside a collective.
        unsafe { *self.slots[me].0.get() = published }
    }

    /// A peer's published buffers; call only between the opening and closing barriers.
    pub fn peer(&self, rank: usize) -> Published {
        // SAFETY: the owner does not write its slot until after the closing barrier.
        unsafe { *self.slots[rank].0.get() }
    }

    /// The opening barrier: waits for every rank, unless the job fails or this rank waits
    /// longer than the job's timeout. If it returns an error, no rank has passed it.
    pub fn open(&self, me: usize, op: Op, job: &Job, members: &[usize]) -> Result<(), Cancelled> {
        let started = Instant::now();
        let mut state = lock(&self.barrier);
        if let Some(failure) = job.failure() {
            return Err(Cancelled::Aborted(failure));
        }
        let Some(generation) = self.arrive(&mut state, me) else {
            return Ok(());
        };
        loop {
            let waited = started.elapsed();
            let Some(remaining) = job
                .timeout
                .checked_sub(waited)
                .filter(|left| !left.is_zero())
            else {
                let missing = (0..state.arrived.len())
                    .filter(|&rank| !state.arrived[rank])
                    .map(|rank| members[rank])
                    .collect();
                let failure = Failure::TimedOut {
                    rank: members[me],
                    op,
                    waited,
                    missing,
                };
                job.mark_failed(failure.clone());
                drop(state);
                job.wake_all();
                return Err(Cancelled::TimedOut(failure));
            };
            state = self
                .wake
                .wait_timeout(state, remaining)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            if state.generation != generation {
                return Ok(());
            }
            if let Some(failure) = job.failure() {
                return Err(Cancelled::Aborted(failure));
            }
        }
    }

    /// A barrier that nothing cancels; only for ranks that all passed the opening barrier.
    pub fn sync(&self, me: usize) {
        let mut state = lock(&self.barrier);
        let Some(generation) = self.arrive(&mut state, me) else {
            return;
        };
        while state.generation == generation {
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Counts this rank in; completes the barrier if it is the last (returns `None`), else
    /// returns the generation to wait out.
    fn arrive(&self, state: &mut BarrierState, me: usize) -> Option<u64> {
        state.arrived[me] = true;
        state.count += 1;
        if state.count < state.arrived.len() {
            return Some(state.generation);
        }
        state.count = 0;
        state
            .arrived
            .iter_mut()
            .for_each(|arrived| *arrived = false);
        state.generation += 1;
        self.wake.notify_all();
        None
    }

    /// Wakes waiters so they can see a failure.
    pub fn wake_all(&self) {
        let _state = lock(&self.barrier);
        self.wake.notify_all();
    }
}
