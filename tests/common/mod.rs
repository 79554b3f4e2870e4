//! What the Rust tests that run the module in mlua's vendored Lua share.

use mlua::{Lua, Table};

/// A Lua state (all standard libraries) where `require "lunet.mem"` finds the module.
pub fn new_lua() -> Lua {
    // SAFETY: the debug library is wanted (mem.lua names functions with it); nothing else unsafe.
    let lua = unsafe { Lua::unsafe_new() };
    // SAFETY: `open` is a well-behaved lua_CFunction.
    let open = unsafe { lua.create_c_function(lunet_mem::open) }.unwrap();
    let preload: Table = lua.load("return package.preload").eval().unwrap();
    preload.set("lunet.mem", open).unwrap();
    lua
}
