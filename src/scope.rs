//! Scopes: named regions of execution whose allocations are counted apart.
//!
//! A scope is opened in a Lua thread (coroutine), and allocations are attributed to the innermost
//! open scope of the running thread, then rolled up to the scopes it was opened in. Which scope is
//! active follows the coroutines: see [`ThreadScopes`] and the enter/leave of
//! `src/bindings/coroutines.rs`.
//!
//! The scopes' budget ledger (what budgeted scopes keep) is the submodule `ledger`
//! (`src/scope/ledger.rs`).

use std::cell::{Cell, OnceCell, UnsafeCell};
use std::ptr;
use std::rc::Rc;
use std::sync::Arc;

use lunet_mem_c::Account;

mod ledger;

pub use ledger::Ledger;

use crate::arena::{Arena, ArenaSet, FreedFrom};
use crate::metrics::{Metrics, ScopeFigures};

/// One scope and its counters (see the `scope:stats()` fields in the README).
pub struct Scope {
    pub name: Rc<str>,
    pub allocs: Cell<u64>,
    pub frees: Cell<u64>,
    pub reallocs: Cell<u64>,
    pub bytes_allocated: Cell<u64>,
    pub bytes_freed: Cell<u64>,
    /// `bytes_allocated - bytes_freed`.
    pub net_bytes: Cell<i64>,
    /// Highest `net_bytes` while the scope was open.
    pub peak_bytes: Cell<i64>,
    /// Set when the scope ends; a closed scope's counters no longer move.
    pub closed: Cell<bool>,
    /// LuaJIT traces recorded while the scope was active: what the recorder allocated then
    /// counts for the scope (it runs alongside the scope's own code, whose allocations cannot be
    /// told apart), so a request with `jit_traces > 0` may count more than a run alone.
    pub jit_traces: Cell<u64>,
    /// Allocations a budget refused (or, on LuaJIT, whose memory error was raised later) while
    /// this scope or one opened inside it was active.
    pub budget_refusals: Cell<u64>,
    /// The state's metrics if they were on when the scope became active: its figures go there
    /// when it closes. Else null. Invariant: the metrics outlive the scope (a field of the
    /// tracker).
    metrics: Cell<*const Metrics>,
    /// The scope that was active when this one was opened: counts roll up to it.
    parent: Option<Rc<Scope>>,
    /// `parent` as a raw pointer for the allocation hook. Invariant: equal to `parent`'s pointer
    /// (or null), so it is valid as long as `self` is.
    parent_ptr: *const Scope,
    /// The arena new objects go to while this scope is active: its own (`owns_arena`), the one
    /// of the scope it was opened in, or null. Invariant: the scope is one of the arena's users
    /// (`Arena::add_user`), so the arena lives as long as the scope.
    arena: *mut Arena,
    owns_arena: bool,
    /// The scope's memory budget: an allocation that would take `net_bytes` past it fails
    /// (`i64::MAX`: none).
    limit: i64,
    /// Allocations the scope still admits before every next one fails (`u64::MAX`: no such
    /// countdown; `mem.fail_after`).
    allowance: Cell<u64>,
    /// Whether this scope or one it was opened in has a limit or an allowance: the hook checks
    /// budgets only then.
    guarded: bool,
    /// Bytes of the blocks made (or grown) while this scope or one opened inside it was active
    /// that are still live: what its budget bounds (kept only where a limit counts, see
    /// `src/scope/ledger.rs`).
    pub kept_bytes: Cell<i64>,
    /// Whether this scope or one it was opened in has a limit: allocations while it is active
    /// are recorded in the ledger.
    kept_tracked: bool,
    /// The state's ledger while this scope may own entries in it, else null. Invariant: the
    /// ledger outlives the scope (a field of the tracker).
    ledger: Cell<*const Ledger>,
    /// Addresses this scope recorded in the ledger (some since freed), and how many entries it
    /// owns.
    ledger_addresses: UnsafeCell<Vec<usize>>,
    pub(crate) ledger_live: Cell<usize>,
    /// Set when an allocation past the budgets of this scope's chain was admitted anyway while
    /// it or a scope opened in it was active (LuaJIT, where failing is not always safe; see
    /// `Tracker::scope_for_call`): if the scope is still past a budget when it closes, its run
    /// ends with Lua's memory error (it keeps memory its budget did not admit, even if the
    /// error raised sooner was caught).
    pub overdrawn: Cell<bool>,
    /// Set with `overdrawn` on the active scope until Lua's memory error has been raised in it
    /// (LuaJIT 2.1 betas: by a count hook, `crate::luajit::BudgetHook`).
    pub raise_pending: Cell<bool>,
    /// The count of open budgeted scopes this scope is counted in until it closes (see
    /// [`Scope::count_in`]), or null. Invariant: the count outlives the scope (it is a field
    /// of the tracker, which outlives every scope of its state).
    counted_in: Cell<*const Cell<u32>>,
    /// The scope's C account (`lunet_mem_scope_t`, `lunet-mem-c`'s `account.rs`), made the
    /// first time C code asks for it: the C memory charged to the scope, from any thread.
    account: OnceCell<Arc<Account>>,
}

/// What a scope bounds, if anything.
#[derive(Clone, Copy, Default, Debug)]
pub struct Guard {
    /// Budget of `net_bytes`.
    pub limit: Option<u64>,
    /// Allocations admitted before every next one fails.
    pub allowance: Option<u64>,
}

impl Scope {
    /// A scope opened inside `parent`. With `arena: Some(first_chunk)` it gets an arena of its
    /// own in `arenas`; else it uses its parent's arena, if any.
    pub fn new(
        name: Rc<str>,
        parent: Option<Rc<Scope>>,
        arena: Option<usize>,
        arenas: &ArenaSet,
    ) -> Rc<Scope> {
        Scope::guarded(name, parent, arena, arenas, Guard::default())
    }

    /// A scope as [`Scope::new`] makes, bounded by `guard`.
    pub fn guarded(
        name: Rc<str>,
        parent: Option<Rc<Scope>>,
        arena: Option<usize>,
        arenas: &ArenaSet,
        guard: Guard,
    ) -> Rc<Scope> {
        let scope = Rc::new(Scope::make(name, parent, arena, arenas, guard));
        if scope.owns_arena {
            // SAFETY: the scope is a user of its arena. The owner is cleared when the scope
            // closes (`Arena::end`), which it does at the latest when it is dropped: a non-null
            // owner is an open, live scope (what `arena_attribution` relies on).
            unsafe { (*scope.arena).set_owner(Rc::as_ptr(&scope).cast()) };
        }
        scope
    }

    fn make(
        name: Rc<str>,
        parent: Option<Rc<Scope>>,
        arena: Option<usize>,
        arenas: &ArenaSet,
        guard: Guard,
    ) -> Scope {
        let parent_ptr = parent.as_ref().map_or(ptr::null(), Rc::as_ptr);
        let parent_tracks_kept = parent.as_ref().is_some_and(|p| p.kept_tracked);
        let guarded = guard.limit.is_some()
            || guard.allowance.is_some()
            || parent.as_ref().is_some_and(|p| p.guarded);
        // (A route whose arenas keep outliving their requests runs without: see `Routes`.)
        let arena = arena.filter(|_| arenas.routes.admits(&name));
        let (arena, owns_arena) = match (arena, &parent) {
            (Some(first_chunk), _) => (arenas.open(name.clone(), first_chunk), true),
            (None, Some(p)) if !p.arena.is_null() => {
                // SAFETY: the parent is a user of its arena, so it is live.
                unsafe { Arena::add_user(p.arena) };
                (p.arena, false)
            }
            _ => (ptr::null_mut(), false),
        };
        Scope {
            name,
            allocs: Cell::new(0),
            frees: Cell::new(0),
            reallocs: Cell::new(0),
            bytes_allocated: Cell::new(0),
            bytes_freed: Cell::new(0),
            net_bytes: Cell::new(0),
            peak_bytes: Cell::new(0),
            closed: Cell::new(false),
            jit_traces: Cell::new(0),
            budget_refusals: Cell::new(0),
            metrics: Cell::new(ptr::null()),
            parent,
            parent_ptr,
            arena,
            owns_arena,
            limit: guard
                .limit
                .map_or(i64::MAX, |l| l.min(i64::MAX as u64) as i64),
            allowance: Cell::new(guard.allowance.unwrap_or(u64::MAX)),
            guarded,
            kept_bytes: Cell::new(0),
            kept_tracked: guard.limit.is_some() || parent_tracks_kept,
            ledger: Cell::new(ptr::null()),
            ledger_addresses: UnsafeCell::new(Vec::new()),
            ledger_live: Cell::new(0),
            overdrawn: Cell::new(false),
            raise_pending: Cell::new(false),
            counted_in: Cell::new(ptr::null()),
            account: OnceCell::new(),
        }
    }

    /// The scope's C account, made now if it has none (with those of the scopes it was opened
    /// in): what `lunet_mem_scope_current` hands to C code.
    pub fn account(&self) -> &Arc<Account> {
        self.account.get_or_init(|| {
            let parent = self.parent.as_ref().map(|p| p.account().clone());
            let limit = (self.limit != i64::MAX).then_some(self.limit);
            let account = Account::new(parent, limit, self.kept_bytes.get());
            if self.closed.get() {
                account.close();
            }
            account
        })
    }

    /// The scope's C account, if C code asked for it.
    pub fn c_account(&self) -> Option<&Arc<Account>> {
        self.account.get()
    }

    /// Live C bytes charged to the scope (0 without an account).
    #[inline]
    fn c_live_bytes(&self) -> i64 {
        self.account.get().map_or(0, |a| a.live_bytes())
    }

    /// A LuaJIT trace starts being recorded while `self` is active: counts it for `self` and
    /// the open scopes it was opened in.
    pub fn count_trace(&self) {
        // SAFETY: `self` is live, so its ancestors are.
        unsafe { Scope::walk(self, |s| s.jit_traces.set(s.jit_traces.get() + 1)) };
    }

    /// Whether an allocation that adds `delta` bytes may happen while `self` is active: within
    /// the limit of this scope and of each open scope it was opened in (the tightest wins), and
    /// within their allowances, which it then uses up by one.
    #[inline(always)]
    pub fn admits(&self, delta: usize) -> bool {
        !self.guarded || self.admits_slow(delta as i64)
    }

    #[cold]
    #[inline(never)]
    fn admits_slow(&self, delta: i64) -> bool {
        let ok = Cell::new(true);
        // SAFETY: `self` is live, so its ancestors are.
        unsafe {
            Scope::walk(self, |s| {
                // (the limit covers the scope's C bytes too)
                let kept = s.kept_bytes.get().saturating_add(s.c_live_bytes());
                if kept.saturating_add(delta) > s.limit || s.allowance.get() == 0 {
                    ok.set(false);
                }
            });
            let ok = ok.get();
            if ok {
                Scope::walk(self, |s| {
                    let left = s.allowance.get();
                    if left != u64::MAX {
                        s.allowance.set(left - 1);
                    }
                });
            }
            ok
        }
    }

    /// The arena new objects go to while this scope is active, or null.
    #[inline(always)]
    pub fn arena(&self) -> *mut Arena {
        self.arena
    }

    /// Its own arena, if it has one (not one inherited from the scope it was opened in).
    pub fn own_arena(&self) -> Option<&Arena> {
        // SAFETY: the scope is a user of its arena (see `arena`'s invariant).
        self.owns_arena.then(|| unsafe { &*self.arena })
    }

    /// Whether this scope or one it was opened in has a limit or an allowance.
    pub fn is_budgeted(&self) -> bool {
        self.guarded
    }

    /// Whether the scope has a limit or an allowance of its own.
    pub fn has_budget(&self) -> bool {
        self.limit != i64::MAX || self.allowance.get() != u64::MAX
    }

    /// Whether allocations while this scope is active are recorded in the ledger.
    #[inline(always)]
    pub fn tracks_kept(&self) -> bool {
        self.kept_tracked
    }

    /// Makes `ledger` the one this scope's entries are in (released when it closes).
    ///
    /// # Safety
    /// `ledger` outlives the scope.
    pub unsafe fn use_ledger(&self, ledger: &Ledger) {
        self.ledger.set(ledger);
    }

    /// The addresses this scope recorded in the ledger.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn ledger_addresses(&self) -> &mut Vec<usize> {
        // SAFETY: only the ledger uses the list, never while holding another reference to it.
        unsafe { &mut *self.ledger_addresses.get() }
    }

    /// An allocation past the budgets of `scope`'s chain was admitted while `scope` was active:
    /// marks it and the open scopes it was opened in overdrawn, and its error pending.
    ///
    /// # Safety
    /// As for [`Scope::walk`].
    pub unsafe fn overdraw(scope: *const Scope) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| s.overdrawn.set(true));
            (*scope).raise_pending.set(true);
        }
    }

    /// Whether the scope or an open scope it was opened in keeps more than its limit or has
    /// used up its allowance: an overdrawn scope then fails when it closes (see `overdrawn`).
    pub fn past_budget(&self) -> bool {
        let past = Cell::new(false);
        // SAFETY: `self` is live, so its ancestors are.
        unsafe {
            Scope::walk(self, |s| {
                let kept = s.kept_bytes.get().saturating_add(s.c_live_bytes());
                if kept > s.limit || s.allowance.get() == 0 {
                    past.set(true);
                }
            })
        };
        past.get()
    }

    /// Whether the scope, closing now, fails for what it was admitted past its budgets.
    pub fn fails_overdrawn(&self) -> bool {
        self.overdrawn.get() && self.past_budget()
    }

    /// Adds `delta` to the kept bytes of `scope` and of the open scopes it was opened in.
    ///
    /// # Safety
    /// As for [`Scope::walk`].
    #[inline]
    pub unsafe fn keep(scope: *const Scope, delta: i64) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                let kept = s.kept_bytes.get() + delta;
                s.kept_bytes.set(kept);
                // (mirrored for the C side's limit checks)
                if let Some(a) = s.account.get() {
                    a.set_lua_kept(kept);
                }
            })
        }
    }

    /// Counts the scope in `open` (the tracker's count of open budgeted scopes) until it closes.
    ///
    /// # Safety
    /// `open` outlives the scope.
    pub unsafe fn count_in(&self, open: &Cell<u32>) {
        open.set(open.get() + 1);
        self.counted_in.set(open);
    }

    /// Counts the scope in `metrics` when it closes.
    ///
    /// # Safety
    /// `metrics` outlives the scope.
    pub unsafe fn report_to(&self, metrics: &Metrics) {
        self.metrics.set(metrics);
    }

    /// A budget refused an allocation while `scope` was active: counts it for `scope` and the
    /// open scopes it was opened in.
    ///
    /// # Safety
    /// As for [`Scope::walk`].
    #[cold]
    pub unsafe fn count_refusal(scope: *const Scope) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                s.budget_refusals.set(s.budget_refusals.get() + 1)
            })
        }
    }

    /// Ends the scope: its counters stop, and its own arena takes no more blocks (it is
    /// reclaimed once the collector has freed every block in it); its figures go to the
    /// metrics it reports to. Once.
    pub fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        if let Some(a) = self.account.get() {
            a.close();
        }
        let metrics = self.metrics.replace(ptr::null());
        if !metrics.is_null() {
            // SAFETY: the metrics outlive the scope (see `metrics`).
            unsafe { (*metrics).record(&self.name, self.figures()) };
        }
        let ledger = self.ledger.replace(ptr::null());
        if !ledger.is_null() {
            let heir = match &self.parent {
                Some(p) if !p.closed.get() && p.kept_tracked => Rc::as_ptr(p),
                _ => ptr::null(),
            };
            // SAFETY: the ledger outlives the scope; the heir is open and budgeted.
            unsafe { (*ledger).release(self, heir) };
        }
        let open = self.counted_in.replace(ptr::null());
        if !open.is_null() {
            // SAFETY: the count outlives the scope (see `counted_in`).
            unsafe { (*open).set((*open).get() - 1) };
        }
        if self.owns_arena {
            // SAFETY: the scope is a user of its arena.
            unsafe { Arena::end(self.arena) };
        }
    }

    /// What the metrics aggregate of the scope.
    fn figures(&self) -> ScopeFigures {
        ScopeFigures {
            bytes_allocated: self.bytes_allocated.get(),
            retained_bytes: self.net_bytes.get(),
            peak_bytes: self.peak_bytes.get(),
            budget_refusals: self.budget_refusals.get(),
        }
    }

    pub fn parent(&self) -> Option<&Rc<Scope>> {
        self.parent.as_ref()
    }

    #[inline(always)]
    fn add_net(&self, delta: i64) {
        let net = self.net_bytes.get() + delta;
        self.net_bytes.set(net);
        if net > self.peak_bytes.get() {
            self.peak_bytes.set(net);
        }
    }

    /// Where a free of an arena block gets counted: the scope the free of a block of `arena`
    /// (whose owner is `owner`, see `Arena::owner`) counts for. The active scope if it places
    /// its blocks in that arena (the arena's own scope or one opened inside it), else the scope
    /// that made the arena while it is open (a collection step that runs during another request
    /// frees this request's garbage), else none. A resize counts as its free would.
    ///
    /// # Safety
    /// `active` is null or a live scope; `owner` is the arena's owner as read while the arena
    /// was live (null or its open scope).
    #[inline(always)]
    pub unsafe fn arena_attribution(
        active: *const Scope,
        arena: *const Arena,
        owner: *const (),
    ) -> *const Scope {
        // SAFETY: the caller's contract.
        if !active.is_null() && ptr::eq(unsafe { (*active).arena() }, arena) {
            active
        } else {
            owner.cast()
        }
    }

    /// [`Scope::arena_attribution`] of a free, from what the arena read before counting it.
    ///
    /// # Safety
    /// `active` is null or a live scope; `from` was returned by `ArenaSet::free` just now.
    #[inline(always)]
    pub unsafe fn arena_free_attribution(active: *const Scope, from: FreedFrom) -> *const Scope {
        // SAFETY: forwarded contract.
        unsafe { Scope::arena_attribution(active, from.arena, from.owner) }
    }

    /// Walks from `scope` to its open ancestors, applying `f` to each.
    ///
    /// # Safety
    /// `scope` must point to a live `Scope` (its ancestors are then alive: each holds its parent).
    #[inline(always)]
    unsafe fn walk(mut scope: *const Scope, f: impl Fn(&Scope)) {
        while !scope.is_null() {
            // SAFETY: the caller guarantees the first pointer; each next one is `parent_ptr`,
            // kept alive by `parent`.
            let s = unsafe { &*scope };
            debug_assert!(ptr::eq(
                s.parent_ptr,
                s.parent.as_ref().map_or(ptr::null(), Rc::as_ptr)
            ));
            if s.closed.get() {
                break;
            }
            f(s);
            scope = s.parent_ptr;
        }
    }

    /// # Safety
    /// As for [`Scope::walk`].
    #[inline(always)]
    pub unsafe fn attribute_alloc(scope: *const Scope, nsize: u64) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                s.allocs.set(s.allocs.get() + 1);
                s.bytes_allocated.set(s.bytes_allocated.get() + nsize);
                s.add_net(nsize as i64);
            })
        }
    }

    /// # Safety
    /// As for [`Scope::walk`].
    #[inline(always)]
    pub unsafe fn attribute_free(scope: *const Scope, osize: u64) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                s.frees.set(s.frees.get() + 1);
                s.bytes_freed.set(s.bytes_freed.get() + osize);
                s.net_bytes.set(s.net_bytes.get() - osize as i64);
            })
        }
    }

    /// # Safety
    /// As for [`Scope::walk`].
    #[inline(always)]
    pub unsafe fn attribute_realloc(scope: *const Scope, osize: u64, nsize: u64) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                s.reallocs.set(s.reallocs.get() + 1);
                s.bytes_allocated.set(s.bytes_allocated.get() + nsize);
                s.bytes_freed.set(s.bytes_freed.get() + osize);
                s.add_net(nsize as i64 - osize as i64);
            })
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // A scope dropped without closing (an error kept it from starting; a coroutine
        // collected inside it ends it sooner, see `ThreadScopes::end_open_scopes`) ends now:
        // its arena, its budget count.
        self.close();
        if !self.arena.is_null() {
            // SAFETY: the scope was one of the arena's users.
            unsafe { Arena::drop_user(self.arena) };
        }
    }
}

/// The scopes one Lua thread has open, innermost last, and the scope it inherits when none is
/// open: the one that was active in the coroutine that resumed it last (`base`).
#[derive(Default)]
pub struct ThreadScopes {
    pub stack: Vec<Rc<Scope>>,
    pub base: Option<Rc<Scope>>,
    /// Whether `base` was set by a resume (see [`ThreadScopes::inherit`]). A thread never
    /// resumed since its record was made, such as the thread a current LuaJIT runs every
    /// finalizer on, got its `base` from the first scope it opened (whatever scope the collector
    /// interrupted), and keeps it after that scope closed: it says nothing of a resume.
    pub resumed: bool,
    /// LuaJIT's `mem.scope`: the scope made for a call, until it becomes active.
    #[cfg_attr(not(feature = "luajit"), allow(dead_code))]
    pub pending: Option<Rc<Scope>>,
    /// LuaJIT's `mem.scope`: the scope that `fn`'s return closed, until its stats are read.
    #[cfg_attr(not(feature = "luajit"), allow(dead_code))]
    pub closed: Option<Rc<Scope>>,
    /// Whether the record is in the tracker's `thread_records` (from the first scope the
    /// thread opened until the record is finalized).
    pub registered: bool,
}

impl ThreadScopes {
    /// The scope allocations of this thread go to.
    pub fn effective(&self) -> Option<Rc<Scope>> {
        self.stack.last().or(self.base.as_ref()).cloned()
    }

    /// A resume (or a wrapper that saw one) makes `scope`, active in the resumer, the scope the
    /// thread inherits.
    pub fn inherit(&mut self, scope: Option<Rc<Scope>>) {
        self.base = scope;
        self.resumed = true;
    }

    /// Whether the chain from `scope` (the scope and those it was opened in) holds one of the
    /// scopes this thread has open.
    pub fn in_chain_of(&self, scope: Option<&Rc<Scope>>) -> bool {
        let mut at = scope;
        while let Some(s) = at {
            if self.stack.iter().any(|open| Rc::ptr_eq(open, s)) {
                return true;
            }
            at = s.parent();
        }
        false
    }

    /// Ends the scopes the thread has open, innermost first, whatever else still holds them (a
    /// scope object, the `base` of a coroutine resumed inside them, a scope opened in such a
    /// coroutine): for a thread that can no longer close them (see the finalizer of thread
    /// records in `src/bindings/scopes.rs`). `base` belongs to another thread and stays open.
    pub fn end_open_scopes(&mut self) {
        while let Some(scope) = self.stack.pop() {
            scope.close();
        }
    }
}
