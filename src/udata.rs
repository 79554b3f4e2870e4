//! Typed userdata: the module's Lua objects (checkpoints, scope handles, trace snapshots, thread
//! records) hold a Rust box, and every C function that takes one checks that it is one.
//!
//! A script reaches much more than the module hands out: `debug.getregistry()` holds the
//! metatables and the thread records, `debug.getmetatable(cp).__gc` is callable by hand with any
//! value, and `debug.getupvalue` reaches every internal function. So a value is taken as a `T`
//! only if it is a userdata of exactly the slot's size, carries the metatable registered for `T`
//! (compared by identity, as `luaL_testudata` does), and holds the slot's tag: a per-type
//! constant mixed with the slot's own address, which no Lua code can write and no other library's
//! userdata holds. A finalized slot is emptied, so a second `__gc` (by hand) does nothing.
//!
//! A leaf: checking an argument (raising `bad argument` when it is not a `T`) is
//! `check_udata` in `src/bindings/errors.rs`, with the other ways of raising.

use std::ffi::{c_int, CStr};
use std::mem;
use std::ptr;

use mlua::ffi::{self, lua_State};

/// A Rust type the module keeps in a userdata.
pub trait Boxed: Sized {
    /// Registry key of its metatable.
    const METATABLE: &'static CStr;
    /// What `bad argument` errors call it.
    const NAME: &'static CStr;
    /// Its tag (any constant distinct from the other types').
    const TAG: u64;

    /// What the `__gc` metamethod does before it drops the value (by default, nothing).
    ///
    /// # Safety
    /// `L` is the thread running the metamethod (called by the collector or by hand), with
    /// `LUA_MINSTACK` free slots; the value is no longer in its userdata. Must not raise.
    unsafe fn finalize(&mut self, _L: *mut lua_State) {}
}

/// The userdata's contents.
#[repr(C)]
struct Slot<T> {
    /// `T::TAG` mixed with the slot's address while the slot holds a value.
    tag: u64,
    /// The boxed value, or null once finalized.
    value: *mut T,
}

fn tag_of<T: Boxed>(slot: *const Slot<T>) -> u64 {
    T::TAG ^ (slot as u64).rotate_left(17)
}

/// Creates (or finds, when the module is loaded again) the metatable of `T`, with a `__gc` that
/// drops the box and `__metatable = false`, and leaves it on the stack.
///
/// # Safety
/// `L` valid with 3 free slots. May raise (memory).
pub unsafe fn new_metatable<T: Boxed>(L: *mut lua_State) {
    // SAFETY: valid state.
    unsafe {
        if ffi::luaL_newmetatable(L, T::METATABLE.as_ptr()) != 0 {
            ffi::lua_pushcfunction(L, gc::<T>);
            ffi::lua_setfield(L, -2, c"__gc".as_ptr());
            ffi::lua_pushboolean(L, 0);
            ffi::lua_setfield(L, -2, c"__metatable".as_ptr());
        }
    }
}

/// Pushes a new userdata holding the value `make` returns, and returns a reference to it.
/// `make` runs once the userdata exists, so that no Rust value is alive while Lua allocates it
/// (a memory error there raises). If the metatable was replaced (the registry is reachable
/// from Lua), the object is made without one: it is then never taken as a `T` and its box is
/// never freed (no finalizer), a leak, not a crash.
///
/// # Safety
/// `L` valid with 2 free slots. May raise (memory) before `make` runs.
pub unsafe fn push<'a, T: Boxed>(L: *mut lua_State, make: impl FnOnce() -> T) -> &'a mut T {
    // SAFETY: valid state; the slot is filled before the metatable (with its __gc) is set.
    unsafe {
        let slot = ffi::lua_newuserdata(L, mem::size_of::<Slot<T>>()) as *mut Slot<T>;
        slot.write(Slot {
            tag: tag_of::<T>(slot),
            value: ptr::null_mut(),
        });
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, T::METATABLE.as_ptr());
        if ffi::lua_type(L, -1) == ffi::LUA_TTABLE {
            ffi::lua_setmetatable(L, -2);
        } else {
            ffi::lua_pop(L, 1);
        }
        let value = Box::into_raw(Box::new(make()));
        (*slot).value = value;
        &mut *value
    }
}

/// The slot of the userdata at `idx` if it is a `T`'s (see the module doc).
///
/// # Safety
/// `L` valid with 2 free slots, `idx` acceptable.
unsafe fn slot_at<T: Boxed>(L: *mut lua_State, idx: c_int) -> *mut Slot<T> {
    // SAFETY: valid state; the contents are read only once the size and metatable match.
    unsafe {
        if ffi::lua_type(L, idx) != ffi::LUA_TUSERDATA
            || ffi::lua_rawlen(L, idx) != mem::size_of::<Slot<T>>()
        {
            return ptr::null_mut();
        }
        let slot = ffi::lua_touserdata(L, idx) as *mut Slot<T>;
        if slot.is_null() || ffi::lua_getmetatable(L, idx) == 0 {
            return ptr::null_mut();
        }
        ffi::lua_getfield(L, ffi::LUA_REGISTRYINDEX, T::METATABLE.as_ptr());
        let same = ffi::lua_rawequal(L, -1, -2) != 0;
        ffi::lua_pop(L, 2);
        if same && (*slot).tag == tag_of::<T>(slot) {
            slot
        } else {
            ptr::null_mut()
        }
    }
}

/// The `T` in the userdata at `idx`, if it is one and not finalized.
///
/// # Safety
/// `L` valid with 2 free slots, `idx` acceptable. The reference lives while the value stays
/// referenced (on the stack, for instance).
pub unsafe fn test<'a, T: Boxed>(L: *mut lua_State, idx: c_int) -> Option<&'a mut T> {
    // SAFETY: forwarded contract; a tagged slot holds a valid box or null.
    unsafe {
        let slot = slot_at::<T>(L, idx);
        if slot.is_null() {
            None
        } else {
            (*slot).value.as_mut()
        }
    }
}

/// `__gc` of a `T`: drops the box once; does nothing for any other value.
unsafe extern "C-unwind" fn gc<T: Boxed>(L: *mut lua_State) -> c_int {
    // SAFETY: only a checked slot is emptied and its box dropped.
    unsafe {
        let slot = slot_at::<T>(L, 1);
        if !slot.is_null() {
            let value = mem::replace(&mut (*slot).value, ptr::null_mut());
            if !value.is_null() {
                let mut boxed = Box::from_raw(value);
                boxed.finalize(L);
                drop(boxed);
            }
        }
    }
    0
}
