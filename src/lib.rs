#![doc = include_str!("../README.md")]
#![allow(non_snake_case)] // `L` for a `lua_State`, as in Lua's own source.

pub mod arena;
pub mod capi;
pub mod hook;
pub mod lua_api;
pub mod scope;
pub mod state;

use std::ffi::c_int;

/// The library's own Rust allocations (scopes, checkpoints) come from mimalloc too: the same
/// allocator the hook serves Lua's blocks from.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use mlua::ffi::{self, lua_State};

/// The Lua half of the module (argument checking, neutrality checks, coroutine wrappers),
/// compiled into the library so that `require "lunet.mem"` needs nothing else.
const LUA_LAYER: &str = include_str!("lua/mem.lua");

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
        state::install(L, state::default_serve());
        let status = ffi::luaL_loadbuffer(
            L,
            LUA_LAYER.as_ptr().cast(),
            LUA_LAYER.len(),
            c"=lunet.mem".as_ptr(),
        );
        if status != ffi::LUA_OK {
            ffi::lua_error(L);
        }
        lua_api::push_core(L);
        ffi::lua_call(L, 1, 1);
    }
    1
}

#[cfg(feature = "module")]
#[mlua::lua_module(name = "lunet_mem")]
fn lunet_mem(lua: &mlua::Lua) -> mlua::Result<mlua::Table> {
    // SAFETY: `open` is a well-behaved lua_CFunction.
    unsafe { lua.create_c_function(open) }?.call(())
}
