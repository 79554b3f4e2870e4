//! `mem.scope` in C (PUC Lua 5.1 to 5.5).
//!
//! The Lua version in mem.lua costs a few thousand VM instructions per call (varargs, pcall,
//! select); this one calls `fn` with `lua_pcallk` and a continuation, so that `fn` can still
//! yield inside the scope (5.2+; 5.2's continuation reads its status and context with
//! `lua_getctx`, 5.3+ gets them as arguments). LuaJIT keeps the Lua version: it cannot yield across a C
//! function, but can across its own `pcall` (`scope_lua.rs`).

use std::ffi::{c_int, c_void};

use mlua::ffi::{self, lua_State};

use super::errors::{check_stack, check_tracker, raise, rethrow};
use super::register;
use super::scopes::{arena_option, close_scope, count_option, open_scope};
use crate::arena;
use crate::scope::{Guard, Scope};

/// Adds `make_scope` (the C `mem.scope`) to the `core` table on top.
///
/// # Safety
/// `L` valid with 2 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: forwarded contract.
    unsafe { register(L, &[(c"make_scope", l_make_scope)]) }
}

/// The error Lua 5.1 raises when `fn` yields inside the scope.
#[cfg(feature = "lua51")]
const YIELD_ERROR: &[u8] = b"attempt to yield across metamethod/C-call boundary";

/// `core.make_scope(prepare, names)`: the C `mem.scope`, with the Lua function that checks the
/// arguments of the general forms (`prepare(a, b)` returns `name, on_exit, arena, limit,
/// fn_index`) and the
/// weak table of default names by function.
unsafe extern "C-unwind" fn l_make_scope(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with two values, kept as upvalues.
    unsafe {
        ffi::lua_settop(L, 2);
        ffi::lua_pushcclosure(L, l_scope, 2);
    }
    1
}

/// `mem.scope([name or opts,] fn, ...)`.
///
/// Stack while `fn` runs, from `base` (the number of arguments): `base+1` name, `base+2`
/// on_exit (or nil), `base+3` token, then `fn`'s call; its results follow `base+3`.
unsafe extern "C-unwind" fn l_scope(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; errors raised before the scope opens leave nothing behind.
    unsafe {
        let t = check_tracker(L);
        let base = ffi::lua_gettop(L);
        check_stack(L, t, base + 8, c"too many arguments");
        let mut arena = None;
        let mut guard = Guard::default();
        let quick = match (ffi::lua_type(L, 1), ffi::lua_type(L, 2)) {
            (ffi::LUA_TTABLE, ffi::LUA_TFUNCTION) => quick_options(L),
            _ => None,
        };
        let fn_at = match (ffi::lua_type(L, 1), ffi::lua_type(L, 2)) {
            (ffi::LUA_TSTRING, ffi::LUA_TFUNCTION) => {
                ffi::lua_pushvalue(L, 1);
                ffi::lua_pushnil(L);
                2
            }
            _ if quick.is_some() => {
                (arena, guard.limit) = quick.expect("checked");
                2
            }
            (first, _) => {
                // A function whose default name is known already.
                if first == ffi::LUA_TFUNCTION
                    && ffi::lua_type(L, ffi::lua_upvalueindex(2)) == ffi::LUA_TTABLE
                {
                    ffi::lua_pushvalue(L, 1);
                    ffi::lua_rawget(L, ffi::lua_upvalueindex(2));
                } else {
                    ffi::lua_pushnil(L);
                }
                if ffi::lua_type(L, -1) == ffi::LUA_TSTRING {
                    ffi::lua_pushnil(L);
                    1
                } else {
                    ffi::lua_pop(L, 1);
                    ffi::lua_pushvalue(L, ffi::lua_upvalueindex(1));
                    for i in 1..=2 {
                        if i <= base {
                            ffi::lua_pushvalue(L, i);
                        } else {
                            ffi::lua_pushnil(L);
                        }
                    }
                    ffi::lua_call(L, 2, 5);
                    let at = ffi::lua_tointeger(L, -1) as c_int;
                    if !(1..=2).contains(&at) || at > base {
                        // (only a replaced `prepare` upvalue can say so)
                        raise(L, c"lunet.mem: mem.scope's argument check failed");
                    }
                    guard.limit = count_option(L, -2);
                    arena = arena_option(L, -3);
                    ffi::lua_pop(L, 3);
                    at
                }
            }
        };
        let token = open_scope(L, t, base + 1, arena, guard);
        ffi::lua_pushlightuserdata(L, token as *mut c_void);
        for i in fn_at..=base {
            ffi::lua_pushvalue(L, i);
        }
        let nargs = base - fn_at;
        #[cfg(feature = "lua51")]
        let status = ffi::lua_pcall(L, nargs, ffi::LUA_MULTRET, 0);
        #[cfg(feature = "lua52")]
        let status = ffi::lua_pcallk(L, nargs, ffi::LUA_MULTRET, 0, base, Some(scope_k52));
        #[cfg(not(any(feature = "lua51", feature = "lua52")))]
        let status = ffi::lua_pcallk(
            L,
            nargs,
            ffi::LUA_MULTRET,
            0,
            base as ffi::lua_KContext,
            Some(scope_k),
        );
        scope_finish(L, status, base)
    }
}

/// The fast path of `l_scope` for `mem.scope(opts, fn, ...)`: when every field of `opts` is one
/// mem.lua's check accepts at sight (`name` a string, `on_exit` a function, `arena` a boolean,
/// `limit` an integer from 0 to 2^53)
/// and the name is known, pushes the name and `on_exit` (or nil) and returns the arena and
/// limit options.
/// Otherwise pushes nothing and returns `None`: the Lua `prepare` checks (and raises).
///
/// # Safety
/// Called from `l_scope` with `opts` at 1, `fn` at 2, and 4 free slots.
unsafe fn quick_options(L: *mut lua_State) -> Option<(Option<usize>, Option<u64>)> {
    // SAFETY: valid state; only string keys are read as strings; the stack is balanced on
    // every return.
    unsafe {
        if ffi::lua_getmetatable(L, 1) != 0 {
            ffi::lua_pop(L, 1); // __index or __pairs could change what mem.lua would see
            return None;
        }
        let (mut has_name, mut has_on_exit, mut arena, mut limit) = (false, false, None, None);
        let top = ffi::lua_gettop(L);
        ffi::lua_pushnil(L);
        while ffi::lua_next(L, 1) != 0 {
            let key = if ffi::lua_type(L, -2) == ffi::LUA_TSTRING {
                let mut len = 0usize;
                let p = ffi::lua_tolstring(L, -2, &mut len);
                std::slice::from_raw_parts(p as *const u8, len)
            } else {
                b""
            };
            let value_type = ffi::lua_type(L, -1);
            match (key, value_type) {
                (b"name", ffi::LUA_TSTRING) => has_name = true,
                (b"on_exit", ffi::LUA_TFUNCTION) => has_on_exit = true,
                (b"arena", ffi::LUA_TBOOLEAN) => {
                    arena = (ffi::lua_toboolean(L, -1) != 0).then_some(arena::DEFAULT_CHUNK)
                }
                (b"limit", ffi::LUA_TNUMBER) => {
                    let n = ffi::lua_tonumber(L, -1);
                    if !(0.0..=MAX_EXACT).contains(&n) || n.fract() != 0.0 {
                        ffi::lua_settop(L, top);
                        return None;
                    }
                    limit = Some(n as u64);
                }
                _ => {
                    ffi::lua_settop(L, top);
                    return None;
                }
            }
            ffi::lua_pop(L, 1);
        }
        if has_name {
            ffi::lua_getfield(L, 1, c"name".as_ptr());
        } else {
            ffi::lua_pushvalue(L, 2);
            ffi::lua_rawget(L, ffi::lua_upvalueindex(2));
            if ffi::lua_type(L, -1) != ffi::LUA_TSTRING {
                ffi::lua_settop(L, top);
                return None;
            }
        }
        if has_on_exit {
            ffi::lua_getfield(L, 1, c"on_exit".as_ptr());
        } else {
            ffi::lua_pushnil(L);
        }
        Some((arena, limit))
    }
}

/// The largest integer mem.lua accepts for byte counts (2^53, exact in a double).
const MAX_EXACT: f64 = 9007199254740992.0;

/// Continuation of `l_scope` after `fn` yielded, in Lua 5.2's form: a plain `lua_CFunction`
/// that asks `lua_getctx` for the outcome (`LUA_YIELD` when `fn` went on and returned, an
/// error status when it raised after a yield: the error object is then on top, as 5.3 leaves
/// it) and for the context (`base`).
#[cfg(feature = "lua52")]
unsafe extern "C-unwind" fn scope_k52(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua as the continuation `l_scope` gave `lua_pcallk`, with its stack.
    unsafe {
        let mut base: c_int = 0;
        let status = ffi::lua_getctx(L, &mut base);
        scope_finish(L, status, base)
    }
}

/// Continuation of `l_scope` after `fn` yielded (5.3+).
#[cfg(not(any(feature = "lua51", feature = "lua52")))]
unsafe extern "C-unwind" fn scope_k(
    L: *mut lua_State,
    status: c_int,
    ctx: ffi::lua_KContext,
) -> c_int {
    // SAFETY: called by Lua with the stack `l_scope` left.
    unsafe { scope_finish(L, status, ctx as c_int) }
}

/// Closes the scope, runs `on_exit`, and returns `fn`'s results or raises its error unchanged.
///
/// # Safety
/// The stack as `l_scope` describes it, `status` the outcome of the protected call.
unsafe fn scope_finish(L: *mut lua_State, status: c_int, base: c_int) -> c_int {
    // SAFETY: forwarded contract.
    unsafe {
        let ok = status == ffi::LUA_OK || status == ffi::LUA_YIELD;
        let t = check_tracker(L);
        let token = ffi::lua_touserdata(L, base + 3) as *const Scope;
        let on_exit = ffi::lua_type(L, base + 2) != ffi::LUA_TNIL;
        check_stack(L, t, 6, c"too many results");
        if on_exit {
            ffi::lua_pushvalue(L, base + 2);
            close_scope(L, t, token, true);
            if ok {
                ffi::lua_call(L, 1, 0);
            } else if ffi::lua_pcall(L, 1, 0, 0) != ffi::LUA_OK {
                ffi::lua_pop(L, 1); // fn's error wins over on_exit's
            }
        } else {
            close_scope(L, t, token, false);
        }
        if ok {
            return ffi::lua_gettop(L) - (base + 3);
        }
        #[cfg(feature = "lua51")]
        if let Some(msg) = to_bytes(L, -1) {
            if msg == YIELD_ERROR {
                ffi::lua_pushstring(
                    L,
                    c" (Lua 5.1 cannot yield inside mem.scope; use LuaJIT or Lua 5.2+)".as_ptr(),
                );
                ffi::lua_concat(L, 2);
            }
        }
        rethrow(L)
    }
}

/// The bytes of the string at `idx`, if it is a string.
///
/// # Safety
/// `L` valid, `idx` acceptable; the slice lives while the value stays on the stack.
#[cfg(feature = "lua51")]
unsafe fn to_bytes<'a>(L: *mut lua_State, idx: c_int) -> Option<&'a [u8]> {
    // SAFETY: valid state; only real strings are read.
    unsafe {
        if ffi::lua_type(L, idx) != ffi::LUA_TSTRING {
            return None;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(L, idx, &mut len);
        Some(std::slice::from_raw_parts(p as *const u8, len))
    }
}
