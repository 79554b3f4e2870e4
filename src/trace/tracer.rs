//! The tracer in the tracker: its state in each Lua state, and what the hook while tracing
//! (`crate::hook::traced`) calls before and after it serves a block.

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_void, CStr};
use std::mem;
use std::ptr;
use std::rc::Rc;

use mlua::ffi::{self, lua_State};

use super::record::Recorder;
use super::{Vm, MAX_DEPTH};

/// The tracing state of one Lua state (a field of the tracker, `crate::hook::Tracker`).
pub struct Trace {
    /// Whether allocations are recorded (the traced hook is installed while it is set).
    pub on: Cell<bool>,
    /// The thread whose stack is read (see the module doc). Invariant while `on`: null or a
    /// live thread of the state (a thread whose block is freed is replaced by `main`).
    running: Cell<*mut lua_State>,
    /// The main thread if known (always on 5.2+), else null.
    main: Cell<*mut lua_State>,
    /// Set while the recorder is borrowed (see [`Busy`]): the hook leaves it alone then.
    pub(crate) busy: Cell<bool>,
    /// Set while the tracer builds its own Lua objects (snapshots, `top` lists): new blocks are
    /// not recorded then. (Reset by the next such call if a memory error skipped the reset.)
    pub(crate) paused: Cell<bool>,
    /// Some while `on`.
    recorder: UnsafeCell<Option<Box<Recorder>>>,
}

impl Default for Trace {
    fn default() -> Trace {
        Trace {
            on: Cell::new(false),
            running: Cell::new(ptr::null_mut()),
            main: Cell::new(ptr::null_mut()),
            busy: Cell::new(false),
            paused: Cell::new(false),
            recorder: UnsafeCell::new(None),
        }
    }
}

/// Re-entrancy guard: while one is alive, new blocks are not recorded and the recorder is not
/// touched by the hook. Must be held whenever the tracer calls into Lua or borrows the
/// recorder; `Drop` clears the flag even if what it guards panics.
pub(crate) struct Busy<'a>(&'a Cell<bool>);

impl<'a> Busy<'a> {
    pub(crate) fn enter(flag: &'a Cell<bool>) -> Option<Busy<'a>> {
        if flag.replace(true) {
            None
        } else {
            Some(Busy(flag))
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl Trace {
    /// The resume machinery says `L` runs now.
    #[inline]
    pub fn set_running(&self, L: *mut lua_State) {
        self.running.set(L);
    }

    /// The recorder, while `busy` is held.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn recorder(&self, _busy: &Busy<'_>) -> Option<&mut Recorder> {
        // SAFETY: the recorder is only reached through `Busy`, which one holder at a time has
        // (the state is single-threaded and the flag refuses a second one).
        unsafe { (*self.recorder.get()).as_deref_mut() }
    }

    pub(crate) fn start(
        &self,
        L: *mut lua_State,
        main: *mut lua_State,
        depth: usize,
        sample_bytes: u64,
    ) {
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        let seed = (L as u64)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        let rec = Box::new(Recorder::new(depth, sample_bytes, seed));
        // SAFETY: held `busy`: nobody else touches the recorder.
        unsafe { *self.recorder.get() = Some(rec) };
        drop(busy);
        self.running.set(L);
        self.main.set(main);
        self.on.set(true);
    }

    pub(crate) fn stop(&self) {
        self.on.set(false);
        let Some(_busy) = Busy::enter(&self.busy) else {
            return;
        };
        // SAFETY: held `busy`.
        drop(unsafe { (*self.recorder.get()).take() });
    }

    /// Reads the stack of the running thread and returns its site.
    ///
    /// # Safety
    /// Called from the hook for a new block, with `busy` held; `running` per its invariant.
    unsafe fn capture(&self, rec: &mut Recorder, vm: Vm) -> u32 {
        // LuaJIT: only the interpreter and C functions keep frames a reader can follow; the
        // running thread is the VM's own idea of it (see `crate::luajit`).
        #[cfg(feature = "luajit")]
        let L = {
            use crate::luajit::Doing;
            let Some(vm) = vm else {
                return rec.special_site("(unknown LuaJIT layout)");
            };
            match vm.doing() {
                Doing::Running => vm.current_thread(),
                Doing::Collecting => return rec.special_site("(garbage collector)"),
                Doing::Compiled => return rec.special_site("(JIT-compiled code)"),
                Doing::Compiling => return rec.special_site("(JIT compiler)"),
            }
        };
        #[cfg(not(feature = "luajit"))]
        let L = {
            #[allow(clippy::let_unit_value)]
            let () = vm;
            self.running.get()
        };
        if L.is_null() {
            return rec.special_site("(unknown thread)");
        }
        const WHAT: &CStr = if cfg!(feature = "lua51") {
            c"Sl"
        } else {
            c"Sln"
        };
        let mut ids = [0u32; MAX_DEPTH];
        let mut n = 0;
        let mut level = 0;
        // SAFETY: lua_Debug is plain data; zero is a valid starting value.
        let mut ar: ffi::lua_Debug = unsafe { mem::zeroed() };
        while n < rec.depth {
            // SAFETY: `L` is a live thread (invariant of `running`, or LuaJIT's current one);
            // neither call allocates nor calls into Lua with these options (see the module
            // doc); on LuaJIT a frame whose function slot holds no function (a fast function
            // that wrote a result there) is skipped, not read.
            unsafe {
                if ffi::lua_getstack(L, level, &mut ar) == 0 {
                    break;
                }
                level += 1;
                #[cfg(feature = "luajit")]
                if !crate::luajit::frame_has_function(L, &ar) {
                    continue;
                }
                if ffi::lua_getinfo(L, WHAT.as_ptr(), &mut ar) == 0 {
                    break;
                }
                ar.name = if cfg!(feature = "lua51") {
                    ptr::null()
                } else {
                    ar.name
                };
                ids[n] = rec.frame_id(&ar);
            }
            n += 1;
        }
        if n == 0 {
            return rec.special_site("(no Lua frame)");
        }
        rec.site_id(&ids[..n])
    }

    /// Before the hook serves a new block of `nsize` bytes while the scope named `scope` is
    /// active: its site and scope ids, if it is to be recorded.
    ///
    /// # Safety
    /// Called from the hook, before the block is served.
    pub(crate) unsafe fn before_new(
        &self,
        nsize: usize,
        vm: Vm,
        scope: Option<&Rc<str>>,
    ) -> Option<(u32, u32)> {
        if self.paused.get() {
            return None;
        }
        let busy = Busy::enter(&self.busy)?;
        let rec = self.recorder(&busy)?;
        if !rec.sample(nsize) {
            return None;
        }
        // SAFETY: forwarded.
        let site = unsafe { self.capture(rec, vm) };
        Some((site, rec.scope_id(scope)))
    }

    pub(crate) fn after_new(&self, block: *mut c_void, nsize: usize, (site, scope): (u32, u32)) {
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        if let Some(rec) = self.recorder(&busy) {
            rec.insert(block as usize, nsize, site, scope);
        }
    }

    /// Before the block `block` of `osize` bytes is freed.
    pub(crate) fn before_free(&self, block: *mut c_void, osize: usize) {
        let running = self.running.get() as usize;
        if running.wrapping_sub(block as usize) < osize {
            self.running.set(self.main.get());
        }
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        if let Some(rec) = self.recorder(&busy) {
            rec.remove(block as usize);
        }
    }

    pub(crate) fn after_move(&self, old: *mut c_void, new: *mut c_void, nsize: usize) {
        let Some(busy) = Busy::enter(&self.busy) else {
            return;
        };
        if let Some(rec) = self.recorder(&busy) {
            rec.moved(old as usize, new as usize, nsize);
        }
    }
}
