//! What budgeted scopes keep: the blocks each made (or grew) that are still live.
//!
//! A budget (`mem.scope{limit = bytes}`) bounds the memory a scope keeps of its own, so a free
//! may only be credited to the scope that made the block: the collector that runs while a scope
//! is active frees other code's garbage too (a budget credited with it kept 10,000 tables on
//! 5.3 under `limit = 1024`). While a budgeted scope is open, the ledger records, by address,
//! each block made inside it and the bytes charged for it; the growth of an older block inside
//! it is recorded the same way, for the growth only. A free or a shrink credits the recorded
//! owner, whatever scope is active then; a block nobody recorded credits nobody.
//!
//! The owner of an entry is the innermost scope that was active; its bytes count in the
//! `kept_bytes` of the owner and of every open scope it was opened in. When the owner closes,
//! its entries pass to the scope it was opened in if that one still counts (open and under a
//! budget), else they are dropped: a closed scope's counters no longer move.
//!
//! Blocks made outside budgeted scopes never enter the ledger, and while it is empty the hook
//! does not look at it.

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::ptr;

use crate::scope::Scope;
use crate::trace::FxHasher;

/// One recorded block: its owner and the bytes charged to it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The scope the bytes count for. Invariant: open (entries leave a scope when it closes).
    owner: *const Scope,
    bytes: usize,
}

/// The recorded blocks of one state's budgeted scopes. Single-threaded, like the state.
#[derive(Default)]
pub struct Ledger {
    entries: UnsafeCell<HashMap<usize, Entry, BuildHasherDefault<FxHasher>>>,
    /// `entries.len()`, readable without touching the map.
    len: Cell<usize>,
}

impl Ledger {
    /// Whether no block is recorded (the hook's frees then skip the ledger).
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len.get() == 0
    }

    #[allow(clippy::mut_from_ref)]
    fn map(&self) -> &mut HashMap<usize, Entry, BuildHasherDefault<FxHasher>> {
        // SAFETY: the map is only reached through these methods, which never call out while
        // holding the reference (the state is single-threaded and the ledger is not reentrant).
        unsafe { &mut *self.entries.get() }
    }

    fn sync_len(&self) {
        self.len.set(self.map().len());
    }

    /// A new block `addr` of `bytes` made while `scope` (budgeted) was active.
    ///
    /// # Safety
    /// `scope` is open and lives until it closes (it then calls [`Ledger::release`]).
    pub unsafe fn made(&self, scope: *const Scope, addr: usize, bytes: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            Scope::keep(scope, bytes as i64);
            self.map().insert(
                addr,
                Entry {
                    owner: scope,
                    bytes,
                },
            );
            let s = &*scope;
            s.ledger_live.set(s.ledger_live.get() + 1);
            let addresses = s.ledger_addresses();
            addresses.push(addr);
            // Freed blocks stay on the list until it is twice what the scope owns: prune then.
            if addresses.len() > 2 * s.ledger_live.get() + 64 {
                let map = self.map();
                addresses.retain(|a| map.get(a).is_some_and(|e| ptr::eq(e.owner, scope)));
            }
        }
        self.sync_len();
    }

    /// The block `addr` was freed: credits its owner, if recorded.
    #[inline]
    pub fn freed(&self, addr: usize) {
        if let Some(e) = self.map().remove(&addr) {
            // SAFETY: an entry's owner is open (see `Entry::owner`).
            unsafe {
                Scope::keep(e.owner, -(e.bytes as i64));
                let live = &(*e.owner).ledger_live;
                live.set(live.get() - 1);
            }
            self.sync_len();
        }
    }

    /// The block `old` of `osize` bytes is now `new` of `nsize` bytes, while `scope` (null or
    /// the active scope, budgeted or not) is active: a recorded block moves and its owner is
    /// charged or credited the difference (never below what was charged for it); an unrecorded
    /// block that grew inside a budgeted scope is recorded for its growth.
    ///
    /// # Safety
    /// As for [`Ledger::made`], for a non-null budgeted `scope`.
    pub unsafe fn resized(
        &self,
        scope: *const Scope,
        budgeted: bool,
        old: usize,
        new: usize,
        osize: usize,
        nsize: usize,
    ) {
        let map = self.map();
        if let Some(mut e) = map.remove(&old) {
            let bytes = (e.bytes as i64 + nsize as i64 - osize as i64).max(0) as usize;
            // SAFETY: an entry's owner is open.
            unsafe { Scope::keep(e.owner, bytes as i64 - e.bytes as i64) };
            e.bytes = bytes;
            if bytes > 0 {
                map.insert(new, e);
                if new != old {
                    // SAFETY: the owner is open.
                    unsafe { (*e.owner).ledger_addresses().push(new) };
                }
            } else {
                // SAFETY: the owner is open.
                let live = unsafe { &(*e.owner).ledger_live };
                live.set(live.get() - 1);
            }
        } else if budgeted && nsize > osize {
            // SAFETY: forwarded contract.
            unsafe { self.made(scope, new, nsize - osize) };
            return;
        }
        self.sync_len();
    }

    /// `scope` closes: its entries pass to `heir` (the scope it was opened in, if that one is
    /// open and budgeted) or are dropped.
    ///
    /// # Safety
    /// `scope` is live; `heir` is null or an open budgeted scope that outlives the entries.
    pub unsafe fn release(&self, scope: *const Scope, heir: *const Scope) {
        // SAFETY: the caller's contract.
        let (addresses, live) = unsafe {
            let s = &*scope;
            (
                std::mem::take(s.ledger_addresses()),
                s.ledger_live.replace(0),
            )
        };
        let map = self.map();
        for addr in addresses {
            match map.get_mut(&addr) {
                Some(e) if ptr::eq(e.owner, scope) => {
                    if heir.is_null() {
                        map.remove(&addr);
                    } else {
                        e.owner = heir;
                        // SAFETY: the caller's contract.
                        unsafe { (*heir).ledger_addresses().push(addr) };
                    }
                }
                _ => {} // freed, or moved and recorded again
            }
        }
        if !heir.is_null() {
            // SAFETY: the caller's contract.
            let heir_live = unsafe { &(*heir).ledger_live };
            heir_live.set(heir_live.get() + live);
        }
        self.sync_len();
    }
}
