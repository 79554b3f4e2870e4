//! Arenas: `core.arenas()`, `mem.arena_of(v)`, and the GC cycle counter arenas measure their
//! age with.

use std::ffi::{c_int, CStr};
use std::ptr;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use super::errors::{check_tracker, no_arguments, push_owned, raise, type_error};
use super::scopes::sweep_lost_records;
use super::{push_str, register, set_int};
use crate::arena;
use crate::hook::Tracker;
use crate::state;

/// Adds `arenas` and `arena_of` to the `core` table on top.
///
/// # Safety
/// `L` valid with 2 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: forwarded contract.
    unsafe {
        register(
            L,
            &[
                (c"arenas", l_arenas),
                (c"arena_of", l_arena_of),
                (c"adaptive_arenas", l_adaptive_arenas),
                (c"keep_gc_ticking", l_keep_gc_ticking),
            ],
        )
    }
}

/// Registers the GC cycle counter's metatable and arms the first counter, unless one runs.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
pub(super) unsafe fn start_gc_ticks(L: *mut lua_State, t: &Tracker) {
    // SAFETY: valid state.
    unsafe {
        if !t.gc_ticking.get() {
            ffi::lua_createtable(L, 0, 1);
            ffi::lua_pushcfunction(L, l_gc_tick);
            ffi::lua_setfield(L, -2, c"__gc".as_ptr());
            ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, GC_TICK_MT.as_ptr());
            arm_gc_tick(L, t);
        }
    }
}

/// `core.arenas()`: an array of the arenas not reclaimed, newest first, each a table with
/// `name`, `live_bytes`, `live_blocks`, `live_objects`, `blocks`, `reserved_bytes`, `running`
/// (its scope has not ended), `age` (GC cycles since the scope ended, 0 while it runs) and
/// `pinned` (age >= 2 and objects live: a whole cycle began and ended after the scope did, and
/// objects the scope made are still alive).
unsafe extern "C-unwind" fn l_arenas(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua. The list is copied first: building the tables may run the
    // collector, which frees blocks and reclaims arenas. The tables are built in protected mode
    // and a memory error is raised once the copy is dropped.
    unsafe {
        let t = check_tracker(L);
        no_arguments(L, c"arenas");
        keep_gc_ticking(L, t); // (the arenas' ages)
        let list = t.arenas.list();
        push_owned(L, list, |list| push_arena_list(L, list));
    }
    1
}

/// `core.adaptive_arenas([on])`: whether a route whose arenas keep outliving their requests
/// runs without them (see `arena::Routes`; on by default). With a boolean, sets it; returns the
/// setting as it was.
unsafe extern "C-unwind" fn l_adaptive_arenas(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; nothing with a destructor is alive when it raises.
    unsafe {
        let t = check_tracker(L);
        let was = t.arenas.routes.adaptive.get();
        match ffi::lua_type(L, 1) {
            ffi::LUA_TNONE => {}
            ffi::LUA_TBOOLEAN => t.arenas.routes.adaptive.set(ffi::lua_toboolean(L, 1) != 0),
            _ => type_error(L, 1, c"adaptive_arenas", c"boolean"),
        }
        ffi::lua_pushboolean(L, c_int::from(was));
    }
    1
}

/// Pushes the array of tables `l_arenas` returns.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
unsafe fn push_arena_list(L: *mut lua_State, list: &[arena::ArenaInfo]) {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_createtable(L, list.len().min(1 << 20) as c_int, 0);
        for (i, a) in list.iter().enumerate() {
            ffi::lua_createtable(L, 0, 9);
            push_str(L, &a.name);
            ffi::lua_setfield(L, -2, c"name".as_ptr());
            set_int(L, c"live_bytes", a.live_bytes as i64);
            set_int(L, c"live_blocks", a.live_blocks as i64);
            set_int(L, c"live_objects", a.live_objects as i64);
            set_int(L, c"blocks", a.blocks as i64);
            set_int(L, c"reserved_bytes", a.reserved_bytes as i64);
            set_int(L, c"age", a.age.unwrap_or(0) as i64);
            ffi::lua_pushboolean(L, a.age.is_none() as c_int);
            ffi::lua_setfield(L, -2, c"running".as_ptr());
            ffi::lua_pushboolean(L, a.pinned() as c_int);
            ffi::lua_setfield(L, -2, c"pinned".as_ptr());
            ffi::lua_rawseti(L, -2, (i + 1) as _);
        }
    }
}

/// `mem.arena_of(v)`: the name of the arena that holds the object `v` (a table, function,
/// thread or full userdata; a string on Lua 5.4 and LuaJIT, where `lua_topointer` sees strings),
/// or nil. Raises if the object is in reclaimed arena memory, which the arenas never allow: a
/// check for the tests, and for users who doubt.
unsafe extern "C-unwind" fn l_arena_of(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; only blocks of live objects are looked at (light userdata, which
    // can point anywhere, are not).
    unsafe {
        check_tracker(L);
        if ffi::lua_type(L, 1) == ffi::LUA_TNONE {
            raise(L, c"bad argument #1 to 'arena_of' (value expected)");
        }
        let p = match ffi::lua_type(L, 1) {
            ffi::LUA_TTABLE | ffi::LUA_TFUNCTION | ffi::LUA_TTHREAD | ffi::LUA_TSTRING => {
                ffi::lua_topointer(L, 1) as *const u8
            }
            // A full userdata's pointer is its payload, after the header in the same block: for
            // an empty payload that is the block's end, possibly the next chunk's start. The
            // header's last byte is always in the block.
            ffi::LUA_TUSERDATA => (ffi::lua_topointer(L, 1) as *const u8).wrapping_sub(1),
            _ => ptr::null(),
        };
        if p.is_null() {
            ffi::lua_pushnil(L);
            return 1;
        }
        match arena::owner(p.cast()) {
            arena::Owner::Elsewhere => ffi::lua_pushnil(L),
            arena::Owner::Arena(a) => {
                // (the name is held while the string is made, which may run the collector and
                // reclaim the arena; a memory error is raised once it is dropped)
                push_owned(L, a.name.clone(), |name: &Rc<str>| push_str(L, name));
            }
            arena::Owner::Reclaimed => raise(
                L,
                c"lunet.mem: a live object is in reclaimed arena memory (a bug: please report it)",
            ),
        }
    }
    1
}

/// Registry key of a table with weak keys whose keys are the counters armed and not freed yet.
/// A key stays while its counter waits for its finalizer (Lua clears weak values then, weak
/// keys only once the object is freed), so a counter found there is armed, or about to count.
const GC_TICKS: &CStr = c"lunet.mem.gc_ticks";

/// The hash size of that table, and the keys that hold half of it (see `arm_gc_tick`).
const GC_TICKS_SLOTS: c_int = 16;
const GC_TICKS_PADS: [&CStr; 8] = [c"1", c"2", c"3", c"4", c"5", c"6", c"7", c"8"];

/// Whether the counter armed last is still to be collected or finalized. A counter can die
/// without its finalizer running: Lua 5.1 to 5.3 drop a finalizer whose call fails (no memory
/// for its stack, as when a budget or `fail_after` refuses the growth), and the counting would
/// stop for good.
///
/// # Safety
/// `L` valid with 3 free slots.
pub(super) unsafe fn gc_tick_alive(L: *mut lua_State, t: &Tracker) -> bool {
    // SAFETY: valid state; the table's type is checked (the registry is reachable from Lua).
    unsafe {
        let top = ffi::lua_gettop(L);
        let mut alive = false;
        if ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, GC_TICKS.as_ptr()) == ffi::LUA_TTABLE {
            ffi::lua_pushnil(L);
            while ffi::lua_next(L, -2) != 0 {
                ffi::lua_pop(L, 1);
                if ffi::lua_topointer(L, -1) as usize == t.gc_tick.get() {
                    alive = true;
                    break;
                }
            }
        }
        ffi::lua_settop(L, top);
        alive
    }
}

/// Arms a new GC cycle counter if none is armed, or if the one armed last died without its
/// finalizer being run, which only a refused allocation can make happen: it is looked for only
/// when a budget (or the host allocator) refused one since the last look (see
/// `Tracker::tick_in_doubt`). Not where a raise would break a promise: when a
/// scope closes, for one (Lua 5.2 and 5.3 raise a finalizer's error, such as the memory error
/// of a call refused by a used-up budget, from whatever allocation ran the collection step).
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
pub(super) unsafe fn keep_gc_ticking(L: *mut lua_State, t: &Tracker) {
    // SAFETY: forwarded contract.
    unsafe {
        if !t.gc_ticking.get() || (t.tick_in_doubt.replace(false) && !gc_tick_alive(L, t)) {
            arm_gc_tick(L, t);
        }
    }
}

/// `core.keep_gc_ticking()`: [`keep_gc_ticking`], for `mem.settle` (whose collections then
/// count, and sweep lost thread records).
unsafe extern "C-unwind" fn l_keep_gc_ticking(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; nothing with a destructor is alive when it raises.
    unsafe {
        let t = check_tracker(L);
        ffi::luaL_checkstack(L, 3, ptr::null());
        keep_gc_ticking(L, t);
    }
    0
}

/// Registry key of the metatable of the GC cycle counter.
const GC_TICK_MT: &CStr = c"lunet.mem.gc_tick";

/// Makes a new unreachable userdata whose finalizer is [`l_gc_tick`].
///
/// # Safety
/// `L` valid with 2 free slots, the metatable registered. May raise (memory).
pub(super) unsafe fn arm_gc_tick(L: *mut lua_State, t: &Tracker) {
    // SAFETY: valid state; the metatable's type is checked (the registry is reachable from Lua).
    unsafe {
        let was = t.begin_exempt(); // (the module's bookkeeping)
        ffi::lua_newuserdata(L, 0);
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, GC_TICK_MT.as_ptr());
        let armed = ffi::lua_type(L, -1) == ffi::LUA_TTABLE;
        if armed {
            ffi::lua_setmetatable(L, -2);
            // Kept where `gc_tick_alive` looks, weakly.
            if ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, GC_TICKS.as_ptr()) != ffi::LUA_TTABLE {
                ffi::lua_pop(L, 1);
                // Its size must not move with the counters in it (a measurement would see the
                // table grow or shrink between its readings): string keys, which a weak table
                // never drops, keep at least 8 of its 16 slots in use, so that a rehash (one
                // counter freed, another set) finds the same size.
                ffi::lua_createtable(L, 0, GC_TICKS_SLOTS);
                for pad in GC_TICKS_PADS {
                    ffi::lua_pushboolean(L, 1);
                    ffi::lua_setfield(L, -2, pad.as_ptr());
                }
                ffi::lua_createtable(L, 0, 1);
                ffi::lua_pushstring(L, c"k".as_ptr());
                ffi::lua_setfield(L, -2, c"__mode".as_ptr());
                ffi::lua_setmetatable(L, -2);
                ffi::lua_pushvalue(L, -1);
                ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, GC_TICKS.as_ptr());
            }
            ffi::lua_pushvalue(L, -2);
            ffi::lua_pushboolean(L, 1);
            ffi::lua_rawset(L, -3);
            ffi::lua_pop(L, 1);
            t.gc_tick.set(ffi::lua_topointer(L, -1) as usize);
        } else {
            ffi::lua_pop(L, 1);
        }
        ffi::lua_pop(L, 1);
        t.end_exempt(was);
        t.gc_ticking.set(armed);
    }
}

/// Finalizer of the GC cycle counter: a cycle ended (the counter was unreachable in it); counts
/// it and arms a new counter for the next cycle. Arenas measure their age with it.
unsafe extern "C-unwind" fn l_gc_tick(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua as a finalizer (or by hand: then only for a counter).
    unsafe {
        if !is_gc_tick(L) {
            return 0;
        }
        if let Some(t) = state::tracker(L) {
            if ffi::lua_topointer(L, 1) as usize != t.gc_tick.get() {
                return 0; // (one replaced by `make_scope` as lost: see `gc_tick_alive`)
            }
            t.gc_cycles.set(t.gc_cycles.get() + 1);
            sweep_lost_records(L, t);
            t.arenas.tick();
            // Not armed until the new counter exists: if making it fails (out of memory), the
            // next scope opened arms one.
            t.gc_ticking.set(false);
            // (The slots are the module's bookkeeping, never refused by a budget; if they
            // cannot be had, the finalizer raises nothing: Lua 5.2 and 5.3 would report it as
            // an error of the collection, in whatever code triggered it (fuzzer seed 93 on
            // lua5.2, where a collection shrinks the stack under a used-up fail_after).)
            let was = t.begin_exempt();
            let room = ffi::lua_checkstack(L, 2) != 0;
            t.end_exempt(was);
            if t.closing.get().is_null() && room {
                // (The new counter is nobody's: not counted for, nor placed in the arena of,
                // the scope that happens to be active during the collection.)
                arm_gc_tick(L, t);
            }
        }
    }
    0
}

/// Whether argument 1 is a GC cycle counter (a zero-size userdata with its metatable).
///
/// # Safety
/// `L` valid with 2 free slots.
unsafe fn is_gc_tick(L: *mut lua_State) -> bool {
    // SAFETY: valid state.
    unsafe {
        if ffi::lua_type(L, 1) != ffi::LUA_TUSERDATA
            || ffi::lua_rawlen(L, 1) != 0
            || ffi::lua_getmetatable(L, 1) == 0
        {
            return false;
        }
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, GC_TICK_MT.as_ptr());
        let same = ffi::lua_rawequal(L, -1, -2) != 0;
        ffi::lua_pop(L, 2);
        same
    }
}
