#![doc = include_str!("../README.md")]
#![allow(non_snake_case)] // `L` for a `lua_State`, as in Lua's own source.

// Modules, leaves first (each uses only those above it; tests/module_graph.sh checks there is
// no cycle): fxhash · arena (chunks and blocks) · luajit (reading LuaJIT's VM) · auxbuf
// (lauxlib's buffers) · udata (typed userdata) · scope (+ its budget ledger) · trace (the
// records) · hook (the Tracker, the counting lua_Alloc body and its traced twin) · state (the
// tracker's life: install, the exported entries, close) · the bindings and capi above them.
// docs/ARCHITECTURE.md follows one allocation and one mem.scope call through them.
mod arena;
#[cfg(aux_buffers)]
mod auxbuf;
mod bindings;
mod capi;
mod fxhash;
mod hook;
#[cfg(feature = "luajit")]
mod luajit;
mod metrics;
mod scope;
mod state;
mod trace;
mod udata;

pub use bindings::coroutines::lunet_mem_resume;

/// What the Rust tests (`tests/*.rs`) drive without Lua: the hook with its tracker, scopes and
/// arenas. Not an API for users (hidden from the docs; it may change with any release).
#[doc(hidden)]
pub mod testing {
    pub use crate::arena::{owner as arena_owner, Owner, MAX_BLOCK};
    pub use crate::hook::{LuaAlloc, Tracker};
    pub use crate::scope::Scope;
    pub use crate::state::{default_serve, hook_for, Serve};
}

/// The coroutine wrappers and the C entries for runtimes that resume coroutines themselves
/// (`lunet_mem_resume`, ...), under their former path.
pub use bindings::coroutines as coroutine;

use std::ffi::c_int;

/// The library's own Rust allocations (scopes, checkpoints) come from mimalloc too: the same
/// allocator the hook serves Lua's blocks from.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use mlua::ffi::{self, lua_State};

/// mimalloc's `mi_option_arena_eager_commit` (the same number in its v2 and v3 headers; the crate
/// builds v2: v3.3 crashed in `mi_thread_init` when the library was loaded from a thread that
/// later exited, as luv threads do, `tests/lua/luv_threads.lua`).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Run when the library is loaded, before its first allocation: mimalloc would otherwise commit
/// its first arena eagerly, which made 4 MiB resident in a Lua process that needs a few hundred
/// KiB (measured with /proc/self/smaps: 7.5 MiB resident after `require` instead of 3.8).
#[used]
#[link_section = ".init_array"]
static CONFIGURE_MIMALLOC: extern "C" fn() = {
    extern "C" fn configure() {
        // SAFETY: sets a mimalloc option; no allocation is live that it could affect.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    configure
};

/// The Lua half of the module (argument checking, neutrality checks, coroutine wrappers),
/// compiled into the library so that `require "lunet.mem"` needs nothing else.
const LUA_LAYER: &str = include_str!("../lua/lunet/mem.lua");

/// The module's Lua helpers, compiled in too: the Lua half offers them in `package.preload`
/// (`core.embedded`), so that a host with no Lua files on disk (a C program that calls
/// `lunet_mem_install`) still gets holder paths in its leak reports (`lunet.mem.holders`).
const HELPERS: [(&str, &std::ffi::CStr, &str); 3] = [
    (
        "lunet.mem.holders",
        c"=lunet.mem.holders",
        include_str!("../lua/lunet/mem/holders.lua"),
    ),
    (
        "lunet.mem.busted",
        c"=lunet.mem.busted",
        include_str!("../lua/lunet/mem/busted.lua"),
    ),
    (
        "lunet.mem.run",
        c"=lunet.mem.run",
        include_str!("../lua/lunet/mem/run.lua"),
    ),
];

/// `core.embedded(name)`: the compiled chunk of the helper module `name`, or nil if the library
/// has none of that name.
unsafe extern "C-unwind" fn l_embedded(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the name is only compared; a chunk that fails to load (memory)
    // raises with no Rust value alive.
    unsafe {
        let mut len = 0usize;
        let p = ffi::luaL_checklstring(L, 1, &mut len);
        let name = std::slice::from_raw_parts(p.cast::<u8>(), len);
        let Some(&(_, chunkname, source)) = HELPERS.iter().find(|h| h.0.as_bytes() == name) else {
            ffi::lua_pushnil(L);
            return 1;
        };
        if ffi::luaL_loadbuffer(L, source.as_ptr().cast(), source.len(), chunkname.as_ptr())
            != ffi::LUA_OK
        {
            ffi::lua_error(L);
        }
    }
    1
}

/// Opens the module in `L`: installs the tracker on the state (once) and returns the
/// `lunet.mem` table. This is what `require "lunet.mem"` runs; a host that embeds Lua can also
/// call it directly (or put it in `package.preload`).
///
/// # Safety
/// A `lua_CFunction`: `L` must be a valid Lua state, called through `lua_call`/`lua_pcall`.
pub unsafe extern "C-unwind" fn open(L: *mut lua_State) -> c_int {
    // SAFETY: valid state; errors (memory, a broken chunk) propagate as Lua errors with no Rust
    // value alive.
    unsafe {
        ffi::luaL_checkstack(L, 16, std::ptr::null());
        if push_other_copy(L) {
            return 1;
        }
        let t = state::install(L, state::default_serve());
        #[cfg(feature = "luajit")]
        {
            if t.vm.get().is_none() {
                t.vm.set(luajit::Vm::find(L));
            }
            t.oom_unsafe_jit.set(luajit::is_beta(L));
        }
        #[cfg(aux_buffers)]
        if t.aux.blocks() == 0 && !t.aux.calibrated() {
            auxbuf::calibrate(L, &t.aux);
        }
        #[cfg(not(any(feature = "luajit", aux_buffers)))]
        let _ = t;
        let status = ffi::luaL_loadbuffer(
            L,
            LUA_LAYER.as_ptr().cast(),
            LUA_LAYER.len(),
            c"=lunet.mem".as_ptr(),
        );
        if status != ffi::LUA_OK {
            ffi::lua_error(L);
        }
        bindings::push_core(L);
        ffi::lua_pushcfunction(L, l_embedded);
        ffi::lua_setfield(L, -2, c"embedded".as_ptr());
        ffi::lua_call(L, 1, 1);
        // This copy of the library owns the state from now on (see `push_other_copy`).
        ffi::lua_createtable(L, 0, 2);
        ffi::lua_pushvalue(L, -2);
        ffi::lua_setfield(L, -2, c"module".as_ptr());
        ffi::lua_pushcfunction(L, open);
        ffi::lua_setfield(L, -2, c"open".as_ptr());
        ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, OWNER_KEY.as_ptr());
    }
    1
}

/// Registry key of `{module = <the module table>, open = <the open function>}` of the copy of the
/// library that installed the tracker on the state.
const OWNER_KEY: &std::ffi::CStr = c"lunet.mem.owner";

/// If another copy of this library (loaded from another path: a second rock tree, a vendored
/// copy) already owns the state, pushes its module table and returns true: two trackers and two
/// sets of coroutine wrappers on one state would each find the other's hook installed. Its
/// module serves every `require` in the state.
///
/// # Safety
/// `L` valid with 3 free slots.
unsafe fn push_other_copy(L: *mut lua_State) -> bool {
    // SAFETY: valid state; values are type-checked before use.
    unsafe {
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, OWNER_KEY.as_ptr());
        if ffi::lua_type(L, -1) == ffi::LUA_TTABLE {
            ffi::lua_getfield(L, -1, c"open".as_ptr());
            let theirs = ffi::lua_tocfunction(L, -1);
            ffi::lua_pop(L, 1);
            let ours: ffi::lua_CFunction = open;
            if theirs.is_some_and(|f| !std::ptr::fn_addr_eq(f, ours)) {
                ffi::lua_getfield(L, -1, c"module".as_ptr());
                if ffi::lua_type(L, -1) == ffi::LUA_TTABLE {
                    ffi::lua_remove(L, -2);
                    return true;
                }
                ffi::lua_pop(L, 1);
            }
        }
        ffi::lua_pop(L, 1);
        false
    }
}

/// The entry point `require "lunet.mem"` finds (`luaopen_` and the module's name, dots as
/// underscores). It is [`open`] itself, called as Lua calls it: mlua's `lua_module` wrapper
/// would first set up mlua's own state (its registry data, a thread for its references) that
/// nothing here uses, about 30 KiB of Lua memory and a part of the library's code run at load
/// for nothing (*Benchmark* in the README: the load cost). (mlua's `module` feature still
/// decides how the library links: against the interpreter's Lua, not a copy of its own.)
///
/// # Safety
/// As for [`open`].
#[cfg(feature = "module")]
#[no_mangle]
pub unsafe extern "C-unwind" fn luaopen_lunet_mem(L: *mut lua_State) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { open(L) }
}
