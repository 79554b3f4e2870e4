//! The tracking allocator: a `lua_Alloc` that forwards every call to the allocator the host
//! installed and counts what succeeded ([`counted`]; [`traced`] is the same plus the records
//! of `mem.trace`, while it runs).
//!
//! One [`Tracker`] per Lua state, reached through the allocator's `ud`. Nothing here is global:
//! several states in several threads each have their own tracker. A Lua state runs on one OS
//! thread at a time, so the counters are plain `Cell`s: no locks, no atomics.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::rc::Rc;

#[cfg(any(feature = "lua54", feature = "lua55"))]
use mlua::ffi;
use mlua::ffi::lua_State;

use crate::arena::{self, ArenaSet};
use crate::metrics::Metrics;
use crate::scope::{Ledger, Scope};
use crate::trace::Trace;

/// The allocator signature Lua uses (`lua_Alloc`).
pub type LuaAlloc = unsafe extern "C" fn(
    ud: *mut c_void,
    ptr: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void;

/// Number of slots in the per-type tables: the type tag Lua 5.2+ passes in `osize` is masked with
/// `TYPE_SLOTS - 1` (its low 4 bits are the basic type).
pub const TYPE_SLOTS: usize = 16;

/// Slots of the scope-name cache.
const NAME_CACHE_SLOTS: usize = 16;

/// A scope name and the address of the Lua string it was made from.
type CachedName = (usize, Rc<str>);

/// Reasons the module keeps LuaJIT's compiler off (see [`Tracker::hold_jit`]): a budgeted scope
/// is active (2.1 betas), `mem.trace` is recording, a neutrality check runs.
#[cfg(feature = "luajit")]
pub const JIT_HELD_BY_BUDGET: u8 = 1;
#[cfg(feature = "luajit")]
pub const JIT_HELD_BY_TRACE: u8 = 2;
#[cfg(feature = "luajit")]
pub const JIT_HELD_BY_CHECK: u8 = 4;

/// Counters of one Lua state's allocations since the tracker was installed.
///
/// `live_bytes` always equals the state's own count (`collectgarbage("count") * 1024`): it starts
/// at the count read when the tracker was installed and moves by exactly the sizes Lua passes to
/// its allocator.
pub struct Tracker {
    /// The allocator that was installed before us; every call is forwarded to it.
    pub host_alloc: LuaAlloc,
    /// Its `ud`, passed back unchanged.
    pub host_ud: *mut c_void,
    /// The state's byte count when the tracker was installed.
    pub baseline_bytes: u64,
    /// Bytes in live blocks (the baseline included).
    pub live_bytes: Cell<u64>,
    /// Highest `live_bytes` seen since install or `reset_peak`.
    pub peak_bytes: Cell<u64>,
    /// Successful allocations of new blocks.
    pub allocs: Cell<u64>,
    /// Blocks freed.
    pub frees: Cell<u64>,
    /// Successful reallocations of existing blocks (to a new non-zero size).
    pub reallocs: Cell<u64>,
    /// Sum of the sizes of new blocks and of the new sizes of reallocated ones.
    pub bytes_allocated: Cell<u64>,
    /// Sum of the sizes of freed blocks and of the old sizes of reallocated ones.
    pub bytes_freed: Cell<u64>,
    /// New objects by the type tag of Lua 5.2+ (slot 0: memory that is not an object).
    pub type_allocs: [Cell<u64>; TYPE_SLOTS],
    /// Bytes of the new objects counted in `type_allocs`.
    pub type_bytes: [Cell<u64>; TYPE_SLOTS],
    /// Live blocks that came from mimalloc (mimalloc serving only). Signed: a host whose own
    /// allocator is this same mimalloc (a Rust host with it as global allocator) makes blocks
    /// that look like ours; freeing them here is still right, and the count may go below 0.
    pub mi_blocks: Cell<i64>,
    /// The [`MI_WINDOW`]-aligned address range of the last freed or resized block that
    /// `mi_is_in_heap_region` said is mimalloc's (0: none yet), so that the next block in the
    /// same range skips that lookup (a walk over mimalloc's arenas). Sound because every host
    /// block the tracker meets was made before it was installed and lives until it comes back:
    /// it cannot lie in a range mimalloc held while the block was alive.
    mi_window: Cell<usize>,
    /// Registry reference of the weak-keyed table `thread -> ThreadScopes userdata`.
    pub threads_ref: Cell<c_int>,
    /// Recently used scope names, by the address of their Lua string's bytes (checked against
    /// the bytes on use: an address can be reused by another string).
    name_cache: [Cell<Option<CachedName>>; NAME_CACHE_SLOTS],
    /// Set while the module does its own bookkeeping (a coroutine's stack grown for a resume, a
    /// thread's scope record): new blocks are not charged to (nor refused by, nor placed in
    /// the arena of) the active scope. Cleared at every call into the module, in case a memory
    /// error skipped the code that clears it.
    pub exempt: Cell<bool>,
    /// The scope that was active when the exemption began: only it is exempt. A finalizer that
    /// runs inside the bookkeeping and opens a scope of its own (or resumes a coroutine in one)
    /// is that scope's code, counted and placed as usual.
    exempt_scope: Cell<*const Scope>,
    /// `core.exempt_call` calls running: while any runs, `exempt` is not cleared at calls into
    /// the module (a finalizer run inside one may call the module; the exemption must last).
    pub exempt_calls: Cell<u32>,
    /// Budgeted scopes (a limit or an allowance) made and not closed yet: on LuaJIT 2.1 betas
    /// the compiler is off while there are any (see `mem.lua`).
    pub budgeted_scopes: Cell<u32>,
    /// The closing state's main thread, set by the sentinel's finalizer in `lua_close` when
    /// mimalloc blocks are still live: the hook gives the state its own allocator back when the
    /// last of them is freed (see `crate::state::uninstall`). Null otherwise.
    pub closing: Cell<*mut lua_State>,
    /// Lua 5.4/5.5: the state's main thread (set at install), to ask `lua_gc` whether the
    /// collector is calling a finalizer (see [`Tracker::collector_in_finalizer`]).
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    pub main_thread: Cell<*mut lua_State>,
    /// The scope allocations are attributed to, or null. Invariant: when not null, it is the
    /// pointer held by `active_owner`, so it stays valid while it is active.
    pub(crate) active: Cell<*const Scope>,
    /// Keeps the active scope alive (the Lua objects that own scopes may be collected first).
    active_owner: Cell<Option<Rc<Scope>>>,
    /// Allocation tracing (`mem.trace`, see `crate::trace`): off unless started.
    pub trace: Trace,
    /// LuaJIT: a checked view of the VM's own state (see `crate::luajit`), found when the
    /// module is opened; `None` on other layouts.
    #[cfg(feature = "luajit")]
    pub vm: Cell<Option<crate::luajit::Vm>>,
    /// LuaJIT 2.1 betas crash when an allocation fails in compiled code: budgets admit those
    /// and fail the interpreter's next allocation instead.
    #[cfg(feature = "luajit")]
    pub oom_unsafe_jit: Cell<bool>,
    /// LuaJIT: why the module wants the compiler off now ([`JIT_HELD_BY_BUDGET`] and the other
    /// `JIT_HELD_BY_*` bits; see [`Tracker::hold_jit`]), and whether it is off because the
    /// module turned it off (then the module turns it on again when no reason is left).
    #[cfg(feature = "luajit")]
    jit_holds: Cell<u8>,
    #[cfg(feature = "luajit")]
    jit_off_by_us: Cell<bool>,
    /// LuaJIT 2.1 betas: the budget hook (raises a budget's memory error at a safe point) and
    /// the debug hook it replaced while armed, to put back (see `crate::luajit::BudgetHook`).
    #[cfg(feature = "luajit")]
    pub budget_hook: crate::luajit::BudgetHook,
    /// LuaJIT: the yield wrapper cleared the VM's "hook running" mark (see
    /// `crate::luajit::Vm::leave_hook`); the resume wrapper puts it back.
    #[cfg(feature = "luajit")]
    pub hook_mark_cleared: Cell<bool>,
    /// LuaJIT: compiled code went past a budget (admitted, see `Scope::overdrawn`): its traces
    /// are flushed at the next safe point, so that the code runs interpreted next time.
    #[cfg(feature = "luajit")]
    pub jit_overdraft: Cell<bool>,
    /// LuaJIT: whether the last scoped allocation came from the trace compiler (to count the
    /// recordings a scope saw, `jit_traces`).
    #[cfg(feature = "luajit")]
    jit_compiling: Cell<bool>,
    /// lauxlib's string buffers (`crate::auxbuf`), counted apart from Lua's memory.
    #[cfg(aux_buffers)]
    pub aux: crate::auxbuf::AuxBuffers,
    /// `mem.metrics` (see `crate::metrics`). Declared after `active_owner`, whose scope may
    /// report to it when it is dropped.
    pub metrics: Metrics,
    /// What budgeted scopes keep (see `src/scope/ledger.rs`). Declared after `active_owner`,
    /// whose scope may have entries in it.
    pub ledger: Ledger,
    /// GC cycles completed (counted by a finalizer that re-arms itself, see
    /// `src/bindings/arenas.rs`): the clock of the arenas' ages, shared with `arenas`.
    pub gc_cycles: Rc<Cell<u64>>,
    /// Whether that finalizer is armed.
    pub gc_ticking: Cell<bool>,
    /// The address of the GC cycle counter armed last: only its finalizer counts a cycle.
    pub gc_tick: Cell<usize>,
    /// The thread whose record (`ThreadScopes`, in the bindings) `thread_record` holds, 0 for
    /// none: a cache of the weak table lookup every scope switch made. Only a running thread
    /// (or one waiting in a resume) is cached: the cache is dropped when a resume of the thread
    /// returns (`coroutines::leave`; a C runtime calls `lunet_mem_leave`), so a thread that
    /// can be collected, whose address a new thread may take, is never the cached one. Dropped
    /// too when the record is finalized (its box is freed).
    pub thread_cached: Cell<usize>,
    /// That thread's record (a `*mut ThreadScopes`), valid while `thread_cached` is not 0.
    pub thread_record: Cell<*mut c_void>,
    /// What LuaJIT's `mem.scope` passes to its FFI functions (`core.jit_scope_calls`): a cell
    /// that holds this tracker, emptied when the tracker is dropped (Lua code can still run
    /// then: finalizers in `lua_close`), never freed (compiled Lua code may hold it). Null
    /// until asked for.
    pub jit_handle: Cell<*const Cell<*const Tracker>>,
    /// The records (`*mut ThreadScopes`) of the threads that opened a scope, until each is
    /// finalized: what the GC cycle counter looks through for records whose finalizer Lua
    /// dropped (see `sweep_lost_records` in `src/bindings/scopes.rs`).
    pub thread_records: RefCell<HashSet<usize>>,
    /// Set when a budget or `fail_after` refused an allocation, or the host allocator failed
    /// one outside scopes: a finalizer may have been dropped for it (Lua 5.1 to 5.3), the GC
    /// cycle counter's among them. The next scope opened checks that the counter still lives.
    pub tick_in_doubt: Cell<bool>,
    /// The state's arenas (arena scopes). Declared last: dropped after `active_owner`, whose
    /// scope may refer to an arena.
    pub arenas: ArenaSet,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let handle = self.jit_handle.get();
        if !handle.is_null() {
            // SAFETY: the handle is leaked when made: it outlives every tracker.
            unsafe { (*handle).set(ptr::null()) };
        }
    }
}

impl Tracker {
    pub fn new(host_alloc: LuaAlloc, host_ud: *mut c_void, baseline_bytes: u64) -> Tracker {
        let gc_cycles = Rc::new(Cell::new(0));
        Tracker {
            host_alloc,
            host_ud,
            baseline_bytes,
            live_bytes: Cell::new(baseline_bytes),
            peak_bytes: Cell::new(baseline_bytes),
            allocs: Cell::new(0),
            frees: Cell::new(0),
            reallocs: Cell::new(0),
            bytes_allocated: Cell::new(0),
            bytes_freed: Cell::new(0),
            type_allocs: Default::default(),
            type_bytes: Default::default(),
            mi_blocks: Cell::new(0),
            mi_window: Cell::new(usize::MAX),
            threads_ref: Cell::new(0),
            name_cache: Default::default(),
            exempt: Cell::new(false),
            exempt_scope: Cell::new(ptr::null()),
            exempt_calls: Cell::new(0),
            budgeted_scopes: Cell::new(0),
            closing: Cell::new(ptr::null_mut()),
            #[cfg(any(feature = "lua54", feature = "lua55"))]
            main_thread: Cell::new(ptr::null_mut()),
            active: Cell::new(ptr::null()),
            active_owner: Cell::new(None),
            trace: Default::default(),
            #[cfg(feature = "luajit")]
            vm: Cell::new(None),
            #[cfg(feature = "luajit")]
            oom_unsafe_jit: Cell::new(false),
            #[cfg(feature = "luajit")]
            jit_holds: Cell::new(0),
            #[cfg(feature = "luajit")]
            jit_off_by_us: Cell::new(false),
            #[cfg(feature = "luajit")]
            budget_hook: Default::default(),
            #[cfg(feature = "luajit")]
            hook_mark_cleared: Cell::new(false),
            #[cfg(feature = "luajit")]
            jit_overdraft: Cell::new(false),
            #[cfg(feature = "luajit")]
            jit_compiling: Cell::new(false),
            #[cfg(aux_buffers)]
            aux: Default::default(),
            metrics: Default::default(),
            ledger: Default::default(),
            arenas: ArenaSet::with_clock(gc_cycles.clone()),
            gc_cycles,
            gc_ticking: Cell::new(false),
            gc_tick: Cell::new(0),
            thread_cached: Cell::new(0),
            thread_record: Cell::new(ptr::null_mut()),
            jit_handle: Cell::new(ptr::null()),
            thread_records: RefCell::new(HashSet::new()),
            tick_in_doubt: Cell::new(false),
        }
    }

    /// Blocks the hook must see freed before the state can get its own allocator back: those
    /// from mimalloc and those in arenas.
    pub fn own_blocks(&self) -> i64 {
        self.mi_blocks.get() + self.arenas.live_blocks.get() as i64
    }

    /// Blocks allocated minus blocks freed since install (blocks made before install are not
    /// known, so this can be negative).
    pub fn net_blocks(&self) -> i64 {
        self.allocs.get() as i64 - self.frees.get() as i64
    }

    /// The name for a scope from the bytes of a Lua string at address `key`, shared with the
    /// last scopes that had the same name (no allocation for a route name seen recently).
    pub fn scope_name(&self, key: usize, bytes: &[u8]) -> Rc<str> {
        let slot = &self.name_cache[(key >> 4) % NAME_CACHE_SLOTS];
        if let Some((cached_key, name)) = slot.take() {
            if cached_key == key && name.as_bytes() == bytes {
                slot.set(Some((key, name.clone())));
                return name;
            }
        }
        let name: Rc<str> = String::from_utf8_lossy(bytes).into();
        slot.set(Some((key, name.clone())));
        name
    }

    /// Whether the budgets of `scope` (the active scope, or null) admit an allocation of `delta`
    /// more bytes (see [`Scope::admits`]); `defer` admits it anyway once counted against them
    /// (the next allocation is refused).
    #[inline(always)]
    fn admits(&self, scope: *const Scope, delta: usize, defer: bool) -> bool {
        // SAFETY: a non-null `scope` is the active one, kept alive by `active_owner`.
        scope.is_null() || unsafe { (*scope).admits(delta) } || (defer && self.overdraw(scope))
    }

    /// Lua 5.4.4+ and 5.5: whether the collector is calling a `__gc` finalizer (`lua_gc` answers
    /// -1 then, "internal stop"); LuaJIT: the same, read from the VM (its hook mask). Such a call is not the scope's code, and Lua drops a finalizer
    /// whose call fails for memory (with a warning): refused there, a finalizer that ends a
    /// coroutine's scopes, or frees a resource, would never run. So what a budget would refuse
    /// there is made for the scope (its arena, its counts) but not charged to its budget. Only
    /// asked when a budget would refuse.
    #[cold]
    fn collector_in_finalizer(&self) -> bool {
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        {
            let main = self.main_thread.get();
            // SAFETY: the main thread lives as long as the state; `LUA_GCISRUNNING` only reads
            // the collector's state (no allocation, no error).
            !main.is_null() && unsafe { ffi::lua_gc(main, ffi::LUA_GCISRUNNING) } == -1
        }
        #[cfg(feature = "luajit")]
        return vm_in_finalizer(self);
        #[cfg(not(any(feature = "lua54", feature = "lua55", feature = "luajit")))]
        false
    }

    /// LuaJIT: whether the collector itself is allocating (the VM in its GC state: a string
    /// table shrunk at the end of a cycle, 32 KiB for 4096 slots). Such a block is the VM's, not
    /// the active scope's: not charged to its budget (where, past the limit, it made the
    /// scope fail at random: fuzzer seed 1742 on luajit-current, where the collector's next step
    /// freed it again), not placed in its arena (which it would pin). Only asked when `defer`
    /// is set, which the GC state implies.
    #[inline(always)]
    fn collector_allocating(&self, defer: bool) -> bool {
        #[cfg(feature = "luajit")]
        if defer {
            if let Some(vm) = self.vm.get() {
                return vm.doing() == crate::luajit::Doing::Collecting;
            }
        }
        let _ = defer;
        false
    }

    /// Whether a call of the hook is for one of lauxlib's string buffers (a new one made at a
    /// buffer's call site, or a live one resized or freed): not Lua's memory (see
    /// `crate::auxbuf`).
    #[cfg(aux_buffers)]
    #[inline(always)]
    fn is_aux_buffer_call(
        &self,
        block: *mut c_void,
        osize: usize,
        nsize: usize,
        caller: usize,
    ) -> bool {
        (block.is_null() && osize == 0 && self.aux.is_buffer_site(caller, nsize))
            || self.aux.is_live_buffer(block, caller)
    }

    /// An allocation past the budgets of `scope` is admitted anyway: `scope` fails when it
    /// closes, if nothing fails sooner. Returns true.
    #[cold]
    fn overdraw(&self, scope: *const Scope) -> bool {
        // SAFETY: `scope` is the live active scope.
        unsafe { Scope::overdraw(scope) };
        #[cfg(feature = "luajit")]
        if let Some(vm) = self.vm.get() {
            if vm.doing() == crate::luajit::Doing::Compiled {
                self.jit_overdraft.set(true);
            }
            if self.oom_unsafe_jit.get() {
                // SAFETY: not the trace compiler (its allocations have no scope).
                unsafe { self.budget_hook.arm(vm) };
            }
        }
        true
    }

    /// The scope a call of the hook is for: the active one, unless the module is doing its own
    /// bookkeeping or (LuaJIT) the VM is compiling a trace or collecting garbage; and whether a
    /// refusal by its budget must wait (LuaJIT 2.1 betas running compiled code).
    #[inline(always)]
    fn scope_for_call(&self) -> (*const Scope, bool) {
        let scope = self.active.get();
        if scope.is_null() {
            return (scope, false);
        }
        if self.exempt.get() && ptr::eq(scope, self.exempt_scope.get()) {
            return (ptr::null(), false);
        }
        #[cfg(feature = "luajit")]
        if let Some(vm) = self.vm.get() {
            return self.scope_in_vm(scope, vm.doing());
        }
        (scope, false)
    }

    /// [`Tracker::scope_for_call`] by what LuaJIT is doing.
    #[cfg(feature = "luajit")]
    #[inline(always)]
    fn scope_in_vm(
        &self,
        scope: *const Scope,
        doing: crate::luajit::Doing,
    ) -> (*const Scope, bool) {
        use crate::luajit::Doing;
        match doing {
            // (a debug hook is instrumentation: what it allocates is never refused, which
            // also keeps a hook from failing inside mem.scope's own frames)
            // (on 2.1 betas no refusal is safe anywhere: every one waits for a safe point, see
            // `crate::luajit::BudgetHook::arm`)
            // (a `__gc` finalizer runs as a hook too, but is no instrumentation: on a LuaJIT
            // that is not a beta, what it allocates past a budget is made uncharged, as on
            // 5.4, see `collector_in_finalizer`)
            Doing::Running => {
                self.jit_compiling.set(false);
                (
                    scope,
                    self.oom_unsafe_jit.get() || (vm_in_hook(self) && !vm_in_finalizer(self)),
                )
            }
            Doing::Compiled => (scope, self.oom_unsafe_jit.get()),
            // (the collector's frees count as before; its own rare allocations, such as the
            // string table's, are nobody's: see `Tracker::collector_allocating`)
            Doing::Collecting => (scope, true),
            Doing::Compiling => {
                if !self.jit_compiling.replace(true) {
                    // SAFETY: the active scope, kept alive by `active_owner`.
                    unsafe { (*scope).count_trace() };
                }
                (ptr::null(), false)
            }
        }
    }

    /// LuaJIT: whether a budget may refuse the growth of `block`: not the running thread's
    /// stack (the frames of mem.scope itself may need it while the scope is at its limit; the
    /// growth is counted, and the next allocation is refused instead), nor while a memory error
    /// would crash the VM (see [`Tracker::refusal_unsafe`]). Elsewhere, always.
    #[cold]
    fn may_refuse_growth(&self, block: *mut c_void) -> bool {
        #[cfg(feature = "luajit")]
        if let Some(vm) = self.vm.get() {
            return !vm.is_current_stack(block) && !vm.refusal_would_crash();
        }
        let _ = block;
        true
    }

    /// LuaJIT: whether refusing a new block now would crash the VM (a fast function that has
    /// not set the thread's `top`: `crate::luajit::Vm::refusal_would_crash`; fuzzer seeds 104 and
    /// 272 on luajit-current, a refused `string.sub`); then `scope` is overdrawn instead (the
    /// next allocation, or its close, fails) and this returns true. Elsewhere, false.
    #[cold]
    fn refusal_unsafe(&self, scope: *const Scope) -> bool {
        #[cfg(feature = "luajit")]
        if let Some(vm) = self.vm.get() {
            if vm.refusal_would_crash() {
                return self.overdraw(scope);
            }
        }
        let _ = scope;
        false
    }

    /// The ledger's part of a free (nothing while the ledger is empty).
    #[inline(always)]
    fn ledger_freed(&self, block: *mut c_void) {
        if !self.ledger.is_empty() {
            self.ledger.freed(block as usize);
        }
    }

    /// The ledger's part of a reallocation from `old` to `new` while `scope` (the active scope,
    /// or null) is active.
    #[inline(always)]
    fn ledger_resized(
        &self,
        scope: *const Scope,
        old: *mut c_void,
        new: *mut c_void,
        osize: usize,
        nsize: usize,
    ) {
        // SAFETY: a non-null `scope` is the live active scope.
        let budgeted = !scope.is_null() && unsafe { (*scope).tracks_kept() };
        if budgeted || !self.ledger.is_empty() {
            // SAFETY: as above; a budgeted scope releases its entries when it closes.
            unsafe {
                self.ledger
                    .resized(scope, budgeted, old as usize, new as usize, osize, nsize)
            };
        }
    }

    pub fn reset_peak(&self) {
        self.peak_bytes.set(self.live_bytes.get());
    }

    /// The scope allocations are attributed to now.
    pub fn active_scope(&self) -> Option<Rc<Scope>> {
        let owner = self.active_owner.take();
        let active = owner.clone();
        self.active_owner.set(owner);
        active
    }

    /// LuaJIT 2.1 betas: the trace compiler is off while a budgeted scope is active, so that a
    /// loop that gets hot inside a budget runs interpreted, where the budget fails it at once
    /// (compiled code may only be refused later, see `scope_for_call`); it is on again (if it
    /// was) as soon as the active scope is not budgeted: when the scope closes, or its
    /// coroutine yields or is abandoned.
    #[cfg(feature = "luajit")]
    fn follow_jit_guard(&self, budgeted: bool) {
        if self.oom_unsafe_jit.get() {
            self.hold_jit(JIT_HELD_BY_BUDGET, budgeted);
        }
    }

    /// LuaJIT: adds (`held`) or removes one reason the compiler is off (a `JIT_HELD_BY_*`
    /// bit). The compiler is off while any reason is left, and on again, if the module turned it
    /// off, when none is: each caller (budgets, `mem.trace`, the neutrality check) may start and
    /// end in any order without turning it on under another. A user's own `jit.on()` while a
    /// reason holds is left alone. Never switched inside a finalizer or a `jit.attach` handler
    /// (LuaJIT refuses it there): the next call outside one catches up.
    #[cfg(feature = "luajit")]
    pub fn hold_jit(&self, reason: u8, held: bool) {
        let holds = self.jit_holds.get();
        self.jit_holds.set(if held {
            holds | reason
        } else {
            holds & !reason
        });
        let Some(vm) = self.vm.get() else { return };
        if !vm.may_switch_jit() {
            return;
        }
        let want_off = self.jit_holds.get() != 0;
        // SAFETY: called from the module's C functions, where `may_switch_jit` holds.
        unsafe {
            if want_off && !self.jit_off_by_us.get() && vm.jit_on() {
                vm.set_jit(false);
                self.jit_off_by_us.set(true);
            } else if !want_off && self.jit_off_by_us.replace(false) {
                vm.set_jit(true);
            }
        }
    }

    /// Begins the module's own bookkeeping (see `exempt`); returns what [`Tracker::end_exempt`]
    /// puts back.
    pub fn begin_exempt(&self) -> (bool, *const Scope) {
        let saved = (self.exempt.get(), self.exempt_scope.get());
        if !saved.0 {
            self.exempt_scope.set(self.active.get());
        }
        self.exempt.set(true);
        saved
    }

    /// Ends what [`Tracker::begin_exempt`] began.
    pub fn end_exempt(&self, saved: (bool, *const Scope)) {
        self.exempt.set(saved.0);
        self.exempt_scope.set(saved.1);
    }

    /// Whether `scope` is the active scope.
    pub fn is_active(&self, scope: &Rc<Scope>) -> bool {
        std::ptr::eq(self.active.get(), Rc::as_ptr(scope))
    }

    /// Makes `scope` the one allocations are attributed to. (Called by the module's C functions
    /// only, never by the hook.)
    pub fn set_active_scope(&self, scope: Option<Rc<Scope>>) {
        #[cfg(feature = "luajit")]
        {
            self.follow_jit_guard(scope.as_ref().is_some_and(|s| s.is_budgeted()));
            if let (Some(vm), true) = (
                self.vm.get(),
                scope
                    .as_ref()
                    .is_some_and(|s| s.raise_pending.get() && s.past_budget()),
            ) {
                // SAFETY: called from the module's C functions.
                unsafe { self.budget_hook.arm(vm) };
            }
        }
        self.active
            .set(scope.as_ref().map_or(ptr::null(), Rc::as_ptr));
        // Dropping the previous owner may free a scope: Rust heap only, no Lua allocation.
        drop(self.active_owner.replace(scope));
    }

    #[inline(always)]
    fn grow(&self, by: u64) {
        let live = self.live_bytes.get() + by;
        self.live_bytes.set(live);
        if live > self.peak_bytes.get() {
            self.peak_bytes.set(live);
        }
    }

    /// Counts a new block in the state's counters (not in any scope's).
    #[inline(always)]
    fn count_alloc(&self, nsize: usize, tag: usize) {
        self.allocs.set(self.allocs.get() + 1);
        self.bytes_allocated
            .set(self.bytes_allocated.get() + nsize as u64);
        if cfg!(type_tags) {
            let slot = tag & (TYPE_SLOTS - 1);
            self.type_allocs[slot].set(self.type_allocs[slot].get() + 1);
            self.type_bytes[slot].set(self.type_bytes[slot].get() + nsize as u64);
        }
        self.grow(nsize as u64);
    }

    /// Counts a freed block in the state's counters.
    #[inline(always)]
    fn count_free(&self, osize: usize) {
        self.frees.set(self.frees.get() + 1);
        self.bytes_freed.set(self.bytes_freed.get() + osize as u64);
        self.live_bytes.set(self.live_bytes.get() - osize as u64);
    }

    /// Counts a resized block in the state's counters.
    #[inline(always)]
    fn count_realloc(&self, osize: usize, nsize: usize) {
        self.reallocs.set(self.reallocs.get() + 1);
        self.bytes_allocated
            .set(self.bytes_allocated.get() + nsize as u64);
        self.bytes_freed.set(self.bytes_freed.get() + osize as u64);
        if nsize >= osize {
            self.grow((nsize - osize) as u64);
        } else {
            self.live_bytes
                .set(self.live_bytes.get() - (osize - nsize) as u64);
        }
    }

    /// Counts a new block, for `scope` (the active scope, or null) too.
    #[inline(always)]
    fn on_alloc(&self, scope: *const Scope, nsize: usize, tag: usize) {
        self.count_alloc(nsize, tag);
        if !scope.is_null() {
            // SAFETY: a non-null `active` is kept alive by `active_owner` (see its invariant).
            unsafe { Scope::attribute_alloc(scope, nsize as u64) };
        }
    }

    /// Counts the free of a block that is not in an arena. It counts for `scope` (the active
    /// scope, or null), unless that scope places its blocks in an arena: then the block is not
    /// one it made.
    #[inline(always)]
    fn on_free(&self, scope: *const Scope, osize: usize) {
        // SAFETY: as in `on_alloc`.
        let to = if !scope.is_null() && unsafe { (*scope).arena() }.is_null() {
            scope
        } else {
            ptr::null()
        };
        self.on_free_for(osize, to);
    }

    /// Counts the free of a block of `osize` bytes for the scope `to` (and its open ancestors),
    /// if not null.
    #[inline(always)]
    fn on_free_for(&self, osize: usize, to: *const Scope) {
        self.count_free(osize);
        if !to.is_null() {
            // SAFETY: `to` is the active scope or an arena's open owner, both live.
            unsafe { Scope::attribute_free(to, osize as u64) };
        }
    }

    /// Counts the reallocation of a block that is not in an arena. It counts for `scope` (the
    /// active scope, or null), unless that scope places its blocks in an arena: then the block
    /// is not one it made (as for frees, see [`Tracker::on_free`]).
    #[inline(always)]
    fn on_realloc(&self, scope: *const Scope, osize: usize, nsize: usize) {
        // SAFETY: as in `on_alloc`.
        let to = if !scope.is_null() && unsafe { (*scope).arena() }.is_null() {
            scope
        } else {
            ptr::null()
        };
        self.on_realloc_for(to, osize, nsize);
    }

    /// Counts a reallocation for the scope `to` (and its open ancestors), if not null.
    #[inline(always)]
    fn on_realloc_for(&self, scope: *const Scope, osize: usize, nsize: usize) {
        self.count_realloc(osize, nsize);
        if !scope.is_null() {
            // SAFETY: as in `on_alloc`.
            unsafe { Scope::attribute_realloc(scope, osize as u64, nsize as u64) };
        }
    }
}

/// LuaJIT: whether a debug hook is running.
#[cfg(feature = "luajit")]
#[inline(always)]
fn vm_in_hook(t: &Tracker) -> bool {
    t.vm.get().is_some_and(|vm| vm.in_hook())
}

/// LuaJIT: whether the collector is calling a `__gc` finalizer.
#[cfg(feature = "luajit")]
#[cold]
fn vm_in_finalizer(t: &Tracker) -> bool {
    t.vm.get().is_some_and(|vm| vm.in_finalizer())
}

/// Gets, resizes or frees a block for `tracker`, from where `SERVE` says.
///
/// # Safety
/// The `lua_Alloc` contract (see [`counted`]); with `MIMALLOC`, every block not in
/// mimalloc's heap was made by the host allocator.
#[inline(always)]
pub(crate) unsafe fn serve<const MIMALLOC: bool>(
    t: &Tracker,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void {
    use libmimalloc_sys as mi;
    // SAFETY: the caller's contract; each block goes back to the allocator that made it.
    unsafe {
        if !MIMALLOC {
            return (t.host_alloc)(t.host_ud, block, osize, nsize);
        }
        if block.is_null() {
            if nsize == 0 {
                return ptr::null_mut();
            }
            let new = mi::mi_malloc(nsize);
            if !new.is_null() {
                t.mi_blocks.set(t.mi_blocks.get() + 1);
            }
            return new;
        }
        if is_mimalloc_block(t, block) {
            if nsize == 0 {
                mi::mi_free(block);
                t.mi_blocks.set(t.mi_blocks.get() - 1);
                return ptr::null_mut();
            }
            return mi::mi_realloc(block, nsize);
        }
        if nsize == 0 {
            return (t.host_alloc)(t.host_ud, block, osize, 0);
        }
        // A host block that changes size moves to mimalloc.
        let moved = mi::mi_malloc(nsize);
        if !moved.is_null() {
            t.mi_blocks.set(t.mi_blocks.get() + 1);
            ptr::copy_nonoverlapping(block as *const u8, moved as *mut u8, osize.min(nsize));
            (t.host_alloc)(t.host_ud, block, osize, 0);
        }
        moved
    }
}

/// Size and alignment of the address ranges mimalloc v2 owns whole: its segments, and its
/// arenas (made of segment-sized blocks, aligned as segments are), on 64-bit targets.
const MI_WINDOW: usize = 32 << 20;

/// Whether `block` (not null) came from mimalloc, the range cached in `mi_window` first.
///
/// # Safety
/// `block` is a live block of the state's.
#[inline(always)]
unsafe fn is_mimalloc_block(t: &Tracker, block: *mut c_void) -> bool {
    let window = block as usize & !(MI_WINDOW - 1);
    if window == t.mi_window.get() {
        // SAFETY: any address may be asked about.
        debug_assert!(unsafe { libmimalloc_sys::mi_is_in_heap_region(block) });
        return true;
    }
    // SAFETY: any address may be asked about.
    let owned = unsafe { libmimalloc_sys::mi_is_in_heap_region(block) };
    if owned && cfg!(target_pointer_width = "64") {
        t.mi_window.set(window);
    }
    owned
}

/// A new block of `nsize` bytes (`tag`: Lua 5.2+'s type tag, else 0): in the active scope's
/// arena if it has one (in its object chunks if the tag says it is an object; on 5.1 and
/// LuaJIT, which pass no tag, if it is small enough to be one), else from where `MIMALLOC` says.
///
/// # Safety
/// The `lua_Alloc` contract for a new block; `nsize > 0`; `scope` is the active scope (not null).
#[inline(always)]
unsafe fn new_block<const MIMALLOC: bool>(
    t: &Tracker,
    scope: *const Scope,
    tag: usize,
    nsize: usize,
) -> *mut c_void {
    // SAFETY: the caller's contract: `scope` is the active scope, kept alive by `active_owner`.
    let arena = unsafe { (*scope).arena() };
    if !arena.is_null() {
        let kind = if cfg!(type_tags) {
            if tag == 0 {
                arena::OTHER
            } else {
                arena::OBJECTS
            }
        } else if nsize > arena::UNTAGGED_OBJECT_MAX {
            arena::OTHER
        } else {
            arena::OBJECTS
        };
        // SAFETY: a scope's arena lives while the scope does.
        let block = unsafe { t.arenas.alloc(arena, nsize, kind) };
        if !block.is_null() {
            return block;
        }
    }
    // SAFETY: forwarded contract.
    unsafe { serve::<MIMALLOC>(t, ptr::null_mut(), tag, nsize) }
}

/// Serves a call of the hook for one of lauxlib's string buffers (a new one, a resize or a
/// free), counted apart from Lua's memory (see `crate::auxbuf`); the block comes from where
/// `MIMALLOC` says, as any other.
///
/// # Safety
/// The `lua_Alloc` contract; `t` is the live tracker; a non-null `block` is a live buffer.
#[cfg(aux_buffers)]
#[cold]
#[inline(never)]
unsafe fn serve_buffer<const MIMALLOC: bool>(
    t: &Tracker,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // SAFETY: forwarded contract.
    let result = unsafe { serve::<MIMALLOC>(t, block, osize, nsize) };
    t.aux.served(block, result, osize, nsize, caller);
    result
}

/// Frees or resizes an arena block (see `crate::arena`). A resize stays in place when it can,
/// else moves the block: to the same arena if it is the active one, else where `MIMALLOC`
/// says. The arena only counts the free of the old block. A growth is charged to `charge` (the
/// active scope, or null when its budget let it through uncharged).
///
/// # Safety
/// As for [`counted`], with `block` an arena block of `t`'s state.
#[inline(never)]
unsafe fn arena_block<const MIMALLOC: bool>(
    t: &Tracker,
    scope: *const Scope,
    charge: *const Scope,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void {
    // SAFETY: the caller's contract: `block` is a live arena block of `osize` bytes.
    unsafe {
        if nsize == 0 {
            let from = t.arenas.free(block, osize);
            let to = Scope::arena_free_attribution(scope, from);
            t.on_free_for(osize, to);
            t.ledger_freed(block);
            return ptr::null_mut();
        }
        // (a resize counts for the scope its arena's frees count for)
        let held_by = t.arenas.arena_of(block);
        let to = Scope::arena_attribution(scope, held_by, held_by.owner());
        if t.arenas.resize_in_place(block, osize, nsize) {
            t.on_realloc_for(to, osize, nsize);
            t.ledger_resized(charge, block, block, osize, nsize);
            return block;
        }
        let mut moved = ptr::null_mut();
        if !scope.is_null() {
            let arena = (*scope).arena();
            if !arena.is_null() && t.arenas.owner_is(block, arena) {
                moved = t.arenas.alloc(arena, nsize, arena::kind_of(block));
            }
        }
        if moved.is_null() {
            moved = serve::<MIMALLOC>(t, ptr::null_mut(), 0, nsize);
            if moved.is_null() {
                return moved;
            }
        }
        ptr::copy_nonoverlapping(block as *const u8, moved as *mut u8, osize.min(nsize));
        t.arenas.free(block, osize); // (counted as the realloc below)
        t.on_realloc_for(to, osize, nsize);
        t.ledger_resized(charge, block, moved, osize, nsize);
        moved
    }
}

/// The hook's work without tracing: serve the call, then count what succeeded. A free may
/// leave the tracker with no block to wait for: the caller then ends it (`crate::state`'s
/// entries, see `crate::state::after_free`).
///
/// The `lua_Alloc` contract (Lua's `lmem.c`): `ptr == NULL` asks for a new block of `nsize`
/// bytes, and `osize` is then a type tag (Lua 5.2+) or 0, never a size; `nsize == 0` frees `ptr`
/// (a block of `osize` bytes) and must return NULL; otherwise the block of `osize` bytes moves to
/// `nsize` bytes. A NULL result means failure and leaves the old block untouched, so counters move
/// only when the allocation succeeded.
///
/// # Safety
/// `tracker` is the live tracker at `ud` (made by `crate::state::install`), and the call follows
/// the `lua_Alloc` contract (Lua itself guarantees this).
#[inline(always)]
pub(crate) unsafe fn counted<const MIMALLOC: bool>(
    tracker: &Tracker,
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    debug_assert!(ptr::eq(ud.cast_const().cast(), tracker));
    // lauxlib's string buffers: not Lua's memory (see `crate::auxbuf`).
    #[cfg(aux_buffers)]
    if tracker.is_aux_buffer_call(block, osize, nsize, caller) {
        // SAFETY: forwarded contract.
        return unsafe { serve_buffer::<MIMALLOC>(tracker, block, osize, nsize, caller) };
    }
    #[cfg(not(aux_buffers))]
    let _ = caller;
    // Most calls of most programs run with no scope active: no budget, arena or attribution.
    let (scope, defer) = tracker.scope_for_call();
    if block.is_null() {
        if nsize == 0 {
            return ptr::null_mut();
        }
        if scope.is_null() || tracker.collector_allocating(defer) {
            // SAFETY: forwarded contract.
            let result = unsafe { serve::<MIMALLOC>(tracker, ptr::null_mut(), osize, nsize) };
            if !result.is_null() {
                tracker.count_alloc(nsize, osize);
            } else {
                tracker.tick_in_doubt.set(true); // (out of memory: a finalizer may be dropped)
            }
            return result;
        }
        let mut charged = tracker.admits(scope, nsize, defer);
        if !charged && !tracker.collector_in_finalizer() {
            if !tracker.refusal_unsafe(scope) {
                tracker.tick_in_doubt.set(true);
                // SAFETY: the live active scope.
                unsafe { Scope::count_refusal(scope) };
                return ptr::null_mut();
            }
            charged = true; // (admitted past the budget: the scope is overdrawn)
        }
        // SAFETY: forwarded contract; `scope` is the live active scope.
        let result = unsafe { new_block::<MIMALLOC>(tracker, scope, osize, nsize) };
        if !result.is_null() {
            tracker.on_alloc(scope, nsize, osize);
            // SAFETY: the live active scope.
            if charged && unsafe { (*scope).tracks_kept() } {
                // SAFETY: as above; the scope releases its entries when it closes.
                unsafe { tracker.ledger.made(scope, result as usize, nsize) };
            }
        } else {
            tracker.tick_in_doubt.set(true); // (out of memory: a finalizer may be dropped)
        }
        return result;
    }
    // A growth may fail (a scope's budget); a free or a shrink never does.
    let mut charge = scope;
    if nsize > osize && tracker.collector_allocating(defer) {
        charge = ptr::null(); // (the collector's: see `collector_allocating`)
    } else if !scope.is_null()
        && nsize > osize
        && !tracker.admits(scope, nsize - osize, defer)
        && (tracker.may_refuse_growth(block)
            || tracker.collector_in_finalizer()
            || !tracker.overdraw(scope))
    {
        if !tracker.collector_in_finalizer() {
            tracker.tick_in_doubt.set(true);
            // SAFETY: the live active scope.
            unsafe { Scope::count_refusal(scope) };
            return ptr::null_mut();
        }
        charge = ptr::null(); // (see `collector_in_finalizer`)
    }
    if arena::contains(block) {
        // SAFETY: forwarded contract; blocks in the arenas' range are arena blocks.
        return unsafe { arena_block::<MIMALLOC>(tracker, scope, charge, block, osize, nsize) };
    }
    // SAFETY: forwarded contract.
    let result = unsafe { serve::<MIMALLOC>(tracker, block, osize, nsize) };
    if nsize == 0 {
        tracker.on_free(scope, osize);
        tracker.ledger_freed(block);
    } else if !result.is_null() {
        tracker.on_realloc(scope, osize, nsize);
        tracker.ledger_resized(charge, block, result, osize, nsize);
    }
    result
}

/// The hook while tracing: the untraced hook ([`counted`]) plus the records (`crate::trace`).
/// Called by the traced hooks, which `mem.trace.start` installs in place of the plain ones.
///
/// # Safety
/// As for the hook: `ud` is the live tracker `t`, and the call follows the `lua_Alloc` contract.
#[cold]
#[inline(never)]
pub(crate) unsafe fn traced<const MIMALLOC: bool>(
    t: &Tracker,
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
    caller: usize,
) -> *mut c_void {
    // (lauxlib's string buffers are not Lua's memory: not recorded, see `crate::auxbuf`)
    #[cfg(aux_buffers)]
    if t.is_aux_buffer_call(block, osize, nsize, caller) {
        // SAFETY: forwarded contract.
        return unsafe { counted::<MIMALLOC>(t, ud, block, osize, nsize, caller) };
    }
    // SAFETY: forwarded contract. The stack is read before the block is served, the records
    // are updated after; a free may end the tracker, so its record goes first.
    unsafe {
        if block.is_null() {
            #[cfg(feature = "luajit")]
            let vm = t.vm.get();
            #[cfg(not(feature = "luajit"))]
            let vm = ();
            // (the scope a sample is labelled with in a profile: the active one, named by
            // reference; only a recorded block interns it)
            let scope = t.active.get();
            let scope_name = if scope.is_null() {
                None
            } else {
                // SAFETY: the active scope, kept alive by `active_owner`.
                Some(&(*scope).name)
            };
            let site = if nsize > 0 {
                t.trace.before_new(nsize, vm, scope_name)
            } else {
                None
            };
            let result = counted::<MIMALLOC>(t, ud, block, osize, nsize, caller);
            if let (Some(site), false) = (site, result.is_null()) {
                t.trace.after_new(result, nsize, site);
            }
            return result;
        }
        if nsize == 0 {
            t.trace.before_free(block, osize);
            return counted::<MIMALLOC>(t, ud, block, osize, nsize, caller);
        }
        let result = counted::<MIMALLOC>(t, ud, block, osize, nsize, caller);
        if !result.is_null() {
            t.trace.after_move(block, result, nsize);
        }
        result
    }
}
