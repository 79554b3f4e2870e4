//! A cumulative count and byte total, moved from any thread by one atomic addition: the cost of
//! a charge to a scope account (`account.rs`) is one read-modify-write, not two.
//!
//! The word holds the bytes in its low `BYTES_BITS` bits and the count in the rest. Whenever a
//! field reaches half its range, the thread that sees it moves that half into `spilled_*`
//! (rare: every 512 GiB or every 8 Mi blocks), so neither field ever overflows into the other:
//! for that, more than half a field's range would have to be added between the addition that
//! reached half and the move, by all threads together.
//!
//! A move changes two words, so a reader that wants figures consistent with each other (the live
//! bytes of an account: what it made minus what it freed) reads under the account's [`Spills`]
//! sequence and retries when a move ran meanwhile.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::*};

const BYTES_BITS: u32 = 40;
const BYTES_MASK: u64 = (1 << BYTES_BITS) - 1;
const BYTES_HALF: u64 = 1 << (BYTES_BITS - 1);
const COUNT_HALF: u64 = 1 << (63 - BYTES_BITS);

/// One account's guard of its tallies' moves: a lock that serializes the (rare) moves and a
/// sequence number, odd while a move runs, that readers check.
#[derive(Default)]
pub(crate) struct Spills {
    lock: AtomicBool,
    seq: AtomicU64,
}

impl Spills {
    /// The sequence number now: a reader that saw it even, and sees it unchanged after reading,
    /// read between moves.
    #[inline(always)]
    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(Acquire)
    }

    /// Whether a read that began at `before` (from [`Spills::seq`]) saw no move.
    #[inline(always)]
    pub(crate) fn unmoved_since(&self, before: u64) -> bool {
        fence(Acquire);
        before & 1 == 0 && self.seq.load(Relaxed) == before
    }

    /// Reads `f` consistently with every move of the tallies this guards.
    #[inline(always)]
    pub(crate) fn read<T>(&self, f: impl Fn() -> T) -> T {
        loop {
            let before = self.seq.load(Acquire);
            let value = f();
            fence(Acquire);
            if before & 1 == 0 && self.seq.load(Relaxed) == before {
                return value;
            }
            std::hint::spin_loop();
        }
    }
}

/// A count and a byte total (see the module doc).
#[derive(Default)]
pub(crate) struct Tally {
    word: AtomicU64,
    spilled_bytes: AtomicU64,
    spilled_count: AtomicU64,
}

impl Tally {
    /// Whether [`Tally::add_fast`] takes `bytes` and `count`.
    #[inline(always)]
    pub(crate) fn fits(bytes: u64, count: u64) -> bool {
        bytes < BYTES_HALF && count < COUNT_HALF
    }

    /// Adds `bytes` and `count` (which [`Tally::fits`]); returns the bytes field after the
    /// addition, or `None` if a field reached half its range: the caller then calls
    /// [`Tally::spill`]. No call: the charge path's fast part.
    #[inline(always)]
    pub(crate) fn add_fast(&self, bytes: u64, count: u64) -> Option<u64> {
        let delta = bytes | (count << BYTES_BITS);
        let new = self.word.fetch_add(delta, Relaxed).wrapping_add(delta);
        ((new & BYTES_MASK) < BYTES_HALF && (new >> BYTES_BITS) < COUNT_HALF)
            .then_some(new & BYTES_MASK)
    }

    /// The bytes moved out of the word so far.
    #[inline(always)]
    pub(crate) fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes.load(Relaxed)
    }

    /// Adds `bytes` and `count`.
    #[inline(always)]
    pub(crate) fn add(&self, bytes: u64, count: u64, spills: &Spills) {
        if !Tally::fits(bytes, count) {
            return self.add_spilled(bytes, count, spills);
        }
        if self.add_fast(bytes, count).is_none() {
            self.spill(spills);
        }
    }

    /// An addition too big for the word: straight to the spilled totals.
    #[cold]
    fn add_spilled(&self, bytes: u64, count: u64, spills: &Spills) {
        spills.moving(|| {
            self.spilled_bytes.fetch_add(bytes, Relaxed);
            self.spilled_count.fetch_add(count, Relaxed);
        });
    }

    /// Moves each field at half its range or more into the spilled totals.
    #[cold]
    #[inline(never)]
    pub(crate) fn spill(&self, spills: &Spills) {
        spills.moving(|| loop {
            let w = self.word.load(Relaxed);
            let bytes = if w & BYTES_MASK >= BYTES_HALF {
                BYTES_HALF
            } else {
                0
            };
            let count = if w >> BYTES_BITS >= COUNT_HALF {
                COUNT_HALF
            } else {
                0
            };
            if bytes == 0 && count == 0 {
                return;
            }
            let sub = bytes | (count << BYTES_BITS);
            if self
                .word
                .compare_exchange_weak(w, w - sub, Relaxed, Relaxed)
                .is_ok()
            {
                self.spilled_bytes.fetch_add(bytes, Relaxed);
                self.spilled_count.fetch_add(count, Relaxed);
            }
        });
    }

    /// The bytes (read under the guard's sequence for a figure consistent with other tallies).
    #[inline(always)]
    pub(crate) fn bytes(&self) -> u64 {
        (self.word.load(Relaxed) & BYTES_MASK).wrapping_add(self.spilled_bytes.load(Relaxed))
    }

    /// The count.
    pub(crate) fn count(&self) -> u64 {
        (self.word.load(Relaxed) >> BYTES_BITS).wrapping_add(self.spilled_count.load(Relaxed))
    }
}

impl Spills {
    /// Runs `f`, which moves figures between words, under the lock, with the sequence odd.
    fn moving(&self, f: impl FnOnce()) {
        while self
            .lock
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        self.seq.fetch_add(1, Relaxed);
        fence(Release);
        f();
        self.seq.fetch_add(1, Release);
        self.lock.store(false, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_never_overflow_into_each_other() {
        let spills = Spills::default();
        let t = Tally::default();
        let step = BYTES_HALF / 3 + 7;
        let mut want = 0u64;
        for _ in 0..10 {
            t.add(step, 1, &spills);
            want += step;
        }
        t.add(BYTES_HALF * 3, 2, &spills);
        want += BYTES_HALF * 3;
        assert_eq!((t.bytes(), t.count()), (want, 12));
        for _ in 0..(COUNT_HALF + 5) / 1024 {
            t.add(0, 1024, &spills);
        }
        assert_eq!(t.count(), 12 + (COUNT_HALF + 5) / 1024 * 1024);
        assert_eq!(t.bytes(), want);
    }

    #[test]
    fn many_threads_add_up_exactly_across_spills() {
        let spills = std::sync::Arc::new(Spills::default());
        let t = std::sync::Arc::new(Tally::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (spills, t) = (spills.clone(), t.clone());
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        t.add(BYTES_HALF / 50_000, 100, &spills);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(t.bytes(), 4 * 100_000 * (BYTES_HALF / 50_000));
        assert_eq!(t.count(), 4 * 100_000 * 100);
    }
}
