//! What LuaJIT is doing when it calls the allocator: a few fields of its own structures.
//!
//! LuaJIT's C API cannot say whether an allocation comes from the interpreter, from compiled
//! code, from the trace compiler or from the collector, nor whether a `__gc` finalizer or a
//! debug hook is running; the module needs all of it:
//!
//! - the trace compiler's own memory (`vmstate` is `RECORD`, `OPT` or `ASM`) belongs to no
//!   request: it is not charged to the active scope, never refused by its budget, never placed
//!   in its arena (which it would pin until the trace is flushed);
//! - an allocation that fails in compiled code crashes LuaJIT 2.1.0-beta3: there, budgets admit
//!   it and fail the next allocation the interpreter makes;
//! - `mem.trace` reads the Lua stack only where its frames are consistent, and checks each
//!   frame's function slot first (a fast function may have overwritten it with a result, as
//!   `coroutine.resume` does with `false` before it allocates its error message);
//! - toggling or flushing the JIT from a `__gc` finalizer (`hookmask & HOOK_GC`) crashes beta3;
//!   flushing it from C right after an error was caught while a trace was being recorded
//!   crashes beta3, and later 2.1 sources have the same code (see [`Vm::flush`]).
//!
//! The fields are read through the layout of LuaJIT 2.1 since 2020 on 64-bit targets with GC64
//! (Debian's 2.1.0-beta3 snapshot of 2022 and every later 2.1), and only after [`Vm::find`] has
//! checked it against the running VM: the allocator and its data at the start of the global
//! state, the VM state "C function" while a C function runs, the current thread being the
//! caller, and the main thread pointing back to the global state. On any other layout the
//! module does without (see each caller's fallback).

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::ptr;

use mlua::ffi::{self, lua_State};

/// `lua_State` fields (GC64): the global state, the current frame's base, the stack.
const L_GLREF: usize = 16;
const L_BASE: usize = 32;
const L_TOP: usize = 40;
const L_STACK: usize = 56;

/// `global_State` fields: allocator and data, hook mask, dispatch mode, VM state, main thread.
const G_ALLOCF: usize = 0;
const G_ALLOCD: usize = 8;
const G_HOOKMASK: usize = 145;
const G_DISPATCHMODE: usize = 146;
const G_VMSTATE: usize = 184;
const G_MAINTHREF: usize = 192;
/// `cur_L`: before 2023 (no `vmthref`) and since.
const G_CUR_L: [usize; 2] = [368, 376];

/// `ctype_state` (the FFI's C type state, null until `require "ffi"`): after `cur_L` and
/// `jit_base`, in every 2.1 since 2020.
const G_CTYPE_STATE_AFTER_CUR_L: usize = 16;
/// `CTState`: `L`, then `g` (after the type table's pointer and two 32-bit sizes).
const CTS_L: usize = 16;
const CTS_G: usize = 24;

/// `~vmstate` values (`LJ_VMST_*`); a `vmstate` of 0 or more is the number of the running trace.
pub const VMST_INTERP: i32 = !0;
pub const VMST_C: i32 = !1;
pub const VMST_GC: i32 = !2;
#[allow(dead_code)] // (the whole list, as in lj_obj.h: no check needs this one)
pub const VMST_EXIT: i32 = !3;
pub const VMST_RECORD: i32 = !4;
pub const VMST_OPT: i32 = !5;
pub const VMST_ASM: i32 = !6;

/// `dispatchmode` bit: the compiler is on (`lj_dispatch.c`).
const DISPMODE_JIT: u8 = 0x10;

/// `hookmask` bits.
const HOOK_ACTIVE: u8 = 0x10;
const HOOK_VMEVENT: u8 = 0x20;
const HOOK_GC: u8 = 0x40;

/// `itype` of a function value and `gct` of a function object (GC64).
const LJ_TFUNC: u32 = !8;
const GCT_FUNC: u8 = 8;

/// A checked view of one LuaJIT VM's global state.
#[derive(Clone, Copy)]
pub struct Vm {
    g: *const u8,
    cur_l: usize,
}

/// What the VM is doing, as the allocator sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Doing {
    /// The interpreter or a C function: frames are consistent.
    Running,
    /// The collector's own work (not a finalizer, which runs as interpreted code).
    Collecting,
    /// Compiled code, or the exit from it that rebuilds the frames.
    Compiled,
    /// The trace compiler (recording, optimizing, assembling).
    Compiling,
}

impl Vm {
    /// The VM of `L`, if its layout is the one this module knows.
    ///
    /// # Safety
    /// `L` a valid state, called from a C function that Lua called (the VM state is "C").
    pub unsafe fn find(L: *mut lua_State) -> Option<Vm> {
        // SAFETY: every read is inside a `lua_State` or `global_State` (both larger than the
        // offsets read) once the first check passed; each field read is checked against what
        // the C API says.
        unsafe {
            let mut ud: *mut c_void = ptr::null_mut();
            let allocf = ffi::lua_getallocf(L, &mut ud);
            let g = read::<*const u8>(L as *const u8, L_GLREF);
            if g.is_null()
                || read::<usize>(g, G_ALLOCF) != allocf as usize
                || read::<*mut c_void>(g, G_ALLOCD) != ud
                || read::<i32>(g, G_VMSTATE) != VMST_C
            {
                return None;
            }
            let main = read::<*const u8>(g, G_MAINTHREF);
            if main.is_null() || read::<*const u8>(main, L_GLREF) != g {
                return None;
            }
            let cur_l = *G_CUR_L
                .iter()
                .find(|&&off| read::<*mut lua_State>(g, off) == L)?;
            let base = read::<usize>(L as *const u8, L_BASE);
            let top = read::<usize>(L as *const u8, L_TOP);
            if top < base || (top - base) / 8 != ffi::lua_gettop(L) as usize {
                return None;
            }
            Some(Vm { g, cur_l })
        }
    }

    /// The state's main thread (`g->mainthref`): it lives until the state's last block is
    /// freed, unlike the thread a current LuaJIT runs finalizers on (`vmthread`), which
    /// `lua_close` frees with the other objects.
    pub fn main_thread(&self) -> *mut lua_State {
        // SAFETY: as in `state`; checked non-null and pointing back at `g` by `find`.
        unsafe { read::<*mut lua_State>(self.g, G_MAINTHREF) }
    }

    /// The VM state (`g->vmstate`).
    #[inline(always)]
    pub fn state(&self) -> i32 {
        // SAFETY: `g` is a live global state (checked by `find`); the field is volatile in C.
        unsafe { ptr::read_volatile(self.g.add(G_VMSTATE) as *const i32) }
    }

    /// What the VM is doing now.
    #[inline(always)]
    pub fn doing(&self) -> Doing {
        match self.state() {
            VMST_INTERP | VMST_C => Doing::Running,
            VMST_GC => Doing::Collecting,
            VMST_RECORD | VMST_OPT | VMST_ASM => Doing::Compiling,
            _ => Doing::Compiled, // a trace number, or VMST_EXIT
        }
    }

    /// Whether a `__gc` finalizer is running (LuaJIT refuses JIT mode changes then, and beta3
    /// crashes on the error).
    pub fn in_finalizer(&self) -> bool {
        // SAFETY: as in `state`.
        unsafe { read::<u8>(self.g, G_HOOKMASK) & HOOK_GC != 0 }
    }

    /// Whether the compiler may be switched on or off, or flushed, now: not inside a `__gc`
    /// finalizer (LuaJIT refuses it with an error that beta3 does not survive everywhere), nor
    /// inside a `jit.attach` handler (the trace compiler is in the middle of its own work, and
    /// the call dispatch does not settle a recording there, see [`Vm::flush`]).
    pub fn may_switch_jit(&self) -> bool {
        // SAFETY: as in `state`.
        unsafe { read::<u8>(self.g, G_HOOKMASK) & (HOOK_GC | HOOK_VMEVENT) == 0 }
    }

    /// Whether the trace compiler is on (what `jit.status()` says first).
    pub fn jit_on(&self) -> bool {
        // SAFETY: as in `state`.
        unsafe { read::<u8>(self.g, G_DISPATCHMODE) & DISPMODE_JIT != 0 }
    }

    /// Whether a debug hook is running.
    pub fn in_hook(&self) -> bool {
        // SAFETY: as in `state`.
        unsafe { read::<u8>(self.g, G_HOOKMASK) & HOOK_ACTIVE != 0 }
    }

    /// Whether `block` is the stack of the thread running now (its growth is then a stack
    /// reallocation).
    pub fn is_current_stack(&self, block: *mut c_void) -> bool {
        let L = self.current_thread();
        // SAFETY: `cur_L` is a live thread of this VM.
        !L.is_null() && unsafe { read::<*mut c_void>(L as *const u8, L_STACK) } == block
    }

    /// Whether a memory error raised now would crash the VM: the running thread's `top` is
    /// below its `base` in a frame that is not a Lua function's. That is a fast function that
    /// has not set `top` (its `fff_newstr` path, for `string.sub` and others): `lj_err_mem`
    /// writes its message at `top`, over a frame of the stack, and the unwinding crashes
    /// (fuzzer seeds 104 and 272). In a Lua function's frame `top` is often below `base` too
    /// (the interpreter leaves it where the last call into C set it; compiled code, where it
    /// entered the trace), but there `lj_err_mem` first sets `top` from the frame: refusing is
    /// safe (LuaJIT since 2022-11, which every LuaJIT that is not a beta has; on the betas no
    /// refusal happens where this is asked, see `crate::hook`). Counting those as unsafe let a
    /// loop of table constructors run far past its budget, interpreted (spec/11, "the
    /// tightest of nested limits" with the compiler off).
    #[cold]
    pub fn refusal_would_crash(&self) -> bool {
        let L = self.current_thread();
        if L.is_null() {
            return false;
        }
        // SAFETY: `cur_L` is a live thread of this VM; `base` and `top` are plain fields; the
        // two slots below `base` (GC64: the function, then the frame link) are in its stack,
        // whose first slots are a frame of its own (so `base` is at least two slots in).
        unsafe {
            let base = read::<*const u64>(L as *const u8, L_BASE);
            if read::<usize>(L as *const u8, L_TOP) >= base as usize {
                return false;
            }
            !is_lua_function(*base.sub(2))
        }
    }

    /// Marks hooks as not running (`hook_leave`) and returns whether they were marked running.
    ///
    /// LuaJIT marks hooks as running while a `__gc` finalizer runs (and a debug hook, and a
    /// `jit.attach` handler), and `lua_yield` then takes its "yield from a hook" path, whose
    /// resume crashes when it was a coroutine's ordinary yield (one resumed by that finalizer).
    /// The yield wrapper clears the mark for its yield; the resume wrapper puts it back. (A
    /// finalizer or hook puts its own mark back when it returns.)
    pub fn leave_hook(&self) -> bool {
        // SAFETY: as in `state`; the VM is not reading the mask concurrently (one thread).
        unsafe {
            let mask = self.g.add(G_HOOKMASK) as *mut u8;
            let was = *mask & HOOK_ACTIVE != 0;
            *mask &= !HOOK_ACTIVE;
            was
        }
    }

    /// Marks hooks as running again (after [`Vm::leave_hook`]).
    pub fn enter_hook(&self) {
        // SAFETY: as in `leave_hook`.
        unsafe { *(self.g.add(G_HOOKMASK) as *mut u8) |= HOOK_ACTIVE };
    }

    /// The FFI keeps the thread of its last call (`cts->L`, for callbacks and errors), and a
    /// current 2.1 marks it as a root of the collector: a coroutine suspended after an FFI call
    /// (the module's `mem.scope` makes some) stayed alive, its scopes open, until another thread
    /// made one. If `cts->L` is `co`, it becomes `to` (the thread running again), as LuaJIT
    /// itself does when it frees a thread. The FFI state is checked first: its `g` is this VM.
    pub fn release_ffi_thread(&self, co: *mut lua_State, to: *mut lua_State) {
        // SAFETY: `g` is the checked global state; `ctype_state` is read at the offset of every
        // 2.1 since 2020 and used only if it points to a `CTState` of this VM.
        unsafe {
            let cts = read::<*mut u8>(self.g, self.cur_l + G_CTYPE_STATE_AFTER_CUR_L);
            if cts.is_null() || read::<*const u8>(cts, CTS_G) != self.g {
                return;
            }
            if read::<*mut lua_State>(cts, CTS_L) == co {
                ptr::write(cts.add(CTS_L) as *mut *mut lua_State, to);
            }
        }
    }

    /// The thread running now (`g->cur_L`).
    #[inline(always)]
    pub fn current_thread(&self) -> *mut lua_State {
        // SAFETY: as in `state`.
        unsafe { read::<*mut lua_State>(self.g, self.cur_l) }
    }
}

/// Whether the frame that `lua_getstack` described in `ar` holds a function in its function
/// slot, so that `lua_getinfo` can read it.
///
/// # Safety
/// `L` a valid thread of a VM [`Vm::find`] accepted; `ar` filled by `lua_getstack(L, ..)`.
pub unsafe fn frame_has_function(L: *mut lua_State, ar: &ffi::lua_Debug) -> bool {
    // `i_ci` is `(size << 16) + offset of the frame slot`; the function is in the slot below.
    // SAFETY: `i_ci` is the `int` right after `short_src` (lua.h's private part).
    let i_ci = unsafe { read::<i32>(ar as *const ffi::lua_Debug as *const u8, I_CI) };
    let offset = (i_ci as u32 & 0xffff) as usize;
    if offset == 0 {
        return false;
    }
    // SAFETY: the slot is inside the thread's stack (lua_getstack found a frame there).
    unsafe {
        let stack = read::<*const u64>(L as *const u8, L_STACK);
        function_object(*stack.add(offset - 1)).is_some()
    }
}

/// Whether the stack slot `slot` (a GC64 tagged value) holds a Lua function (not a C or fast
/// function, whose `ffid` is not 0).
///
/// # Safety
/// A slot of a live thread's stack.
unsafe fn is_lua_function(slot: u64) -> bool {
    // SAFETY: forwarded contract; `ffid` is a byte of the live `GCfunc`.
    unsafe { function_object(slot).is_some_and(|f| *f.add(FUNC_FFID) == FF_LUA) }
}

/// The `GCfunc` that the stack slot `slot` (a GC64 tagged value) holds, if it holds a function.
///
/// # Safety
/// A slot of a live thread's stack.
unsafe fn function_object(slot: u64) -> Option<*const u8> {
    if ((slot as i64) >> 47) as u32 != LJ_TFUNC {
        return None;
    }
    let object = (slot & ((1u64 << 47) - 1)) as *const u8;
    // SAFETY: a function value points to a live `GCfunc` (`gct` at 9).
    (!object.is_null() && unsafe { *object.add(9) } == GCT_FUNC).then_some(object)
}

/// `GCfunc`'s `ffid` (after the GC header) and its value for a Lua function.
const FUNC_FFID: usize = 10;
const FF_LUA: u8 = 0;

/// Offset of `lua_Debug`'s private `i_ci`, right after `short_src`.
const I_CI: usize = std::mem::offset_of!(ffi::lua_Debug, short_src) + 60; // LUA_IDSIZE
const _: () = assert!(I_CI + 4 <= std::mem::size_of::<ffi::lua_Debug>() && I_CI % 4 == 0);

/// # Safety
/// `base + offset` is a readable, aligned `T`.
#[inline(always)]
unsafe fn read<T: Copy>(base: *const u8, offset: usize) -> T {
    // SAFETY: the caller's contract.
    unsafe { ptr::read(base.add(offset) as *const T) }
}

/// `jit.version` says a 2.1 beta (2.1.0-beta3 and before, Debian's 2022 snapshot included):
/// an allocation that fails while a trace runs, or in a coroutine's resume, can crash it.
///
/// # Safety
/// `L` valid with 2 free slots.
pub unsafe fn is_beta(L: *mut lua_State) -> bool {
    // SAFETY: reads `jit.version` from the loaded-modules table; allocates nothing new.
    unsafe {
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, c"_LOADED".as_ptr());
        let mut beta = false;
        if ffi::lua_type(L, -1) == ffi::LUA_TTABLE {
            ffi::lua_getfield(L, -1, c"jit".as_ptr());
            if ffi::lua_type(L, -1) == ffi::LUA_TTABLE {
                ffi::lua_getfield(L, -1, c"version".as_ptr());
                let mut len = 0usize;
                if ffi::lua_type(L, -1) == ffi::LUA_TSTRING {
                    let s = ffi::lua_tolstring(L, -1, &mut len);
                    let v = std::slice::from_raw_parts(s as *const u8, len);
                    beta = v.windows(5).any(|w| w == b"-beta");
                }
                ffi::lua_pop(L, 1);
            }
            ffi::lua_pop(L, 1);
        }
        ffi::lua_pop(L, 1);
        beta
    }
}

extern "C-unwind" {
    fn luaJIT_setmode(
        L: *mut lua_State,
        idx: std::ffi::c_int,
        mode: std::ffi::c_int,
    ) -> std::ffi::c_int;
}

/// `luaJIT_setmode`'s engine modes (luajit.h).
const MODE_ENGINE: std::ffi::c_int = 0;
const MODE_ON: std::ffi::c_int = 0x0100;
const MODE_FLUSH: std::ffi::c_int = 0x0200;

impl Vm {
    /// Turns the trace compiler on or off, as `jit.on()`/`jit.off()`. This only marks a
    /// recording under way aborted (LuaJIT settles it at the next instruction) and frees no
    /// trace, so unlike [`Vm::flush`] it is safe right after an error was caught.
    ///
    /// # Safety
    /// Not called from the allocator; `self.may_switch_jit()`.
    pub unsafe fn set_jit(&self, on: bool) {
        let L = self.current_thread();
        // SAFETY: the current thread of a live VM; outside finalizers the call does not raise.
        unsafe { luaJIT_setmode(L, 0, MODE_ENGINE | if on { MODE_ON } else { 0 }) };
    }

    /// Flushes every trace, as `jit.flush()`; returns false if it could not (out of memory).
    ///
    /// An error raised while a trace is recorded (a budget's memory error, fail_after's) only
    /// marks the recording aborted: LuaJIT settles it when it dispatches the next instruction
    /// or call, and a recording stitched to a trace (it started when a C function called from
    /// that trace returned) then marks that trace, found by its number. A C function that
    /// caught the error with `lua_pcall` or `lua_resume` runs before that: a `luaJIT_setmode`
    /// flush there frees the trace, and the settling writes through the emptied slot (a
    /// segfault in `trace_abort` on beta3; later 2.1 sources have the same code). So the flush
    /// is made by a Lua function that this calls: the call dispatch settles the recording
    /// first, as it does for `jit.flush()` called from Lua. (A Lua function, not a C one: the
    /// settling tells a `jit.attach` handler where the recording stopped by walking down from
    /// the called function to a Lua frame, and a coroutine run by fail_after may have none
    /// below.)
    ///
    /// # Safety
    /// `L` the running thread, with 2 free slots; not called from the allocator;
    /// `self.may_switch_jit()`.
    pub unsafe fn flush(&self, L: *mut lua_State) -> bool {
        // SAFETY: a protected call of the function `register_flush` made, checked by its
        // upvalue (the registry is reachable from Lua).
        unsafe {
            ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, FLUSH_KEY.as_ptr());
            let ours: ffi::lua_CFunction = flush_traces;
            let mut checked = false;
            if ffi::lua_type(L, -1) == ffi::LUA_TFUNCTION
                && !ffi::lua_getupvalue(L, -1, 1).is_null()
            {
                checked = ffi::lua_tocfunction(L, -1).is_some_and(|f| ptr::fn_addr_eq(f, ours));
                ffi::lua_pop(L, 1);
            }
            if checked && ffi::lua_pcall(L, 0, 0, 0) == ffi::LUA_OK {
                return true;
            }
            ffi::lua_pop(L, 1);
            false
        }
    }
}

/// The C function [`Vm::flush`] ends up in: `jit.flush()`.
unsafe extern "C-unwind" fn flush_traces(L: *mut lua_State) -> std::ffi::c_int {
    // SAFETY: called from Lua (a call by hand, the registry being reachable, is `jit.flush()`,
    // refused inside a finalizer as that is).
    unsafe { luaJIT_setmode(L, 0, MODE_ENGINE | MODE_FLUSH) };
    0
}

/// Registry key of the Lua function that calls [`flush_traces`].
const FLUSH_KEY: &std::ffi::CStr = c"lunet.mem.flush_traces";

/// Its source: a plain call, not a tail call, so that its Lua frame stays below `flush_traces`.
/// The chunk is named as the module's Lua code (the budget hook never raises there).
const FLUSH_SOURCE: &str = "local flush_traces = ... return function() flush_traces() end";

/// Puts the Lua function that [`Vm::flush`] calls in the registry.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
pub unsafe fn register_flush(L: *mut lua_State) {
    // SAFETY: valid state; the chunk is constant and compiles.
    unsafe {
        if ffi::luaL_loadbuffer(
            L,
            FLUSH_SOURCE.as_ptr().cast(),
            FLUSH_SOURCE.len(),
            c"=lunet.mem".as_ptr(),
        ) != ffi::LUA_OK
        {
            ffi::lua_error(L);
        }
        ffi::lua_pushcfunction(L, flush_traces);
        ffi::lua_call(L, 1, 1);
        ffi::lua_setfield(L, ffi::LUA_REGISTRYINDEX, FLUSH_KEY.as_ptr());
    }
}

// ---------------------------------------------------------------------------------------------
// Budgets on 2.1 betas: refused at a safe point

/// The budget hook of one state: the count hook that raises a budget's memory error at a safe
/// point, and the debug hook it replaced while armed. This module only installs and removes
/// it; the hook itself needs the tracker, so the tracker's owner hands it over at install
/// (`crate::state`'s `budget_hook`), and a state that got none never arms one.
#[derive(Default)]
pub struct BudgetHook {
    /// The count hook to install, if handed over.
    handler: Cell<Option<ffi::lua_Hook>>,
    /// Whether the count hook is installed.
    armed: Cell<bool>,
    /// The debug hook it replaced, with its mask and count, to put back.
    saved_hook: Cell<Option<ffi::lua_Hook>>,
    saved_mask: Cell<c_int>,
    saved_count: Cell<c_int>,
}

impl BudgetHook {
    /// Sets the count hook [`BudgetHook::arm`] installs.
    pub fn set_handler(&self, handler: ffi::lua_Hook) {
        self.handler.set(Some(handler));
    }

    /// LuaJIT 2.1 betas do not survive an allocation that fails in compiled code, in a fast
    /// function, while a coroutine is resumed or while an error is being raised (their
    /// out-of-memory paths were fixed in 2023). So there, a budget never refuses an allocation:
    /// it admits it and marks the active scope overdrawn (`Tracker::overdraw`), and this
    /// installs a count hook that raises Lua's memory error at the next instruction the
    /// interpreter runs in that scope: a point where raising is safe. Compiled code gets there
    /// when it leaves its trace (and the compiler is off while a budgeted scope is active). The
    /// debug hook in place (if any) is put back once the error is raised, or once the scope is
    /// no longer active.
    ///
    /// # Safety
    /// `vm` is the VM of the state this belongs to; not called from the trace compiler.
    pub unsafe fn arm(&self, vm: Vm) {
        let Some(handler) = self.handler.get() else {
            return;
        };
        if self.armed.get() {
            return;
        }
        let L = vm.current_thread();
        // SAFETY: a thread of the VM; setting a hook only updates the VM's dispatch table.
        unsafe {
            self.saved_hook.set(ffi::lua_gethook(L));
            self.saved_mask.set(ffi::lua_gethookmask(L));
            self.saved_count.set(ffi::lua_gethookcount(L));
            self.armed.set(true);
            ffi::lua_sethook(L, Some(handler), ffi::LUA_MASKCOUNT, 1);
        }
    }

    /// Puts back the hook [`BudgetHook::arm`] replaced.
    ///
    /// # Safety
    /// `L` a thread of the state this belongs to.
    pub unsafe fn disarm(&self, L: *mut lua_State) {
        if self.armed.replace(false) {
            // SAFETY: as in `arm`.
            unsafe {
                ffi::lua_sethook(
                    L,
                    self.saved_hook.get(),
                    self.saved_mask.get(),
                    self.saved_count.get(),
                )
            };
        }
    }
}
