//! Budgets and failure injection: `mem.fail_after`'s run (`core.fail_run`) and the memory
//! error of a scope that closed overdrawn. The budgets themselves are enforced by the hook
//! (`crate::hook`) for the scopes `mem.scope` opens with a `limit`.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

#[cfg(not(c_scope))]
use super::errors::rethrow;
use super::errors::{check_stack, check_tracker};
use super::register;
use super::scopes::{close_scope, make_scope, push_scope, thread_scopes};
use crate::hook::Tracker;
use crate::scope::{Guard, Scope};

/// Adds `fail_run` to the `core` table on top.
///
/// # Safety
/// `L` valid with 2 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: forwarded contract.
    unsafe { register(L, &[(c"fail_run", l_fail_run)]) }
}

/// `core.fail_run(n, fn, ...)`: `mem.fail_after`'s run, in C so that nothing can allocate
/// between the end of the protected call and the close of its scope (a Lua frame in between may
/// need to grow the stack, which the exhausted allowance would refuse). Opens a scope that
/// admits `n` allocations, calls `fn(...)` in protected mode inside it, closes it, and returns
/// `true, results...` or `false, err`.
unsafe extern "C-unwind" fn l_fail_run(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua. Nothing with a destructor is alive when a call may raise; between
    // the protected call and the close of the scope nothing allocates.
    unsafe {
        let t = check_tracker(L);
        let n = ffi::luaL_checknumber(L, 1).clamp(0.0, u64::MAX as f64) as u64;
        ffi::luaL_checkany(L, 2);
        let nargs = ffi::lua_gettop(L) - 2;
        check_stack(L, t, 8, c"too many arguments");
        ffi::lua_pushstring(L, c"fail_after".as_ptr());
        ffi::lua_replace(L, 1); // the name, at 1
        let guard = Guard {
            limit: None,
            allowance: Some(n),
        };
        let ts = thread_scopes(L, t, 0, true).expect("created");
        let scope = make_scope(L, t, 1, None, guard);
        let token = push_scope(t, ts, scope);
        let mut status = ffi::lua_pcall(L, nargs, ffi::LUA_MULTRET, 0);
        // (an allocation admitted past the allowance where failing was unsafe: the run fails)
        if (*token).fails_overdrawn() && status == ffi::LUA_OK {
            Scope::count_refusal(token);
            ffi::lua_settop(L, 1);
            ffi::lua_pushstring(L, c"not enough memory".as_ptr());
            status = ffi::LUA_ERRMEM;
        }
        close_scope(L, t, token, false);
        // the stack: name, then fn's results or its error (the scope is closed: growing the
        // stack for the flush's call and the status may allocate now)
        ffi::luaL_checkstack(L, 2, c"too many results".as_ptr());
        flush_overdraft(L, t);
        ffi::lua_pushboolean(L, (status == ffi::LUA_OK) as c_int);
        ffi::lua_replace(L, 1);
        ffi::lua_gettop(L)
    }
}

/// Raises Lua's memory error for a scope that closed overdrawn (see `Scope::overdrawn`), after
/// [`flush_overdraft`].
///
/// # Safety
/// `L` valid with 2 free slots; nothing with a destructor alive in the caller.
#[cfg(not(c_scope))]
pub(super) unsafe fn memory_error(L: *mut lua_State, t: &Tracker) -> ! {
    // SAFETY: valid state.
    unsafe {
        flush_overdraft(L, t);
        ffi::lua_pushstring(L, c"not enough memory".as_ptr());
        rethrow(L)
    }
}

/// If compiled code overdrew a budget (LuaJIT 2.1 betas), flushes the traces, so that the code
/// runs interpreted, where a budget fails at once, next time. Not inside a finalizer (then, or
/// if the flush fails, a later call flushes them).
///
/// # Safety
/// `L` the running thread, with 2 free slots; called from a C function of the module.
unsafe fn flush_overdraft(L: *mut lua_State, t: &Tracker) {
    #[cfg(feature = "luajit")]
    if let Some(vm) = t.vm.get() {
        // SAFETY: the caller's contract; `may_switch_jit` checked first.
        if t.jit_overdraft.get() && vm.may_switch_jit() && unsafe { vm.flush(L) } {
            t.jit_overdraft.set(false);
        }
    }
    #[cfg(not(feature = "luajit"))]
    let _ = (L, t);
}
