//! `mem.metrics`: `core.metrics_enable`, `metrics_disable`, `metrics_reset` and
//! `metrics_text` (the aggregates themselves are `crate::metrics`; options are checked by
//! mem.lua).

use std::ffi::c_int;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use super::errors::{check_tracker, push_owned};
use super::{push_str, register};
use crate::metrics::{self, CTotals, StateTotals};

/// Adds the metrics functions to the `core` table on top.
///
/// # Safety
/// `L` valid with 2 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: forwarded contract.
    unsafe {
        register(
            L,
            &[
                (c"metrics_enable", l_metrics_enable),
                (c"metrics_disable", l_metrics_disable),
                (c"metrics_reset", l_metrics_reset),
                (c"metrics_text", l_metrics_text),
            ],
        )
    }
}

/// `core.metrics_enable(max_scopes, buckets)`: `max_scopes` an integer >= 1 or nil, `buckets` nil
/// or an array of strictly increasing integers (checked by mem.lua).
unsafe extern "C-unwind" fn l_metrics_enable(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the bounds are read before anything with a destructor is made,
    // and reading an array's items neither allocates nor raises.
    unsafe {
        let t = check_tracker(L);
        let max_scopes = if ffi::lua_type(L, 1) == ffi::LUA_TNUMBER {
            ffi::lua_tointeger(L, 1).max(1) as usize
        } else {
            metrics::DEFAULT_MAX_SCOPES
        };
        let bounds = if ffi::lua_type(L, 2) == ffi::LUA_TTABLE {
            let n = ffi::lua_rawlen(L, 2);
            let mut bounds = Vec::with_capacity(n);
            for i in 1..=n {
                ffi::lua_rawgeti(L, 2, i as _);
                bounds.push(ffi::lua_tonumber(L, -1) as i64);
                ffi::lua_pop(L, 1);
            }
            bounds
        } else {
            metrics::default_buckets()
        };
        t.metrics.enable(max_scopes, bounds);
    }
    0
}

/// `core.metrics_disable()`.
unsafe extern "C-unwind" fn l_metrics_disable(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { check_tracker(L).metrics.disable() };
    0
}

/// `core.metrics_reset()`.
unsafe extern "C-unwind" fn l_metrics_reset(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { check_tracker(L).metrics.reset() };
    0
}

/// `core.metrics_text()`: the text exposition of the state's totals, the C ledger's and (when
/// on) the aggregates by scope name.
unsafe extern "C-unwind" fn l_metrics_text(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; the text is built in Rust, then pushed in protected mode.
    unsafe {
        let t = check_tracker(L);
        let pinned: Vec<Rc<str>> = t
            .arenas
            .list()
            .into_iter()
            .filter(|a| a.pinned())
            .map(|a| a.name)
            .collect();
        let state = StateTotals {
            live_bytes: t.live_bytes.get(),
            peak_bytes: t.peak_bytes.get(),
            allocs: t.allocs.get(),
            frees: t.frees.get(),
            bytes_allocated: t.bytes_allocated.get(),
            arena_bytes: t.arenas.reserved_bytes.get(),
            arenas_pinned: pinned.len() as u64,
        };
        let mut c = lunet_mem_c::CStats::default();
        lunet_mem_c::lunet_mem_c_stats(&mut c);
        let c = CTotals {
            live_bytes: c.live_bytes,
            allocs: c.allocs,
            frees: c.frees,
            bytes_allocated: c.bytes_allocated,
        };
        let text = t.metrics.render(&state, &c, &pinned);
        drop(pinned);
        push_owned(L, text, |text| push_str(L, text));
    }
    1
}
