//! Scopes: the thread records that let them follow coroutines, opening and closing one, scope
//! objects (`mem.current()`, `scope:stats()`, ...) and `core.exempt_call`. How `mem.scope` runs
//! its function inside one is in `scope_call.rs`.

use std::ffi::{c_int, CStr};
use std::ptr;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use super::arenas::keep_gc_ticking;
use super::errors::{check_tracker, check_udata, no_arguments, push_owned, raise, rethrow};
use super::{push_str, register, set_int};
use crate::arena;
use crate::hook::Tracker;
use crate::scope::{Guard, Scope, ThreadScopes};
use crate::state;
use crate::udata;

impl udata::Boxed for Rc<Scope> {
    const METATABLE: &'static CStr = c"lunet.mem.scope";
    const NAME: &'static CStr = c"scope";
    const TAG: u64 = 0x6c75_6e65_7473_6331;
}

impl udata::Boxed for ThreadScopes {
    const METATABLE: &'static CStr = c"lunet.mem.thread_scopes";
    const NAME: &'static CStr = c"thread record";
    const TAG: u64 = 0x6c75_6e65_7474_7331;

    /// A thread's record is finalized when the thread was collected (suspended inside its
    /// scopes) or the state closes: nothing can close the scopes it has open any more, so they
    /// end now, whatever else holds them. Left to their last holder, a scope object whose
    /// finalizer Lua dropped kept such a scope and its arena running for good: PUC Lua drops a
    /// finalizer whose call fails, and a budget active when the collector calls one may refuse
    /// the stack or `CallInfo` the call needs. A record finalized by hand (the debug library
    /// reaches it) whose thread still runs, or waits in a resume, keeps its scopes: one of them
    /// is then the active scope or the running thread's `base`, or was opened in one of those.
    unsafe fn finalize(&mut self, L: *mut lua_State) {
        // SAFETY: `L` is a thread of a state whose tracker is found by checking its allocator;
        // `thread_scopes` without `create` neither allocates nor raises.
        unsafe {
            let Some(t) = state::tracker(L) else { return };
            if ptr::eq(t.thread_record.get().cast_const().cast(), self) {
                t.thread_cached.set(0); // (its box is freed after this)
            }
            if self.registered {
                self.registered = false;
                let key = ptr::from_mut(self) as usize;
                t.thread_records.borrow_mut().remove(&key);
            }
            end_if_orphaned(L, t, self);
        }
    }
}

/// Ends the scopes of `ts`, the record of a thread that can no longer run, unless one of them
/// is in the chain of the active scope or of the scope the running thread was resumed from (a
/// record finalized by hand while its thread runs or waits in a resume).
///
/// # Safety
/// `L` valid with 3 free slots, `t` its tracker. Allocates nothing, raises nothing.
unsafe fn end_if_orphaned(L: *mut lua_State, t: &Tracker, ts: &mut ThreadScopes) {
    // SAFETY: forwarded contract; `thread_scopes` without `create` neither allocates nor raises.
    unsafe {
        let resumer_scope = thread_scopes(L, t, 0, false)
            .filter(|running| running.resumed)
            .and_then(|running| running.base.clone());
        if ts.in_chain_of(t.active_scope().as_ref()) || ts.in_chain_of(resumer_scope.as_ref()) {
            return;
        }
        ts.end_open_scopes();
    }
}

/// Ends the scopes of the threads whose record was collected without its finalizer: Lua 5.1 to
/// 5.3 drop a finalizer whose call fails, and a budget or `fail_after` active when the
/// collector calls one may refuse the stack or `CallInfo` the call needs. The thread was
/// collected, suspended inside its scopes, so nothing else would end them (an arena scope would
/// run for good). A record with scopes open that is no longer in the table of records is such
/// a record, or one whose finalizer is still to run (it then finds nothing left to end): its
/// key, the thread, was collected (a thread only reachable from an object being finalized
/// stays a key until it is freed). The record's box is left (its finalizer may still come):
/// only its scopes are ended.
///
/// Called by the GC cycle counter, once per cycle. Costs a walk of the table of records, only
/// while some thread has a scope open. (A counter whose own finalizer was dropped is replaced
/// when the next scope opens, or at the next `mem.settle()` or `mem.arenas()`.)
///
/// # Safety
/// `L` valid, `t` its tracker. Needs 5 free slots (checked). Raises nothing.
pub(super) unsafe fn sweep_lost_records(L: *mut lua_State, t: &Tracker) {
    // SAFETY: registered records are live boxes: a record leaves the set in its finalizer,
    // before its box is dropped, and a box whose finalizer never ran is never dropped.
    unsafe {
        let open: Vec<usize> = t
            .thread_records
            .borrow()
            .iter()
            .copied()
            .filter(|&r| !(*(r as *const ThreadScopes)).stack.is_empty())
            .collect();
        if open.is_empty() || !t.closing.get().is_null() {
            return;
        }
        let was = t.begin_exempt(); // (the stack slots are the module's bookkeeping)
        let room = ffi::lua_checkstack(L, 5) != 0;
        t.end_exempt(was);
        if !room {
            return;
        }
        let top = ffi::lua_gettop(L);
        ffi::lua_rawgeti(L, ffi::LUA_REGISTRYINDEX, t.threads_ref.get() as _);
        if ffi::lua_type(L, -1) != ffi::LUA_TTABLE {
            ffi::lua_settop(L, top);
            return; // (replaced by a script: nothing says which threads live)
        }
        let mut listed = std::collections::HashSet::new();
        ffi::lua_pushnil(L);
        while ffi::lua_next(L, -2) != 0 {
            if let Some(ts) = udata::test::<ThreadScopes>(L, -1) {
                listed.insert(ptr::from_mut(ts) as usize);
            }
            ffi::lua_pop(L, 1);
        }
        ffi::lua_settop(L, top);
        for record in open.into_iter().filter(|r| !listed.contains(r)) {
            let ts = &mut *(record as *mut ThreadScopes);
            ts.registered = false;
            t.thread_records.borrow_mut().remove(&record);
            end_if_orphaned(L, t, ts);
        }
    }
}

/// Adds the scope objects' functions, `exempt_call` and `scope_mt` to the `core` table on top.
///
/// # Safety
/// `L` valid with 3 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: valid state, table on top.
    unsafe {
        register(
            L,
            &[
                (c"current", l_current),
                (c"scope_stats", l_scope_stats),
                (c"scope_name", l_scope_name),
                (c"is_scope", l_is_scope),
                (c"exempt_call", l_exempt_call),
                (c"charge", l_charge),
            ],
        );
        udata::new_metatable::<Rc<Scope>>(L);
        ffi::lua_setfield(L, -2, c"scope_mt".as_ptr());
    }
}

/// The `ThreadScopes` of the thread at stack index `idx` (the running thread if `idx` is 0),
/// created if `create` is set.
///
/// The table of thread records sits in the registry, where `debug.getregistry` can reach it: its
/// type and each record's metatable are checked, so that a script that replaced them gets no
/// scopes (and an error when it opens one), never a crash.
///
/// # Safety
/// `L` valid with 3 free slots (4 with `create`), `t` its tracker. Allocates and may raise
/// (memory, or a replaced table) only when `create` is set; the allocations are the module's
/// bookkeeping, not charged to or refused by the active scope.
pub(crate) unsafe fn thread_scopes<'a>(
    L: *mut lua_State,
    t: &Tracker,
    idx: c_int,
    create: bool,
) -> Option<&'a mut ThreadScopes> {
    // SAFETY: valid state; the registry table is made at load (`push_core`). A cached record
    // is live: the cache is dropped when it is finalized (before its box is freed) and when
    // its thread's block is freed.
    unsafe {
        if idx == 0 && t.thread_cached.get() == L as usize {
            return Some(&mut *(t.thread_record.get() as *mut ThreadScopes));
        }
        let ts = thread_record_lookup(L, t, idx, create);
        if idx == 0 {
            if let Some(ts) = &ts {
                t.thread_record
                    .set(ptr::from_ref::<ThreadScopes>(ts).cast_mut().cast());
                t.thread_cached.set(L as usize);
            }
        }
        ts
    }
}

/// [`thread_scopes`] without the cache: the lookup in the registry's table of records.
///
/// # Safety
/// As for [`thread_scopes`].
unsafe fn thread_record_lookup<'a>(
    L: *mut lua_State,
    t: &Tracker,
    idx: c_int,
    create: bool,
) -> Option<&'a mut ThreadScopes> {
    // SAFETY: valid state; the registry table is made at load (`push_core`).
    unsafe {
        let idx = if idx == 0 {
            0
        } else {
            ffi::lua_absindex(L, idx)
        };
        ffi::lua_rawgeti(L, ffi::LUA_REGISTRYINDEX, t.threads_ref.get() as _);
        if ffi::lua_type(L, -1) != ffi::LUA_TTABLE {
            ffi::lua_pop(L, 1);
            if create {
                raise(L, c"lunet.mem: the table of scopes by thread was replaced");
            }
            return None;
        }
        if idx == 0 {
            ffi::lua_pushthread(L);
        } else {
            ffi::lua_pushvalue(L, idx);
        }
        ffi::lua_pushvalue(L, -1);
        ffi::lua_rawget(L, -3);
        if let Some(ts) = udata::test::<ThreadScopes>(L, -1) {
            ffi::lua_pop(L, 3);
            return Some(ts);
        }
        ffi::lua_pop(L, 1);
        if !create {
            ffi::lua_pop(L, 2);
            return None;
        }
        let was = t.begin_exempt();
        let ts = udata::push(L, ThreadScopes::default);
        ffi::lua_rawset(L, -3);
        t.end_exempt(was);
        ffi::lua_pop(L, 1);
        Some(ts)
    }
}

/// The arena option at `idx` as `core` gets it from mem.lua: nil or false for none, else the
/// first chunk's size in bytes (0: the default), already checked.
///
/// # Safety
/// `L` valid, `idx` acceptable.
pub(super) unsafe fn arena_option(L: *mut lua_State, idx: c_int) -> Option<usize> {
    // SAFETY: valid state and index.
    unsafe {
        if ffi::lua_type(L, idx) != ffi::LUA_TNUMBER {
            return None;
        }
        Some(arena_chunk(ffi::lua_tointeger(L, idx).max(0) as usize))
    }
}

/// The first chunk's size for an arena option of `bytes` (0: the default).
pub(super) fn arena_chunk(bytes: usize) -> usize {
    if bytes == 0 {
        arena::DEFAULT_CHUNK
    } else {
        bytes.clamp(arena::DEFAULT_CHUNK, arena::MAX_CHUNK)
    }
}

/// A non-negative integer option at `idx` (checked by mem.lua), or `None` for nil.
///
/// # Safety
/// `L` valid, `idx` acceptable.
pub(super) unsafe fn count_option(L: *mut lua_State, idx: c_int) -> Option<u64> {
    // SAFETY: valid state and index.
    unsafe {
        (ffi::lua_type(L, idx) == ffi::LUA_TNUMBER)
            .then(|| ffi::lua_tonumber(L, idx).clamp(0.0, u64::MAX as f64) as u64)
    }
}

/// Makes a scope named by the string at `name_idx` (or "scope"), opened inside the active scope,
/// with an arena of its own if `arena` says so (see [`arena_option`]), bounded by `guard`. It is
/// not active yet: [`push_scope`] makes it so.
///
/// # Safety
/// `L` valid with 4 free slots, `t` its tracker. May raise (memory) before anything changes;
/// the module's allocations here are not charged to the active scope.
pub(super) unsafe fn make_scope(
    L: *mut lua_State,
    t: &Tracker,
    name_idx: c_int,
    arena: Option<usize>,
    guard: Guard,
) -> Rc<Scope> {
    // SAFETY: forwarded contract.
    unsafe {
        // (its finalizer could not arm the next one, out of memory; or it died without its
        // finalizer being run)
        keep_gc_ticking(L, t);
        let name = if ffi::lua_type(L, name_idx) == ffi::LUA_TSTRING {
            let mut len = 0usize;
            let p = ffi::lua_tolstring(L, name_idx, &mut len);
            t.scope_name(p as usize, std::slice::from_raw_parts(p as *const u8, len))
        } else {
            Rc::from("scope")
        };
        new_scope(t, name, arena, guard)
    }
}

/// The part of [`make_scope`] that needs no Lua: the scope named `name`, opened inside the
/// active scope.
pub(super) fn new_scope(
    t: &Tracker,
    name: Rc<str>,
    arena: Option<usize>,
    guard: Guard,
) -> Rc<Scope> {
    let scope = Scope::guarded(name, t.active_scope(), arena, &t.arenas, guard);
    if scope.has_budget() {
        // SAFETY: the tracker, and its counts, outlive every scope of its state.
        unsafe { scope.count_in(&t.budgeted_scopes) };
    }
    if scope.tracks_kept() {
        // SAFETY: the tracker, and its ledger, outlive every scope of its state.
        unsafe { scope.use_ledger(&t.ledger) };
    }
    scope
}

/// Makes `scope` (made by [`make_scope`] in this thread, with the active scope as its parent)
/// the running thread's innermost scope and the active one; returns its token (its address).
/// Allocates nothing, raises nothing: the thread's record exists (`make_thread_record`).
///
/// # Safety
/// `L` valid with 3 free slots, `t` its tracker, `ts` the running thread's record.
pub(super) unsafe fn push_scope(
    t: &Tracker,
    ts: &mut ThreadScopes,
    scope: Rc<Scope>,
) -> *const Scope {
    if ts.stack.is_empty() {
        ts.base = scope.parent().cloned();
        if !ts.registered {
            ts.registered = true;
            let key = ptr::from_mut(ts) as usize;
            t.thread_records.borrow_mut().insert(key);
        }
    }
    let token = Rc::as_ptr(&scope);
    if t.metrics.is_on() {
        // SAFETY: the tracker, and its metrics, outlive every scope of its state.
        unsafe { scope.report_to(&t.metrics) };
    }
    ts.stack.push(scope.clone());
    t.set_active_scope(Some(scope));
    token
}

/// Opens a scope in the running thread and makes it active: [`make_scope`] then [`push_scope`].
/// Returns its token.
///
/// # Safety
/// As for [`make_scope`]; the switch itself allocates nothing.
#[cfg(c_scope)]
pub(super) unsafe fn open_scope(
    L: *mut lua_State,
    t: &Tracker,
    name_idx: c_int,
    arena: Option<usize>,
    guard: Guard,
) -> *const Scope {
    // SAFETY: forwarded contract.
    unsafe {
        let ts = thread_scopes(L, t, 0, true).expect("created");
        let scope = make_scope(L, t, name_idx, arena, guard);
        push_scope(t, ts, scope)
    }
}

/// Closes the scope `token` of the running thread, and the scopes above it (left open by an
/// error between their open and the call they guard), and makes the scope it inherits active
/// again; returns it, or `None` if `token` is not an open scope of the thread. Allocates
/// nothing, raises nothing.
///
/// # Safety
/// `t` the tracker, `ts` the running thread's record.
pub(super) unsafe fn pop_scope(
    t: &Tracker,
    ts: &mut ThreadScopes,
    token: *const Scope,
) -> Option<Rc<Scope>> {
    if !ts.stack.iter().any(|s| Rc::as_ptr(s) == token) {
        return None;
    }
    loop {
        let top = ts.stack.pop().expect("token is below");
        top.close();
        if Rc::as_ptr(&top) == token {
            t.set_active_scope(ts.effective());
            return Some(top);
        }
    }
}

/// Closes the running thread's innermost scope, which must be `token`, and makes the scope it
/// inherits active again; pushes the scope's stats table if `want_stats`.
///
/// # Safety
/// `L` valid with 4 free slots, `t` its tracker. Raises if `token` is not an open scope of the
/// thread (a bug of this module) or, with `want_stats`, on a memory error (leaking that one
/// scope, never freeing it early).
pub(super) unsafe fn close_scope(
    L: *mut lua_State,
    t: &Tracker,
    token: *const Scope,
    want_stats: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        let mut closed = match thread_scopes(L, t, 0, false) {
            Some(ts) => pop_scope(t, ts, token),
            None => None,
        };
        if closed.is_none() {
            // The thread's record is gone (its finalizer called by hand): the scope still ends,
            // and the scope it was opened in is active again.
            if let Some(active) = t.active_scope().filter(|a| Rc::as_ptr(a) == token) {
                active.close();
                t.set_active_scope(active.parent().cloned());
                closed = Some(active);
            }
        }
        let Some(scope) = closed else {
            raise(L, c"lunet.mem: scope closed out of order")
        };
        if want_stats {
            push_stats_of(L, scope);
        } else {
            drop(scope);
        }
    }
}

/// Pushes the stats table of `scope` and drops it.
///
/// # Safety
/// `L` valid with 3 free slots.
pub(super) unsafe fn push_stats_of(L: *mut lua_State, scope: Rc<Scope>) {
    // SAFETY: the table is built in protected mode; a memory error is raised once the scope is
    // dropped.
    unsafe {
        push_owned(L, scope, |scope| push_scope_stats(L, scope));
    }
}

/// `core.exempt_call(f, ...)`: calls `f(...)` as the module's own bookkeeping: what it
/// allocates is not charged to the active scope, refused by its budget or placed in its arena
/// (mem.lua's cache of default scope names, which lives longer than any request).
unsafe extern "C-unwind" fn l_exempt_call(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the flag is restored before anything is raised.
    unsafe {
        let t = check_tracker(L);
        ffi::luaL_checkany(L, 1);
        let was = t.begin_exempt();
        t.exempt_calls.set(t.exempt_calls.get() + 1);
        let status = ffi::lua_pcall(L, ffi::lua_gettop(L) - 1, ffi::LUA_MULTRET, 0);
        t.exempt_calls.set(t.exempt_calls.get() - 1);
        t.end_exempt(was);
        if status != ffi::LUA_OK {
            rethrow(L);
        }
        ffi::lua_gettop(L)
    }
}

/// Pushes the stats table of `scope`.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory): the caller must hold no destructors.
pub(super) unsafe fn push_scope_stats(L: *mut lua_State, scope: &Scope) {
    let counters = [
        (c"allocs", scope.allocs.get() as i64),
        (c"frees", scope.frees.get() as i64),
        (c"reallocs", scope.reallocs.get() as i64),
        (c"bytes_allocated", scope.bytes_allocated.get() as i64),
        (c"bytes_freed", scope.bytes_freed.get() as i64),
        // (their former names, kept as aliases so that scripts that read those still work)
        (c"allocated_bytes", scope.bytes_allocated.get() as i64),
        (c"freed_bytes", scope.bytes_freed.get() as i64),
        (c"net_bytes", scope.net_bytes.get()),
        (c"peak_bytes", scope.peak_bytes.get()),
        (c"jit_traces", scope.jit_traces.get() as i64),
        (c"kept_bytes", scope.kept_bytes.get()),
        (c"budget_refusals", scope.budget_refusals.get() as i64),
    ];
    // The C memory charged to the scope (`lunet_mem_charge`, request and worker arenas).
    let c = scope.c_account().map(|a| a.stats()).unwrap_or_default();
    let c_counters = [
        (c"c_bytes", c.c_bytes),
        (c"c_bytes_allocated", c.c_bytes_allocated as i64),
        (c"c_bytes_freed", c.c_bytes_freed as i64),
        (c"c_allocs", c.c_allocs as i64),
        (c"c_frees", c.c_frees as i64),
        (c"c_peak_bytes", c.c_peak_bytes),
        (c"c_late_bytes", c.late_bytes),
        (c"c_refusals", c.refusals as i64),
    ];
    // SAFETY: valid state.
    unsafe {
        ffi::lua_createtable(L, 0, 24);
        for (key, value) in counters.into_iter().chain(c_counters) {
            set_int(L, key, value);
        }
        push_str(L, &scope.name);
        ffi::lua_setfield(L, -2, c"name".as_ptr());
        ffi::lua_pushboolean(L, scope.closed.get() as c_int);
        ffi::lua_setfield(L, -2, c"closed".as_ptr());
        if let Some(a) = scope.own_arena() {
            ffi::lua_createtable(L, 0, 4);
            set_int(L, c"live_bytes", a.live_bytes.get() as i64);
            set_int(L, c"live_blocks", a.live_blocks.get() as i64);
            set_int(L, c"blocks", a.blocks.get() as i64);
            set_int(L, c"reserved_bytes", a.reserved_bytes.get() as i64);
            ffi::lua_setfield(L, -2, c"arena".as_ptr());
        }
    }
}

/// `core.current()`: the active scope as a scope object, or nil.
unsafe extern "C-unwind" fn l_current(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"current");
        if t.active_scope().is_some() {
            udata::push(L, || t.active_scope().expect("checked"));
        } else {
            ffi::lua_pushnil(L);
        }
    }
    1
}

/// # Safety
/// Called from a Lua C function; raises a `bad argument` error naming `fname` if arg 1 is not a
/// scope object.
unsafe fn check_scope<'a>(L: *mut lua_State, fname: &CStr) -> &'a Scope {
    // SAFETY: forwarded contract.
    unsafe { check_udata::<Rc<Scope>>(L, 1, fname) }
}

/// `scope:stats()`.
unsafe extern "C-unwind" fn l_scope_stats(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the scope is kept alive by its userdata at index 1.
    unsafe { push_scope_stats(L, check_scope(L, c"stats")) };
    1
}

/// `core.charge(bytes)`: `mem.charge`, its argument checked by the Lua half (an integer).
unsafe extern "C-unwind" fn l_charge(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let bytes = ffi::lua_tonumber(L, 1) as i64;
        let counted = match t.active_scope() {
            Some(scope) => {
                let account = scope.account();
                if bytes >= 0 {
                    account.charge(bytes as u64, 1)
                } else {
                    account.release(bytes.unsigned_abs(), 1);
                    true
                }
            }
            None => false,
        };
        ffi::lua_pushboolean(L, counted as c_int);
    }
    1
}

/// `core.scope_name(scope)`.
unsafe extern "C-unwind" fn l_scope_name(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the scope is kept alive by its userdata at index 1.
    unsafe { push_str(L, &check_scope(L, c"name").name) };
    1
}

/// `core.is_scope(v)`.
unsafe extern "C-unwind" fn l_is_scope(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let yes = udata::test::<Rc<Scope>>(L, 1).is_some();
        ffi::lua_pushboolean(L, yes as c_int);
    }
    1
}
