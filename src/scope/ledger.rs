//! What budgeted scopes keep: the blocks each made (or grew) that are still live.
//!
//! A budget (`mem.scope{limit = bytes}`) bounds the memory a scope keeps of its own, so a free
//! may only be credited to the scope that made the block: the collector that runs while a scope
//! is active frees other code's garbage too (a budget credited with it kept 10,000 tables on
//! 5.3 under `limit = 1024`). While a budgeted scope is open, the ledger records, by address,
//! each block made inside it and the bytes charged for it. A growth is charged like a new block
//! to the budgeted scope active when it happens (whose budget admitted it), whoever made the
//! block: growth done outside every budget (by code outside the scopes, or by the module's own
//! bookkeeping) is charged to nobody, and a block made in one scope and grown in another has
//! an entry for each. A free credits every owner; a shrink credits the latest charges first.
//!
//! The owner of an entry is the innermost scope that was active; its bytes count in the
//! `kept_bytes` of the owner and of every open scope it was opened in. When the owner closes,
//! its entries pass to the scope it was opened in if that one still counts (open and under a
//! budget), else they are dropped: a closed scope's counters no longer move.
//!
//! Blocks made outside budgeted scopes never enter the ledger, and while it is empty the hook
//! does not look at it.

use std::cell::{Cell, UnsafeCell};
use std::ptr;

use super::Scope;
use crate::fxhash::FxMap;

/// One owner's part of a recorded block: the bytes charged to it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The scope the bytes count for. Invariant: open (entries leave a scope when it closes).
    owner: *const Scope,
    bytes: usize,
}

/// The owners of one recorded block, oldest charge first: almost always one.
#[derive(Debug)]
enum Owners {
    One(Entry),
    Many(Vec<Entry>),
}

impl Owners {
    fn entries(&mut self) -> &mut [Entry] {
        match self {
            Owners::One(e) => std::slice::from_mut(e),
            Owners::Many(v) => v,
        }
    }

    fn has(&self, owner: *const Scope) -> bool {
        match self {
            Owners::One(e) => ptr::eq(e.owner, owner),
            Owners::Many(v) => v.iter().any(|e| ptr::eq(e.owner, owner)),
        }
    }

    fn push(&mut self, e: Entry) {
        match self {
            Owners::One(first) => *self = Owners::Many(vec![*first, e]),
            Owners::Many(v) => v.push(e),
        }
    }

    /// Keeps the entries `keep` says yes to; returns whether any is left.
    fn retain(&mut self, mut keep: impl FnMut(&mut Entry) -> bool) -> bool {
        match self {
            Owners::One(e) => keep(e),
            Owners::Many(v) => {
                v.retain_mut(|e| keep(e));
                let (only, any) = ((v.len() == 1).then(|| v[0]), !v.is_empty());
                if let Some(e) = only {
                    *self = Owners::One(e);
                }
                any
            }
        }
    }
}

/// Counts one more or one fewer block that `owner` has an entry for.
///
/// # Safety
/// `owner` is open.
unsafe fn count_entry(owner: *const Scope, more: bool) {
    // SAFETY: the caller's contract.
    let live = unsafe { &(*owner).ledger_live };
    live.set(if more { live.get() + 1 } else { live.get() - 1 });
}

type Map = FxMap<usize, Owners>;

/// The recorded blocks of one state's budgeted scopes. Single-threaded, like the state.
#[derive(Default)]
pub struct Ledger {
    entries: UnsafeCell<Map>,
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
    fn map(&self) -> &mut Map {
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
        // SAFETY: forwarded contract.
        unsafe {
            Scope::keep(scope, bytes as i64);
            if let Some(old) = self.map().insert(
                addr,
                Owners::One(Entry {
                    owner: scope,
                    bytes,
                }),
            ) {
                // (a block freed behind the hook's back: its owners are credited)
                Self::credit_all(old);
            }
            self.added(scope, addr);
        }
        self.sync_len();
    }

    /// `scope` has a new entry at `addr`: counted, and listed for its release.
    ///
    /// # Safety
    /// `scope` is open.
    unsafe fn added(&self, scope: *const Scope, addr: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            count_entry(scope, true);
            let s = &*scope;
            let addresses = s.ledger_addresses();
            addresses.push(addr);
            // Freed blocks stay on the list until it is twice what the scope owns: prune then.
            if addresses.len() > 2 * s.ledger_live.get() + 64 {
                let map = self.map();
                addresses.sort_unstable();
                addresses.dedup();
                addresses.retain(|a| map.get(a).is_some_and(|o| o.has(scope)));
            }
        }
    }

    /// Credits every owner of a block that is gone.
    ///
    /// # Safety
    /// The owners are open (see `Entry::owner`).
    unsafe fn credit_all(mut owners: Owners) {
        for e in owners.entries() {
            // SAFETY: the caller's contract.
            unsafe {
                Scope::keep(e.owner, -(e.bytes as i64));
                count_entry(e.owner, false);
            }
        }
    }

    /// The block `addr` was freed: credits its owners, if recorded.
    #[inline]
    pub fn freed(&self, addr: usize) {
        if let Some(owners) = self.map().remove(&addr) {
            // SAFETY: an entry's owner is open (see `Entry::owner`).
            unsafe { Self::credit_all(owners) };
            self.sync_len();
        }
    }

    /// The block `old` of `osize` bytes is now `new` of `nsize` bytes, while `scope` (null or
    /// the active scope, budgeted or not) is active: a recorded block moves; a shrink credits
    /// its latest charges first; a growth inside a budgeted scope is charged to that scope.
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
        let grows = budgeted && nsize > osize;
        let Some(mut owners) = map.remove(&old) else {
            if grows {
                // SAFETY: forwarded contract.
                unsafe { self.made(scope, new, nsize - osize) };
            }
            return;
        };
        if nsize < osize {
            // the latest charges first, none below zero
            let mut credit = osize - nsize;
            for e in owners.entries().iter_mut().rev() {
                let c = credit.min(e.bytes);
                e.bytes -= c;
                credit -= c;
                // SAFETY: an entry's owner is open.
                unsafe { Scope::keep(e.owner, -(c as i64)) };
            }
        }
        let mut charged_new_owner = false;
        if grows {
            let growth = nsize - osize;
            // SAFETY: forwarded contract.
            unsafe { Scope::keep(scope, growth as i64) };
            match owners
                .entries()
                .iter_mut()
                .find(|e| ptr::eq(e.owner, scope))
            {
                Some(e) => e.bytes += growth,
                None => {
                    owners.push(Entry {
                        owner: scope,
                        bytes: growth,
                    });
                    charged_new_owner = true;
                }
            }
        }
        let left = owners.retain(|e| {
            if e.bytes == 0 {
                // SAFETY: an entry's owner is open.
                unsafe { count_entry(e.owner, false) };
                return false;
            }
            true
        });
        if left {
            for e in owners.entries() {
                let is_new = charged_new_owner && ptr::eq(e.owner, scope);
                if is_new {
                    // SAFETY: an open budgeted scope.
                    unsafe { self.added(scope, new) };
                } else if new != old {
                    // SAFETY: the owner is open.
                    unsafe { (*e.owner).ledger_addresses().push(new) };
                }
            }
            self.map().insert(new, owners);
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
        let addresses = unsafe {
            let s = &*scope;
            s.ledger_live.set(0);
            std::mem::take(s.ledger_addresses())
        };
        let mut heir_gets = Vec::new();
        let map = self.map();
        for addr in addresses {
            let Some(owners) = map.get_mut(&addr) else {
                continue; // freed
            };
            let Some(bytes) = owners
                .entries()
                .iter()
                .find(|e| ptr::eq(e.owner, scope))
                .map(|e| e.bytes)
            else {
                continue; // moved since, or already passed on
            };
            let heir_has = !heir.is_null() && owners.has(heir);
            let left = owners.retain(|e| {
                if ptr::eq(e.owner, scope) {
                    if heir.is_null() || heir_has {
                        return false;
                    }
                    e.owner = heir;
                } else if heir_has && ptr::eq(e.owner, heir) {
                    e.bytes += bytes;
                }
                true
            });
            if !heir.is_null() && !heir_has {
                heir_gets.push(addr);
            }
            if !left {
                map.remove(&addr);
            }
        }
        for addr in heir_gets {
            // SAFETY: the caller's contract.
            unsafe { self.added(heir, addr) };
        }
        self.sync_len();
    }
}

#[cfg(test)]
mod tests {
    //! The ledger against a model: random blocks made, resized and freed by three budgeted
    //! scopes (A, B opened in A, C) and by code outside them, and scopes closed.
    use super::*;
    use crate::arena::ArenaSet;
    use crate::scope::Guard;
    use proptest::prelude::*;
    use std::rc::Rc;

    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    const NOBODY: usize = 3;

    #[derive(Clone, Debug)]
    enum Op {
        Make {
            by: usize,
            size: usize,
        },
        Resize {
            block: usize,
            size: usize,
            by: usize,
            moves: bool,
        },
        Free {
            block: usize,
        },
        Close {
            scope: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, 1..500usize).prop_map(|(by, size)| Op::Make { by, size }),
            4 => (0..64usize, 1..800usize, 0..4usize, any::<bool>())
                .prop_map(|(block, size, by, moves)| Op::Resize { block, size, by, moves }),
            2 => (0..64usize).prop_map(|block| Op::Free { block }),
            1 => (0..3usize).prop_map(|scope| Op::Close { scope }),
        ]
    }

    proptest! {
        #[test]
        fn charges_match_the_model(ops in proptest::collection::vec(op(), 1..120)) {
            let arenas = ArenaSet::default();
            let ledger = Ledger::default();
            let guard = || Guard { limit: Some(1 << 40), allowance: None };
            let a = Scope::guarded("A".into(), None, None, &arenas, guard());
            let b = Scope::guarded("B".into(), Some(a.clone()), None, &arenas, guard());
            let c = Scope::guarded("C".into(), None, None, &arenas, guard());
            let scopes = [a, b, c];
            for s in &scopes {
                // SAFETY: the ledger outlives the scopes (closed below, before it is dropped).
                unsafe { s.use_ledger(&ledger) };
            }
            let mut open = [true; 3];
            // live blocks: address, size, and the model's charges (owner, bytes), oldest first
            type Charges = Vec<(usize, usize)>;
            let mut blocks: Vec<(usize, usize, Charges)> = Vec::new();
            let mut next_addr = 16usize;
            let ptr_of = |i: usize| Rc::as_ptr(&scopes[i]);
            for op in ops {
                match op {
                    Op::Make { by, size } if open[by] => {
                        next_addr += 16;
                        // SAFETY: an open budgeted scope.
                        unsafe { ledger.made(ptr_of(by), next_addr, size) };
                        blocks.push((next_addr, size, vec![(by, size)]));
                    }
                    Op::Resize { block, size, by, moves } if block < blocks.len() => {
                        let by = if by < 3 && open[by] { by } else { NOBODY };
                        let (addr, osize, charges) = &mut blocks[block];
                        let new = if moves { next_addr += 16; next_addr } else { *addr };
                        let scope = if by == NOBODY { ptr::null() } else { ptr_of(by) };
                        // SAFETY: null or an open budgeted scope.
                        unsafe { ledger.resized(scope, by != NOBODY, *addr, new, *osize, size) };
                        if size < *osize {
                            let mut credit = *osize - size;
                            for ch in charges.iter_mut().rev() {
                                let cut = credit.min(ch.1);
                                ch.1 -= cut;
                                credit -= cut;
                            }
                        } else if size > *osize && by != NOBODY {
                            match charges.iter_mut().find(|ch| ch.0 == by) {
                                Some(ch) => ch.1 += size - *osize,
                                None => charges.push((by, size - *osize)),
                            }
                        }
                        charges.retain(|ch| ch.1 > 0);
                        *addr = new;
                        *osize = size;
                    }
                    Op::Free { block } if block < blocks.len() => {
                        let (addr, _, _) = blocks.swap_remove(block);
                        ledger.freed(addr);
                    }
                    Op::Close { scope } if open[scope] && !(scope == A && open[B]) => {
                        scopes[scope].close();
                        open[scope] = false;
                        let heir = if scope == B && open[A] { Some(A) } else { None };
                        // the heir takes the closed scope's charge: into its own charge if
                        // it has one, else in the closed scope's place (the charge's age)
                        for (_, _, charges) in blocks.iter_mut() {
                            let mine: usize =
                                charges.iter().filter(|ch| ch.0 == scope).map(|ch| ch.1).sum();
                            match heir {
                                Some(h) if charges.iter().any(|ch| ch.0 == h) => {
                                    charges.retain(|ch| ch.0 != scope);
                                    if let Some(ch) = charges.iter_mut().find(|ch| ch.0 == h) {
                                        ch.1 += mine;
                                    }
                                }
                                Some(h) => {
                                    for ch in charges.iter_mut().filter(|ch| ch.0 == scope) {
                                        ch.0 = h;
                                    }
                                }
                                None => charges.retain(|ch| ch.0 != scope),
                            }
                        }
                    }
                    _ => {}
                }
                // each open scope keeps its charges and those of the open scopes inside it
                for s in [A, B, C] {
                    if !open[s] {
                        continue;
                    }
                    let counts = |owner: usize| owner == s || (s == A && owner == B && open[B]);
                    let want: usize = blocks
                        .iter()
                        .flat_map(|b| b.2.iter())
                        .filter(|ch| counts(ch.0))
                        .map(|ch| ch.1)
                        .sum();
                    prop_assert_eq!(scopes[s].kept_bytes.get(), want as i64, "kept_bytes of {}", s);
                    let entries = blocks.iter().filter(|b| b.2.iter().any(|ch| ch.0 == s)).count();
                    prop_assert_eq!(scopes[s].ledger_live.get(), entries, "entries of {}", s);
                }
            }
            for i in [B, A, C] {
                scopes[i].close();
            }
            prop_assert!(ledger.is_empty());
        }
    }
}
