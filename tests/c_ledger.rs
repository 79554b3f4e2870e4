//! One ledger for Lua and C (a scope's C account, `lunet_mem_scope_current`): random sequences
//! of Lua allocations, C charges (from the loop thread and from another thread) and releases in
//! a budgeted scope, checked against a model of the C figures, and the invariant that the scope
//! never keeps more Lua and C bytes together than its limit.
#![cfg(feature = "vendored")]
#![allow(non_snake_case)] // `L` for a `lua_State`, as in Lua's own source.

use std::ffi::{c_int, c_void};

use lunet_mem_c::{
    lunet_mem_charge, lunet_mem_scope_release, lunet_mem_scope_stats, Account, AccountStats,
};
use mlua::ffi;
use proptest::prelude::*;

mod common;
use common::new_lua;

extern "C-unwind" {
    /// As C declares it in include/lunet_mem.h (an opaque handle).
    fn lunet_mem_scope_current(L: *mut ffi::lua_State) -> *const c_void;
}

/// `scope_handle()`: the running scope's handle as a light userdata (the test releases it).
unsafe extern "C-unwind" fn l_scope_handle(L: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by Lua on the state's thread.
    unsafe {
        let s = lunet_mem_scope_current(L);
        ffi::lua_pushlightuserdata(L, s.cast_mut());
    }
    1
}

/// `c_charge(handle, bytes, on_thread)`: `lunet_mem_charge`, on this thread or another one.
unsafe extern "C-unwind" fn l_c_charge(L: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by Lua with a handle from `scope_handle`, still referenced.
    unsafe {
        let s = ffi::lua_touserdata(L, 1) as usize;
        let bytes = ffi::lua_tointeger(L, 2);
        let on_thread = ffi::lua_toboolean(L, 3) != 0;
        let status = if on_thread {
            std::thread::spawn(move || lunet_mem_charge(s as *const Account, bytes))
                .join()
                .unwrap()
        } else {
            lunet_mem_charge(s as *const Account, bytes)
        };
        ffi::lua_pushboolean(L, (status == 0) as c_int);
    }
    1
}

#[derive(Debug, Clone)]
enum Op {
    /// A Lua string of about this many bytes, kept.
    Lua(u16),
    /// Drops a kept string (freed at the next collection).
    Drop(u8),
    Collect,
    /// A C charge (on another thread if set).
    Charge(u16, bool),
    /// Releases a C charge that was admitted.
    Release(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u16..8000).prop_map(Op::Lua),
        1 => any::<u8>().prop_map(Op::Drop),
        1 => Just(Op::Collect),
        3 => ((1u16..12000), any::<bool>()).prop_map(|(n, t)| Op::Charge(n, t)),
        2 => any::<u8>().prop_map(Op::Release),
    ]
}

// The scope's budget binds the program's own bookkeeping too: its tables are made before the
// scope (slots filled), it formats no message unless a check fails, and a memory error outside
// the operations (reading the stats makes a table) skips that step's checks.
const PROGRAM: &str = r#"
local mem = require "lunet.mem"
local limit, ops = ...
local kept, charges, nkept, ncharges = {}, {}, 0, 0
for i = 1, 64 do kept[i], charges[i] = false, false end
local model = { bytes = 0, allocs = 0, frees = 0 }
local failure
local function fail(msg) failure = failure or msg end
local scope_object
local function stats() return scope_object:stats() end
-- (no collection step between a reading and the charge it predicts: only the "collect" ops)
collectgarbage("stop")
local h
-- One operation and its checks. Its own calls may run out of memory where the operation did not
-- (a Lua stack grown near the limit): the step then stops there, which changes nothing C counts.
local function step(i, op)
    local kind, a, b = op[1], op[2], op[3]
    if kind == "lua" then
      local ok, s = pcall(string.rep, "x", a)
      if ok then nkept = nkept + 1; kept[nkept] = s end
    elseif kind == "drop" and nkept > 0 then
      local k = a % nkept + 1
      kept[k], kept[nkept] = kept[nkept], false
      nkept = nkept - 1
    elseif kind == "collect" then
      collectgarbage()
    elseif kind == "charge" then
      local ok = c_charge(h, a, b)
      if ok then
        ncharges = ncharges + 1
        charges[ncharges] = a
        model.bytes, model.allocs = model.bytes + a, model.allocs + 1
      end
      -- Admitted exactly when Lua's kept bytes and C's live bytes leave room. The reading after
      -- the charge sees the figures the charge saw: nothing allocates or frees between them (its
      -- figures are read before its table is made, which may run an emergency collection).
      local got, after = pcall(stats)
      if got then
        local kept, c = after.kept_bytes, after.c_bytes
        if ok and kept + c > limit then
          fail(("op %d: admitted %d: kept %d + C %d > %d"):format(i, a, kept, c, limit))
        elseif not ok and kept + c + a <= limit then
          fail(("op %d: refused %d: kept %d + C %d leave room"):format(i, a, kept, c))
        end
      end
    elseif kind == "release" and ncharges > 0 then
      local k = a % ncharges + 1
      local n = charges[k]
      charges[k], charges[ncharges] = charges[ncharges], false
      ncharges = ncharges - 1
      if not c_charge(h, -n, false) then fail("a release refused") end
      model.bytes, model.frees = model.bytes - n, model.frees + 1
    end
    local got, s = pcall(stats)
    if got then
      if s.kept_bytes + s.c_bytes > limit then
        fail(("op %d: kept %d + C %d > %d"):format(i, s.kept_bytes, s.c_bytes, limit))
      end
      if s.c_bytes ~= model.bytes or s.c_allocs ~= model.allocs or s.c_frees ~= model.frees then
        fail(("op %d: C %d %d %d, model %d %d %d"):format(i, s.c_bytes, s.c_allocs, s.c_frees,
          model.bytes, model.allocs, model.frees))
      end
    end
end
mem.scope({ limit = limit }, function()
  scope_object = mem.current()
  h = scope_handle()
  for i, op in ipairs(ops) do
    local ok, err = pcall(step, i, op)
    if not ok and err ~= "not enough memory" then fail(tostring(err)) end
  end
end)
-- (after the scope: the call into Rust allocates, which the scope's budget may refuse)
release_handle(h)
if failure then error(failure, 0) end
return 0
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever Lua allocates and C charges in a budgeted scope, its kept Lua bytes plus its
    /// live C bytes never pass its limit, a C charge is admitted exactly when they leave room,
    /// and the C figures follow the model, charges from another thread included.
    #[test]
    fn limit_is_never_exceeded_by_lua_and_c_together(
        ops in prop::collection::vec(op(), 1..60),
        limit in 20_000i64..120_000,
    ) {
        let lua = new_lua();
        // SAFETY: well-behaved lua_CFunctions.
        unsafe {
            lua.globals().set("scope_handle", lua.create_c_function(l_scope_handle).unwrap()).unwrap();
            lua.globals().set("c_charge", lua.create_c_function(l_c_charge).unwrap()).unwrap();
        }
        let release = lua
            .create_function(|_, h: mlua::LightUserData| {
                // SAFETY: the handle `scope_handle` gave, released once.
                unsafe { lunet_mem_scope_release(h.0 as *const Account) };
                Ok(())
            })
            .unwrap();
        lua.globals().set("release_handle", release).unwrap();
        let ops_table = lua.create_table().unwrap();
        for (i, op) in ops.iter().enumerate() {
            let (kind, a, b) = match *op {
                Op::Lua(n) => ("lua", n as i64, false),
                Op::Drop(k) => ("drop", k as i64, false),
                Op::Collect => ("collect", 0, false),
                Op::Charge(n, t) => ("charge", n as i64, t),
                Op::Release(k) => ("release", k as i64, false),
            };
            let t = lua.create_table().unwrap();
            t.set(1, kind).unwrap();
            t.set(2, a).unwrap();
            t.set(3, b).unwrap();
            ops_table.set(i + 1, t).unwrap();
        }
        let result: mlua::Result<i64> = lua.load(PROGRAM).call((limit, ops_table));
        prop_assert!(result.is_ok(), "{:?}", result.err());
    }
}

#[test]
fn a_handle_outlives_its_scope_and_counts_late_charges_apart() {
    let lua = new_lua();
    // SAFETY: a well-behaved lua_CFunction.
    unsafe {
        lua.globals()
            .set(
                "scope_handle",
                lua.create_c_function(l_scope_handle).unwrap(),
            )
            .unwrap();
    }
    let h: mlua::LightUserData = lua
        .load(
            r#"
            local mem = require "lunet.mem"
            return mem.scope("request", function()
              assert(mem.charge(100))
              return scope_handle()
            end)
            "#,
        )
        .eval()
        .unwrap();
    let s = h.0 as *const Account;
    drop(lua); // the state, and the scope, are gone; the handle is not
    let stats = || {
        let mut st = AccountStats::default();
        // SAFETY: a live handle, a writable struct.
        unsafe { lunet_mem_scope_stats(s, &mut st) };
        st
    };
    let handle = s as usize;
    let t = std::thread::spawn(move || {
        // SAFETY: a live handle, from another thread.
        unsafe { lunet_mem_charge(handle as *const Account, -100) }
    });
    assert_eq!(t.join().unwrap(), 0);
    let st = stats();
    assert_eq!(
        (st.closed, st.c_bytes, st.late_bytes, st.late_frees),
        (1, 100, -100, 1)
    );
    // SAFETY: the handle's one reference.
    unsafe { lunet_mem_scope_release(s) };
}
