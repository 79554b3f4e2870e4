//! A C host with no Lua files of the module: a state made with the plain C API, the tracker
//! installed with `lunet_mem_install` (include/lunet_mem.h), and an empty package.path. Leak
//! reports still say what holds a leak: `lunet.mem.holders` is compiled into the library and
//! offered in `package.preload` (lua/lunet/mem.lua, "Helpers").
#![cfg(feature = "vendored")]
#![allow(non_snake_case)] // `L` for a `lua_State`, as in Lua's own source.

use std::ffi::{c_int, CStr, CString};

use lunet_mem as _; // (the library that defines the C symbols below)
use mlua::ffi::{self, lua_State};

extern "C-unwind" {
    /// As C declares it in include/lunet_mem.h.
    fn lunet_mem_install(L: *mut lua_State) -> c_int;
}

/// Runs `code` in a fresh state set up as a C host sets it up, and returns what it returns (a
/// string) or its error.
fn run_in_c_host(code: &str) -> Result<String, String> {
    let code = CString::new(code).unwrap();
    // SAFETY: a state of our own, used from this thread only, closed before returning; every
    // call is on a valid state with the stack room it needs.
    unsafe {
        let L = ffi::luaL_newstate();
        assert!(!L.is_null());
        ffi::luaL_openlibs(L);
        assert_eq!(lunet_mem_install(L), 0);
        let status = match ffi::luaL_loadstring(L, code.as_ptr()) {
            ffi::LUA_OK => ffi::lua_pcall(L, 0, 1, 0),
            status => status,
        };
        let text = ffi::lua_tostring(L, -1);
        let text = if text.is_null() {
            String::from("(no string)")
        } else {
            CStr::from_ptr(text).to_string_lossy().into_owned()
        };
        ffi::lua_close(L);
        if status == ffi::LUA_OK {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

#[test]
fn a_c_host_with_no_lua_files_gets_holder_paths_in_leak_reports() {
    let report = run_in_c_host(
        r#"
        -- Nothing of lunet.mem on disk: only what the library carries.
        package.path, package.cpath = "", ""
        local mem = require "lunet.mem"
        local holders = require "lunet.mem.holders"
        assert(debug.getinfo(holders.explain, "S").source == "=lunet.mem.holders")
        keep = {}
        local ok, report = mem.is_neutral(function() keep[#keep + 1] = {} end)
        assert(not ok, "no leak found")
        local cp = mem.checkpoint { holders = true }
        kept_since = {}
        for i = 1, 100 do kept_since[i] = { i } end
        local neutral, since = cp:is_neutral()
        assert(not neutral, "no leak found since the checkpoint")
        return report .. "\n" .. since
        "#,
    )
    .unwrap();
    assert!(report.contains("held by: _G.keep"), "{report}");
    assert!(report.contains("held by: _G.kept_since"), "{report}");
}

#[test]
fn helpers_on_package_path_are_loaded_before_the_compiled_ones() {
    let dir = std::env::temp_dir().join(format!("lunet-mem-c-host-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("lunet/mem")).unwrap();
    std::fs::write(
        dir.join("lunet/mem/holders.lua"),
        "return { from_disk = true }\n",
    )
    .unwrap();
    let path = dir.join("?.lua").to_string_lossy().replace('\\', "/");
    let found = run_in_c_host(&format!(
        r#"
        package.path = "{path}"
        require "lunet.mem"
        return tostring(require("lunet.mem.holders").from_disk)
        "#
    ));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.unwrap(), "true");
}
