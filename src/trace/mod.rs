//! Allocation tracing (`mem.trace`): live blocks by the Lua stack that allocated them, modelled
//! on Python's tracemalloc, with byte sampling as in tcmalloc and memray.
//!
//! # Where the site comes from
//!
//! The allocator gets no `lua_State`. The tracker follows the thread that runs (set by
//! `trace.start` to the calling thread, by `enter` in `src/bindings/coroutines.rs` to the coroutine
//! being resumed and by `leave` back to the resumer: the same points that make scopes follow
//! coroutines). When a new block is recorded, the stack of that thread is read with
//! `lua_getstack` and `lua_getinfo("Sl")` (`"Sln"` on 5.2+ and LuaJIT).
//!
//! Why that is safe inside an allocation (read in each version's `ldebug.c` / `lj_debug.c`):
//! `lua_getstack` walks the `CallInfo` list (5.1: the `CallInfo` array; LuaJIT: the frame links
//! from `L->base`); `lua_getinfo` with `S`, `l` and `n` writes only into the `lua_Debug` (the
//! short source is copied by `luaO_chunkid` / `lj_debug_shortname` into its buffer) and reads
//! prototypes and bytecode: no allocation, no call into Lua. Only `f` and `L` push values (not
//! used). `n` reads the calling frame's saved pc, which every call saves; on 5.1 it runs
//! `symbexec` over the caller's code (no allocation, but slow), so 5.1 frames have no name.
//! Frees and reallocations never read a stack: Lua 5.4.6+ turns the stack's pointers into
//! offsets while it reallocates the stack (`luaD_reallocstack`), and 5.1 reallocates its
//! `CallInfo` array in place; a reallocation moves the record of its block (the site is where
//! the block was first made), a free removes it.
//!
//! Phases:
//! - The collector runs finalizers as ordinary calls on the running thread: consistent stacks.
//! - LuaJIT: compiled code neither keeps `L->base` nor frames up to date (a trace inlines calls
//!   and writes frames back only when it exits), and a fast function may overwrite its own
//!   frame's function slot with a result before it allocates. The tracer reads LuaJIT's VM state
//!   (`crate::luajit`): it reads a stack only in the interpreter or a C function, from the VM's
//!   current thread, skipping frames whose function slot holds no function; allocations of
//!   compiled code, of the trace compiler and of the collector are recorded under
//!   `(JIT-compiled code)`, `(JIT compiler)` and `(garbage collector)`. `mem.trace.start` turns
//!   the compiler off and flushes the traces (`stop` turns it back on), so that code is
//!   interpreted and its sites read.
//! - A thread whose block is freed while it is the running one (resumed by a path that does not
//!   go through the wrappers, then collected) is forgotten: the main thread (or no thread,
//!   `(unknown thread)`) takes its place.
//!
//! Lines: 5.2, 5.3 and LuaJIT save the pc before any allocation; 5.1 and 5.4 do not save it
//! before a table constructor (`OP_NEWTABLE`, and 5.1's `OP_CLOSURE`), so such a block is given
//! the line of the last call, concatenation or closure of the same function.
//!
//! # Cost
//!
//! With tracing off the hook does not test anything: `mem.trace.start` installs the traced
//! twin of the hook (`lunet_mem_alloc_*_traced`, same tracker) and `stop` puts the plain one
//! back. The records live in Rust memory (mimalloc, the global allocator), never in Lua's.
//!
//! Files: `record.rs` (frames and sites: what the hook reads of a stack), `live.rs` (the map of
//! live recorded blocks), `snapshot.rs` (copies grouped by site and scope), `render.rs` (labels,
//! folded stacks, flame graphs), `pprof.rs` (heap profiles in pprof's format), `tracer.rs` (the tracer in the tracker). The traced hook that feeds it
//! is `crate::hook::traced`; the Lua functions are in `src/bindings/tracing.rs`.

mod live;
mod pprof;
mod record;
mod render;
mod snapshot;
mod tracer;

use crate::fxhash::FxMap;

pub use snapshot::{Key, Snapshot, Stat};
pub(crate) use tracer::Busy;
pub use tracer::Trace;

/// What the tracer knows of the VM: LuaJIT's checked view of its own state, if any.
#[cfg(feature = "luajit")]
type Vm = Option<crate::luajit::Vm>;
#[cfg(not(feature = "luajit"))]
type Vm = ();

/// Deepest traceback recorded (`opts.depth`).
pub const MAX_DEPTH: usize = 64;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::live::LiveBlock;
    use super::record::{Frame, Recorder};
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize, u32),
        Free(usize),
        Realloc(usize, usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let addr = (1usize..64).prop_map(|a| a * 16);
        prop_oneof![
            (addr.clone(), 0u32..4).prop_map(|(a, s)| Op::Alloc(a, s)),
            addr.clone().prop_map(Op::Free),
            (addr.clone(), addr, 1usize..512).prop_map(|(a, b, n)| Op::Realloc(a, b, n)),
        ]
    }

    proptest! {
        /// The live map holds exactly the blocks a simple model says are live, with their
        /// latest size and their first site, whatever the sequence of allocations, frees and
        /// (moving) reallocations.
        #[test]
        fn live_map_matches_the_model(ops in proptest::collection::vec(op(), 0..200)) {
            let mut rec = Recorder::new(8, 0, 1);
            let mut model: HashMap<usize, LiveBlock> = HashMap::new();
            for op in ops {
                match op {
                    Op::Alloc(a, site) => {
                        if model.contains_key(&a) { continue; } // an address is live once
                        rec.insert(a, 32, site, site % 2);
                        model.insert(a, LiveBlock { size: 32, site, scope: site % 2 });
                    }
                    Op::Free(a) => {
                        prop_assert_eq!(rec.remove(a), model.remove(&a));
                    }
                    Op::Realloc(a, b, n) => {
                        if a != b && model.contains_key(&b) { continue; }
                        rec.moved(a, b, n);
                        if let Some(old) = model.remove(&a) {
                            model.insert(b, LiveBlock { size: n, ..old });
                        }
                    }
                }
            }
            let got: HashMap<usize, LiveBlock> = rec.live().iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(got, model);
        }
    }

    #[test]
    fn exact_mode_records_every_allocation() {
        let mut rec = Recorder::new(8, 0, 1);
        assert!((0..1000).all(|_| rec.sample(1)));
        assert_eq!(Recorder::weight(0, 100), 1.0);
    }

    #[test]
    fn sampling_estimates_are_unbiased() {
        // 200k blocks of 64 bytes, sampled every 4096 bytes on average: the scaled estimate is
        // within 5% of the truth.
        let n = 200_000usize;
        let mut rec = Recorder::new(8, 4096, 12345);
        let site = rec.special_site("x");
        for i in 0..n {
            if rec.sample(64) {
                rec.insert(i * 16 + 16, 64, site, 0);
            }
        }
        let snap = rec.snapshot();
        let bytes = snap.sites[0].bytes;
        let truth = (n * 64) as f64;
        assert!((bytes - truth).abs() / truth < 0.05, "{bytes} vs {truth}");
    }

    #[test]
    fn top_groups_and_sorts() {
        let mut rec = Recorder::new(8, 0, 1);
        rec.frames.push(Frame {
            src: "a.lua".into(),
            line: 3,
            defined: 1,
            name: Some("f".into()),
            what: b'L',
        });
        rec.frames.push(Frame {
            src: "a.lua".into(),
            line: 4,
            defined: 1,
            name: Some("f".into()),
            what: b'L',
        });
        rec.frames.push(Frame {
            src: "a.lua".into(),
            line: 9,
            defined: 0,
            name: None,
            what: b'm',
        });
        let s1 = rec.site_id(&[0, 2]);
        let s2 = rec.site_id(&[1, 2]);
        rec.insert(16, 100, s1, 0);
        rec.insert(32, 300, s2, 1);
        rec.insert(48, 100, s2, 2);
        let snap = rec.snapshot();
        let lines = snap.top(Key::Line);
        assert_eq!(lines[0].site, "a.lua:4");
        assert_eq!((lines[0].bytes, lines[0].blocks), (400.0, 2.0));
        assert_eq!(lines[1].site, "a.lua:3");
        let funcs = snap.top(Key::Function);
        assert_eq!(funcs.len(), 1);
        assert_eq!(funcs[0].site, "f (a.lua:1)");
        assert_eq!(funcs[0].bytes, 500.0);
        let tb = snap.top(Key::Traceback);
        assert_eq!(
            tb[0].site,
            "a.lua:4 in f (a.lua:1) <- a.lua:9 in main chunk (a.lua)"
        );
        assert_eq!(
            snap.folded(),
            vec![
                "main chunk (a.lua:9);f (a.lua:3) 100".to_string(),
                "main chunk (a.lua:9);f (a.lua:4) 400".to_string(),
            ]
        );
    }
}
