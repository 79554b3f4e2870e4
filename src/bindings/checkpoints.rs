//! Checkpoints (`mem.checkpoint`, `cp:delta`, ...) and what the neutrality checks built on them
//! in mem.lua need: readings taken at a reproducible point (`core.measured`, `core.stretch`)
//! and a `pcall` the checked function cannot yield across (`core.cpcall`).

use std::ffi::{c_int, CStr};
use std::ptr;

use mlua::ffi::{self, lua_State};

use super::errors::{check_tracker, check_udata, raise};
use super::{push_str, register, set_int, to_string};
use crate::udata;

/// What a checkpoint remembers.
pub struct Checkpoint {
    pub name: Option<String>,
    pub live_bytes: u64,
    pub net_blocks: i64,
}

impl udata::Boxed for Checkpoint {
    const METATABLE: &'static CStr = c"lunet.mem.checkpoint";
    const NAME: &'static CStr = c"checkpoint";
    const TAG: u64 = 0x6c75_6e65_7463_7031;
}

/// Adds the checkpoint functions and `checkpoint_mt` to the `core` table on top.
///
/// # Safety
/// `L` valid with 3 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: valid state, table on top.
    unsafe {
        register(
            L,
            &[
                (c"checkpoint", l_checkpoint),
                (c"cp_attach", l_cp_attach),
                (c"cp_attached", l_cp_attached),
                (c"cp_delta", l_cp_delta),
                (c"cp_values", l_cp_values),
                (c"cp_name", l_cp_name),
                (c"is_checkpoint", l_is_checkpoint),
                (c"stretch", l_stretch),
                (c"reserved_call", l_reserved_call),
                (c"measured", l_measured),
                (c"cpcall", l_cpcall),
            ],
        );
        udata::new_metatable::<Checkpoint>(L);
        ffi::lua_setfield(L, -2, c"checkpoint_mt".as_ptr());
    }
}

/// `core.checkpoint([name])`: a checkpoint of the counters as they are after its own object
/// has been allocated.
unsafe extern "C-unwind" fn l_checkpoint(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the counters are read once the checkpoint's own userdata exists.
    unsafe {
        let t = check_tracker(L);
        let cp = udata::push(L, || Checkpoint {
            name: to_string(L, 1),
            live_bytes: 0,
            net_blocks: 0,
        });
        cp.live_bytes = t.live_bytes.get();
        cp.net_blocks = t.net_blocks();
    }
    1
}

/// # Safety
/// Called from a Lua C function; raises a `bad argument` error naming `fname` if arg 1 is not a
/// checkpoint.
unsafe fn check_checkpoint<'a>(L: *mut lua_State, fname: &CStr) -> &'a Checkpoint {
    // SAFETY: forwarded contract.
    unsafe { check_udata::<Checkpoint>(L, 1, fname) }
}

/// `cp:delta()`: `{bytes = n, blocks = n}` since the checkpoint, read before the table is made.
unsafe extern "C-unwind" fn l_cp_delta(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let cp = check_checkpoint(L, c"delta");
        let t = check_tracker(L);
        let bytes = t.live_bytes.get() as i64 - cp.live_bytes as i64;
        let blocks = t.net_blocks() - cp.net_blocks;
        ffi::lua_createtable(L, 0, 2);
        set_int(L, c"bytes", bytes);
        set_int(L, c"blocks", blocks);
    }
    1
}

/// `core.cp_values(cp, fname)`: `bytes, blocks` since the checkpoint as numbers, no table.
unsafe extern "C-unwind" fn l_cp_values(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua (from mem.lua, which passes the public method's name); the name is
    // read from Lua's string, so nothing with a destructor is alive if `check` raises.
    unsafe {
        let fname = if ffi::lua_type(L, 2) == ffi::LUA_TSTRING {
            CStr::from_ptr(ffi::lua_tolstring(L, 2, ptr::null_mut()))
        } else {
            c"is_neutral"
        };
        let cp = check_udata::<Checkpoint>(L, 1, fname);
        let t = check_tracker(L);
        ffi::lua_pushinteger(L, (t.live_bytes.get() as i64 - cp.live_bytes as i64) as _);
        ffi::lua_pushinteger(L, (t.net_blocks() - cp.net_blocks) as _);
    }
    2
}

/// `core.cp_name(cp)`: the checkpoint's name or nil.
unsafe extern "C-unwind" fn l_cp_name(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        match udata::test::<Checkpoint>(L, 1).and_then(|cp| cp.name.as_deref()) {
            Some(name) => push_str(L, name),
            None => ffi::lua_pushnil(L),
        }
    }
    1
}

/// `core.cp_attach(cp, t)`: keeps the table `t` with the checkpoint (its user value; setting it
/// allocates nothing, so it can follow the checkpoint's reading). mem.lua keeps the heap
/// snapshot of `mem.checkpoint{holders = true}` there.
unsafe extern "C-unwind" fn l_cp_attach(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; only this module's checkpoints and tables are accepted.
    unsafe {
        if udata::test::<Checkpoint>(L, 1).is_some() && ffi::lua_type(L, 2) == ffi::LUA_TTABLE {
            ffi::lua_settop(L, 2);
            ffi::lua_setuservalue(L, 1);
        }
    }
    0
}

/// `core.cp_attached(cp)`: what `cp_attach` kept (on 5.1 and LuaJIT, a userdata's environment,
/// the globals when nothing was kept).
unsafe extern "C-unwind" fn l_cp_attached(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        if udata::test::<Checkpoint>(L, 1).is_some() {
            ffi::lua_getuservalue(L, 1);
        } else {
            ffi::lua_pushnil(L);
        }
    }
    1
}

/// `core.is_checkpoint(v)`.
unsafe extern "C-unwind" fn l_is_checkpoint(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let yes = udata::test::<Checkpoint>(L, 1).is_some();
        ffi::lua_pushboolean(L, yes as c_int);
    }
    1
}

// ---------------------------------------------------------------------------------------------
// Measuring at a reproducible point (the neutrality checks)

/// `core.stretch()`: grows the running thread's stack so that the collection that follows
/// shrinks it to a size that depends only on what is in use, not on its history.
///
/// Live memory includes the stacks of threads, and Lua 5.4 shrinks a stack only when it is
/// more than 3 times what is in use (then to 2 times), so two readings at the same depth could
/// differ by a stack that grew in between. Growing it past that first makes the collection
/// shrink it to twice the use. Lua 5.3 always shrinks to a size computed from the use; 5.1 and
/// LuaJIT halve a stack used below 1/4, which no growth can make canonical: nothing is done.
unsafe extern "C-unwind" fn l_stretch(L: *mut lua_State) -> c_int {
    #[cfg(lua54_gc)]
    // SAFETY: called by Lua; `lua_checkstack` reports failure instead of raising.
    unsafe {
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        let mut depth = 0;
        while depth < 2000 && ffi::lua_getstack(L, depth, &mut ar) != 0 {
            depth += 1;
        }
        // A frame uses at most 255 slots (Lua) or its values + LUA_MINSTACK (C).
        ffi::lua_checkstack(L, (depth + 2) * 3 * 256);
    }
    #[cfg(not(lua54_gc))]
    let _ = L;
    0
}

/// Stack slots `core.reserved_call` holds in use below the function it calls: 16 KiB of
/// stack, more than a request handler's calls use.
const STACK_RESERVE: c_int = 1024;

/// Lua 5.1 keeps its call records in an array that a collection halves when less than a
/// quarter of it is in use: `core.reserved_call` holds this many records in use too.
#[cfg(feature = "lua51")]
const CALL_RESERVE: ffi::lua_Integer = 48;
#[cfg(not(feature = "lua51"))]
const CALL_RESERVE: ffi::lua_Integer = 0;

/// `core.reserved_call(f)`: calls `f()` above [`STACK_RESERVE`] slots (and, on 5.1,
/// [`CALL_RESERVE`] call records) held in use, and returns its results.
///
/// mem.measure takes its readings through it. A collection shrinks a thread's stack by what is
/// in use (Lua 5.3 to 9/8 of it, 5.4 to twice it when above three times; 5.1 and LuaJIT halve it
/// below a quarter), so a reading taken where little is in use would leave a stack that the
/// measured call, deeper than the reading, grows again inside its scope, by an amount that
/// depends on where its caller stands and on the thread's history. With the reserve in use, the
/// readings leave a stack that holds the call (up to that many slots deeper than mem.measure's
/// frame) and find it the same size before and after the call.
unsafe extern "C-unwind" fn l_reserved_call(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with a function (and, from itself, a count of levels still to
    // hold); lua_checkstack reports failure instead of raising, and errors from `f` propagate
    // (no destructor alive).
    unsafe {
        ffi::luaL_checktype(L, 1, ffi::LUA_TFUNCTION);
        let levels = if ffi::lua_isnumber(L, 2) != 0 {
            ffi::lua_tointeger(L, 2)
        } else {
            CALL_RESERVE
        };
        if levels > 0 {
            ffi::lua_settop(L, 1);
            ffi::lua_pushcfunction(L, l_reserved_call);
            ffi::lua_pushvalue(L, 1);
            ffi::lua_pushinteger(L, levels - 1);
            ffi::lua_call(L, 2, ffi::LUA_MULTRET);
            return ffi::lua_gettop(L) - 1;
        }
        if ffi::lua_checkstack(L, STACK_RESERVE + ffi::LUA_MINSTACK) == 0 {
            raise(L, c"stack overflow (mem.measure's reserve)");
        }
        ffi::lua_settop(L, 1 + STACK_RESERVE);
        ffi::lua_pushvalue(L, 1);
        ffi::lua_call(L, 0, ffi::LUA_MULTRET);
        ffi::lua_gettop(L) - 1 - STACK_RESERVE
    }
}

/// `core.measured(check, settle, finish)`: a C function that calls `check(a, b)`, then
/// `settle()` if `check` returned true, then returns `finish(a, b)`.
///
/// Every function made this way calls `settle` with the same stack layout, whatever Lua
/// function it stands for, so that readings taken through them (a checkpoint and its check)
/// see the caller's thread at the same depth and size.
unsafe extern "C-unwind" fn l_measured(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with three functions; the closure holds them as upvalues.
    unsafe {
        ffi::lua_settop(L, 3);
        ffi::lua_pushcclosure(L, l_measured_call, 3);
    }
    1
}

unsafe extern "C-unwind" fn l_measured_call(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; errors from the three calls propagate (no destructors alive).
    unsafe {
        ffi::lua_settop(L, 2);
        ffi::lua_pushvalue(L, ffi::lua_upvalueindex(1));
        ffi::lua_pushvalue(L, 1);
        ffi::lua_pushvalue(L, 2);
        ffi::lua_call(L, 2, 1);
        let settle = ffi::lua_toboolean(L, -1) != 0;
        ffi::lua_pop(L, 1);
        if settle {
            ffi::lua_pushvalue(L, ffi::lua_upvalueindex(2));
            ffi::lua_call(L, 0, 0);
        }
        ffi::lua_pushvalue(L, ffi::lua_upvalueindex(3));
        ffi::lua_pushvalue(L, 1);
        ffi::lua_pushvalue(L, 2);
        ffi::lua_call(L, 2, ffi::LUA_MULTRET);
        ffi::lua_gettop(L) - 2
    }
}

/// `core.cpcall(f, ...)`: `pcall` through C, so that `f` cannot yield past it (LuaJIT's `pcall`
/// lets a coroutine yield across: a check that turned the compiler off must not be left
/// suspended, or abandoned, with it off).
unsafe extern "C-unwind" fn l_cpcall(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; `lua_pcall` gets at least the function (checked).
    unsafe {
        ffi::luaL_checkany(L, 1);
        let status = ffi::lua_pcall(L, ffi::lua_gettop(L) - 1, ffi::LUA_MULTRET, 0);
        ffi::luaL_checkstack(L, 1, ptr::null());
        ffi::lua_pushboolean(L, (status == ffi::LUA_OK) as c_int);
        ffi::lua_insert(L, 1);
        ffi::lua_gettop(L)
    }
}
