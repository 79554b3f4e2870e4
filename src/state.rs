//! Installing the tracker on a Lua state, finding it again, and removing it when the state closes.

use std::ffi::{c_int, c_void};
use std::ptr;

use mlua::ffi::{self, lua_State};

use crate::hook::{hook_for, is_tracking_alloc, Serve, Tracker};

/// Registry key of the userdata whose finalizer removes the tracker when the state closes.
const SENTINEL_KEY: &std::ffi::CStr = c"lunet.mem.sentinel";

/// The state's byte count as Lua keeps it (`LUA_GCCOUNT` KiB plus `LUA_GCCOUNTB` bytes).
///
/// # Safety
/// `L` must be a valid Lua state.
pub unsafe fn gc_count_bytes(L: *mut lua_State) -> u64 {
    // SAFETY: plain API calls on a valid state; LUA_GCCOUNT(B) never allocate.
    let (kib, bytes) = unsafe {
        #[cfg(lua54_gc)]
        {
            (
                ffi::lua_gc(L, ffi::LUA_GCCOUNT),
                ffi::lua_gc(L, ffi::LUA_GCCOUNTB),
            )
        }
        #[cfg(not(lua54_gc))]
        {
            (
                ffi::lua_gc(L, ffi::LUA_GCCOUNT, 0),
                ffi::lua_gc(L, ffi::LUA_GCCOUNTB, 0),
            )
        }
    };
    (kib as u32 as u64) * 1024 + bytes as u32 as u64
}

/// The tracker installed on `L`, if the state's allocator is this library's hook.
///
/// # Safety
/// `L` must be a valid Lua state. The reference must not outlive the state's allocator setting.
pub unsafe fn tracker<'a>(L: *mut lua_State) -> Option<&'a Tracker> {
    let mut ud: *mut c_void = ptr::null_mut();
    // SAFETY: valid state.
    let f = unsafe { ffi::lua_getallocf(L, &mut ud) };
    if is_tracking_alloc(f) && !ud.is_null() {
        // SAFETY: our hook is only ever installed with a live Tracker as `ud` (see `install`).
        Some(unsafe { &*(ud as *const Tracker) })
    } else {
        None
    }
}

/// Where new blocks come from: mimalloc, unless `LUNET_MEM_ALLOCATOR=host` says to forward every
/// call to the host allocator.
pub fn default_serve() -> Serve {
    match std::env::var("LUNET_MEM_ALLOCATOR").as_deref() {
        Ok("host") => Serve::Host,
        _ => Serve::Mimalloc,
    }
}

/// Wraps the state's allocator with the tracking hook, unless it is wrapped already.
///
/// The baseline is read just before `lua_setallocf`, with no allocation in between, so that
/// `live_bytes` equals the state's own count from then on. How the tracker ends: see
/// [`uninstall`] (host mode) and the hook's last free (`crate::hook`).
///
/// # Safety
/// `L` must be a valid Lua state with at least 3 free stack slots. May raise a Lua error (memory).
pub unsafe fn install<'a>(L: *mut lua_State, serve: Serve) -> &'a Tracker {
    // SAFETY: valid state.
    if let Some(t) = unsafe { tracker(L) } {
        return t;
    }
    let mut host_ud: *mut c_void = ptr::null_mut();
    // SAFETY: valid state; reading the baseline and swapping the allocator allocate nothing.
    let tracker = unsafe {
        let host = ffi::lua_getallocf(L, &mut host_ud);
        let baseline = gc_count_bytes(L);
        let tracker = Box::into_raw(Box::new(Tracker::new(host, host_ud, baseline)));
        ffi::lua_setallocf(L, hook_for(serve), tracker.cast());
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        {
            // (the registry's main-thread slot: a lookup, no allocation)
            ffi::lua_rawgeti(L, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_MAINTHREAD);
            (*tracker).main_thread.set(ffi::lua_tothread(L, -1));
            ffi::lua_pop(L, 1);
        }
        &*tracker
    };
    // SAFETY: valid state with stack room; allocations from here on are tracked.
    unsafe { push_sentinel(L) };
    tracker
}

/// Anchors a new sentinel in the registry: a userdata whose finalizer is [`uninstall`].
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
unsafe fn push_sentinel(L: *mut lua_State) {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_newuserdata(L, 1);
        ffi::lua_createtable(L, 0, 1);
        ffi::lua_pushcfunction(L, uninstall);
        ffi::lua_setfield(L, -2, c"__gc".as_ptr());
        ffi::lua_setmetatable(L, -2);
        ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, SENTINEL_KEY.as_ptr());
    }
}

/// Finalizer of the sentinel: ends the tracker when the state closes.
///
/// Every version runs all finalizers inside `lua_close`, before freeing the remaining objects,
/// with the main thread as `L`, and the registry still holds the sentinel then. With host
/// serving, the state gets its own allocator back at once: the frees that follow go straight to
/// the host allocator, which made every block (and LuaJIT then releases its arena as usual).
/// With mimalloc serving, or with arena blocks live, blocks must keep coming to the hook until
/// the last of ours is freed; the tracker is marked closing and the hook does the same then. If the sentinel was
/// collected without a close (someone cleared its registry entry), a new one takes its place.
unsafe extern "C-unwind" fn uninstall(L: *mut lua_State) -> c_int {
    // SAFETY: valid state (called by Lua as a finalizer, the sentinel at index 1).
    unsafe {
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, SENTINEL_KEY.as_ptr());
        // `lua_close` runs finalizers with no Lua frame below them; a call by hand (the
        // registry is reachable from Lua) has its caller there, and changes nothing.
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        let closing = ffi::lua_rawequal(L, -1, 1) != 0 && ffi::lua_getstack(L, 1, &mut ar) == 0;
        let by_hand = ffi::lua_rawequal(L, -1, 1) != 0 && !closing;
        ffi::lua_pop(L, 1);
        if by_hand {
            return 0;
        }
        if !closing {
            ffi::luaL_checkstack(L, 3, ptr::null());
            push_sentinel(L);
            return 0;
        }
        let mut ud: *mut c_void = ptr::null_mut();
        let f = ffi::lua_getallocf(L, &mut ud);
        if !is_tracking_alloc(f) {
            return 0;
        }
        let tracker = &*(ud as *const Tracker);
        if tracker.own_blocks() > 0 {
            tracker.closing.set(L);
            return 0;
        }
        // `ud` is the Box made by `install`; after `lua_setallocf` nothing reaches it.
        let tracker = Box::from_raw(ud as *mut Tracker);
        ffi::lua_setallocf(L, tracker.host_alloc, tracker.host_ud);
        drop(tracker);
    }
    0
}
