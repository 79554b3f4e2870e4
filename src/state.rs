//! The tracker's life on a Lua state: installed, serving, closing, handed back. This module
//! installs the hook (its exported entries are here, recognised by their addresses), finds the
//! tracker again from a state, and ends it; the counting itself is `crate::hook`'s.
//!
//! ```text
//!            install (lua_setallocf: our entry, the Tracker as `ud`)
//!   (none) ---------------------------------------------------------> Serving
//!                                                                        |
//!       lua_close runs the sentinel's finalizer ([`uninstall`]):        |
//!         no block of ours live (host serving, no arena block) ---------+----------> HandedBack
//!         blocks of ours live: `Tracker::closing` set ------------------+--> Closing     ^
//!                                                                               |         |
//!       the last block of ours freed ([`after_free`] -> `finish_close`) --------+---------+
//!
//!   Serving or Closing --(the free that brings `live_bytes` to 0: another allocator wrapped
//!                         ours, so it could not be handed back)--> Freed (tracker dropped, the
//!                         state is gone: no call can follow)
//! ```
//!
//! HandedBack: the state has its host allocator again and the tracker is dropped. Every block
//! goes back to the allocator that made it (host blocks to the host allocator, ours to the hook
//! until the last is freed), which is why a tracker closes in two steps.
//!
//! Lua 5.5 never hands back: an external string keeps the allocator it was made with (lauxlib's
//! finished buffers, and any C code's, take it from `lua_getallocf`: the hook, with the tracker
//! as `ud`) and frees its body through it after every finalizer of `lua_close` ran, with
//! nothing to tell the hook how many are left. The tracker stays until the state's last block
//! (Serving or Closing -> Freed).

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use mlua::ffi::{self, lua_State};

use crate::hook::{counted, traced, LuaAlloc, Tracker};

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
    // (libc's getenv, not `std::env::var`: std's environment code sits far from the rest of
    // the code the module runs when it loads, and running it would fault in 128 KiB more of
    // the library's text, see *Benchmark* in the README)
    // SAFETY: a NUL-terminated name. (As every getenv, it races with a setenv on another
    // thread; std's lock would not stop C code's setenv either; the module sets none.)
    let value = unsafe { libc::getenv(c"LUNET_MEM_ALLOCATOR".as_ptr()) };
    // SAFETY: getenv's result is null or a NUL-terminated string, read at once.
    if !value.is_null() && unsafe { CStr::from_ptr(value) }.to_bytes() == b"host" {
        Serve::Host
    } else {
        Serve::Mimalloc
    }
}

/// Wraps the state's allocator with the tracking hook, unless it is wrapped already.
///
/// The baseline is read just before `lua_setallocf`, with no allocation in between, so that
/// `live_bytes` equals the state's own count from then on. How the tracker ends: see the module
/// doc ([`uninstall`], [`after_free`]).
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
        #[cfg(feature = "luajit")]
        (*tracker).budget_hook.set_handler(budget_hook);
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
/// the last of ours is freed; the tracker is marked closing and [`after_free`] does the same
/// then. If the sentinel was collected without a close (someone cleared its registry entry), a
/// new one takes its place.
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
        if !may_hand_back(tracker) {
            // The thread that finishes the close later must outlive every other object: the
            // main thread (PUC Lua runs close's finalizers on it; a current LuaJIT on a thread
            // of its own, freed before the last of our blocks).
            #[cfg(feature = "luajit")]
            let main = tracker.vm.get().map_or(L, |vm| vm.main_thread());
            #[cfg(not(feature = "luajit"))]
            let main = L;
            tracker.closing.set(main);
            return 0;
        }
        // `ud` is the Box made by `install`; after `lua_setallocf` nothing reaches it.
        let tracker = Box::from_raw(ud as *mut Tracker);
        ffi::lua_setallocf(L, tracker.host_alloc, tracker.host_ud);
        drop(tracker);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Serving: the hook's exported entries, and how a state's allocator is recognised as ours.

/// Where the hook gets new blocks from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Serve {
    /// Every call goes to the allocator the host installed.
    Host,
    /// New blocks come from mimalloc; blocks made before the hook was installed still go back
    /// to the host allocator (ownership is told by `mi_is_in_heap_region`). Faster than glibc's
    /// malloc for Lua's small blocks, which pays for the counting.
    Mimalloc,
}

/// The body of both hooks ([`lunet_mem_alloc_host`], [`lunet_mem_alloc_mimalloc`]): serve the
/// call and count what succeeded (`crate::hook::counted`), then end the tracker if that was its
/// last block ([`after_free`]).
///
/// The `lua_Alloc` contract (Lua's `lmem.c`): `ptr == NULL` asks for a new block of `nsize`
/// bytes, and `osize` is then a type tag (Lua 5.2+) or 0, never a size; `nsize == 0` frees `ptr`
/// (a block of `osize` bytes) and must return NULL; otherwise the block of `osize` bytes moves to
/// `nsize` bytes. A NULL result means failure and leaves the old block untouched, so counters move
/// only when the allocation succeeded.
///
/// How the tracker ends: in `lua_close`, the sentinel's finalizer gives the state its own
/// allocator back (host serving, no arena block live), or marks the tracker closing and the hook
/// does it once no block of ours is live. If neither could (another allocator wrapped ours),
/// the free that brings `live_bytes` to 0 frees the tracker: that is the state's last block (its
/// main thread and global state, freed last by `lua_close`), and no call can follow.
///
/// # Safety
/// `ud` must be a live `Tracker` made by [`install`], and the call must follow the
/// `lua_Alloc` contract (Lua itself guarantees this).
#[inline(always)]
unsafe fn hook<const MIMALLOC: bool>(
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // SAFETY: the caller guarantees `ud` is a live Tracker.
    let tracker = unsafe { &*(ud as *const Tracker) };
    // (Tracing costs this hook nothing: `mem.trace.start` installs the traced hooks instead.)
    // SAFETY: forwarded contract.
    let result = unsafe { counted::<MIMALLOC>(tracker, ud, block, osize, nsize, caller) };
    // SAFETY: `tracker` is not used after this.
    unsafe { end_if_last(tracker, ud, block, nsize) };
    result
}

/// After a call of the hook: if it freed a block, [`after_free`].
///
/// # Safety
/// `ud` is the live tracker `t`, not used by the caller after this.
#[inline(always)]
unsafe fn end_if_last(t: &Tracker, ud: *mut c_void, block: *mut c_void, nsize: usize) {
    if nsize == 0 && !block.is_null() {
        // SAFETY: the caller's contract.
        unsafe { after_free(t, ud) };
    }
}

/// Defines an exported `lua_Alloc` named `$name` that calls `$body` with one more argument: the
/// address its caller returns to (`crate::auxbuf` tells lauxlib's string buffers by it). Where
/// that is wanted (5.3+, whose lauxlib allocates through `lua_getallocf`) and the target is
/// x86-64 or AArch64, the entry is two instructions that pass the return address and jump;
/// elsewhere it is a plain function that passes 0.
///
/// Every entry is exported under a fixed name and never inlined, so that it has one address: the
/// hook is recognised by its address (see [`hook_kind`]).
macro_rules! alloc_entry {
    ($(#[$doc:meta])* $name:ident => $body:ident) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// See [`hook`].
        #[cfg(all(aux_buffers, target_arch = "x86_64"))]
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            ud: *mut c_void,
            block: *mut c_void,
            osize: usize,
            nsize: usize,
        ) -> *mut c_void {
            core::arch::naked_asm!("mov r8, qword ptr [rsp]", "jmp {body}", body = sym $body)
        }

        $(#[$doc])*
        ///
        /// # Safety
        /// See [`hook`].
        #[cfg(all(aux_buffers, target_arch = "aarch64"))]
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            ud: *mut c_void,
            block: *mut c_void,
            osize: usize,
            nsize: usize,
        ) -> *mut c_void {
            core::arch::naked_asm!("mov x4, x30", "b {body}", body = sym $body)
        }

        $(#[$doc])*
        ///
        /// # Safety
        /// See [`hook`].
        #[cfg(not(all(aux_buffers, any(target_arch = "x86_64", target_arch = "aarch64"))))]
        #[no_mangle]
        #[inline(never)]
        pub unsafe extern "C" fn $name(
            ud: *mut c_void,
            block: *mut c_void,
            osize: usize,
            nsize: usize,
        ) -> *mut c_void {
            // SAFETY: forwarded contract.
            unsafe { $body(ud, block, osize, nsize, 0) }
        }
    };
}

alloc_entry! {
    /// The allocation hook that forwards every call to the host allocator ([`Serve::Host`]).
    lunet_mem_alloc_host => host_body
}
alloc_entry! {
    /// The allocation hook that serves new blocks from mimalloc ([`Serve::Mimalloc`]).
    lunet_mem_alloc_mimalloc => mimalloc_body
}
alloc_entry! {
    /// The hook that forwards every call to the host allocator and records allocation sites
    /// (installed by `mem.trace.start`, see `crate::hook::traced`).
    lunet_mem_alloc_host_traced => host_traced_body
}
alloc_entry! {
    /// The hook that serves new blocks from mimalloc and records allocation sites.
    lunet_mem_alloc_mimalloc_traced => mimalloc_traced_body
}

/// The hooks' bodies: `caller` is the address the allocator's caller returns to, or 0.
///
/// # Safety
/// See [`hook`].
unsafe extern "C" fn host_body(
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { hook::<false>(ud, block, osize, nsize, caller) }
}

/// # Safety
/// See [`hook`].
unsafe extern "C" fn mimalloc_body(
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { hook::<true>(ud, block, osize, nsize, caller) }
}

/// # Safety
/// See [`hook`].
unsafe extern "C" fn host_traced_body(
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // SAFETY: forwarded contract; `ud` is a live Tracker, not used after `end_if_last`.
    unsafe {
        let tracker = &*(ud as *const Tracker);
        let result = traced::<false>(tracker, ud, block, osize, nsize, caller);
        end_if_last(tracker, ud, block, nsize);
        result
    }
}

/// # Safety
/// See [`hook`].
unsafe extern "C" fn mimalloc_traced_body(
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // SAFETY: forwarded contract; `ud` is a live Tracker, not used after `end_if_last`.
    unsafe {
        let tracker = &*(ud as *const Tracker);
        let result = traced::<true>(tracker, ud, block, osize, nsize, caller);
        end_if_last(tracker, ud, block, nsize);
        result
    }
}

/// The hook for `serve`.
pub fn hook_for(serve: Serve) -> LuaAlloc {
    hook_with(serve, false)
}

/// The hook for `serve`, recording allocation sites if `traced`.
pub fn hook_with(serve: Serve, traced: bool) -> LuaAlloc {
    match (serve, traced) {
        (Serve::Host, false) => lunet_mem_alloc_host,
        (Serve::Mimalloc, false) => lunet_mem_alloc_mimalloc,
        (Serve::Host, true) => lunet_mem_alloc_host_traced,
        (Serve::Mimalloc, true) => lunet_mem_alloc_mimalloc_traced,
    }
}

/// Which hook `f` is, if it is one of this library's (so that its `ud` is a `Tracker`), traced
/// or not.
pub fn hook_kind(f: LuaAlloc) -> Option<Serve> {
    let is = |g: LuaAlloc| std::ptr::fn_addr_eq(f, g);
    if is(lunet_mem_alloc_host) || is(lunet_mem_alloc_host_traced) {
        Some(Serve::Host)
    } else if is(lunet_mem_alloc_mimalloc) || is(lunet_mem_alloc_mimalloc_traced) {
        Some(Serve::Mimalloc)
    } else {
        None
    }
}

/// Installs the traced or untraced hook on `L`, keeping its tracker, if ours is installed.
///
/// # Safety
/// `L` is a valid state.
pub unsafe fn set_traced(L: *mut lua_State, traced: bool) {
    let mut ud = ptr::null_mut();
    // SAFETY: valid state; only our own hook is swapped for its twin with the same `ud`.
    unsafe {
        if let Some(serve) = hook_kind(ffi::lua_getallocf(L, &mut ud)) {
            ffi::lua_setallocf(L, hook_with(serve, traced), ud);
        }
    }
}

/// Whether `f` is one of this library's hooks.
pub fn is_tracking_alloc(f: LuaAlloc) -> bool {
    hook_kind(f).is_some()
}

// ---------------------------------------------------------------------------------------------
// Closing: the hook's part of the end (the sentinel's part is `uninstall`).

/// Whether the closing state may get its own allocator back now: no block of ours (mimalloc's or
/// an arena's) is live, and not Lua 5.5, whose external strings may still free through the hook
/// (see the module's top).
fn may_hand_back(t: &Tracker) -> bool {
    t.own_blocks() == 0 && !cfg!(feature = "lua55")
}

/// In `lua_close`, once no block of ours (mimalloc's or an arena's) is live: gives the state its
/// own allocator back and frees the tracker. Returns whether it did (then `ud` is gone).
///
/// # Safety
/// `ud` is the live tracker `t`; `t.closing` is the closing state's main thread.
#[cold]
#[inline(never)]
unsafe fn finish_close(t: &Tracker, ud: *mut c_void) -> bool {
    if !may_hand_back(t) {
        return false;
    }
    let L = t.closing.get();
    let mut installed_ud = ptr::null_mut();
    // SAFETY: the main thread lives until the state's last block is freed; these only read and
    // write the global state's allocator fields.
    unsafe {
        let installed = ffi::lua_getallocf(L, &mut installed_ud);
        if !is_tracking_alloc(installed) || installed_ud != ud {
            return false; // something wrapped us: the hook stays until the last block
        }
        ffi::lua_setallocf(L, t.host_alloc, t.host_ud);
        drop(Box::from_raw(ud as *mut Tracker));
    }
    true
}

/// After a block was freed: ends the tracker if the state is closing and that was the last
/// block of ours, or if it was the state's last block. Returns whether the tracker is gone.
///
/// # Safety
/// `ud` is the live tracker `t`, not used by the caller if this returns true.
#[inline(always)]
unsafe fn after_free(t: &Tracker, ud: *mut c_void) -> bool {
    // SAFETY: `closing` is set only by the sentinel's finalizer in `lua_close`.
    if !t.closing.get().is_null() && unsafe { finish_close(t, ud) } {
        return true;
    }
    if t.live_bytes.get() == 0 {
        // SAFETY: the state is gone (see `hook`); `t` is not used after this.
        unsafe { drop(Box::from_raw(ud as *mut Tracker)) };
        return true;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// LuaJIT 2.1 betas: the budget hook (armed by the hook, see `crate::luajit::BudgetHook::arm`).

/// The budget hook: at an instruction of the interpreter, raises Lua's memory error if the
/// active scope is overdrawn, unless this is a finalizer (LuaJIT propagates a finalizer's error
/// from wherever the collector ran) or the module's own Lua code (mem.scope's frames: the scope
/// closes, and fails, there). Here rather than in `luajit.rs`: it finds the tracker from the
/// state, which only this module knows how to do.
#[cfg(feature = "luajit")]
unsafe extern "C-unwind" fn budget_hook(L: *mut lua_State, ar: *mut ffi::lua_Debug) {
    // SAFETY: called by LuaJIT as a hook, between two instructions.
    unsafe {
        let Some(t) = tracker(L) else {
            return;
        };
        let scope = t.active.get();
        if scope.is_null() || !(*scope).raise_pending.get() {
            t.budget_hook.disarm(L); // (armed again when the scope is active again)
            return;
        }
        if !(*scope).past_budget() {
            // The budget it went past has closed since (a coroutine overdrew it in a finalizer
            // and was resumed after), or is no longer exceeded: nothing to raise any more.
            (*scope).raise_pending.set(false);
            t.budget_hook.disarm(L);
            return;
        }
        if t.vm.get().is_some_and(|vm| vm.in_finalizer()) {
            return;
        }
        if ffi::lua_getinfo(L, c"S".as_ptr(), ar) != 0
            && !(*ar).source.is_null()
            && std::ffi::CStr::from_ptr((*ar).source) == c"=lunet.mem"
        {
            return;
        }
        t.budget_hook.disarm(L);
        (*scope).raise_pending.set(false);
        crate::scope::Scope::count_refusal(scope);
        ffi::lua_pushstring(L, c"not enough memory".as_ptr());
        ffi::lua_error(L);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn libc_alloc(
        _: *mut c_void,
        p: *mut c_void,
        _: usize,
        n: usize,
    ) -> *mut c_void {
        // SAFETY: plain libc realloc/free contract.
        unsafe {
            if n == 0 {
                libc_free(p);
                ptr::null_mut()
            } else {
                libc_realloc(p, n)
            }
        }
    }
    extern "C" {
        #[link_name = "realloc"]
        fn libc_realloc(p: *mut c_void, n: usize) -> *mut c_void;
        #[link_name = "free"]
        fn libc_free(p: *mut c_void);
    }

    #[test]
    fn counts_follow_the_lua_alloc_contract() {
        let t = Box::new(Tracker::new(libc_alloc, ptr::null_mut(), 1000));
        // (a baseline above 0: the tracker frees itself when live bytes reach 0)
        let ud = &*t as *const Tracker as *mut c_void;
        // SAFETY: `ud` is a live tracker; calls follow the lua_Alloc contract.
        unsafe {
            let a = lunet_mem_alloc_host(ud, ptr::null_mut(), 5, 100);
            assert_eq!(t.live_bytes.get(), 1100);
            let a = lunet_mem_alloc_host(ud, a, 100, 300);
            assert_eq!(t.live_bytes.get(), 1300);
            assert_eq!(t.peak_bytes.get(), 1300);
            let a = lunet_mem_alloc_host(ud, a, 300, 50);
            assert_eq!(t.live_bytes.get(), 1050);
            assert!(lunet_mem_alloc_host(ud, a, 50, 0).is_null());
            // A NULL free is a no-op whatever `osize` says (it is a tag there).
            assert!(lunet_mem_alloc_host(ud, ptr::null_mut(), 7, 0).is_null());
        }
        assert_eq!(t.live_bytes.get(), 1000);
        assert_eq!(t.peak_bytes.get(), 1300);
        assert_eq!((t.allocs.get(), t.frees.get(), t.reallocs.get()), (1, 1, 2));
        assert_eq!(t.bytes_allocated.get() - t.bytes_freed.get(), 0);
    }
}
