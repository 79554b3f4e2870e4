//! Raising Lua errors from the C functions, and the argument checks built on it.
//!
//! `lua_error` does not unwind Rust frames: a value with a destructor alive in any of them when
//! an error propagates is never dropped (a leak, or a guard whose `Drop` never runs).
//! The one rule: raise only through [`raise`], [`type_error`] (and [`check_udata`]) or
//! [`rethrow`], each called with nothing of Rust's alive; a Lua value built from a Rust one that
//! owns memory is made by [`push_owned`] (or [`try_push`]), which builds it in protected mode,
//! drops the Rust value, and only then raises what building it raised.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::ptr;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use super::checkpoints::Checkpoint;
use crate::hook::Tracker;
use crate::scope::Scope;
use crate::state;
use crate::udata;

/// Raises `msg`, prefixed with the position of the calling Lua code (like `luaL_error`).
///
/// # Safety
/// `L` valid; no value with a destructor may be alive in the caller's frames (the error does not
/// unwind them). `msg` is dropped here, before raising.
pub(crate) unsafe fn raise(L: *mut lua_State, msg: &CStr) -> ! {
    // SAFETY: valid state; the message is static, nothing of Rust's is alive.
    unsafe {
        ffi::luaL_where(L, 1);
        ffi::lua_pushstring(L, msg.as_ptr());
        ffi::lua_concat(L, 2);
        ffi::lua_error(L)
    }
}

/// Raises the error object on top of the stack (`lua_error`).
///
/// # Safety
/// `L` valid; no value with a destructor may be alive in the caller's frames (the error does not
/// unwind them).
pub(crate) unsafe fn rethrow(L: *mut lua_State) -> ! {
    // SAFETY: forwarded contract.
    unsafe { ffi::lua_error(L) }
}

/// Pushes the one value `push` builds from `owned`, then drops `owned` (and `push`), and returns
/// true; if building raised (a memory error), returns false with the error object on top,
/// `owned` dropped all the same: the caller raises it with [`rethrow`] once nothing else of
/// Rust's is alive.
///
/// # Safety
/// `L` valid with 3 free slots; `push` pushes exactly one value.
pub(crate) unsafe fn try_push<T>(L: *mut lua_State, owned: T, mut push: impl FnMut(&T)) -> bool {
    // SAFETY: forwarded contract.
    let ok = unsafe { protected(L, &mut || push(&owned)) };
    drop(owned);
    drop(push);
    ok
}

/// [`try_push`], raising the error once `owned` is dropped.
///
/// # Safety
/// As for [`try_push`]; nothing with a destructor alive in the caller's frames.
pub(crate) unsafe fn push_owned<T>(L: *mut lua_State, owned: T, push: impl FnMut(&T)) {
    // SAFETY: forwarded contract.
    unsafe {
        if !try_push(L, owned, push) {
            rethrow(L);
        }
    }
}

/// Runs `push` in protected mode: it may raise (a memory error while it builds Lua values from
/// Rust ones it borrows), and the error is caught. Returns true with the one value `push` left
/// on top, or false with the error object on top: the caller then drops what `push` borrowed
/// and raises it with `lua_error`, so that no Rust value is alive when the error propagates.
///
/// # Safety
/// `L` valid with 3 free slots; `push` pushes exactly one value and owns no Rust value itself.
unsafe fn protected(L: *mut lua_State, push: &mut dyn FnMut()) -> bool {
    let mut push = push;
    // SAFETY: a protected call of `protected_trampoline` with a pointer to `push`. The function
    // is taken from the registry, where `push_core` put it: pushing a C function allocates a
    // closure on 5.1 and LuaJIT, which may fail before the protected call starts.
    unsafe {
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, PROTECTED_KEY.as_ptr());
        let ours: ffi::lua_CFunction = protected_trampoline;
        if !ffi::lua_tocfunction(L, -1).is_some_and(|f| std::ptr::fn_addr_eq(f, ours)) {
            ffi::lua_pop(L, 1);
            ffi::lua_pushcfunction(L, protected_trampoline);
        }
        let current = &mut push as *mut &mut dyn FnMut() as *mut c_void;
        let outer = PROTECTED_CLOSURE.replace(current);
        ffi::lua_pushlightuserdata(L, current);
        let ok = ffi::lua_pcall(L, 1, 1, 0) == ffi::LUA_OK;
        PROTECTED_CLOSURE.set(outer);
        ok
    }
}

thread_local! {
    /// The closure [`protected`] is about to run, until [`protected_trampoline`] takes it: a
    /// call of the trampoline by hand (the registry is reachable from Lua), even with a copy of
    /// its argument, finds nothing to run.
    static PROTECTED_CLOSURE: Cell<*mut c_void> = const { Cell::new(ptr::null_mut()) };
}

/// The C function [`protected`] calls: runs the closure its argument points to.
unsafe extern "C-unwind" fn protected_trampoline(L: *mut lua_State) -> c_int {
    // SAFETY: called by `protected` only (a call by hand passes no light userdata and gets an
    // error): argument 1 points to its closure, alive in its frame for the duration of the call.
    unsafe {
        let expected = PROTECTED_CLOSURE.replace(ptr::null_mut());
        if expected.is_null() || ffi::lua_touserdata(L, 1) != expected {
            raise(L, c"lunet.mem: internal function called by hand");
        }
        let push = &mut **(expected as *mut &mut dyn FnMut());
        ffi::lua_settop(L, 0);
        push();
    }
    1
}

/// Registry key of [`protected_trampoline`].
const PROTECTED_KEY: &CStr = c"lunet.mem.protected";

/// Puts [`protected_trampoline`] in the registry.
///
/// # Safety
/// `L` valid with 2 free slots. May raise (memory).
pub(super) unsafe fn register_protected(L: *mut lua_State) {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_pushcfunction(L, protected_trampoline);
        ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, PROTECTED_KEY.as_ptr());
    }
}

/// The name of the type of the value at `idx`, naming this library's objects.
///
/// # Safety
/// `L` valid with 2 free slots, `idx` acceptable.
unsafe fn type_name<'a>(L: *mut lua_State, idx: c_int) -> &'a CStr {
    // SAFETY: valid state and index; `lua_typename` returns a static string.
    unsafe {
        if udata::test::<Checkpoint>(L, idx).is_some() {
            return c"checkpoint";
        }
        if udata::test::<Rc<Scope>>(L, idx).is_some() {
            return c"scope";
        }
        if udata::test::<crate::trace::Snapshot>(L, idx).is_some() {
            return c"snapshot";
        }
        CStr::from_ptr(ffi::lua_typename(L, ffi::lua_type(L, idx)))
    }
}

/// Raises `bad argument #n to 'fname' (expected expected, got <type>)`, formatted by Lua (no
/// Rust value is alive when it raises).
///
/// # Safety
/// As for [`raise`].
pub(crate) unsafe fn type_error(L: *mut lua_State, n: c_int, fname: &CStr, expected: &CStr) -> ! {
    // SAFETY: forwarded contract.
    unsafe {
        let got = type_name(L, n);
        ffi::luaL_where(L, 1);
        ffi::lua_pushfstring(
            L,
            c"bad argument #%d to '%s' (%s expected, got %s)".as_ptr(),
            n,
            fname.as_ptr(),
            expected.as_ptr(),
            got.as_ptr(),
        );
        ffi::lua_concat(L, 2);
        ffi::lua_error(L)
    }
}

/// The `T` at argument `n`, or `bad argument #n to 'fname' (<T::NAME> expected, got <type>)`.
///
/// # Safety
/// Called from a Lua C function; nothing with a destructor alive in the caller.
pub(super) unsafe fn check_udata<'a, T: udata::Boxed>(
    L: *mut lua_State,
    n: c_int,
    fname: &CStr,
) -> &'a mut T {
    // SAFETY: forwarded contract.
    unsafe {
        match udata::test::<T>(L, n) {
            Some(value) => value,
            None => type_error(L, n, fname, T::NAME),
        }
    }
}

/// The state's tracker, or an error if the hook is gone (removed at close, or wrapped by another
/// allocator installed later).
///
/// # Safety
/// `L` valid; as for [`raise`].
pub(super) unsafe fn check_tracker<'a>(L: *mut lua_State) -> &'a Tracker {
    // SAFETY: valid state.
    match unsafe { state::tracker(L) } {
        Some(t) => {
            if t.exempt_calls.get() == 0 {
                t.exempt.set(false); // (see its doc)
            }
            t
        }
        // SAFETY: nothing with a destructor is alive here.
        None => unsafe {
            raise(
                L,
                c"lunet.mem: the tracking allocator is not installed on this state",
            )
        },
    }
}

/// Raises `bad argument #1 to 'fname' (no argument expected, got <type>)` if the function got
/// any argument.
///
/// # Safety
/// Called from a Lua C function; nothing with a destructor alive in the caller.
pub(crate) unsafe fn no_arguments(L: *mut lua_State, fname: &CStr) {
    // SAFETY: forwarded contract.
    unsafe {
        if ffi::lua_gettop(L) > 0 {
            type_error(L, 1, fname, c"no argument");
        }
    }
}

/// `luaL_checkstack` for the slots of the module's own frames (`mem.scope`, `mem.fail_after`),
/// grown as the module's bookkeeping: a budget (the scope's, or one it was opened in) never
/// refuses them. Refused, `lua_checkstack` reports
/// a memory error as a stack overflow, which would replace the memory error the budget promises
/// with one nobody can tell from a real overflow (fuzzer seed 71 on lua5.2: the slots of the
/// results of a scope opened inside a budget at its limit).
///
/// # Safety
/// `L` the running thread, inside a C function of the module. Raises the stock
/// `stack overflow (msg)` error when the stack cannot grow.
pub(super) unsafe fn check_stack(L: *mut lua_State, t: &Tracker, n: c_int, msg: &CStr) {
    let was = t.begin_exempt();
    // SAFETY: valid state; `lua_checkstack` reports failure instead of raising.
    let ok = unsafe { ffi::lua_checkstack(L, n) } != 0;
    t.end_exempt(was);
    if !ok {
        // SAFETY: as `luaL_checkstack` would raise it.
        unsafe { ffi::luaL_checkstack(L, n, msg.as_ptr()) };
    }
}
