//! The allocation hook, scope attribution and arena scopes against a simple model, over random
//! sequences of operations (allocations, reallocations, frees, host failures, scopes with and
//! without arenas opened, closed and switched as coroutines would).
//!
//! Every live block is filled with a pattern of its own and checked when it is resized or freed
//! and at the end: a block placed in memory that another live block uses, or in a reclaimed
//! chunk that was reused, breaks a pattern.
#![cfg(feature = "vendored")]

use std::cell::Cell;
use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;

use lunet_mem::testing::{
    arena_owner, hook_for, LuaAlloc, Owner, Scope, Serve, Tracker, MAX_BLOCK,
};
use proptest::prelude::*;

/// A host allocator (libc) that fails the calls it is told to fail.
struct Host {
    fail_next: Cell<bool>,
}

unsafe extern "C" fn host_alloc(
    ud: *mut c_void,
    p: *mut c_void,
    _osize: usize,
    nsize: usize,
) -> *mut c_void {
    // SAFETY: `ud` is the test's `Host`; libc realloc/free contract.
    unsafe {
        let host = &*(ud as *const Host);
        if nsize == 0 {
            libc_free(p);
            return ptr::null_mut();
        }
        if host.fail_next.replace(false) {
            return ptr::null_mut();
        }
        libc_realloc(p, nsize)
    }
}

extern "C" {
    #[link_name = "realloc"]
    fn libc_realloc(p: *mut c_void, n: usize) -> *mut c_void;
    #[link_name = "free"]
    fn libc_free(p: *mut c_void);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        size: usize,
        tag: usize,
    },
    Realloc {
        pick: usize,
        size: usize,
    },
    Free {
        pick: usize,
    },
    FailNext,
    OpenScope,
    /// A scope with an arena whose first chunk holds `chunk` bytes.
    OpenArenaScope {
        chunk: usize,
    },
    CloseScope,
    SwitchTo {
        pick: usize,
    },
    Deactivate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..5000, 0usize..12).prop_map(|(size, tag)| Op::Alloc { size, tag }),
        3 => (any::<usize>(), 1usize..8000).prop_map(|(pick, size)| Op::Realloc { pick, size }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::FailNext),
        1 => Just(Op::OpenScope),
        2 => prop_oneof![Just(4096usize), Just(16384), Just(1 << 20)]
            .prop_map(|chunk| Op::OpenArenaScope { chunk }),
        2 => Just(Op::CloseScope),
        1 => any::<usize>().prop_map(|pick| Op::SwitchTo { pick }),
        1 => Just(Op::Deactivate),
    ]
}

#[derive(Default, Clone, PartialEq, Debug)]
struct Counts {
    allocs: u64,
    frees: u64,
    reallocs: u64,
    allocated: u64,
    freed: u64,
    net: i64,
    peak: i64,
}

struct ModelScope {
    real: Rc<Scope>,
    parent: Option<usize>,
    closed: bool,
    counts: Counts,
    /// The scope whose arena new objects go to while this one is active (itself, or the one it
    /// was opened in), if any.
    arena_scope: Option<usize>,
}

/// A live block of the test: address, size, and the byte it is filled with.
type Block = (*mut c_void, usize, u8);

/// Fills `size` bytes at `p` with `fill`.
fn fill(p: *mut c_void, size: usize, fill: u8) {
    // SAFETY: `p` is a live block of at least `size` bytes.
    unsafe { ptr::write_bytes(p as *mut u8, fill, size) };
}

/// Checks that the first `size` bytes at `p` are all `fill`, and that an arena block is in an
/// arena that is not reclaimed.
fn check(p: *mut c_void, size: usize, fill: u8) {
    // SAFETY: `p` is a live block of at least `size` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
    assert!(
        bytes.iter().all(|&b| b == fill),
        "block {p:?} of {size} bytes was overwritten"
    );
    // SAFETY: a live block.
    if let Owner::Reclaimed = unsafe { arena_owner(p) } {
        panic!("live block {p:?} is in reclaimed arena memory");
    }
}

/// The scope a free counts for: for an arena block, the active scope if it places its blocks
/// in that arena, else the arena's scope if open; for another block, the active scope unless
/// it places its blocks in an arena.
fn free_attribution(
    scopes: &[ModelScope],
    active: Option<usize>,
    arena: Option<String>,
) -> Option<usize> {
    let active_arena = active.and_then(|a| scopes[a].arena_scope);
    match arena {
        Some(name) => {
            let owner: usize = name[1..].parse().expect("arena names are s<index>");
            if active_arena == Some(owner) {
                active
            } else {
                Some(owner).filter(|&o| !scopes[o].closed)
            }
        }
        None if active_arena.is_none() => active,
        None => None,
    }
}

/// The name of the arena that holds `p`, if any.
fn arena_name(p: *mut c_void) -> Option<String> {
    // SAFETY: a live block.
    match unsafe { arena_owner(p) } {
        Owner::Arena(a) => Some(a.name.to_string()),
        _ => None,
    }
}

/// Applies `f` to the active scope and its open ancestors, as the hook does.
fn attribute(scopes: &mut [ModelScope], active: Option<usize>, f: impl Fn(&mut Counts)) {
    let mut at = active;
    while let Some(i) = at {
        if scopes[i].closed {
            break;
        }
        f(&mut scopes[i].counts);
        let c = &mut scopes[i].counts;
        c.peak = c.peak.max(c.net);
        at = scopes[i].parent;
    }
}

fn run(ops: Vec<Op>, serve: Serve) {
    let host = Host {
        fail_next: Cell::new(false),
    };
    let host_ud = &host as *const Host as *mut c_void;
    // Blocks the host made before the hook was installed; they count in the baseline.
    let mut blocks: Vec<Block> = [100usize, 200, 300, 4000]
        .iter()
        // SAFETY: new blocks from the host allocator.
        .map(|&n| (unsafe { host_alloc(host_ud, ptr::null_mut(), 0, n) }, n, 0))
        .collect();
    for &(p, n, f) in &blocks {
        fill(p, n, f);
    }
    let mut next_fill = 0u8;
    let mut fresh_fill = move || {
        next_fill = next_fill.wrapping_add(1);
        next_fill
    };
    let baseline = 12345u64 + 4600;
    let tracker = Box::new(Tracker::new(host_alloc, host_ud, baseline));
    let ud = &*tracker as *const Tracker as *mut c_void;
    let tracking_alloc: LuaAlloc = hook_for(serve);
    let (mut live, mut peak) = (baseline, baseline);
    let mut totals = Counts::default();
    let mut scopes: Vec<ModelScope> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut active: Option<usize> = None;

    for op in ops {
        // With mimalloc serving, the host is only asked to free its own blocks (never fails).
        let failing = serve == Serve::Host && host.fail_next.get();
        if serve == Serve::Mimalloc {
            host.fail_next.set(false);
        }
        match op {
            Op::Alloc { size, tag } => {
                // SAFETY: a new block, per the lua_Alloc contract.
                let p = unsafe { tracking_alloc(ud, ptr::null_mut(), tag, size) };
                let expected = active
                    .and_then(|a| scopes[a].arena_scope)
                    .filter(|_| size <= MAX_BLOCK)
                    .map(|a| scopes[a].real.name.to_string());
                // A block placed in an arena never reaches the host (which would fail it).
                if failing && expected.is_none() {
                    assert!(p.is_null());
                    continue;
                }
                let f = fresh_fill();
                fill(p, size, f);
                assert_eq!(arena_name(p), expected, "block of {size} bytes, tag {tag}");
                blocks.push((p, size, f));
                live += size as u64;
                peak = peak.max(live);
                totals.allocs += 1;
                totals.allocated += size as u64;
                attribute(&mut scopes, active, |c| {
                    c.allocs += 1;
                    c.allocated += size as u64;
                    c.net += size as i64;
                });
            }
            Op::Realloc { pick, size } if !blocks.is_empty() => {
                let i = pick % blocks.len();
                let (p, old, f) = blocks[i];
                check(p, old, f);
                // (a resize counts for the scope a free of the block would)
                let to = free_attribution(&scopes, active, arena_name(p));
                // SAFETY: `p` is a live block of `old` bytes.
                let q = unsafe { tracking_alloc(ud, p, old, size) };
                // An arena block resized in place or moved within its arena never reaches the
                // host; one that reaches it fails, leaving the block as it was.
                if q.is_null() {
                    assert!(failing && !host.fail_next.get());
                    check(p, old, f);
                    continue;
                }
                assert!(
                    !failing || host.fail_next.get(),
                    "a failing host was not asked"
                );
                check(q, old.min(size), f);
                let f = fresh_fill();
                fill(q, size, f);
                blocks[i] = (q, size, f);
                live = live + size as u64 - old as u64;
                peak = peak.max(live);
                totals.reallocs += 1;
                totals.allocated += size as u64;
                totals.freed += old as u64;
                attribute(&mut scopes, to, |c| {
                    c.reallocs += 1;
                    c.allocated += size as u64;
                    c.freed += old as u64;
                    c.net += size as i64 - old as i64;
                });
            }
            Op::Free { pick } if !blocks.is_empty() => {
                let (p, old, f) = blocks.swap_remove(pick % blocks.len());
                check(p, old, f);
                let to = free_attribution(&scopes, active, arena_name(p));
                // SAFETY: `p` is a live block of `old` bytes.
                assert!(unsafe { tracking_alloc(ud, p, old, 0) }.is_null());
                host.fail_next.set(false); // frees never fail
                live -= old as u64;
                totals.frees += 1;
                totals.freed += old as u64;
                attribute(&mut scopes, to, |c| {
                    c.frees += 1;
                    c.freed += old as u64;
                    c.net -= old as i64;
                });
            }
            Op::FailNext => host.fail_next.set(true),
            Op::OpenScope | Op::OpenArenaScope { .. } => {
                let parent = active;
                let chunk = match op {
                    Op::OpenArenaScope { chunk } => Some(chunk),
                    _ => None,
                };
                let real = Scope::new(
                    format!("s{}", scopes.len()).into(),
                    tracker.active_scope(),
                    chunk,
                    &tracker.arenas,
                );
                tracker.set_active_scope(Some(real.clone()));
                let arena_scope = match chunk {
                    Some(_) => Some(scopes.len()),
                    None => parent.and_then(|p| scopes[p].arena_scope),
                }
                // An arena takes no block once its scope has closed.
                .filter(|&a| a == scopes.len() || !scopes[a].closed);
                scopes.push(ModelScope {
                    real,
                    parent,
                    closed: false,
                    counts: Counts::default(),
                    arena_scope,
                });
                active = Some(scopes.len() - 1);
                open.push(scopes.len() - 1);
            }
            Op::CloseScope => {
                if let Some(i) = open.pop() {
                    scopes[i].closed = true;
                    scopes[i].real.close();
                    // Inner scopes that use this scope's arena no longer place blocks in it.
                    for s in scopes.iter_mut() {
                        if s.arena_scope == Some(i) {
                            s.arena_scope = None;
                        }
                    }
                    active = open.last().copied();
                    tracker.set_active_scope(active.map(|a| scopes[a].real.clone()));
                }
            }
            Op::SwitchTo { pick } if !open.is_empty() => {
                let i = open[pick % open.len()];
                active = Some(i);
                tracker.set_active_scope(Some(scopes[i].real.clone()));
            }
            Op::Deactivate => {
                active = None;
                tracker.set_active_scope(None);
            }
            _ => {}
        }
        assert_eq!(tracker.live_bytes.get(), live);
        assert!(tracker.peak_bytes.get() >= tracker.live_bytes.get());
        check_arenas(&tracker, &blocks, &scopes);
    }

    assert_eq!(tracker.peak_bytes.get(), peak);
    assert_eq!(tracker.allocs.get(), totals.allocs);
    assert_eq!(tracker.frees.get(), totals.frees);
    assert_eq!(tracker.reallocs.get(), totals.reallocs);
    assert_eq!(tracker.bytes_allocated.get(), totals.allocated);
    assert_eq!(tracker.bytes_freed.get(), totals.freed);
    assert_eq!(
        baseline + tracker.bytes_allocated.get() - tracker.bytes_freed.get(),
        live
    );
    for s in &scopes {
        let real = Counts {
            allocs: s.real.allocs.get(),
            frees: s.real.frees.get(),
            reallocs: s.real.reallocs.get(),
            allocated: s.real.bytes_allocated.get(),
            freed: s.real.bytes_freed.get(),
            net: s.real.net_bytes.get(),
            peak: s.real.peak_bytes.get(),
        };
        assert_eq!(real, s.counts, "scope {}", s.real.name);
        assert_eq!(real.net, real.allocated as i64 - real.freed as i64);
    }
    for (p, size, f) in blocks {
        check(p, size, f);
        // SAFETY: live blocks of the test.
        unsafe { tracking_alloc(ud, p, size, 0) };
    }
    assert_eq!(tracker.live_bytes.get(), 12345);
    tracker.set_active_scope(None);
    for s in &scopes {
        s.real.close();
    }
    assert_eq!(tracker.arenas.count.get(), 0, "every arena is reclaimed");
    assert_eq!(tracker.arenas.reserved_bytes.get(), 0);
    assert_eq!(tracker.arenas.live_blocks.get(), 0);
}

/// The arenas' counts agree with the live blocks: live blocks and bytes in arenas, and an arena
/// is kept exactly while its scope is open or a block lives in it.
fn check_arenas(tracker: &Tracker, blocks: &[Block], scopes: &[ModelScope]) {
    let mut in_arenas = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for &(p, size, _) in blocks {
        if let Some(name) = arena_name(p) {
            let e = in_arenas.entry(name).or_default();
            e.0 += 1;
            e.1 += size as u64;
        }
    }
    let set = &tracker.arenas;
    assert_eq!(
        set.live_blocks.get(),
        in_arenas.values().map(|e| e.0).sum::<u64>()
    );
    assert_eq!(
        set.live_bytes.get(),
        in_arenas.values().map(|e| e.1).sum::<u64>()
    );
    let kept = scopes
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            s.real.own_arena().is_some() && (!s.closed || in_arenas.contains_key(&format!("s{i}")))
        })
        .count();
    assert_eq!(set.count.get() as usize, kept, "arenas not reclaimed");
    for info in set.list() {
        let (blocks, bytes) = in_arenas.get(&*info.name).copied().unwrap_or_default();
        assert_eq!(
            (info.live_blocks, info.live_bytes),
            (blocks, bytes),
            "{}",
            info.name
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn live_bytes_always_equals_the_model(ops in prop::collection::vec(op(), 1..300)) {
        run(ops, Serve::Host);
    }

    #[test]
    fn live_bytes_always_equals_the_model_with_mimalloc_serving(
        ops in prop::collection::vec(op(), 1..300)
    ) {
        run(ops, Serve::Mimalloc);
    }
}

#[test]
fn failed_allocations_are_not_counted() {
    run_both(vec![
        Op::Alloc { size: 100, tag: 5 },
        Op::FailNext,
        Op::Alloc { size: 50, tag: 4 },
        Op::FailNext,
        Op::Realloc {
            pick: 0,
            size: 4000,
        },
        Op::Free { pick: 0 },
    ]);
}

#[test]
fn scope_counts_roll_up_to_open_ancestors_only() {
    run_both(vec![
        Op::OpenScope,
        Op::OpenScope,
        Op::Alloc { size: 10, tag: 5 },
        Op::SwitchTo { pick: 0 },
        Op::CloseScope, // closes the inner one; the outer stays
        Op::Alloc { size: 20, tag: 5 },
        Op::Free { pick: 0 },
        Op::CloseScope,
        Op::Alloc { size: 30, tag: 5 },
    ]);
}

fn run_both(ops: Vec<Op>) {
    run(ops.clone(), Serve::Host);
    run(ops, Serve::Mimalloc);
}

#[test]
fn the_tracker_ends_with_the_last_block() {
    // A tracker whose baseline is one block: freeing it frees the tracker (checked by running
    // under the test's allocator without a crash; valgrind/ASan would see a double free or leak).
    let host = Host {
        fail_next: Cell::new(false),
    };
    let host_ud = &host as *const Host as *mut c_void;
    // SAFETY: a block from the host, then the hook frees it and with it the tracker.
    unsafe {
        let last = host_alloc(host_ud, ptr::null_mut(), 0, 64);
        let tracker = Box::into_raw(Box::new(Tracker::new(host_alloc, host_ud, 64)));
        let hook = hook_for(Serve::Mimalloc);
        let extra = hook(tracker.cast(), ptr::null_mut(), 0, 32);
        assert!(!extra.is_null());
        hook(tracker.cast(), extra, 32, 0);
        assert_eq!((*tracker).live_bytes.get(), 64);
        hook(tracker.cast(), last, 64, 0);
    }
}
