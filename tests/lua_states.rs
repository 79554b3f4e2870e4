//! The module in real Lua states (mlua's vendored Lua 5.4, 5.5 or LuaJIT): exact counts over random
//! programs, several states in several threads, loading twice, closing, and the C entry for
//! resuming coroutines.
#![cfg(feature = "vendored")]
#![allow(non_snake_case)] // `L` for a `lua_State`, as in Lua's own source.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CString};
use std::ptr;

use mlua::{ffi, Lua, Table};
use proptest::prelude::*;

mod common;
use common::new_lua;

/// Lua that checks exactness in a function kept out of the JIT (the recorder may allocate
/// between two readings; that is real memory, not a counting error).
const PRELUDE: &str = r#"
mem = require "lunet.mem"
function exact(where)
  local counted = collectgarbage("count") * 1024
  local live = mem.stats().live_bytes
  if live ~= counted then error(("%s: live %d ~= counted %d"):format(where, live, counted)) end
end
if jit then jit.off(exact) end
keep = {}
"#;

#[derive(Debug, Clone)]
enum LuaOp {
    Tables(u16),
    Strings(u16),
    Closures(u8),
    Coroutine(u8),
    Drop(u8),
    Step,
    Collect,
    Scope(u8),
    Checkpoint,
}

fn lua_op() -> impl Strategy<Value = LuaOp> {
    prop_oneof![
        (1u16..300).prop_map(LuaOp::Tables),
        (1u16..300).prop_map(LuaOp::Strings),
        (1u8..50).prop_map(LuaOp::Closures),
        (1u8..20).prop_map(LuaOp::Coroutine),
        any::<u8>().prop_map(LuaOp::Drop),
        Just(LuaOp::Step),
        Just(LuaOp::Collect),
        (1u8..50).prop_map(LuaOp::Scope),
        Just(LuaOp::Checkpoint),
    ]
}

fn render(op: &LuaOp) -> String {
    match op {
        LuaOp::Tables(n) => format!("for i = 1, {n} do keep[#keep % 64 + 1] = {{ i, {{}} }} end"),
        LuaOp::Strings(n) => format!("for i = 1, {n} do keep[i % 50 + 1] = ('s%d'):format(i) .. ('x'):rep(i % 90) end"),
        LuaOp::Closures(n) => format!("for i = 1, {n} do keep[i % 30 + 1] = function() return i end end"),
        LuaOp::Coroutine(n) => format!(
            "local co = coroutine.wrap(function() for i = 1, {n} do coroutine.yield({{ i }}) end end) \
             for i = 1, {n} do co() end keep[7] = co"
        ),
        LuaOp::Drop(k) => format!("keep[{}] = nil", k % 64 + 1),
        LuaOp::Step => "collectgarbage('step')".into(),
        LuaOp::Collect => "collectgarbage('collect')".into(),
        LuaOp::Scope(n) => format!(
            "keep[3] = mem.scope('op', function() local t = {{}} for i = 1, {n} do t[i] = {{ i }} end return t end)"
        ),
        LuaOp::Checkpoint => "local cp = mem.checkpoint({ collect = false }) keep[5] = cp:delta()".into(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn live_bytes_equals_the_state_count_after_every_operation(
        ops in prop::collection::vec(lua_op(), 1..40)
    ) {
        let lua = new_lua();
        lua.load(PRELUDE).exec().unwrap();
        for (i, op) in ops.iter().enumerate() {
            let code = format!("{}\nexact('op {i}: ' .. {:?})", render(op), format!("{op:?}"));
            lua.load(&code).exec().unwrap();
        }
    }
}

/// A deterministic workload, with an arena per request or not; returns the numbers that must
/// not depend on other states (the arenas' chunks come from one range for the whole process).
fn workload(arena: bool) -> (i64, i64, i64) {
    let lua = new_lua();
    lua.load(PRELUDE).exec().unwrap();
    lua.globals().set("ARENA", arena).unwrap();
    lua.load(
        r#"
        -- LuaJIT: what the trace recorder allocates counts for the scope active while it runs
        if jit then jit.off() end
        collectgarbage("stop")
        local totals = { allocs = 0, net = 0 }
        for r = 1, 200 do
          mem.scope({ name = "req", arena = ARENA, on_exit = function(s)
            totals.allocs = totals.allocs + s.allocs
            totals.net = totals.net + s.net_bytes
          end }, function()
            local rows = {}
            for i = 1, 30 do rows[i] = { id = i, name = "n" .. i } end
            assert(mem.arena_of(rows) == (ARENA and "req" or nil))
            return rows
          end)
          exact("round " .. r)
          if r % 50 == 0 then collectgarbage("collect") collectgarbage("stop") end
        end
        collectgarbage("restart")
        collectgarbage("collect")
        collectgarbage("collect")
        assert(mem.stats().arenas == 0, "every arena reclaimed")
        result = totals
        "#,
    )
    .exec()
    .unwrap();
    let totals: Table = lua.globals().get("result").unwrap();
    let allocs: i64 = totals.get("allocs").unwrap();
    let net: i64 = totals.get("net").unwrap();
    let exact: bool = lua
        .load("local c = collectgarbage('count') * 1024 return mem.stats().live_bytes == c")
        .eval()
        .unwrap();
    (allocs, net, exact as i64)
}

#[test]
fn several_states_in_several_threads_count_on_their_own() {
    let alone = [workload(false), workload(true)];
    assert_eq!((alone[0].2, alone[1].2), (1, 1));
    let threads: Vec<_> = (0..8)
        .map(|i| std::thread::spawn(move || (i % 2, workload(i % 2 == 1))))
        .collect();
    for t in threads {
        let (arena, result) = t.join().unwrap();
        assert_eq!(result, alone[arena]);
    }
}

/// The allocator installed on `lua`'s state, as (function address, ud).
fn allocator(lua: &Lua) -> (usize, usize) {
    let out = Cell::new((0usize, 0usize));
    // SAFETY: reading the allocator of a valid state.
    unsafe {
        lua.exec_raw::<()>((), |L| {
            let mut ud = ptr::null_mut();
            let f = ffi::lua_getallocf(L, &mut ud);
            out.set((f as usize, ud as usize));
        })
    }
    .unwrap();
    out.get()
}

#[test]
fn loading_twice_wraps_the_allocator_once() {
    let lua = new_lua();
    let host = allocator(&lua);
    lua.load("m1 = require 'lunet.mem'").exec().unwrap();
    let first = allocator(&lua);
    assert_ne!(first, host);
    let hook = lunet_mem::testing::hook_for(lunet_mem::testing::default_serve());
    assert_eq!(first.0, hook as *const () as usize);
    lua.load(
        r#"
        local resume = coroutine.resume
        package.loaded["lunet.mem"] = nil
        m2 = require "lunet.mem"
        assert(m1 ~= m2 and coroutine.resume == resume)
        local c = collectgarbage("count") * 1024
        assert(m2.stats().live_bytes == c)
        "#,
    )
    .exec()
    .unwrap();
    assert_eq!(allocator(&lua), first);
}

/// A host allocator that counts its live blocks and bytes.
#[derive(Default)]
struct Counting {
    blocks: Cell<i64>,
    bytes: Cell<i64>,
}

unsafe extern "C" fn counting_alloc(
    ud: *mut c_void,
    p: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void {
    // SAFETY: `ud` is the test's `Counting`; libc realloc/free contract.
    unsafe {
        let c = &*(ud as *const Counting);
        if nsize == 0 {
            if !p.is_null() {
                c.blocks.set(c.blocks.get() - 1);
                c.bytes.set(c.bytes.get() - osize as i64);
            }
            libc_free(p);
            return ptr::null_mut();
        }
        let q = libc_realloc(p, nsize);
        if !q.is_null() {
            if p.is_null() {
                c.blocks.set(c.blocks.get() + 1);
                c.bytes.set(c.bytes.get() + nsize as i64);
            } else {
                c.bytes.set(c.bytes.get() + nsize as i64 - osize as i64);
            }
        }
        q
    }
}

extern "C" {
    #[link_name = "realloc"]
    fn libc_realloc(p: *mut c_void, n: usize) -> *mut c_void;
    #[link_name = "free"]
    fn libc_free(p: *mut c_void);
}

/// Runs `code` in `L`; panics with the error message if it fails.
///
/// # Safety
/// `L` a valid state.
unsafe fn run(L: *mut ffi::lua_State, code: &str) {
    let code = CString::new(code).unwrap();
    // SAFETY: valid state.
    unsafe {
        if ffi::luaL_loadstring(L, code.as_ptr()) != 0 || ffi::lua_pcall(L, 0, 0, 0) != 0 {
            let msg = std::ffi::CStr::from_ptr(ffi::lua_tolstring(L, -1, ptr::null_mut()));
            panic!("{}", msg.to_string_lossy());
        }
    }
}

/// Opens the module in a raw state as `require` would, as the global `mem`.
///
/// # Safety
/// `L` a valid state with the standard libraries.
unsafe fn open_module(L: *mut ffi::lua_State) {
    // SAFETY: valid state.
    unsafe {
        ffi::lua_pushcfunction(L, lunet_mem::open);
        assert_eq!(ffi::lua_pcall(L, 0, 1, 0), 0);
        ffi::lua_setglobal(L, c"mem".as_ptr());
    }
}

/// A fresh state on the counting allocator (`lua_newstate`; 5.5 takes a seed for its string
/// hashes too: a fixed one, so that runs are alike).
///
/// # Safety
/// `counting` outlives the state.
unsafe fn new_state(counting: &Counting) -> *mut ffi::lua_State {
    let ud = counting as *const Counting as *mut c_void;
    // SAFETY: the caller's contract.
    #[cfg(feature = "lua55")]
    let L = unsafe { ffi::lua_newstate(counting_alloc, ud, 0x5eed) };
    // SAFETY: the caller's contract.
    #[cfg(not(feature = "lua55"))]
    let L = unsafe { ffi::lua_newstate(counting_alloc, ud) };
    L
}

/// A fresh state on the counting allocator, with the standard libraries and the module (`mem`).
///
/// # Safety
/// `counting` outlives the state.
unsafe fn open_state(counting: &Counting) -> *mut ffi::lua_State {
    // SAFETY: the caller's contract.
    unsafe {
        let L = new_state(counting);
        assert!(!L.is_null());
        ffi::luaL_openlibs(L);
        open_module(L);
        L
    }
}

#[test]
fn lua_close_with_live_scopes_gives_every_block_back_to_the_host() {
    let counting = Box::new(Counting::default());
    // SAFETY: a fresh state on the counting allocator, closed at the end.
    unsafe {
        let L = open_state(&counting);
        run(
            L,
            r#"
            cp = mem.checkpoint("at close")
            held = {}
            for i = 1, 20 do
              local co = coroutine.create(function()
                mem.scope("pending " .. i, function() coroutine.yield() end)
              end)
              coroutine.resume(co)
              held[i] = co
            end
            for i = 1, 20 do
              local co = coroutine.create(function()
                mem.scope({ name = "pending arena " .. i, arena = true, limit = 1e6 }, function()
                  local t = { i }
                  coroutine.yield(t)
                end)
              end)
              coroutine.resume(co)
              held[#held + 1] = co
            end
            for i = 1, 50 do
              mem.scope({ name = "pinned", arena = true }, function() held[#held + 1] = { i } end)
            end
            current = mem.scope(mem.current)
            setmetatable(held, { __gc = function() pcall(mem.stats) pcall(mem.checkpoint) end })
            "#,
        );
        assert!(counting.blocks.get() > 0);
        ffi::lua_close(L);
    }
    assert_eq!(counting.blocks.get(), 0);
    assert_eq!(counting.bytes.get(), 0);
}

#[test]
fn many_states_opened_and_closed_in_turn() {
    for _ in 0..50 {
        let counting = Box::new(Counting::default());
        // SAFETY: as above.
        unsafe {
            let L = open_state(&counting);
            run(
                L,
                "mem.scope('x', function() return {} end) assert(mem.stats().live_bytes > 0)",
            );
            ffi::lua_close(L);
        }
        assert_eq!(counting.bytes.get(), 0);
    }
}

#[test]
fn lunet_mem_resume_keeps_scopes_right_for_c_resumers() {
    let lua = new_lua();
    lua.load(
        r#"
        mem = require "lunet.mem"
        co = coroutine.create(function()
          return mem.scope("from C", function()
            local t = {}
            for i = 1, 10 do t[i] = { i } end
            coroutine.yield(mem.current().name)
            for i = 1, 10 do t[i] = { i } end
            return mem.current():stats().allocs
          end)
        end)
        "#,
    )
    .exec()
    .unwrap();
    let outcome = Cell::new((0, 0, false));
    // SAFETY: resuming a coroutine of this state from C, as a runtime would.
    unsafe {
        lua.exec_raw::<()>((), |L| {
            ffi::lua_getglobal(L, c"co".as_ptr());
            let co = ffi::lua_tothread(L, -1);
            let mut nres: c_int = 0;
            let first = lunet_mem::lunet_mem_resume(L, co, 0, &mut nres);
            ffi::lua_pop(co, nres);
            // Between the resumes, the resumer has no scope and its allocations are its own.
            run(
                L,
                "assert(mem.current() == nil) for i = 1, 100 do local _ = { i } end",
            );
            let second = lunet_mem::lunet_mem_resume(L, co, 0, &mut nres);
            let allocs = ffi::lua_tointeger(co, -1);
            let ok = (20..60).contains(&allocs);
            outcome.set((first, second, ok));
            ffi::lua_pop(L, 1);
        })
    }
    .unwrap();
    let (first, second, ok) = outcome.get();
    assert_eq!(first, ffi::LUA_YIELD);
    assert_eq!(second, ffi::LUA_OK);
    assert!(ok, "the scope counted allocations it did not make");
}

/// Lua 5.5: a C library makes external strings whose bodies it got from the state's own
/// allocator (`lua_getallocf`), as lauxlib does, and Lua frees each body through that allocator
/// after `lua_close` has run every finalizer: the module's hook, with its tracker, must still
/// be there (with the host allocator serving, it was gone, and the first such free crashed).
#[cfg(feature = "lua55")]
#[test]
fn external_strings_on_the_states_allocator_are_freed_after_the_finalizers() {
    let counting = Box::new(Counting::default());
    // SAFETY: a fresh state on the counting allocator, closed at the end; each body is a block
    // of the state's allocator, handed to Lua with that allocator to free it.
    unsafe {
        let L = open_state(&counting);
        run(
            L,
            "kept = {} setmetatable(kept, { __gc = function() mem.stats() end })",
        );
        ffi::lua_getglobal(L, c"kept".as_ptr());
        for i in 1..=20 {
            let mut ud = ptr::null_mut();
            let alloc = ffi::lua_getallocf(L, &mut ud);
            let len = 1000 + i;
            let body = alloc(ud, ptr::null_mut(), 0, len + 1) as *mut u8;
            assert!(!body.is_null());
            ptr::write_bytes(body, b'x', len);
            *body.add(len) = 0;
            ffi::lua_pushexternalstring(L, body.cast(), len, Some(alloc), ud);
            ffi::lua_rawseti(L, -2, i as ffi::lua_Integer);
        }
        ffi::lua_pop(L, 1);
        run(L, "assert(#kept[20] == 1020)");
        ffi::lua_close(L);
    }
    assert_eq!(counting.blocks.get(), 0);
    assert_eq!(counting.bytes.get(), 0);
}
