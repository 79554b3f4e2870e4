#![doc = include_str!("../README.md")]
#![allow(non_snake_case)] // `L` for a `lua_State`, as in Lua's own source.

pub mod hook;
pub mod lua_api;
pub mod scope;
pub mod state;

use mlua::{Lua, Result, Table};

/// The Lua half of the module (argument checking, neutrality checks, coroutine wrappers),
/// compiled into the library so that `require "lunet.mem"` needs nothing else.
const LUA_LAYER: &str = include_str!("lua/mem.lua");

/// Installs the tracker on `lua`'s state (once) and builds the `lunet.mem` module table.
pub fn open(lua: &Lua) -> Result<Table> {
    // SAFETY: `exec_raw` gives the state with a checked stack, in protected mode; `install` and
    // `push_core` only use the Lua API on it.
    let core: Table = unsafe {
        lua.exec_raw((), |L| {
            mlua::ffi::luaL_checkstack(L, 16, std::ptr::null());
            state::install(L);
            lua_api::push_core(L);
        })
    }?;
    lua.load(LUA_LAYER).set_name("=lunet.mem").call(core)
}

#[cfg(feature = "module")]
#[mlua::lua_module(name = "lunet_mem")]
fn lunet_mem(lua: &Lua) -> Result<Table> {
    open(lua)
}
