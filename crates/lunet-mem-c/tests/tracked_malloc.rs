//! The C allocation library through its C functions, from Rust (no Lua, no C compiler): counts,
//! checkpoints, realloc, worker arenas, blocks freed by another thread, the per-site report, and
//! random sequences of operations against a model of the live bytes.
//!
//! The counters are process-wide, so each test holds `serial()` while it runs.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, MutexGuard};

use lunet_mem_c::*;
use proptest::prelude::*;

/// The file name the tests' allocations are counted under (`__FILE__` in C).
const FILE: &CStr = c"tests/tracked_malloc.rs";

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn file() -> *const c_char {
    FILE.as_ptr()
}

fn stats() -> CStats {
    let mut s = CStats::default();
    // SAFETY: a writable struct.
    unsafe { lunet_mem_c_stats(&mut s) };
    s
}

fn neutral_since(cp: &Checkpoint) -> bool {
    // SAFETY: a checkpoint taken by `lunet_mem_checkpoint_take`; a NUL-terminated context.
    unsafe { lunet_mem_check_neutral(cp, c"test".as_ptr(), 0) == 1 }
}

fn malloc(size: usize, line: c_int) -> *mut u8 {
    // SAFETY: a string literal for the file.
    unsafe { lunet_mem_malloc_at(size, file(), line) }.cast()
}

fn free(p: *mut u8, line: c_int) {
    // SAFETY: a block from `lunet_malloc` (or NULL), freed once.
    unsafe { lunet_mem_free_at(p.cast::<c_void>(), file(), line) }
}

#[test]
fn malloc_and_free_are_counted_and_a_checkpoint_sees_the_leak() {
    let _serial = serial();
    let before = stats();
    let cp = lunet_mem_checkpoint_take();
    let blocks: Vec<*mut u8> = (1..=3).map(|i| malloc(100 * i, 10)).collect();
    assert!(!neutral_since(&cp));
    let during = stats();
    assert_eq!(during.allocs - before.allocs, 3);
    assert_eq!(during.bytes_allocated - before.bytes_allocated, 600);
    assert_eq!(during.live_bytes - before.live_bytes, 600);
    for p in blocks {
        free(p, 11);
    }
    assert!(neutral_since(&cp));
    let after = stats();
    assert_eq!(after.frees - before.frees, 3);
    assert_eq!(after.live_bytes, before.live_bytes);
    assert!(after.peak_bytes >= 600);
}

#[test]
fn blocks_are_aligned_and_hold_their_bytes() {
    let _serial = serial();
    let cp = lunet_mem_checkpoint_take();
    let blocks: Vec<(*mut u8, usize)> = (0..2100)
        .step_by(7)
        .map(|size| (malloc(size, 20), size))
        .collect();
    for (i, &(p, size)) in blocks.iter().enumerate() {
        assert_eq!(p as usize % 16, 0, "block of {size} bytes");
        // SAFETY: a block of `size` bytes.
        unsafe { p.write_bytes(i as u8, size) };
    }
    for (i, &(p, size)) in blocks.iter().enumerate() {
        // SAFETY: as above, written just now.
        assert!(unsafe { std::slice::from_raw_parts(p, size) }
            .iter()
            .all(|&b| b == i as u8));
        free(p, 21);
    }
    assert!(neutral_since(&cp));
}

#[test]
fn a_site_slot_counts_its_calls_at_one_site() {
    let _serial = serial();
    static SLOT: SiteSlot = SiteSlot::new();
    let cp = lunet_mem_checkpoint_take();
    let blocks: Vec<*mut c_void> = (0..5)
        // SAFETY: one slot for one `file:line`.
        .map(|_| unsafe { lunet_mem_malloc_site(32, &SLOT, file(), 30) })
        .collect();
    assert!(blocks.iter().all(|p| !p.is_null()));
    // SAFETY: as above; the block is live.
    let grown = unsafe { lunet_mem_realloc_site(blocks[0], 64, &SLOT, file(), 30) };
    assert!(!grown.is_null());
    for p in std::iter::once(grown).chain(blocks.into_iter().skip(1)) {
        free(p.cast(), 31);
    }
    assert!(neutral_since(&cp));
}

#[test]
fn realloc_keeps_the_contents_and_mallocs_or_frees_at_the_edges() {
    let _serial = serial();
    let cp = lunet_mem_checkpoint_take();
    // SAFETY: NULL: a malloc.
    let p = unsafe { lunet_mem_realloc_at(std::ptr::null_mut(), 10, file(), 40) }.cast::<u8>();
    // SAFETY: a block of 10 bytes.
    unsafe { p.copy_from(b"0123456789".as_ptr(), 10) };
    // SAFETY: a live block, grown then shrunk.
    let p = unsafe { lunet_mem_realloc_at(p.cast(), 5000, file(), 41) }.cast::<u8>();
    // SAFETY: at least 10 bytes, kept from the first block.
    assert_eq!(unsafe { std::slice::from_raw_parts(p, 10) }, b"0123456789");
    // SAFETY: as above.
    let p = unsafe { lunet_mem_realloc_at(p.cast(), 4, file(), 42) }.cast::<u8>();
    // SAFETY: 4 bytes, kept.
    assert_eq!(unsafe { std::slice::from_raw_parts(p, 4) }, b"0123");
    // SAFETY: size 0: a free, which returns NULL.
    assert!(unsafe { lunet_mem_realloc_at(p.cast(), 0, file(), 43) }.is_null());
    assert!(neutral_since(&cp));
}

#[test]
fn worker_arenas_nest_and_count_their_escaped_blocks() {
    let _serial = serial();
    let before = stats();
    // SAFETY: a string literal for the file.
    unsafe { lunet_mem_arena_begin(256, file(), 50) };
    let outer: Vec<*mut u8> = (1..=100).map(|i| malloc(i * 3, 51)).collect();
    // SAFETY: as above.
    unsafe { lunet_mem_arena_begin(0, file(), 52) };
    let inner = malloc(4000, 53);
    free(inner, 54);
    // SAFETY: the inner arena is open; every block of it was freed.
    assert_eq!(unsafe { lunet_mem_arena_end_at(0, file(), 55) }, 0);
    for &p in &outer[1..] {
        free(p, 56);
    }
    // SAFETY: the outer arena is open; one block escapes (allowed: reported, not fatal).
    let escaped = unsafe { lunet_mem_arena_end_at(ARENA_REPORT, file(), 57) };
    assert_eq!(escaped, 1);
    let after = stats();
    // The escaped block (3 bytes) was released by the end: counted freed.
    assert_eq!(after.live_bytes - before.live_bytes, 0);
    assert_eq!(after.allocs - before.allocs, 101);
    assert_eq!(after.frees - before.frees, 101);
}

#[test]
fn a_worker_arena_reset_releases_its_blocks_and_keeps_checkpoints_neutral() {
    let _serial = serial();
    let cp = lunet_mem_checkpoint_take();
    // SAFETY: a string literal for the file.
    unsafe { lunet_mem_arena_begin(1024, file(), 70) };
    for i in 1..=50 {
        let p = malloc(i * 7, 71);
        if i % 2 == 0 {
            free(p, 72);
        }
    }
    // SAFETY: the arena is open.
    let escaped = unsafe { lunet_mem_arena_end_at(ARENA_RESET, file(), 73) };
    assert_eq!(escaped, 25);
    assert!(neutral_since(&cp));
}

#[test]
fn a_block_freed_by_another_thread_is_counted_back() {
    let _serial = serial();
    let cp = lunet_mem_checkpoint_take();
    let p = malloc(77, 60) as usize;
    std::thread::spawn(move || free(p as *mut u8, 61))
        .join()
        .unwrap();
    assert!(neutral_since(&cp));
}

#[test]
fn the_report_names_the_sites_with_live_blocks() {
    let _serial = serial();
    let p = malloc(123, 70);
    // SAFETY: a temporary file from libc, closed here.
    let text = unsafe {
        let f = libc::tmpfile();
        assert!(!f.is_null());
        lunet_mem_report(f.cast());
        libc::rewind(f);
        let mut buf = vec![0u8; 1 << 16];
        let n = libc::fread(buf.as_mut_ptr().cast(), 1, buf.len(), f);
        libc::fclose(f);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    free(p, 71);
    assert!(text.starts_with("lunet_mem: "), "{text}");
    assert!(
        text.contains(
            "  tests/tracked_malloc.rs:70: 1 allocs, 0 frees, 123 live bytes in 1 blocks"
        ),
        "{text}"
    );
}

/// One step of a random program.
#[derive(Debug, Clone)]
enum Op {
    Malloc(usize),
    Free(usize),
    Realloc(usize, usize),
    ArenaBegin,
    /// Frees the innermost arena's blocks, then ends it.
    ArenaEnd,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3000).prop_map(Op::Malloc),
        3 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), 0usize..3000).prop_map(|(i, n)| Op::Realloc(i, n)),
        1 => Just(Op::ArenaBegin),
        1 => Just(Op::ArenaEnd),
    ]
}

/// A live block in the model: its address, size, the byte it is filled with, and the arena
/// depth it was made at (0: the heap).
struct Block {
    p: *mut u8,
    size: usize,
    fill: u8,
    depth: usize,
}

fn check_and_free(b: Block) {
    // SAFETY: a live block of `size` bytes filled with `fill`.
    let bytes = unsafe { std::slice::from_raw_parts(b.p, b.size) };
    assert!(bytes.iter().all(|&x| x == b.fill), "block contents changed");
    free(b.p, 81);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Live bytes are what the model says after every step, every block keeps its bytes, and
    /// the program is neutral once everything is freed.
    #[test]
    fn live_bytes_follow_the_model(ops in prop::collection::vec(op(), 1..200)) {
        let _serial = serial();
        let before = stats();
        let cp = lunet_mem_checkpoint_take();
        let mut live: Vec<Block> = Vec::new();
        let mut depth = 0usize;
        for (step, op) in ops.into_iter().enumerate() {
            let fill = step as u8;
            match op {
                Op::Malloc(size) => {
                    let p = malloc(size, 80);
                    // SAFETY: a block of `size` bytes.
                    unsafe { p.write_bytes(fill, size) };
                    live.push(Block { p, size, fill, depth });
                }
                // Blocks of an outer arena are freed only from it: blocks of the innermost
                // arena and of the heap may be freed any time.
                Op::Free(i) if !live.is_empty() => {
                    let i = i % live.len();
                    if live[i].depth == depth || live[i].depth == 0 {
                        check_and_free(live.swap_remove(i));
                    }
                }
                Op::Realloc(i, size) if !live.is_empty() && depth == 0 => {
                    let i = i % live.len();
                    if live[i].depth == 0 && size > 0 {
                        let old = &live[i];
                        let keep = old.size.min(size);
                        // SAFETY: a live heap block.
                        let p = unsafe { lunet_mem_realloc_at(old.p.cast(), size, file(), 82) }
                            .cast::<u8>();
                        // SAFETY: the first `keep` bytes were kept; the rest are filled.
                        let kept = unsafe { std::slice::from_raw_parts(p, keep) };
                        prop_assert!(kept.iter().all(|&x| x == old.fill));
                        // SAFETY: a block of `size` bytes.
                        unsafe { p.write_bytes(fill, size) };
                        live[i] = Block { p, size, fill, depth: 0 };
                    }
                }
                Op::ArenaBegin => {
                    // SAFETY: a string literal for the file.
                    unsafe { lunet_mem_arena_begin(64, file(), 83) };
                    depth += 1;
                }
                Op::ArenaEnd if depth > 0 => {
                    let (ended, kept): (Vec<Block>, Vec<Block>) =
                        live.into_iter().partition(|b| b.depth == depth);
                    live = kept;
                    ended.into_iter().for_each(check_and_free);
                    // SAFETY: an open arena, all of whose blocks were freed.
                    prop_assert_eq!(unsafe { lunet_mem_arena_end_at(0, file(), 84) }, 0);
                    depth -= 1;
                }
                _ => {}
            }
            let model: usize = live.iter().map(|b| b.size).sum();
            prop_assert_eq!(stats().live_bytes - before.live_bytes, model as i64);
        }
        while depth > 0 {
            let (ended, kept): (Vec<Block>, Vec<Block>) =
                live.into_iter().partition(|b| b.depth == depth);
            live = kept;
            ended.into_iter().for_each(check_and_free);
            // SAFETY: as above.
            prop_assert_eq!(unsafe { lunet_mem_arena_end_at(0, file(), 85) }, 0);
            depth -= 1;
        }
        live.into_iter().for_each(check_and_free);
        prop_assert!(neutral_since(&cp));
    }
}
