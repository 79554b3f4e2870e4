//! Request arenas and scope accounts through their C functions, from Rust: blocks, the realloc
//! form, stats, destroy and the pool, charges rolled up to the scopes above, limits, charges
//! after the scope closed, charges from other threads, worker arenas begun in a scope; and random
//! sequences of operations against a model of the arena's and the account's figures.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

use lunet_mem_c::*;
use proptest::prelude::*;

const FILE: &CStr = c"tests/request_arenas.rs";

fn file() -> *const c_char {
    FILE.as_ptr()
}

fn handle(a: &Arc<Account>) -> *const Account {
    Arc::into_raw(a.clone())
}

fn release(s: *const Account) {
    // SAFETY: a handle this test made and owns.
    unsafe { lunet_mem_scope_release(s) };
}

fn create(s: *const Account, name: &CStr) -> *mut RequestArena {
    // SAFETY: NULL or a live handle; a NUL-terminated name.
    let a = unsafe { lunet_request_arena_create(s, name.as_ptr()) };
    assert!(!a.is_null());
    a
}

fn alloc(a: *mut RequestArena, n: usize) -> *mut u8 {
    // SAFETY: a live arena, used by this thread only.
    unsafe { lunet_request_alloc(a, n) }.cast()
}

fn realloc(a: *mut RequestArena, p: *mut u8, n: usize) -> *mut u8 {
    // SAFETY: a live arena; `p` NULL or one of its live blocks.
    unsafe { lunet_request_realloc(a, p.cast::<c_void>(), n) }.cast()
}

fn stats(a: *mut RequestArena) -> RequestArenaStats {
    let mut st = RequestArenaStats::default();
    // SAFETY: a live arena, a writable struct.
    unsafe { lunet_request_arena_stats(a, &mut st) };
    st
}

fn destroy(a: *mut RequestArena) {
    // SAFETY: a live arena whose blocks are not used again.
    unsafe { lunet_request_arena_destroy(a) };
}

fn charge(s: *const Account, bytes: i64) -> c_int {
    // SAFETY: a live handle.
    unsafe { lunet_mem_charge(s, bytes) }
}

#[test]
fn blocks_are_aligned_distinct_and_keep_their_bytes() {
    let a = create(std::ptr::null(), c"GET /");
    let sizes = [1usize, 15, 16, 17, 100, 5000, 16 * 1024 + 1, 200_000, 0, 33];
    let blocks: Vec<*mut u8> = sizes.iter().map(|&n| alloc(a, n)).collect();
    for (i, (&p, &n)) in blocks.iter().zip(&sizes).enumerate() {
        assert!(!p.is_null() && p as usize % 16 == 0, "block {i}");
        // SAFETY: `n` bytes of the block.
        unsafe { std::ptr::write_bytes(p, i as u8, n) };
    }
    for (i, (&p, &n)) in blocks.iter().zip(&sizes).enumerate() {
        // SAFETY: as above.
        let bytes = unsafe { std::slice::from_raw_parts(p, n) };
        assert!(bytes.iter().all(|&b| b == i as u8), "block {i} overwritten");
    }
    let st = stats(a);
    assert_eq!(st.bytes, sizes.iter().sum::<usize>() as u64);
    assert_eq!(st.blocks, sizes.len() as u64);
    assert_eq!(st.peak_bytes, st.bytes);
    assert!(
        st.chunks >= 2,
        "a big block that does not fit gets a chunk of its own: {st:?}"
    );
    destroy(a);
}

#[test]
fn realloc_grows_in_place_moves_and_keeps_contents() {
    let a = create(std::ptr::null(), c"realloc");
    let p = alloc(a, 10);
    // SAFETY: 10 bytes.
    unsafe { std::ptr::copy_nonoverlapping(b"0123456789".as_ptr(), p, 10) };
    let q = realloc(a, p, 100);
    assert_eq!(p, q, "the last block grows in place");
    let other = alloc(a, 8);
    let r = realloc(a, q, 1000);
    assert_ne!(r, q, "a block that is not the last one moves");
    // SAFETY: at least 10 bytes, copied.
    assert_eq!(unsafe { std::slice::from_raw_parts(r, 10) }, b"0123456789");
    let st = stats(a);
    assert_eq!((st.bytes, st.blocks), (1008, 2));
    assert_eq!(st.peak_bytes, 1008);
    assert!(realloc(a, other, 0).is_null());
    assert_eq!(stats(a).bytes, 1000);
    let n = realloc(a, std::ptr::null_mut(), 5);
    assert!(!n.is_null());
    destroy(a);
}

#[test]
fn charges_count_in_the_scope_and_roll_up() {
    let parent = Account::new(None, None, 0);
    let child = Account::new(Some(parent.clone()), None, 0);
    let s = handle(&child);
    let a = create(s, c"GET /users");
    release(s); // (the arena holds its own reference)
    for n in [100, 200, 300] {
        assert!(!alloc(a, n).is_null());
    }
    let p = alloc(a, 50);
    let p = realloc(a, p, 70);
    assert!(!p.is_null());
    let c = child.stats();
    assert_eq!(c.c_bytes, 670);
    assert_eq!((c.c_allocs, c.c_frees), (5, 1));
    assert_eq!(c.c_bytes_allocated, 670 + 50);
    assert_eq!(parent.stats().c_bytes, 670);
    destroy(a);
    let c = child.stats();
    assert_eq!((c.c_bytes, c.c_frees, c.c_peak_bytes), (0, 5, 670));
    assert_eq!(parent.stats().c_bytes, 0);
}

#[test]
fn a_limit_refuses_c_past_the_lua_bytes_and_refusals_count_nothing() {
    let scope = Account::new(None, Some(10_000), 0);
    scope.set_lua_kept(6_000);
    let s = handle(&scope);
    let a = create(s, c"budget");
    assert!(!alloc(a, 3_000).is_null());
    assert!(
        alloc(a, 1_001).is_null(),
        "6000 Lua + 3000 C + 1001 > 10000"
    );
    let st = stats(a);
    assert_eq!((st.bytes, st.blocks), (3_000, 1));
    let p = alloc(a, 1_000);
    assert!(!p.is_null());
    assert!(realloc(a, p, 1_001).is_null(), "a growth past the limit");
    assert_eq!(scope.stats().c_bytes, 4_000);
    assert_eq!(scope.stats().refusals, 2);
    assert_eq!(charge(s, 1), -1);
    assert_eq!(charge(s, -4_000), 0);
    destroy(a);
    release(s);
}

#[test]
fn charges_to_a_closed_scope_are_counted_apart() {
    let parent = Account::new(None, None, 0);
    let child = Account::new(Some(parent.clone()), None, 0);
    let s = handle(&child);
    let a = create(s, c"late");
    assert!(!alloc(a, 500).is_null());
    child.close();
    assert!(!alloc(a, 100).is_null());
    destroy(a);
    let c = child.stats();
    assert_eq!((c.c_bytes, c.c_allocs, c.closed), (500, 1, 1));
    assert_eq!((c.late_bytes, c.late_allocs, c.late_frees), (-500, 1, 2));
    assert_eq!(
        parent.stats().c_bytes,
        0,
        "the open scope above sees every release"
    );
    release(s);
}

#[test]
fn charges_from_many_threads_add_up_exactly() {
    let scope = Account::new(None, None, 0);
    let s = handle(&scope) as usize;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let s = s as *const Account;
                for i in 0..10_000i64 {
                    assert_eq!(charge(s, 16 + (i + t) % 64), 0);
                }
                for i in 0..5_000i64 {
                    assert_eq!(charge(s, -(16 + (i + t) % 64)), 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let want: i64 = (0..4)
        .map(|t| (5_000..10_000i64).map(|i| 16 + (i + t) % 64).sum::<i64>())
        .sum();
    let st = scope.stats();
    assert_eq!(st.c_bytes, want);
    assert_eq!((st.c_allocs, st.c_frees), (40_000, 20_000));
    release(s as *const Account);
}

#[test]
fn concurrent_c_charges_never_pass_a_limit_together() {
    let scope = Account::new(None, Some(64 * 100), 0);
    let s = handle(&scope) as usize;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let s = s as *const Account;
                (0..1000).filter(|_| charge(s, 64) == 0).count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 100);
    assert_eq!(scope.stats().c_bytes, 6400);
    assert_eq!(scope.stats().c_peak_bytes, 6400);
    release(s as *const Account);
}

#[test]
fn a_worker_arena_begun_in_a_scope_charges_its_live_blocks() {
    let scope = Account::new(None, Some(4096), 0);
    let s = handle(&scope);
    // SAFETY: a live handle; a string literal for the file.
    unsafe { lunet_mem_arena_begin_in(s, 1024, file(), 10) };
    release(s); // (the arena holds its own reference)
                // SAFETY: a string literal for the file.
    let p = unsafe { lunet_mem_malloc_at(1000, file(), 11) };
    // SAFETY: as above.
    let q = unsafe { lunet_mem_malloc_at(2000, file(), 12) };
    assert!(!p.is_null() && !q.is_null());
    // SAFETY: as above.
    let refused = unsafe { lunet_mem_malloc_at(1500, file(), 13) };
    assert!(refused.is_null(), "past the limit");
    assert_eq!(scope.stats().c_bytes, 3000);
    // SAFETY: a nested arena charges the same scope.
    unsafe { lunet_mem_arena_begin(256, file(), 14) };
    // SAFETY: as above.
    let r = unsafe { lunet_mem_malloc_at(96, file(), 15) };
    assert!(!r.is_null());
    assert_eq!(scope.stats().c_bytes, 3096);
    // SAFETY: the nested arena is open; its block is released by the reset.
    let released = unsafe { lunet_mem_arena_end_at(ARENA_RESET, file(), 16) };
    assert_eq!(released, 1);
    // SAFETY: a live block of the open arena.
    unsafe { lunet_mem_free_at(p, file(), 17) };
    assert_eq!(scope.stats().c_bytes, 2000);
    // SAFETY: the arena is open; `q` is released by the reset.
    let released = unsafe { lunet_mem_arena_end_at(ARENA_RESET, file(), 18) };
    assert_eq!(released, 1);
    let st = scope.stats();
    assert_eq!(
        (st.c_bytes, st.c_allocs, st.c_frees, st.refusals),
        (0, 3, 3, 1)
    );
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(usize),
    Realloc(usize, usize),
    Free(usize),
    Charge(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..40_000).prop_map(Op::Alloc),
        2 => (any::<usize>(), 0usize..30_000).prop_map(|(i, n)| Op::Realloc(i, n)),
        1 => any::<usize>().prop_map(Op::Free),
        1 => (0i64..5_000).prop_map(Op::Charge),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The arena's bytes and blocks, and the scope's live C bytes, follow a model through any
    /// sequence of allocations, reallocations, releases and direct charges under a limit; live
    /// blocks never overlap and keep their contents.
    #[test]
    fn figures_follow_the_model_and_blocks_never_overlap(
        ops in prop::collection::vec(op(), 1..120),
        limit in 50_000i64..400_000,
    ) {
        let scope = Account::new(None, Some(limit), 0);
        let s = handle(&scope);
        let a = create(s, c"model");
        let mut live: Vec<(*mut u8, usize, u8)> = Vec::new();
        let mut charged = 0i64;
        let mut next_fill = 1u8;
        for op in ops {
            let bytes: i64 = live.iter().map(|b| b.1 as i64).sum::<i64>() + charged;
            match op {
                Op::Alloc(n) => {
                    let p = alloc(a, n);
                    prop_assert_eq!(p.is_null(), bytes + n as i64 > limit);
                    if !p.is_null() {
                        // SAFETY: `n` bytes of a new block.
                        unsafe { std::ptr::write_bytes(p, next_fill, n) };
                        live.push((p, n, next_fill));
                        next_fill = next_fill.wrapping_add(1).max(1);
                    }
                }
                Op::Realloc(i, n) if !live.is_empty() => {
                    let i = i % live.len();
                    let (p, old, fill) = live[i];
                    let q = realloc(a, p, n);
                    if n == 0 {
                        prop_assert!(q.is_null());
                        live.swap_remove(i);
                    } else if bytes - old as i64 + n as i64 > limit && n > old {
                        prop_assert!(q.is_null());
                    } else {
                        prop_assert!(!q.is_null());
                        // SAFETY: the kept bytes of the block.
                        let kept = unsafe { std::slice::from_raw_parts(q, old.min(n)) };
                        prop_assert!(kept.iter().all(|&b| b == fill));
                        // SAFETY: `n` bytes of the block.
                        unsafe { std::ptr::write_bytes(q, fill, n) };
                        live[i] = (q, n, fill);
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let i = i % live.len();
                    prop_assert!(realloc(a, live[i].0, 0).is_null());
                    live.swap_remove(i);
                }
                Op::Charge(n) => {
                    if charge(s, n) == 0 {
                        prop_assert!(bytes + n <= limit);
                        charged += n;
                    } else {
                        prop_assert!(bytes + n > limit);
                    }
                }
                _ => {}
            }
            let st = stats(a);
            prop_assert_eq!(st.bytes as usize, live.iter().map(|b| b.1).sum::<usize>());
            prop_assert_eq!(st.blocks as usize, live.len());
            prop_assert_eq!(scope.stats().c_bytes, st.bytes as i64 + charged);
        }
        let mut spans: Vec<(usize, usize)> = live.iter().map(|b| (b.0 as usize, b.1)).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            prop_assert!(w[0].0 + w[0].1 <= w[1].0, "overlap");
        }
        for &(p, n, fill) in &live {
            // SAFETY: a live block of `n` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(p, n) };
            prop_assert!(bytes.iter().all(|&b| b == fill));
        }
        destroy(a);
        prop_assert_eq!(scope.stats().c_bytes, charged);
        release(s);
    }
}
