//! Coroutines: the active scope follows `coroutine.resume`, `wrap`, `yield` and `close`.
//!
//! The module replaces those functions with C functions that do what the stock ones do, line for
//! line (each version's `lcorolib.c`, 5.1's `lbaselib.c`, LuaJIT's `lib_base.c`: same checks,
//! same messages, same results), plus the two switches of the active scope:
//!
//! - `enter(co)` right before `lua_resume`: `co`'s innermost scope becomes active (or, with none,
//!   the resumer's stays active); the scope active until then becomes `co`'s `base`;
//! - `leave(co)` right after `lua_resume` returns (yield, end or error): `co`'s `base` (the
//!   resumer's scope) is active again.
//!
//! Between the two, nothing allocates and nothing raises: the arguments are moved to `co`
//! before `enter` (the growth of `co`'s stack is the module's bookkeeping, never charged to or
//! refused by a budget: a refused growth of a coroutine's stack crashes LuaJIT 2.1.0-beta3), and
//! `leave` runs before the results are moved back (which may grow the resumer's stack, charged
//! to the resumer). `leave` needs no stack of its own beyond the `LUA_MINSTACK` slots every C
//! function gets.
//!
//! `coroutine.yield` leaves the coroutine's scopes before it yields, so that a resumer that is
//! not one of these wrappers (a `resume` saved before the module was loaded, a C runtime's
//! `lua_resume`) never runs inside the coroutine's scope; on 5.2+ its continuation enters them
//! again when the coroutine is resumed. `coroutine.close` (5.4+) and `wrap`'s closing of a
//! coroutine that failed run the coroutine's `__close` handlers inside its scopes, then end the
//! scopes it had open (it can no longer close them) and restore the caller's.
//!
//! C runtimes that resume coroutines themselves use `lunet_mem_resume`, or `lunet_mem_enter` and
//! `lunet_mem_leave` around their own `lua_resume` (`include/lunet_mem.h`).

use std::ffi::c_int;
use std::mem;

use mlua::ffi::{self, lua_State};

use super::{register, rethrow, thread_scopes};
use crate::hook::Tracker;
use crate::state;

/// A continuation's context: `lua_KContext` on 5.3+, an `int` on 5.2.
#[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
type Context = ffi::lua_KContext;
#[cfg(feature = "lua52")]
type Context = c_int;

#[cfg(feature = "lua51")]
extern "C-unwind" {
    /// Lua 5.1's C stack accounting across a resume (`lbaselib.c` calls it before
    /// `lua_resume`).
    fn lua_setlevel(from: *mut lua_State, to: *mut lua_State);
}

#[cfg(feature = "luajit")]
extern "C-unwind" {
    /// LuaJIT 2.1's `cframe_canyield` (exported by every 2.1).
    fn lua_isyieldable(L: *mut lua_State) -> c_int;
}

// ---------------------------------------------------------------------------------------------
// The switches

/// Whether `co` can be resumed by `L` now (suspended: yielded, or not started).
///
/// # Safety
/// Both threads valid and of the same Lua state.
unsafe fn is_resumable(L: *mut lua_State, co: *mut lua_State) -> bool {
    if co == L {
        return false;
    }
    // SAFETY: valid threads.
    unsafe {
        match ffi::lua_status(co) {
            ffi::LUA_YIELD => true,
            ffi::LUA_OK => !has_frames(co) && ffi::lua_gettop(co) > 0,
            _ => false,
        }
    }
}

/// Whether `co` has call frames: it is running, or it resumed another coroutine ("normal").
///
/// # Safety
/// `co` a valid thread.
unsafe fn has_frames(co: *mut lua_State) -> bool {
    // SAFETY: lua_Debug is plain data; lua_getstack only reads.
    unsafe {
        let mut ar: ffi::lua_Debug = mem::zeroed();
        ffi::lua_getstack(co, 0, &mut ar) != 0
    }
}

/// Makes `co`'s scopes active for a resume of `co` by the running thread `L`; returns whether
/// [`leave`] must follow. The scope active now becomes `co`'s `base`: what `co` inherits while
/// it has no scope of its own, and what is active again once it yields or ends.
///
/// Allocates nothing, raises nothing.
///
/// # Safety
/// `L` valid with 3 free slots, the thread at stack index `idx` (a pseudo-index is fine).
pub(crate) unsafe fn enter(L: *mut lua_State, t: &Tracker, idx: c_int) -> bool {
    // SAFETY: valid state; `thread_scopes` without `create` neither allocates nor raises.
    unsafe {
        let co = ffi::lua_tothread(L, idx);
        if co.is_null() || !is_resumable(L, co) {
            return false;
        }
        t.trace.set_running(co); // (mem.trace reads the stack of the running thread)
        if let Some(ts) = thread_scopes(L, t, idx, false) {
            ts.inherit(t.active_scope());
            if let Some(top) = ts.stack.last() {
                t.set_active_scope(Some(top.clone()));
            }
        }
        true
    }
}

/// Restores the resumer's scope after a resume of the thread at `idx` returned.
///
/// Allocates nothing, raises nothing.
///
/// # Safety
/// `L` valid with 3 free slots, the thread at stack index `idx`.
pub(crate) unsafe fn leave(L: *mut lua_State, t: &Tracker, idx: c_int) {
    // SAFETY: as for `enter`.
    unsafe {
        t.trace.set_running(L); // the resumer runs again
        forget_thread(t, ffi::lua_tothread(L, idx), L);
        if let Some(ts) = thread_scopes(L, t, idx, false) {
            t.set_active_scope(ts.base.clone());
        }
    }
}

/// Drops the cached record of `co` (see `Tracker::thread_cached`), and LuaJIT's FFI's hold on
/// it, given to `resumer` (see `Vm::release_ffi_thread`): it no longer runs, and may be
/// collected.
fn forget_thread(t: &Tracker, co: *mut lua_State, resumer: *mut lua_State) {
    if t.thread_cached.get() == co as usize {
        t.thread_cached.set(0);
    }
    #[cfg(feature = "luajit")]
    if let Some(vm) = t.vm.get() {
        vm.release_ffi_thread(co, resumer);
    }
    #[cfg(not(feature = "luajit"))]
    let _ = resumer;
}

/// Before the thread at `idx` runs its `__close` handlers to be closed (it is dead or
/// suspended): makes its scopes active, as [`enter`] does for a resume.
///
/// # Safety
/// As for [`enter`].
#[cfg(any(feature = "lua54", feature = "lua55"))]
unsafe fn enter_closing(L: *mut lua_State, t: &Tracker, idx: c_int) {
    // SAFETY: as for `enter`.
    unsafe {
        if let Some(ts) = thread_scopes(L, t, idx, false) {
            ts.inherit(t.active_scope());
            if let Some(top) = ts.stack.last() {
                t.set_active_scope(Some(top.clone()));
            }
        }
    }
}

/// After the thread at `idx` was closed: ends the scopes it still had open (it was suspended
/// inside them and will never run again), then restores the caller's scope.
///
/// # Safety
/// As for [`enter`].
#[cfg(any(feature = "lua54", feature = "lua55"))]
unsafe fn leave_closed(L: *mut lua_State, t: &Tracker, idx: c_int) {
    // SAFETY: as for `enter`.
    unsafe {
        forget_thread(t, ffi::lua_tothread(L, idx), L);
        if let Some(ts) = thread_scopes(L, t, idx, false) {
            while let Some(scope) = ts.stack.pop() {
                scope.close();
            }
            t.set_active_scope(ts.base.clone());
        }
    }
}

/// Before the running thread `L` yields: the scope it inherited from its resumer becomes active
/// again, so that whoever resumed it continues in its own scope.
///
/// # Safety
/// `L` valid with 3 free slots.
unsafe fn leave_yielding(L: *mut lua_State, t: &Tracker) {
    // SAFETY: as for `enter`.
    unsafe {
        ffi::lua_pushthread(L);
        if let Some(ts) = thread_scopes(L, t, -1, false) {
            if !ts.stack.is_empty() {
                t.set_active_scope(ts.base.clone());
            }
        }
        ffi::lua_pop(L, 1);
    }
}

/// When the running thread `L` is resumed after a yield (by any resumer): its scopes are active
/// again, and the scope active until now (the resumer's) is its `base`.
///
/// # Safety
/// `L` valid with 3 free slots.
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
unsafe fn enter_resumed(L: *mut lua_State, t: &Tracker) {
    // SAFETY: as for `enter`.
    unsafe {
        t.trace.set_running(L);
        ffi::lua_pushthread(L);
        if let Some(ts) = thread_scopes(L, t, -1, false) {
            if let Some(top) = ts.stack.last().cloned() {
                // Resumed by the resume wrappers, `enter` made `top` active already (and
                // recorded the resumer's scope); else the scope active now is the resumer's.
                if !t.is_active(&top) {
                    ts.inherit(t.active_scope());
                    t.set_active_scope(Some(top));
                }
            }
        }
        ffi::lua_pop(L, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// resume

/// The resume common to `resume` and `wrap`: resumes `co` (at stack index `co_idx` of `L`) with
/// the `narg` values on top of `L`'s stack. Pushes the results and returns their number, or
/// pushes an error message and returns -1, as each version's `auxresume`.
///
/// # Safety
/// Called from a `lua_CFunction` running on `L`, `co` a thread of the same state.
unsafe fn aux_resume(L: *mut lua_State, co: *mut lua_State, co_idx: c_int, narg: c_int) -> c_int {
    // SAFETY: forwarded contract; every check mirrors the stock library of the version.
    unsafe {
        let t = state::tracker(L);
        #[cfg(feature = "lua51")]
        {
            let status = costatus51(L, co);
            if !grow_coroutine_stack(t, co, narg) {
                ffi::luaL_error(L, c"too many arguments to resume".as_ptr());
            }
            if status != CO51_SUSPENDED {
                ffi::lua_pushfstring(
                    L,
                    c"cannot resume %s coroutine".as_ptr(),
                    CO51_NAMES[status].as_ptr(),
                );
                return -1;
            }
        }
        #[cfg(feature = "luajit")]
        {
            if let Some(msg) = luajit_not_resumable(L, co) {
                ffi::lua_pushstring(L, msg.as_ptr());
                return -1;
            }
            if !grow_coroutine_stack(t, co, narg) {
                ffi::luaL_error(L, c"too many arguments to resume".as_ptr());
            }
        }
        #[cfg(any(feature = "lua52", feature = "lua53"))]
        {
            if !grow_coroutine_stack(t, co, narg) {
                ffi::lua_pushstring(L, c"too many arguments to resume".as_ptr());
                return -1;
            }
            if ffi::lua_status(co) == ffi::LUA_OK && ffi::lua_gettop(co) == 0 {
                ffi::lua_pushstring(L, c"cannot resume dead coroutine".as_ptr());
                return -1;
            }
        }
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        {
            if !grow_coroutine_stack(t, co, narg) {
                ffi::lua_pushstring(L, c"too many arguments to resume".as_ptr());
                return -1;
            }
        }
        ffi::lua_xmove(L, co, narg);
        #[cfg(feature = "lua51")]
        lua_setlevel(L, co);
        // The switch: nothing between `enter` and `leave` allocates or raises.
        let entered = match t {
            Some(t) => enter(L, t, co_idx),
            None => false,
        };
        let mut nres: c_int = 0;
        let status = ffi::lua_resume(co, L, narg, &mut nres);
        if entered {
            if let Some(t) = state::tracker(L) {
                leave(L, t, co_idx);
            }
        }
        #[cfg(feature = "luajit")]
        {
            restore_current_thread(L);
            if let Some(t) = state::tracker(L) {
                if t.hook_mark_cleared.replace(false) {
                    if let Some(vm) = t.vm.get() {
                        vm.enter_hook();
                    }
                }
            }
        }
        if status == ffi::LUA_OK || status == ffi::LUA_YIELD {
            #[cfg(not(any(feature = "lua54", feature = "lua55")))]
            let nres = ffi::lua_gettop(co);
            #[cfg(any(feature = "lua51", feature = "luajit"))]
            if ffi::lua_checkstack(L, nres + 1) == 0 {
                ffi::luaL_error(L, c"too many results to resume".as_ptr());
            }
            #[cfg(not(any(feature = "lua51", feature = "luajit")))]
            if ffi::lua_checkstack(L, nres + 1) == 0 {
                ffi::lua_pop(co, nres);
                ffi::lua_pushstring(L, c"too many results to resume".as_ptr());
                return -1;
            }
            ffi::lua_xmove(co, L, nres);
            nres
        } else {
            ffi::lua_xmove(co, L, 1);
            -1
        }
    }
}

/// After `lua_resume` returned to C: makes `L` LuaJIT's current thread again.
///
/// LuaJIT's `lua_resume` leaves `co` as the global "current thread" (`g->cur_L`), which its own
/// `coroutine.resume` restores (in assembler) and the C API does not; compiled code that later
/// leaves a trace then restores its frames into `co` and crashes (LuaJIT issue #1066, fixed in
/// 2023 for one path only). Calling any function through the C API sets it: a no-op one.
///
/// # Safety
/// `L` the running thread, with a free slot. May raise (memory: the call's stack).
#[cfg(feature = "luajit")]
unsafe fn restore_current_thread(L: *mut lua_State) {
    unsafe extern "C-unwind" fn nothing(_: *mut lua_State) -> c_int {
        0
    }
    // SAFETY: a call of a C function that does nothing.
    unsafe {
        ffi::lua_pushcfunction(L, nothing);
        ffi::lua_call(L, 0, 0);
    }
}

/// Grows `co`'s stack for `narg` values as the module's bookkeeping: the growth is not charged
/// to the active scope, and its budget cannot refuse it. Returns `lua_checkstack`'s verdict.
///
/// # Safety
/// `co` a valid thread that is not running.
unsafe fn grow_coroutine_stack(t: Option<&Tracker>, co: *mut lua_State, narg: c_int) -> bool {
    let Some(t) = t else {
        // SAFETY: valid thread.
        return unsafe { ffi::lua_checkstack(co, narg) != 0 };
    };
    let was = t.begin_exempt();
    // SAFETY: valid thread. (If a real out-of-memory error is raised here, `check_tracker`
    // clears `exempt` at the next call into the module.)
    let ok = unsafe { ffi::lua_checkstack(co, narg) != 0 };
    t.end_exempt(was);
    ok
}

/// LuaJIT's `ffh_resume` checks: the message if `co` cannot be resumed.
///
/// # Safety
/// Valid threads of the same state.
#[cfg(feature = "luajit")]
unsafe fn luajit_not_resumable(
    L: *mut lua_State,
    co: *mut lua_State,
) -> Option<&'static std::ffi::CStr> {
    // SAFETY: valid threads; `co->cframe != NULL` is "running or resumed another one".
    unsafe {
        let status = ffi::lua_status(co);
        if co == L || (status == ffi::LUA_OK && has_frames(co)) {
            Some(c"cannot resume running coroutine") // (LJ_ERR_CORUN, as its ffh_resume says)
        } else if status > ffi::LUA_YIELD || (status == ffi::LUA_OK && ffi::lua_gettop(co) == 0) {
            Some(c"cannot resume dead coroutine")
        } else {
            None
        }
    }
}

#[cfg(feature = "lua51")]
const CO51_SUSPENDED: usize = 1;
#[cfg(feature = "lua51")]
const CO51_NAMES: [&std::ffi::CStr; 4] = [c"running", c"suspended", c"normal", c"dead"];

/// Lua 5.1's `costatus`: an index into [`CO51_NAMES`].
///
/// # Safety
/// Valid threads of the same state.
#[cfg(feature = "lua51")]
unsafe fn costatus51(L: *mut lua_State, co: *mut lua_State) -> usize {
    if L == co {
        return 0;
    }
    // SAFETY: valid thread.
    unsafe {
        match ffi::lua_status(co) {
            ffi::LUA_YIELD => 1,
            0 if has_frames(co) => 2,
            0 if ffi::lua_gettop(co) == 0 => 3,
            0 => 1,
            _ => 3,
        }
    }
}

/// The running thread's argument 1 as a coroutine, or the stock `bad argument` error.
///
/// # Safety
/// Called from a `lua_CFunction`.
unsafe fn get_co(L: *mut lua_State) -> *mut lua_State {
    // SAFETY: valid state.
    unsafe {
        let co = ffi::lua_tothread(L, 1);
        if co.is_null() {
            #[cfg(any(feature = "lua54", feature = "lua55"))]
            ffi::luaL_checktype(L, 1, ffi::LUA_TTHREAD); // (luaL_typeerror's message)
            #[cfg(feature = "lua53")]
            ffi::luaL_argerror(L, 1, c"thread expected".as_ptr());
            #[cfg(any(feature = "lua51", feature = "lua52", feature = "luajit"))]
            ffi::luaL_argerror(L, 1, c"coroutine expected".as_ptr());
        }
        co
    }
}

/// `coroutine.resume(co, ...)`.
pub(crate) unsafe extern "C-unwind" fn co_resume(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let co = get_co(L);
        let r = aux_resume(L, co, 1, ffi::lua_gettop(L) - 1);
        if r < 0 {
            ffi::lua_pushboolean(L, 0);
            ffi::lua_insert(L, -2);
            2
        } else {
            ffi::lua_pushboolean(L, 1);
            ffi::lua_insert(L, -(r + 1));
            r + 1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// wrap

/// `coroutine.wrap(f)`: a C closure over a new coroutine running `f`, as the stock one.
pub(crate) unsafe extern "C-unwind" fn co_wrap(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        #[cfg(feature = "lua51")]
        {
            let nl = ffi::lua_newthread(L);
            if ffi::lua_isfunction(L, 1) == 0 || ffi::lua_iscfunction(L, 1) != 0 {
                ffi::luaL_argerror(L, 1, c"Lua function expected".as_ptr());
            }
            ffi::lua_pushvalue(L, 1);
            ffi::lua_xmove(L, nl, 1);
        }
        #[cfg(not(feature = "lua51"))]
        {
            ffi::luaL_checktype(L, 1, ffi::LUA_TFUNCTION);
            let nl = ffi::lua_newthread(L);
            ffi::lua_pushvalue(L, 1);
            ffi::lua_xmove(L, nl, 1);
        }
        ffi::lua_pushcclosure(L, co_wrap_aux, 1);
    }
    1
}

/// The function `coroutine.wrap` returns.
unsafe extern "C-unwind" fn co_wrap_aux(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua as a closure made by `co_wrap` (its upvalue is the coroutine).
    unsafe {
        let up = ffi::lua_upvalueindex(1);
        let co = ffi::lua_tothread(L, up);
        if co.is_null() {
            // (only reachable by replacing the upvalue with debug.setupvalue)
            ffi::luaL_error(L, c"cannot resume dead coroutine".as_ptr());
        }
        #[cfg(feature = "luajit")]
        if let Some(msg) = luajit_not_resumable(L, co) {
            ffi::luaL_error(L, c"%s".as_ptr(), msg.as_ptr());
        }
        let r = aux_resume(L, co, up, ffi::lua_gettop(L));
        if r >= 0 {
            return r;
        }
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        {
            let mut stat = ffi::lua_status(co);
            if stat != ffi::LUA_OK && stat != ffi::LUA_YIELD {
                stat = close_thread(L, co, up);
                ffi::lua_xmove(co, L, 1);
            }
            if stat != ffi::LUA_ERRMEM && ffi::lua_type(L, -1) == ffi::LUA_TSTRING {
                add_where(L);
            }
        }
        #[cfg(any(feature = "lua53", feature = "luajit"))]
        if ffi::lua_type(L, -1) == ffi::LUA_TSTRING {
            add_where(L);
        }
        #[cfg(any(feature = "lua51", feature = "lua52"))]
        if ffi::lua_isstring(L, -1) != 0 {
            add_where(L);
        }
        rethrow(L)
    }
}

/// Prefixes the string on top with the position of the caller (`luaL_where(L, 1)`).
///
/// # Safety
/// A string on top of `L`'s stack, 2 free slots.
unsafe fn add_where(L: *mut lua_State) {
    // SAFETY: valid state.
    unsafe {
        ffi::luaL_where(L, 1);
        ffi::lua_insert(L, -2);
        ffi::lua_concat(L, 2);
    }
}

// ---------------------------------------------------------------------------------------------
// yield

/// `coroutine.yield(...)`: leaves the coroutine's scopes, then yields as the stock one.
pub(crate) unsafe extern "C-unwind" fn co_yield(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the switch happens only when the yield cannot fail.
    unsafe {
        let n = ffi::lua_gettop(L);
        if let Some(t) = state::tracker(L) {
            if can_yield(L) {
                leave_yielding(L, t);
                #[cfg(feature = "luajit")]
                if let Some(vm) = t.vm.get() {
                    if vm.leave_hook() {
                        t.hook_mark_cleared.set(true);
                    }
                }
            }
        }
        // (LuaJIT's own yield names its caller's line in this error; `lua_yield` would name
        // this C function, which has none)
        #[cfg(feature = "luajit")]
        if !can_yield(L) {
            ffi::luaL_where(L, 1);
            ffi::lua_pushstring(L, c"attempt to yield across C-call boundary".as_ptr());
            ffi::lua_concat(L, 2);
            rethrow(L);
        }
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        return ffi::lua_yield(L, n);
        #[cfg(feature = "lua52")]
        return ffi::lua_yieldk(L, n, 0, Some(co_yield_k52));
        #[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
        return ffi::lua_yieldk(L, n, 0, Some(co_yield_k));
    }
}

/// [`co_yield_k`] in Lua 5.2's form: a continuation is a plain `lua_CFunction` (its status and
/// context come from `lua_getctx`, which neither needs here).
#[cfg(feature = "lua52")]
unsafe extern "C-unwind" fn co_yield_k52(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua as a continuation, as `co_yield_k`.
    unsafe { co_yield_k(L, ffi::LUA_YIELD, 0) }
}

/// Continuation of [`co_yield`]: the coroutine was resumed (by whoever); its scopes are active
/// again, and the values passed to the resume are `yield`'s results.
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
unsafe extern "C-unwind" fn co_yield_k(L: *mut lua_State, _status: c_int, _ctx: Context) -> c_int {
    // SAFETY: called by Lua with the resume's values on the stack; at least LUA_MINSTACK slots
    // are free in a continuation as in a C function.
    unsafe {
        if let Some(t) = state::tracker(L) {
            enter_resumed(L, t);
        }
        ffi::lua_gettop(L)
    }
}

/// Whether a yield of `L` now would succeed (so that the switch is not made for a yield that
/// raises instead).
///
/// # Safety
/// `L` the running thread, with a free slot.
unsafe fn can_yield(L: *mut lua_State) -> bool {
    // SAFETY: valid state.
    unsafe {
        #[cfg(feature = "luajit")]
        return lua_isyieldable(L) != 0;
        #[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
        return ffi::lua_isyieldable(L) != 0;
        // 5.1 and 5.2 cannot tell a yield across a C call in advance; the main thread never
        // yields. A yield that fails inside a scope is caught by that scope's protected call,
        // which closes it and restores the active scope.
        #[cfg(any(feature = "lua51", feature = "lua52"))]
        {
            let main = ffi::lua_pushthread(L) == 1;
            ffi::lua_pop(L, 1);
            !main
        }
    }
}

// ---------------------------------------------------------------------------------------------
// close (5.4+)

/// Closes the coroutine at `idx` (its pending `__close` handlers run inside its scopes), ends
/// the scopes it had open and restores the caller's; returns the close's status with the error
/// object (if any) on `co`'s stack, as `lua_closethread`.
///
/// # Safety
/// `L` the running thread with 3 free slots, `co` (at `idx`) dead or suspended.
#[cfg(any(feature = "lua54", feature = "lua55"))]
unsafe fn close_thread(L: *mut lua_State, co: *mut lua_State, idx: c_int) -> c_int {
    // SAFETY: forwarded contract.
    unsafe {
        let t = state::tracker(L);
        if let Some(t) = t {
            enter_closing(L, t, idx);
        }
        let status = raw_close_thread(co, L);
        if let Some(t) = state::tracker(L) {
            leave_closed(L, t, idx);
        }
        status
    }
}

/// `lua_closethread(co, from)` where the host has it (5.4.6+), else `lua_resetthread(co)`: the
/// module must load in every 5.4, and a missing symbol would stop `require`.
///
/// # Safety
/// As `lua_closethread`.
#[cfg(any(feature = "lua54", feature = "lua55"))]
unsafe fn raw_close_thread(co: *mut lua_State, from: *mut lua_State) -> c_int {
    #[cfg(feature = "lua55")]
    // SAFETY: forwarded contract.
    return unsafe { ffi::lua_closethread(co, from) };
    #[cfg(feature = "lua54")]
    {
        type CloseThread = unsafe extern "C-unwind" fn(*mut lua_State, *mut lua_State) -> c_int;
        static CLOSE_THREAD: std::sync::OnceLock<Option<CloseThread>> = std::sync::OnceLock::new();
        let found = CLOSE_THREAD.get_or_init(|| {
            // SAFETY: looking a symbol up in the process; a found one has this signature.
            unsafe {
                let p = libc::dlsym(libc::RTLD_DEFAULT, c"lua_closethread".as_ptr());
                (!p.is_null()).then(|| mem::transmute::<*mut std::ffi::c_void, CloseThread>(p))
            }
        });
        // SAFETY: forwarded contract.
        unsafe {
            match found {
                Some(close) => close(co, from),
                None => ffi::lua_resetthread(co),
            }
        }
    }
}

/// `coroutine.close(co)` (5.4+).
#[cfg(any(feature = "lua54", feature = "lua55"))]
pub(crate) unsafe extern "C-unwind" fn co_close(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; mirrors `luaB_close`.
    unsafe {
        // (5.5: the coroutine is optional, the running one by default)
        #[cfg(feature = "lua55")]
        let co = if ffi::lua_type(L, 1) == ffi::LUA_TNONE {
            L
        } else {
            get_co(L)
        };
        #[cfg(feature = "lua54")]
        let co = get_co(L);
        let status = auxstatus54(L, co);
        match status {
            CO54_DEAD | CO54_SUSPENDED => {
                if close_thread(L, co, 1) == ffi::LUA_OK {
                    ffi::lua_pushboolean(L, 1);
                    1
                } else {
                    ffi::lua_pushboolean(L, 0);
                    ffi::lua_xmove(co, L, 1);
                    2
                }
            }
            // 5.5: a coroutine closes itself (not the main thread): its pending `__close`
            // handlers run, and it ends as if it had returned to its resumer, whose wrapper
            // restores the resumer's scope; the scopes it had open end when it is collected
            // (as for a coroutine abandoned inside a scope).
            #[cfg(feature = "lua55")]
            CO54_RUNNING => {
                ffi::lua_rawgeti(L, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_MAINTHREAD);
                if ffi::lua_tothread(L, -1) == co {
                    ffi::luaL_error(L, c"cannot close main thread".as_ptr());
                }
                ffi::lua_closethread(co, L); // (does not return)
                0
            }
            _ => ffi::luaL_error(
                L,
                c"cannot close a %s coroutine".as_ptr(),
                CO54_NAMES[status].as_ptr(),
            ),
        }
    }
}

#[cfg(feature = "lua55")]
const CO54_RUNNING: usize = 0;
#[cfg(any(feature = "lua54", feature = "lua55"))]
const CO54_DEAD: usize = 1;
#[cfg(any(feature = "lua54", feature = "lua55"))]
const CO54_SUSPENDED: usize = 2;
#[cfg(any(feature = "lua54", feature = "lua55"))]
const CO54_NAMES: [&std::ffi::CStr; 4] = [c"running", c"dead", c"suspended", c"normal"];

/// 5.4's `auxstatus`: an index into [`CO54_NAMES`].
///
/// # Safety
/// Valid threads of the same state.
#[cfg(any(feature = "lua54", feature = "lua55"))]
unsafe fn auxstatus54(L: *mut lua_State, co: *mut lua_State) -> usize {
    if L == co {
        return 0;
    }
    // SAFETY: valid thread.
    unsafe {
        match ffi::lua_status(co) {
            ffi::LUA_YIELD => CO54_SUSPENDED,
            ffi::LUA_OK if has_frames(co) => 3,
            ffi::LUA_OK if ffi::lua_gettop(co) == 0 => CO54_DEAD,
            ffi::LUA_OK => CO54_SUSPENDED,
            _ => CO54_DEAD,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A `resume` that is not the stock one

/// `core.co_resume_via(f)`: a `coroutine.resume` that calls `f` (a `resume` some library
/// installed before the module was loaded: an instrumenting wrapper, a runtime's own), with the
/// switches around it. `f` runs in protected mode, so that whatever it raises, the resumer's
/// scope is active again before the error goes on.
unsafe extern "C-unwind" fn co_resume_via(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with the function to wrap.
    unsafe {
        ffi::luaL_checkany(L, 1);
        ffi::lua_settop(L, 1);
        ffi::lua_pushcclosure(L, resume_via, 1);
    }
    1
}

/// The function [`co_resume_via`] makes.
unsafe extern "C-unwind" fn resume_via(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the stack is [co, args...], then [co, f, co, args...] for the call,
    // and `co` stays at 1 for `leave`.
    unsafe {
        let nargs = ffi::lua_gettop(L);
        ffi::luaL_checkstack(L, 3, c"too many arguments".as_ptr());
        ffi::lua_pushvalue(L, ffi::lua_upvalueindex(1));
        ffi::lua_insert(L, 1);
        ffi::lua_pushvalue(L, 2);
        ffi::lua_insert(L, 1);
        let t = state::tracker(L);
        let entered = match t {
            Some(t) if ffi::lua_type(L, 1) == ffi::LUA_TTHREAD => enter(L, t, 1),
            _ => false,
        };
        let status = ffi::lua_pcall(L, nargs, ffi::LUA_MULTRET, 0);
        if entered {
            if let Some(t) = state::tracker(L) {
                leave(L, t, 1);
            }
        }
        #[cfg(feature = "luajit")]
        restore_current_thread(L);
        ffi::lua_remove(L, 1);
        if status != ffi::LUA_OK {
            rethrow(L);
        }
        ffi::lua_gettop(L)
    }
}

/// `core.is_stock(name, f)`: whether `f` is the stock `coroutine[name]` of this Lua (then the
/// module puts its own in place, which does the same; else it wraps `f`, or leaves it).
unsafe extern "C-unwind" fn is_stock(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with a string and a value.
    unsafe {
        ffi::lua_settop(L, 2);
        let stock = match ffi::lua_tocfunction(L, 2) {
            None => false,
            Some(f) => is_stock_cfunction(L, f),
        };
        ffi::lua_pushboolean(L, stock as c_int);
    }
    1
}

/// Whether the C function `f` (argument 2, named by argument 1) is the stock coroutine function
/// of that name: on 5.2+ compared with a fresh `luaopen_coroutine` table; on 5.1, whether it is
/// in the same object (executable or library) as Lua's own API.
///
/// # Safety
/// `L` valid with 3 free slots, the name at 1.
unsafe fn is_stock_cfunction(L: *mut lua_State, f: ffi::lua_CFunction) -> bool {
    // SAFETY: valid state; `luaopen_coroutine` only builds a table.
    unsafe {
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        {
            ffi::lua_pushcfunction(L, ffi::luaopen_coroutine);
            if ffi::lua_pcall(L, 0, 1, 0) != ffi::LUA_OK || ffi::lua_type(L, -1) != ffi::LUA_TTABLE
            {
                ffi::lua_pop(L, 1);
                return false;
            }
            ffi::lua_pushvalue(L, 1);
            ffi::lua_rawget(L, -2);
            let fresh = ffi::lua_tocfunction(L, -1);
            ffi::lua_pop(L, 2);
            fresh.is_some_and(|g| std::ptr::fn_addr_eq(f, g))
        }
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        {
            let _ = L;
            let base_of = |p: *const std::ffi::c_void| {
                let mut info: libc::Dl_info = mem::zeroed();
                (libc::dladdr(p, &mut info) != 0).then_some(info.dli_fbase)
            };
            let ours = base_of(ffi::lua_gettop as *const std::ffi::c_void);
            ours.is_some() && base_of(f as *const std::ffi::c_void) == ours
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registration and the C entry for runtimes that resume coroutines from C

/// Adds `co_resume`, `co_wrap`, `co_yield` (and `co_close` on 5.4+) to the table on top.
///
/// # Safety
/// `L` valid with 2 free slots, a table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: valid state, table on top.
    unsafe {
        register(
            L,
            &[
                (c"co_resume", co_resume),
                (c"co_wrap", co_wrap),
                (c"co_yield", co_yield),
                (c"co_resume_via", co_resume_via),
                (c"is_stock", is_stock),
                #[cfg(any(feature = "lua54", feature = "lua55"))]
                (c"co_close", co_close),
            ],
        );
    }
}

/// Before a runtime resumes `co` from C with `lua_resume`: makes `co`'s scopes active (or, if it
/// has none, keeps the resumer's). Returns 1 if [`lunet_mem_leave`] must be called after the
/// resume returns, 0 if not (no tracker, or `co` cannot be resumed). Allocates nothing.
///
/// # Safety
/// `L` the running thread and `co` a thread of the same state; `L` has 3 free stack slots
/// (always the case in a C function called by Lua, or after `lua_checkstack`), and `co` 1.
#[no_mangle]
pub unsafe extern "C-unwind" fn lunet_mem_enter(L: *mut lua_State, co: *mut lua_State) -> c_int {
    // SAFETY: the caller's contract; the thread is pushed on `L` to find its scopes and popped.
    unsafe {
        let Some(t) = state::tracker(L) else { return 0 };
        push_thread(L, co);
        let entered = enter(L, t, -1);
        ffi::lua_pop(L, 1);
        entered as c_int
    }
}

/// After the resume that [`lunet_mem_enter`] prepared returned (yield, end or error): makes the
/// resumer's scope active again. Allocates nothing.
///
/// # Safety
/// As for [`lunet_mem_enter`].
#[no_mangle]
pub unsafe extern "C-unwind" fn lunet_mem_leave(L: *mut lua_State, co: *mut lua_State) {
    // SAFETY: as above.
    unsafe {
        let Some(t) = state::tracker(L) else { return };
        push_thread(L, co);
        leave(L, t, -1);
        ffi::lua_pop(L, 1);
    }
}

/// `lua_resume` with Lua 5.4's signature on every version, keeping scope attribution right:
/// [`lunet_mem_enter`], `lua_resume`, [`lunet_mem_leave`].
///
/// # Safety
/// As `lua_resume(co, L, nargs, nres)`: `co` a thread of the same state as `L`, with the function
/// (first resume) or the values for `yield` pushed, and `L` the running thread with 3 free slots.
#[no_mangle]
pub unsafe extern "C-unwind" fn lunet_mem_resume(
    L: *mut lua_State,
    co: *mut lua_State,
    nargs: c_int,
    nres: *mut c_int,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe {
        let entered = lunet_mem_enter(L, co);
        let status = ffi::lua_resume(co, L, nargs, nres);
        if entered != 0 {
            lunet_mem_leave(L, co);
        }
        #[cfg(feature = "luajit")]
        restore_current_thread(L);
        status
    }
}

/// Pushes the thread `co` onto `L`'s stack (through `co`'s own stack, which needs one free slot
/// there: `lua_pushthread` pushes on the thread it is given).
///
/// # Safety
/// Both threads of the same state; `L` and `co` have a free slot.
unsafe fn push_thread(L: *mut lua_State, co: *mut lua_State) {
    // SAFETY: pushing a thread onto its own stack and moving it across is always allowed.
    unsafe {
        ffi::lua_pushthread(co);
        if co != L {
            ffi::lua_xmove(co, L, 1);
        }
    }
}
