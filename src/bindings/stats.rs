//! The state's counters: `mem.stats()`, `mem.reset_peak()`, `core.live()`,
//! `core.gc_count_bytes()`.

use std::ffi::c_int;
#[cfg(type_tags)]
use std::ffi::CStr;

use mlua::ffi::{self, lua_State};

use super::errors::{check_tracker, no_arguments};
use super::{register, set_int};
use crate::hook::{Tracker, TYPE_SLOTS};
use crate::state;

/// Adds the counters' functions to the `core` table on top.
///
/// # Safety
/// `L` valid with 2 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: forwarded contract.
    unsafe {
        register(
            L,
            &[
                (c"stats", l_stats),
                (c"reset_peak", l_reset_peak),
                (c"live", l_live),
                (c"gc_count_bytes", l_gc_count_bytes),
            ],
        )
    }
}

/// A copy of the tracker's counters, taken before anything is allocated for the result.
#[cfg_attr(not(type_tags), allow(dead_code))]
struct Snapshot {
    live_bytes: u64,
    peak_bytes: u64,
    allocs: u64,
    frees: u64,
    reallocs: u64,
    bytes_allocated: u64,
    bytes_freed: u64,
    baseline_bytes: u64,
    type_allocs: [u64; TYPE_SLOTS],
    type_bytes: [u64; TYPE_SLOTS],
    arena_bytes: u64,
    arena_live_bytes: u64,
    arena_live_blocks: u64,
    arena_pool_bytes: u64,
    arenas: u64,
    arenas_reclaimed: u64,
    arenas_skipped: u64,
    gc_cycles: u64,
    buffer_bytes: u64,
    buffer_blocks: u64,
    external_bytes: u64,
    external_blocks: u64,
}

impl Snapshot {
    fn of(t: &Tracker) -> Snapshot {
        Snapshot {
            live_bytes: t.live_bytes.get(),
            peak_bytes: t.peak_bytes.get(),
            allocs: t.allocs.get(),
            frees: t.frees.get(),
            reallocs: t.reallocs.get(),
            bytes_allocated: t.bytes_allocated.get(),
            bytes_freed: t.bytes_freed.get(),
            baseline_bytes: t.baseline_bytes,
            type_allocs: t.type_allocs.each_ref().map(|c| c.get()),
            type_bytes: t.type_bytes.each_ref().map(|c| c.get()),
            arena_bytes: t.arenas.reserved_bytes.get(),
            arena_live_bytes: t.arenas.live_bytes.get(),
            arena_live_blocks: t.arenas.live_blocks.get(),
            arena_pool_bytes: t.arenas.pool_bytes.get(),
            arenas: t.arenas.count.get(),
            arenas_reclaimed: t.arenas.reclaimed.get(),
            arenas_skipped: t.arenas.routes.skipped.get(),
            gc_cycles: t.gc_cycles.get(),
            #[cfg(aux_buffers)]
            buffer_bytes: t.aux.bytes.get(),
            #[cfg(aux_buffers)]
            buffer_blocks: t.aux.blocks() as u64,
            #[cfg(not(aux_buffers))]
            buffer_bytes: 0,
            #[cfg(not(aux_buffers))]
            buffer_blocks: 0,
            #[cfg(feature = "lua55")]
            external_bytes: t.aux.external_bytes.get(),
            #[cfg(feature = "lua55")]
            external_blocks: t.aux.external_blocks() as u64,
            #[cfg(not(feature = "lua55"))]
            external_bytes: 0,
            #[cfg(not(feature = "lua55"))]
            external_blocks: 0,
        }
    }
}

/// Names of the type slots (the low 4 bits of Lua 5.2+'s tag; slot 0 is memory that is not an
/// object: arrays, buffers, stacks).
#[cfg(type_tags)]
fn type_slot_name(slot: usize) -> Option<&'static CStr> {
    let lua54_order = cfg!(lua54_gc);
    Some(match slot {
        0 => c"other",
        4 => c"string",
        5 => c"table",
        6 => c"function",
        7 => c"userdata",
        8 => c"thread",
        9 if lua54_order => c"upvalue",
        9 => c"proto",
        10 if lua54_order => c"proto",
        10 => c"upvalue",
        _ => return None,
    })
}

/// `mem.stats()`: a fresh table of the state's counters.
unsafe extern "C-unwind" fn l_stats(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; nothing with a destructor is alive when it may raise.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"stats");
        let s = Snapshot::of(t);
        ffi::lua_createtable(L, 0, 20);
        set_int(L, c"live_bytes", s.live_bytes as i64);
        set_int(L, c"peak_bytes", s.peak_bytes as i64);
        set_int(L, c"allocs", s.allocs as i64);
        set_int(L, c"frees", s.frees as i64);
        set_int(L, c"reallocs", s.reallocs as i64);
        set_int(L, c"bytes_allocated", s.bytes_allocated as i64);
        set_int(L, c"bytes_freed", s.bytes_freed as i64);
        set_int(L, c"baseline_bytes", s.baseline_bytes as i64);
        set_int(L, c"net_blocks", s.allocs as i64 - s.frees as i64);
        set_int(L, c"arena_bytes", s.arena_bytes as i64);
        set_int(L, c"arena_live_bytes", s.arena_live_bytes as i64);
        set_int(L, c"arena_live_blocks", s.arena_live_blocks as i64);
        set_int(L, c"arena_pool_bytes", s.arena_pool_bytes as i64);
        set_int(L, c"arenas", s.arenas as i64);
        set_int(L, c"arenas_reclaimed", s.arenas_reclaimed as i64);
        set_int(L, c"arenas_skipped", s.arenas_skipped as i64);
        set_int(L, c"gc_cycles", s.gc_cycles as i64);
        set_int(L, c"buffer_bytes", s.buffer_bytes as i64);
        set_int(L, c"buffer_blocks", s.buffer_blocks as i64);
        set_int(L, c"external_bytes", s.external_bytes as i64);
        set_int(L, c"external_blocks", s.external_blocks as i64);
        #[cfg(type_tags)]
        {
            ffi::lua_createtable(L, 0, 8);
            ffi::lua_createtable(L, 0, 8);
            for slot in 0..TYPE_SLOTS {
                if let Some(name) = type_slot_name(slot) {
                    set_int(L, name, s.type_bytes[slot] as i64);
                    ffi::lua_pushinteger(L, s.type_allocs[slot] as ffi::lua_Integer);
                    ffi::lua_setfield(L, -3, name.as_ptr());
                }
            }
            ffi::lua_setfield(L, -3, c"bytes_by_type".as_ptr());
            ffi::lua_setfield(L, -2, c"allocs_by_type".as_ptr());
        }
    }
    1
}

/// `mem.reset_peak()`.
unsafe extern "C-unwind" fn l_reset_peak(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"reset_peak");
        t.reset_peak();
    }
    0
}

/// `core.live()`: `live_bytes, net_blocks` as two numbers (allocates nothing).
unsafe extern "C-unwind" fn l_live(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let (bytes, blocks) = (t.live_bytes.get(), t.net_blocks());
        ffi::lua_pushinteger(L, bytes as ffi::lua_Integer);
        ffi::lua_pushinteger(L, blocks as ffi::lua_Integer);
    }
    2
}

/// `core.gc_count_bytes()`: the state's own count, read in the same call (for tests).
unsafe extern "C-unwind" fn l_gc_count_bytes(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let t = check_tracker(L);
        let live = t.live_bytes.get();
        let counted = state::gc_count_bytes(L);
        ffi::lua_pushinteger(L, counted as ffi::lua_Integer);
        ffi::lua_pushinteger(L, live as ffi::lua_Integer);
    }
    2
}
