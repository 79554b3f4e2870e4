//! Installing the tracker on a Lua state, finding it again, and removing it when the state closes.

use std::ffi::{c_int, c_void};
use std::ptr;

use mlua::ffi::{self, lua_State};

use crate::hook::{hook_for, hook_kind, is_tracking_alloc, Serve, Tracker};

/// Registry key of the userdata whose finalizer removes the tracker when the state closes.
const SENTINEL_KEY: &std::ffi::CStr = c"lunet.mem.sentinel";

/// The state's byte count as Lua keeps it (`LUA_GCCOUNT` KiB plus `LUA_GCCOUNTB` bytes).
///
/// # Safety
/// `L` must be a valid Lua state.
pub unsafe fn gc_count_bytes(L: *mut lua_State) -> u64 {
    // SAFETY: plain API calls on a valid state; LUA_GCCOUNT(B) never allocate.
    let (kib, bytes) = unsafe {
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        {
            (
                ffi::lua_gc(L, ffi::LUA_GCCOUNT),
                ffi::lua_gc(L, ffi::LUA_GCCOUNTB),
            )
        }
        #[cfg(not(any(feature = "lua54", feature = "lua55")))]
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

/// Where new blocks come from unless `LUNET_MEM_ALLOCATOR` (`host` or `mimalloc`) says: mimalloc
/// on PUC Lua, whose host allocator is the C library's; the host's own allocator on LuaJIT, whose
/// built-in allocator is fast and must get its arena back at `lua_close` (see [`uninstall`]).
pub fn default_serve() -> Serve {
    match std::env::var("LUNET_MEM_ALLOCATOR").as_deref() {
        Ok("host") => Serve::Host,
        Ok("mimalloc") => Serve::Mimalloc,
        _ if cfg!(feature = "luajit") => Serve::Host,
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
        &*tracker
    };
    if serve == Serve::Host {
        // SAFETY: valid state with stack room; allocations from here on are tracked.
        unsafe {
            ffi::lua_newuserdata(L, 1);
            ffi::lua_createtable(L, 0, 1);
            ffi::lua_pushcfunction(L, uninstall);
            ffi::lua_setfield(L, -2, c"__gc".as_ptr());
            ffi::lua_setmetatable(L, -2);
            ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, SENTINEL_KEY.as_ptr());
        }
    }
    tracker
}

/// Finalizer of the sentinel (host mode only): gives the state its own allocator back and frees
/// the tracker.
///
/// Runs inside `lua_close` (every version runs all finalizers there, before freeing the
/// remaining objects), so the frees that follow go straight to the host allocator, which made
/// every block. LuaJIT then sees its own allocator again and releases its arena as usual. With
/// mimalloc serving, blocks must keep coming to the hook, which frees the tracker with the
/// state's last block instead. If something wrapped our hook in the meantime, it stays too.
unsafe extern "C-unwind" fn uninstall(L: *mut lua_State) -> c_int {
    let mut ud: *mut c_void = ptr::null_mut();
    // SAFETY: valid state (called by Lua as a finalizer).
    let f = unsafe { ffi::lua_getallocf(L, &mut ud) };
    if hook_kind(f) == Some(Serve::Host) && !ud.is_null() {
        // SAFETY: `ud` is the Box made by `install`; after `lua_setallocf` nothing reaches it.
        unsafe {
            let tracker = Box::from_raw(ud as *mut Tracker);
            ffi::lua_setallocf(L, tracker.host_alloc, tracker.host_ud);
            drop(tracker);
        }
    }
    0
}
