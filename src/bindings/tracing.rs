//! `core.trace_*`, wrapped by `mem.trace` in lua/lunet/mem.lua, which checks the arguments: the
//! Lua side of `crate::trace`. None of these raises but for memory errors: failures return
//! `nil, message`.

use std::ffi::{c_int, CStr};
use std::ptr;

use mlua::ffi::{self, lua_State};

use super::errors::{push_owned, rethrow, try_push};
use super::{push_str, register, to_string};
use crate::hook::Tracker;
use crate::state;
use crate::trace::{Busy, Key, Snapshot, Stat, MAX_DEPTH};
use crate::udata;

/// # Safety
/// `L` valid.
unsafe fn tracker_of<'a>(L: *mut lua_State) -> Option<&'a Tracker> {
    // SAFETY: valid state.
    unsafe { state::tracker(L) }
}

/// # Safety
/// `L` valid with 2 free slots; pushes `nil, msg` and returns 2.
unsafe fn fail(L: *mut lua_State, msg: &str) -> c_int {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_pushnil(L);
        push_str(L, msg);
    }
    2
}

/// The main thread of `L`'s state if it can be known.
///
/// # Safety
/// `L` valid with 2 free slots.
unsafe fn main_thread(L: *mut lua_State) -> *mut lua_State {
    // SAFETY: valid state; pushes one value and pops it.
    unsafe {
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        {
            let is_main = ffi::lua_pushthread(L) == 1;
            ffi::lua_pop(L, 1);
            if is_main {
                L
            } else {
                ptr::null_mut()
            }
        }
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        {
            ffi::lua_rawgeti(L, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_MAINTHREAD);
            let main = ffi::lua_tothread(L, -1);
            ffi::lua_pop(L, 1);
            main
        }
    }
}

/// `core.trace_start(depth, sample_bytes)`: true, or false if tracing was on already.
unsafe extern "C-unwind" fn l_start(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with two integers (checked by mem.lua).
    unsafe {
        let Some(t) = tracker_of(L) else {
            return fail(L, "lunet.mem: the tracking allocator is not installed");
        };
        if t.trace.on.get() {
            ffi::lua_pushboolean(L, 0);
            return 1;
        }
        let depth = ffi::lua_tointeger(L, 1).clamp(1, MAX_DEPTH as _) as usize;
        let sample = ffi::lua_tointeger(L, 2).max(0) as u64;
        #[cfg(feature = "luajit")]
        if t.vm.get().is_none() {
            return fail(
                L,
                "mem.trace cannot read this LuaJIT's stacks safely (unknown internal layout)",
            );
        }
        let main = main_thread(L);
        t.trace.paused.set(false);
        t.trace.start(L, main, depth, sample);
        crate::state::set_traced(L, true);
        ffi::lua_pushboolean(L, 1);
        1
    }
}

/// `core.trace_stop()`: ends recording and drops the records.
unsafe extern "C-unwind" fn l_stop(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        if let Some(t) = tracker_of(L) {
            crate::state::set_traced(L, false);
            t.trace.stop();
        }
    }
    0
}

/// `core.trace_is_on()`.
unsafe extern "C-unwind" fn l_is_on(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let on = tracker_of(L).is_some_and(|t| t.trace.on.get());
        ffi::lua_pushboolean(L, on as c_int);
    }
    1
}

/// `core.trace_snapshot()`: a snapshot userdata, or `nil, msg` when not tracing.
unsafe extern "C-unwind" fn l_snapshot(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua. The snapshot is built (Rust memory) while `busy` is held, which
    // ends before anything can raise; the userdata's own allocation is not recorded (`paused`).
    unsafe {
        let Some(t) = tracker_of(L) else {
            return fail(L, "lunet.mem: the tracking allocator is not installed");
        };
        if !t.trace.on.get() {
            return fail(L, "not tracing (call mem.trace.start() first)");
        }
        let ready = match Busy::enter(&t.trace.busy) {
            Some(busy) => t.trace.recorder(&busy).is_some(),
            None => false,
        };
        if !ready {
            return fail(L, "the tracer is busy");
        }
        t.trace.paused.set(true);
        // (the snapshot is made once its userdata exists: nothing is lost if that raises)
        udata::push(L, || {
            let busy = Busy::enter(&t.trace.busy).expect("not busy: checked above");
            t.trace.recorder(&busy).expect("checked above").snapshot()
        });
        t.trace.paused.set(false);
    }
    1
}

impl udata::Boxed for Snapshot {
    const METATABLE: &'static CStr = c"lunet.mem.trace_snapshot";
    const NAME: &'static CStr = c"snapshot";
    const TAG: u64 = 0x6c75_6e65_7473_6e31;
}
/// `core.trace_is_snapshot(v)`.
unsafe extern "C-unwind" fn l_is_snapshot(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe {
        let is = udata::test::<Snapshot>(L, 1).is_some();
        ffi::lua_pushboolean(L, is as c_int);
    }
    1
}

/// `core.trace_top(snap, n, key)`: a list of `{site=, bytes=, blocks=}` (and `traceback=` for
/// the traceback key), biggest first, at most `n` (n < 0: all).
unsafe extern "C-unwind" fn l_top(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua with a snapshot, an integer and "line" | "function" | "traceback"
    // (checked by mem.lua). Rust values are dropped before anything that can raise.
    unsafe {
        let Some(snap) = udata::test::<Snapshot>(L, 1) else {
            return fail(L, "snapshot expected");
        };
        let n = ffi::lua_tointeger(L, 2);
        let mut len = 0;
        let key = ffi::lua_tolstring(L, 3, &mut len);
        let key = if key.is_null() {
            Key::Line
        } else {
            match std::slice::from_raw_parts(key as *const u8, len) {
                b"function" => Key::Function,
                b"traceback" => Key::Traceback,
                _ => Key::Line,
            }
        };
        let mut stats = snap.top(key);
        if n >= 0 && (n as usize) < stats.len() {
            stats.truncate(n as usize);
        }
        // Built in protected mode: a memory error is raised once `stats` is dropped.
        let tracker = tracker_of(L);
        if let Some(t) = tracker {
            t.trace.paused.set(true);
        }
        let ok = try_push(L, stats, |stats| push_stats(L, stats, key));
        if let Some(t) = tracker {
            t.trace.paused.set(false);
        }
        if !ok {
            rethrow(L);
        }
    }
    1
}

/// Pushes the list `l_top` returns.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
unsafe fn push_stats(L: *mut lua_State, stats: &[Stat], key: Key) {
    // SAFETY: valid state.
    unsafe {
        ffi::luaL_checkstack(L, 6, ptr::null());
        ffi::lua_createtable(L, stats.len() as c_int, 0);
        for (i, s) in stats.iter().enumerate() {
            ffi::lua_createtable(L, 0, 4);
            push_str(L, &s.site);
            ffi::lua_setfield(L, -2, c"site".as_ptr());
            ffi::lua_pushinteger(L, s.bytes.round() as ffi::lua_Integer);
            ffi::lua_setfield(L, -2, c"bytes".as_ptr());
            ffi::lua_pushinteger(L, s.blocks.round() as ffi::lua_Integer);
            ffi::lua_setfield(L, -2, c"blocks".as_ptr());
            if key == Key::Traceback {
                ffi::lua_createtable(L, s.traceback.len() as c_int, 0);
                for (j, f) in s.traceback.iter().enumerate() {
                    push_str(L, f);
                    ffi::lua_rawseti(L, -2, (j + 1) as _);
                }
                ffi::lua_setfield(L, -2, c"traceback".as_ptr());
            }
            ffi::lua_rawseti(L, -2, (i + 1) as _);
        }
    }
}

/// What `write_out` writes.
#[derive(Clone, Copy)]
enum Output {
    Folded,
    FlameGraph,
    Pprof,
}

/// `core.trace_dump(snap, path)` / `core.trace_flamegraph(snap, path, title)` /
/// `core.trace_pprof(snap, path)`: true, or `nil, msg`.
unsafe fn write_out(L: *mut lua_State, output: Output) -> c_int {
    // SAFETY: called by Lua with a snapshot and strings (checked by mem.lua); the Rust strings
    // are dropped before anything can raise.
    unsafe {
        let Some(snap) = udata::test::<Snapshot>(L, 1) else {
            return fail(L, "snapshot expected");
        };
        let path = to_string(L, 2).unwrap_or_default();
        let result = match output {
            Output::FlameGraph => {
                let title = to_string(L, 3).unwrap_or_default();
                let title = if title.is_empty() {
                    "Live bytes by Lua stack".to_string()
                } else {
                    title
                };
                snap.flamegraph(&path, &title)
            }
            Output::Folded => snap.dump(&path),
            Output::Pprof => snap.pprof(&path),
        };
        let error = result.err().map(|e| format!("{path}: {e}"));
        drop(path);
        match error {
            None => {
                ffi::lua_pushboolean(L, 1);
                1
            }
            Some(msg) => {
                // (a memory error is raised once `msg` is dropped)
                push_owned(L, msg, |msg: &String| push_str(L, msg));
                ffi::lua_pushnil(L);
                ffi::lua_insert(L, -2);
                2
            }
        }
    }
}

unsafe extern "C-unwind" fn l_dump(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { write_out(L, Output::Folded) }
}

unsafe extern "C-unwind" fn l_flamegraph(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { write_out(L, Output::FlameGraph) }
}

unsafe extern "C-unwind" fn l_pprof(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua.
    unsafe { write_out(L, Output::Pprof) }
}

/// `core.trace_site_of(v)`: the line that allocated the object `v` (a table, function or
/// thread: `lua_topointer` gives their block), if tracing recorded it; else nil. The leak report
/// uses it to name the allocating line of what a leaking function left alive.
unsafe extern "C-unwind" fn l_site_of(L: *mut lua_State) -> c_int {
    // SAFETY: called by Lua; only the recorder's map is read, under `busy`.
    unsafe {
        let addr = match ffi::lua_type(L, 1) {
            ffi::LUA_TTABLE | ffi::LUA_TFUNCTION | ffi::LUA_TTHREAD => {
                ffi::lua_topointer(L, 1) as usize
            }
            _ => 0,
        };
        let line = match tracker_of(L) {
            Some(t) if addr != 0 && t.trace.on.get() => match Busy::enter(&t.trace.busy) {
                Some(busy) => t.trace.recorder(&busy).and_then(|rec| rec.line_of(addr)),
                None => None,
            },
            _ => None,
        };
        match line {
            // (a memory error while the string is made is raised once `line` is dropped)
            Some(line) => {
                push_owned(L, line, |line: &String| push_str(L, line));
            }
            None => ffi::lua_pushnil(L),
        }
    }
    1
}

/// Adds the `trace_*` functions and `trace_snapshot_mt` to the `core` table on top of the stack.
///
/// # Safety
/// `L` valid with 4 free slots, the core table on top. May raise (memory).
pub(super) unsafe fn open(L: *mut lua_State) {
    // SAFETY: valid state, table on top.
    unsafe {
        register(
            L,
            &[
                (c"trace_site_of", l_site_of),
                (c"trace_start", l_start),
                (c"trace_stop", l_stop),
                (c"trace_is_on", l_is_on),
                (c"trace_snapshot", l_snapshot),
                (c"trace_is_snapshot", l_is_snapshot),
                (c"trace_top", l_top),
                (c"trace_dump", l_dump),
                (c"trace_flamegraph", l_flamegraph),
                (c"trace_pprof", l_pprof),
            ],
        );
        udata::new_metatable::<Snapshot>(L);
        ffi::lua_setfield(L, -2, c"trace_snapshot_mt".as_ptr());
    }
}
