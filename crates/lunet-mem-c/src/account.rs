//! Accounts: the C side of a Lua scope's ledger (`lunet_mem_scope_t`). One per scope that C code
//! asked for (`lunet_mem_scope_current`), made by the Lua module and shared by reference count
//! (an `Arc`), so that a handle stays valid on any thread after its scope closed.
//!
//! A charge (`lunet_mem_charge`, a request arena's block, a block of a worker arena begun in a
//! scope) moves the account's counters and those of the accounts of the scopes it was opened in,
//! with atomics: one read-modify-write per account (a [`Tally`] packs a block count and a byte
//! total in one word), none of them on the Lua allocation hook, which never touches an account. The Lua side writes only `lua_kept` (a mirror of the scope's
//! kept bytes, on its budget path) and `closed`.
//!
//! A limit covers Lua and C together: a C charge is refused when the kept Lua bytes of a limited
//! account plus its live C bytes would pass the limit; the Lua hook, on its budget path, adds the
//! live C bytes to the Lua bytes it checks. The two sides do not lock each other out: a charge
//! that runs on a worker thread while the loop thread allocates for the same scope may pass the
//! limit by that one allocation. Concurrent C charges never do (each adds, checks its result,
//! and takes its bytes back if they do not fit).
//!
//! A charge to a closed account is counted apart (`late_*`: never lost, never mixed with the
//! figures the scope closed with) and still rolls up to the open accounts above it, whose live
//! bytes stay true.

use std::ffi::c_int;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::tally::{Spills, Tally};

/// `lunet_mem_scope_t`: the C account of one Lua scope.
#[repr(align(64))]
pub struct Account {
    /// Blocks and C bytes charged (cumulative) and released (cumulative) while the account was
    /// open: the live C bytes are the difference of the bytes, less `withdrawn`.
    made: Tally,
    freed: Tally,
    /// Bytes a limit refused after they were added to `made` (taken back).
    withdrawn: AtomicU64,
    /// Guards the tallies' rare moves (see `tally.rs`).
    spills: Spills,
    /// The highest live C bytes seen.
    peak_bytes: AtomicI64,
    /// Charges that arrived after the account closed: bytes (net), blocks made and released.
    late_bytes: AtomicI64,
    late_allocs: AtomicU64,
    late_frees: AtomicU64,
    /// Charges refused by a limit (of this account or one above it), counted where they began.
    refusals: AtomicU64,
    closed: AtomicBool,
    /// The kept Lua bytes of the scope (`Scope::kept_bytes`), mirrored by the loop thread when
    /// the scope has a limit: what a C charge adds its bytes to.
    lua_kept: AtomicI64,
    /// The scope's limit on Lua and C bytes together (`i64::MAX`: none). Fixed at creation.
    limit: i64,
    /// Whether this account or one above it has a limit: only then does a charge check.
    limited: bool,
    /// The account of the scope this one was opened in.
    parent: Option<Arc<Account>>,
}

/// What [`Account::stats`] reads: `lunet_mem_scope_stats_t`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct AccountStats {
    pub c_bytes: i64,
    pub c_bytes_allocated: u64,
    pub c_bytes_freed: u64,
    pub c_allocs: u64,
    pub c_frees: u64,
    pub c_peak_bytes: i64,
    pub late_bytes: i64,
    pub late_allocs: u64,
    pub late_frees: u64,
    pub refusals: u64,
    pub limit: i64,
    pub closed: c_int,
}

impl Account {
    /// The account of a scope opened in the scope of `parent` (if any), with `limit` on its Lua
    /// and C bytes together (`None`: none), whose Lua side keeps `lua_kept` bytes now.
    pub fn new(parent: Option<Arc<Account>>, limit: Option<i64>, lua_kept: i64) -> Arc<Account> {
        let limited = limit.is_some() || parent.as_ref().is_some_and(|p| p.limited);
        Arc::new(Account {
            made: Tally::default(),
            freed: Tally::default(),
            withdrawn: AtomicU64::new(0),
            spills: Spills::default(),
            peak_bytes: AtomicI64::new(0),
            late_bytes: AtomicI64::new(0),
            late_allocs: AtomicU64::new(0),
            late_frees: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            lua_kept: AtomicI64::new(lua_kept),
            limit: limit.unwrap_or(i64::MAX),
            limited,
            parent,
        })
    }

    /// Live C bytes charged to the account while open (a concurrent charge may be half counted).
    #[inline(always)]
    pub fn live_bytes(&self) -> i64 {
        // `freed` first: a release is counted after the charge it releases, so this never reads
        // a release without its charge.
        self.spills.read(|| {
            let freed = self.freed.bytes();
            let withdrawn = self.withdrawn.load(Relaxed);
            self.made
                .bytes()
                .wrapping_sub(freed)
                .wrapping_sub(withdrawn) as i64
        })
    }

    /// The Lua side's kept bytes changed (loop thread, budget path only).
    #[inline(always)]
    pub fn set_lua_kept(&self, bytes: i64) {
        self.lua_kept.store(bytes, Relaxed);
    }

    /// The scope closed: later charges are counted apart.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    pub fn parent(&self) -> Option<&Arc<Account>> {
        self.parent.as_ref()
    }

    /// The account's figures.
    pub fn stats(&self) -> AccountStats {
        let (allocated, freed, allocs, frees) = self.spills.read(|| {
            let (freed, frees) = (self.freed.bytes(), self.freed.count());
            let allocated = self.made.bytes().wrapping_sub(self.withdrawn.load(Relaxed));
            (allocated, freed, self.made.count(), frees)
        });
        AccountStats {
            c_bytes: allocated.wrapping_sub(freed) as i64,
            c_bytes_allocated: allocated,
            c_bytes_freed: freed,
            c_allocs: allocs,
            c_frees: frees,
            c_peak_bytes: self.peak_bytes.load(Relaxed),
            late_bytes: self.late_bytes.load(Relaxed),
            late_allocs: self.late_allocs.load(Relaxed),
            late_frees: self.late_frees.load(Relaxed),
            refusals: self.refusals.load(Relaxed),
            limit: self.limit,
            closed: self.is_closed() as c_int,
        }
    }

    /// Charges `bytes` more C bytes in `blocks` new blocks to this account and those above it.
    /// False (and nothing counted but the refusal) if a limit refuses them.
    ///
    /// The fast path (an account with no limit and no account above it) is one atomic addition
    /// and a few loads, with no call: whatever else (a chain, a limit, a closed account, a
    /// tally's move, a new peak) is in functions of its own, so that it saves no registers.
    #[inline(always)]
    pub fn charge(&self, bytes: u64, blocks: u64) -> bool {
        if self.limited || self.parent.is_some() {
            return self.charge_chain(bytes, blocks);
        }
        if self.closed.load(Relaxed) || !Tally::fits(bytes, blocks) {
            self.add_cold(bytes, blocks);
            return true;
        }
        // (the live bytes from the addition's result, unless a move ran meanwhile)
        let seq = self.spills.seq();
        let Some(made) = self.made.add_fast(bytes, blocks) else {
            self.spilled_made();
            return true;
        };
        let made = made.wrapping_add(self.made.spilled_bytes());
        let freed = self
            .freed
            .bytes()
            .wrapping_add(self.withdrawn.load(Relaxed));
        let live = made.wrapping_sub(freed) as i64;
        if live > self.peak_bytes.load(Relaxed) || !self.spills.unmoved_since(seq) {
            self.raise_peak();
        }
        true
    }

    /// [`Account::charge`] past its fast path: a chain, or a limit.
    #[inline(never)]
    fn charge_chain(&self, bytes: u64, blocks: u64) -> bool {
        if self.limited {
            return self.charge_limited(bytes, blocks);
        }
        self.add_chain(bytes, blocks);
        true
    }

    /// [`Account::add`], out of line.
    #[cold]
    #[inline(never)]
    fn add_cold(&self, bytes: u64, blocks: u64) {
        self.add(bytes, blocks);
    }

    /// `made` reached a move: does it, then the peak.
    #[cold]
    #[inline(never)]
    fn spilled_made(&self) {
        self.made.spill(&self.spills);
        self.raise_peak();
    }

    /// Raises the peak to the live bytes, read consistently.
    #[inline(never)]
    fn raise_peak(&self) {
        self.peak_bytes.fetch_max(self.live_bytes(), Relaxed);
    }

    /// Counts a charge in this account and those above it, with no limit to check.
    #[inline(always)]
    fn add_chain(&self, bytes: u64, blocks: u64) {
        let mut at = self;
        loop {
            at.add(bytes, blocks);
            match &at.parent {
                Some(p) => at = p,
                None => return,
            }
        }
    }

    /// Whether `growth` more C bytes fit the limits of this account and the open ones above it
    /// now (loads only: for a caller that wants to know before it allocates). Counts a refusal.
    #[inline(always)]
    pub fn admits(&self, growth: u64) -> bool {
        !self.limited || growth == 0 || self.admits_limited(growth)
    }

    /// [`Account::admits`] for a limited account.
    #[cold]
    #[inline(never)]
    fn admits_limited(&self, growth: u64) -> bool {
        let growth = growth.min(i64::MAX as u64) as i64;
        let mut at = Some(self);
        while let Some(a) = at {
            if !a.is_closed()
                && a.limit != i64::MAX
                && a.lua_kept
                    .load(Relaxed)
                    .saturating_add(a.live_bytes())
                    .saturating_add(growth)
                    > a.limit
            {
                self.refusals.fetch_add(1, Relaxed);
                return false;
            }
            at = a.parent.as_deref();
        }
        true
    }

    /// A block of `old` bytes becomes one of `new` bytes (a realloc: counted as one block
    /// released and one made). False if a limit refuses the growth (nothing counted but the
    /// refusal). The check and the count are not one step: a concurrent charge to the same
    /// limited account may pass the limit by this growth.
    pub fn resize(&self, old: u64, new: u64) -> bool {
        if new > old && !self.admits(new - old) {
            return false;
        }
        self.resize_unchecked(old, new);
        true
    }

    /// [`Account::resize`] with no limit checked (the caller checked with [`Account::admits`]).
    pub fn resize_unchecked(&self, old: u64, new: u64) {
        // (released first, so that the peak never holds both)
        self.release(old, 1);
        self.add_chain(new, 1);
    }

    /// Releases `bytes` C bytes in `blocks` blocks from this account and those above it.
    #[inline(always)]
    pub fn release(&self, bytes: u64, blocks: u64) {
        if self.parent.is_some() || self.closed.load(Relaxed) || !Tally::fits(bytes, blocks) {
            return self.release_chain(bytes, blocks);
        }
        if self.freed.add_fast(bytes, blocks).is_none() {
            self.freed.spill(&self.spills);
        }
    }

    /// [`Account::release`] past its fast path.
    #[inline(never)]
    fn release_chain(&self, bytes: u64, blocks: u64) {
        let mut at = self;
        loop {
            if at.closed.load(Relaxed) {
                at.late_bytes.fetch_sub(bytes as i64, Relaxed);
                at.late_frees.fetch_add(blocks, Relaxed);
            } else {
                at.freed.add(bytes, blocks, &at.spills);
            }
            match &at.parent {
                Some(p) => at = p,
                None => return,
            }
        }
    }

    /// Counts a charge in this account alone (no limit to check).
    #[inline(always)]
    fn add(&self, bytes: u64, blocks: u64) {
        if self.closed.load(Relaxed) {
            self.late_bytes.fetch_add(bytes as i64, Relaxed);
            self.late_allocs.fetch_add(blocks, Relaxed);
            return;
        }
        self.made.add(bytes, blocks, &self.spills);
        let live = self.live_bytes();
        if live > self.peak_bytes.load(Relaxed) {
            self.peak_bytes.fetch_max(live, Relaxed);
        }
    }

    /// [`Account::charge`] where a limit may refuse: the bytes are added up the chain, each
    /// limited open account checks its result, and on a refusal the accounts already added to
    /// take them back (`withdrawn`). A concurrent charge that reads an account's live bytes
    /// meanwhile (for its own check or the peak) sees them: it may be refused, or raise the peak,
    /// by a charge that is then taken back.
    #[cold]
    #[inline(never)]
    fn charge_limited(&self, bytes: u64, blocks: u64) -> bool {
        // The accounts added to, in order (chains are short; a Vec only past 16).
        let mut added: smallvec16::Stack = smallvec16::Stack::new();
        let mut at: Option<&Account> = Some(self);
        let mut refused = false;
        while let Some(a) = at {
            if a.closed.load(Relaxed) {
                added.push(a, false);
            } else {
                a.made.add(bytes, 0, &a.spills);
                added.push(a, true);
                let live = a.live_bytes();
                if a.limit != i64::MAX && a.lua_kept.load(Relaxed).saturating_add(live) > a.limit {
                    refused = true;
                    break;
                }
            }
            at = a.parent.as_deref();
        }
        if refused {
            added.for_each(|a, open| {
                if open {
                    a.withdrawn.fetch_add(bytes, Relaxed);
                }
            });
            self.refusals.fetch_add(1, Relaxed);
            return false;
        }
        added.for_each(|a, open| {
            if open {
                if blocks != 0 {
                    a.made.add(0, blocks, &a.spills);
                }
                // (a charge another thread added and a limit is about to take back is in `live`
                // too: never above what the limits over this account leave to its C bytes)
                let live = a.live_bytes().min(a.room());
                if live > a.peak_bytes.load(Relaxed) {
                    a.peak_bytes.fetch_max(live, Relaxed);
                }
            } else {
                a.late_bytes.fetch_add(bytes as i64, Relaxed);
                a.late_allocs.fetch_add(blocks, Relaxed);
            }
        });
        true
    }

    /// The most C bytes this account can hold now: what the limits of it and of the open accounts
    /// above it leave beside their kept Lua bytes (`i64::MAX` without a limit).
    fn room(&self) -> i64 {
        let mut room = i64::MAX;
        let mut at = Some(self);
        while let Some(a) = at {
            if !a.is_closed() && a.limit != i64::MAX {
                room = room.min(a.limit.saturating_sub(a.lua_kept.load(Relaxed)));
            }
            at = a.parent.as_deref();
        }
        room
    }

    /// Whether `bytes` more Lua bytes fit this account's limit (its live C bytes counted), for
    /// the Lua side's budget check.
    #[inline]
    pub fn admits_lua(&self, kept: i64, bytes: i64) -> bool {
        kept.saturating_add(self.live_bytes()).saturating_add(bytes) <= self.limit
    }
}

/// A small stack of the accounts a limited charge went through, with whether each was open.
mod smallvec16 {
    use super::Account;

    pub(super) struct Stack<'a> {
        inline: [(Option<&'a Account>, bool); 16],
        len: usize,
        spill: Vec<(&'a Account, bool)>,
    }

    impl<'a> Stack<'a> {
        pub(super) fn new() -> Stack<'a> {
            Stack {
                inline: [(None, false); 16],
                len: 0,
                spill: Vec::new(),
            }
        }

        pub(super) fn push(&mut self, a: &'a Account, open: bool) {
            if self.len < self.inline.len() {
                self.inline[self.len] = (Some(a), open);
                self.len += 1;
            } else {
                self.spill.push((a, open));
            }
        }

        pub(super) fn for_each(&self, mut f: impl FnMut(&'a Account, bool)) {
            for &(a, open) in &self.inline[..self.len] {
                if let Some(a) = a {
                    f(a, open);
                }
            }
            for &(a, open) in &self.spill {
                f(a, open);
            }
        }
    }
}

/// A new reference to the account `s` (for a request arena or a worker arena that charges it).
///
/// # Safety
/// `s` is a live handle (from `lunet_mem_scope_current`, not released).
pub(crate) unsafe fn retain(s: *const Account) -> *const Account {
    // SAFETY: the caller's contract: `s` came from `Arc::into_raw` and its count is > 0.
    unsafe { Arc::increment_strong_count(s) };
    s
}

/// Drops one reference to `s`.
///
/// # Safety
/// `s` is a live handle whose reference the caller owns.
pub(crate) unsafe fn drop_ref(s: *const Account) {
    // SAFETY: the caller's contract.
    drop(unsafe { Arc::from_raw(s) });
}

/// Takes one more reference to the scope handle `s` (NULL: none), for another owner that
/// releases it with [`lunet_mem_scope_release`].
///
/// # Safety
/// `s` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_scope_retain(s: *const Account) -> *const Account {
    if s.is_null() {
        return ptr::null();
    }
    // SAFETY: the caller's contract.
    unsafe { retain(s) }
}

/// Releases a reference to the scope handle `s` (NULL: nothing), on any thread.
///
/// # Safety
/// `s` is NULL or a live handle whose reference the caller owns.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_scope_release(s: *const Account) {
    if !s.is_null() {
        // SAFETY: the caller's contract.
        unsafe { drop_ref(s) };
    }
}

/// Charges (`bytes > 0`) or releases (`bytes < 0`) C memory the runtime allocated for the scope
/// `s` with its own allocator: counted as one block made or freed. Returns 0, or -1 when a limit
/// refuses the charge (nothing is counted then) or `s` is NULL.
///
/// # Safety
/// `s` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_charge(s: *const Account, bytes: i64) -> c_int {
    // SAFETY: the caller's contract.
    let Some(a) = (unsafe { s.as_ref() }) else {
        return -1;
    };
    if bytes >= 0 {
        if a.charge(bytes as u64, 1) {
            0
        } else {
            -1
        }
    } else {
        a.release(bytes.unsigned_abs(), 1);
        0
    }
}

/// Fills `out` with the C figures of the scope handle `s` (all zero for NULL).
///
/// # Safety
/// `s` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_scope_stats(s: *const Account, out: *mut AccountStats) {
    // SAFETY: the caller's contract.
    let stats = unsafe { s.as_ref() }
        .map(Account::stats)
        .unwrap_or_default();
    // SAFETY: the caller's contract.
    if let Some(out) = unsafe { out.as_mut() } {
        *out = stats;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_roll_up_and_a_closed_account_counts_apart() {
        let parent = Account::new(None, None, 0);
        let child = Account::new(Some(parent.clone()), None, 0);
        assert!(child.charge(100, 1));
        child.release(40, 1);
        assert_eq!(child.stats().c_bytes, 60);
        assert_eq!(parent.stats().c_bytes, 60);
        assert_eq!(parent.stats().c_peak_bytes, 100);
        child.close();
        child.release(60, 0);
        let c = child.stats();
        assert_eq!((c.c_bytes, c.late_bytes, c.late_frees), (60, -60, 0));
        assert_eq!(parent.stats().c_bytes, 0);
    }

    #[test]
    fn a_limit_covers_lua_and_c_and_refusals_take_nothing() {
        let parent = Account::new(None, Some(1000), 0);
        let child = Account::new(Some(parent.clone()), None, 0);
        parent.set_lua_kept(600);
        assert!(child.charge(400, 1));
        assert!(!child.charge(1, 1));
        assert_eq!(child.stats().c_bytes, 400);
        assert_eq!(child.stats().refusals, 1);
        assert_eq!(parent.stats().c_allocs, 1);
        assert!(!parent.admits_lua(600, 1));
        child.release(400, 1);
        assert!(parent.admits_lua(600, 400));
    }
}
