//! Scopes: named regions of execution whose allocations are counted apart.
//!
//! A scope is opened in a Lua thread (coroutine), and allocations are attributed to the innermost
//! open scope of the running thread, then rolled up to the scopes it was opened in. Which scope is
//! active follows the coroutines: see [`ThreadScopes`] and `crate::lua_api`'s enter/leave.

use std::cell::Cell;
use std::ptr;
use std::rc::Rc;

/// One scope and its counters (see the `scope:stats()` fields in the README).
pub struct Scope {
    pub name: Rc<str>,
    pub allocs: Cell<u64>,
    pub frees: Cell<u64>,
    pub reallocs: Cell<u64>,
    pub allocated_bytes: Cell<u64>,
    pub freed_bytes: Cell<u64>,
    /// `allocated_bytes - freed_bytes`.
    pub net_bytes: Cell<i64>,
    /// Highest `net_bytes` while the scope was open.
    pub peak_bytes: Cell<i64>,
    /// Set when the scope ends; a closed scope's counters no longer move.
    pub closed: Cell<bool>,
    /// The scope that was active when this one was opened: counts roll up to it.
    parent: Option<Rc<Scope>>,
    /// `parent` as a raw pointer for the allocation hook. Invariant: equal to `parent`'s pointer
    /// (or null), so it is valid as long as `self` is.
    parent_ptr: *const Scope,
}

impl Scope {
    pub fn new(name: Rc<str>, parent: Option<Rc<Scope>>) -> Scope {
        let parent_ptr = parent.as_ref().map_or(ptr::null(), Rc::as_ptr);
        Scope {
            name,
            allocs: Cell::new(0),
            frees: Cell::new(0),
            reallocs: Cell::new(0),
            allocated_bytes: Cell::new(0),
            freed_bytes: Cell::new(0),
            net_bytes: Cell::new(0),
            peak_bytes: Cell::new(0),
            closed: Cell::new(false),
            parent,
            parent_ptr,
        }
    }

    pub fn parent(&self) -> Option<&Rc<Scope>> {
        self.parent.as_ref()
    }

    #[inline(always)]
    fn add_net(&self, delta: i64) {
        let net = self.net_bytes.get() + delta;
        self.net_bytes.set(net);
        if net > self.peak_bytes.get() {
            self.peak_bytes.set(net);
        }
    }

    /// Walks from `scope` to its open ancestors, applying `f` to each.
    ///
    /// # Safety
    /// `scope` must point to a live `Scope` (its ancestors are then alive: each holds its parent).
    #[inline(always)]
    unsafe fn walk(mut scope: *const Scope, f: impl Fn(&Scope)) {
        while !scope.is_null() {
            // SAFETY: the caller guarantees the first pointer; each next one is `parent_ptr`,
            // kept alive by `parent`.
            let s = unsafe { &*scope };
            if s.closed.get() {
                break;
            }
            f(s);
            scope = s.parent_ptr;
        }
    }

    /// # Safety
    /// As for [`Scope::walk`].
    #[inline(always)]
    pub unsafe fn attribute_alloc(scope: *const Scope, nsize: u64) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                s.allocs.set(s.allocs.get() + 1);
                s.allocated_bytes.set(s.allocated_bytes.get() + nsize);
                s.add_net(nsize as i64);
            })
        }
    }

    /// # Safety
    /// As for [`Scope::walk`].
    #[inline(always)]
    pub unsafe fn attribute_free(scope: *const Scope, osize: u64) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                s.frees.set(s.frees.get() + 1);
                s.freed_bytes.set(s.freed_bytes.get() + osize);
                s.net_bytes.set(s.net_bytes.get() - osize as i64);
            })
        }
    }

    /// # Safety
    /// As for [`Scope::walk`].
    #[inline(always)]
    pub unsafe fn attribute_realloc(scope: *const Scope, osize: u64, nsize: u64) {
        // SAFETY: forwarded contract.
        unsafe {
            Scope::walk(scope, |s| {
                s.reallocs.set(s.reallocs.get() + 1);
                s.allocated_bytes.set(s.allocated_bytes.get() + nsize);
                s.freed_bytes.set(s.freed_bytes.get() + osize);
                s.add_net(nsize as i64 - osize as i64);
            })
        }
    }
}

/// The scopes one Lua thread has open, innermost last, and the scope it inherits when none is
/// open: the one that was active in the coroutine that resumed it last (`base`).
#[derive(Default)]
pub struct ThreadScopes {
    pub stack: Vec<Rc<Scope>>,
    pub base: Option<Rc<Scope>>,
}

impl ThreadScopes {
    /// The scope allocations of this thread go to.
    pub fn effective(&self) -> Option<Rc<Scope>> {
        self.stack.last().or(self.base.as_ref()).cloned()
    }
}
