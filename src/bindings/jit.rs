//! LuaJIT's compiler: whether it may be switched now, and the reasons it is held off.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

use super::errors::check_tracker;
use super::register;

/// Adds `jit_can_switch` and `jit_hold` to the `core` table on top.
///
/// # Safety
/// `L` valid with 2 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: forwarded contract.
    unsafe {
        register(
            L,
            &[
                (c"jit_can_switch", l_jit_can_switch),
                (c"jit_hold", l_jit_hold),
            ],
        )
    }
}

/// `core.jit_can_switch()`: whether LuaJIT's compiler may be turned on, off or flushed now: not
/// inside a `__gc` finalizer, where LuaJIT refuses it with an error that 2.1.0-beta3 does not
/// survive everywhere, nor inside a `jit.attach` handler. (Always true on PUC Lua, which has no
/// compiler to switch.)
unsafe extern "C-unwind" fn l_jit_can_switch(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        #[cfg(feature = "luajit")]
        let can = {
            let t = check_tracker(L);
            match t.vm.get() {
                Some(vm) => vm.may_switch_jit(),
                None => probe_jit_mode(L),
            }
        };
        #[cfg(not(feature = "luajit"))]
        let can = true;
        ffi::lua_pushboolean(L, can as c_int);
    }
    1
}

/// `core.jit_hold(reason, held)`: adds or removes a reason LuaJIT's compiler is kept off
/// (`Tracker::hold_jit`; reasons 2 = tracing, 4 = a neutrality check). Nothing on PUC Lua.
unsafe extern "C-unwind" fn l_jit_hold(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let reason = ffi::luaL_checkinteger(L, 1);
        let held = ffi::lua_toboolean(L, 2) != 0;
        #[cfg(feature = "luajit")]
        {
            use crate::hook::{JIT_HELD_BY_CHECK, JIT_HELD_BY_TRACE};
            if reason == JIT_HELD_BY_TRACE as ffi::lua_Integer
                || reason == JIT_HELD_BY_CHECK as ffi::lua_Integer
            {
                t.hold_jit(reason as u8, held);
            }
        }
        #[cfg(not(feature = "luajit"))]
        let _ = (t, reason, held);
    }
    0
}

#[cfg(feature = "luajit")]
extern "C-unwind" {
    fn luaJIT_setmode(L: *mut lua_State, idx: c_int, mode: c_int) -> c_int;
}

/// Whether LuaJIT accepts a mode change now: a protected `luaJIT_setmode` with a mode that
/// does not exist (it changes nothing, but raises inside a `__gc` finalizer).
///
/// # Safety
/// `L` valid with 2 free slots.
#[cfg(feature = "luajit")]
unsafe fn probe_jit_mode(L: *mut lua_State) -> bool {
    unsafe extern "C-unwind" fn probe(L: *mut lua_State) -> c_int {
        // SAFETY: an unknown mode is refused with 0 after the finalizer check.
        unsafe { luaJIT_setmode(L, 0, 0xff) };
        0
    }
    // SAFETY: a protected call of `probe`.
    unsafe {
        ffi::lua_pushcfunction(L, probe);
        if ffi::lua_pcall(L, 0, 0, 0) == ffi::LUA_OK {
            true
        } else {
            ffi::lua_pop(L, 1);
            false
        }
    }
}
