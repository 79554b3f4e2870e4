//! The allocation hook and scope attribution against a simple model, over random sequences of
//! operations (allocations, reallocations, frees, host failures, scopes opened, closed and
//! switched as coroutines would).
#![cfg(feature = "vendored")]

use std::cell::Cell;
use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;

use lunet_mem::hook::{hook_for, LuaAlloc, Serve, Tracker};
use lunet_mem::scope::Scope;
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
    Alloc { size: usize, tag: usize },
    Realloc { pick: usize, size: usize },
    Free { pick: usize },
    FailNext,
    OpenScope,
    CloseScope,
    SwitchTo { pick: usize },
    Deactivate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..5000, 0usize..12).prop_map(|(size, tag)| Op::Alloc { size, tag }),
        3 => (any::<usize>(), 1usize..8000).prop_map(|(pick, size)| Op::Realloc { pick, size }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::FailNext),
        1 => Just(Op::OpenScope),
        1 => Just(Op::CloseScope),
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
    let mut blocks: Vec<(*mut c_void, usize)> = [100usize, 200, 300, 4000]
        .iter()
        // SAFETY: new blocks from the host allocator.
        .map(|&n| (unsafe { host_alloc(host_ud, ptr::null_mut(), 0, n) }, n))
        .collect();
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
                if failing {
                    assert!(p.is_null());
                    continue;
                }
                blocks.push((p, size));
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
                let (p, old) = blocks[i];
                // SAFETY: `p` is a live block of `old` bytes.
                let q = unsafe { tracking_alloc(ud, p, old, size) };
                if failing {
                    assert!(q.is_null());
                    continue;
                }
                blocks[i] = (q, size);
                live = live + size as u64 - old as u64;
                peak = peak.max(live);
                totals.reallocs += 1;
                totals.allocated += size as u64;
                totals.freed += old as u64;
                attribute(&mut scopes, active, |c| {
                    c.reallocs += 1;
                    c.allocated += size as u64;
                    c.freed += old as u64;
                    c.net += size as i64 - old as i64;
                });
            }
            Op::Free { pick } if !blocks.is_empty() => {
                let (p, old) = blocks.swap_remove(pick % blocks.len());
                // SAFETY: `p` is a live block of `old` bytes.
                assert!(unsafe { tracking_alloc(ud, p, old, 0) }.is_null());
                host.fail_next.set(false); // frees never fail
                live -= old as u64;
                totals.frees += 1;
                totals.freed += old as u64;
                attribute(&mut scopes, active, |c| {
                    c.frees += 1;
                    c.freed += old as u64;
                    c.net -= old as i64;
                });
            }
            Op::FailNext => host.fail_next.set(true),
            Op::OpenScope => {
                let parent = active;
                let real = Rc::new(Scope::new(
                    format!("s{}", scopes.len()).into(),
                    tracker.active_scope(),
                ));
                tracker.set_active_scope(Some(real.clone()));
                scopes.push(ModelScope {
                    real,
                    parent,
                    closed: false,
                    counts: Counts::default(),
                });
                active = Some(scopes.len() - 1);
                open.push(scopes.len() - 1);
            }
            Op::CloseScope => {
                if let Some(i) = open.pop() {
                    scopes[i].closed = true;
                    scopes[i].real.closed.set(true);
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
            allocated: s.real.allocated_bytes.get(),
            freed: s.real.freed_bytes.get(),
            net: s.real.net_bytes.get(),
            peak: s.real.peak_bytes.get(),
        };
        assert_eq!(real, s.counts, "scope {}", s.real.name);
        assert_eq!(real.net, real.allocated as i64 - real.freed as i64);
    }
    for (p, size) in blocks {
        // SAFETY: live blocks of the test.
        unsafe { tracking_alloc(ud, p, size, 0) };
    }
    assert_eq!(tracker.live_bytes.get(), 12345);
    tracker.set_active_scope(None);
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
