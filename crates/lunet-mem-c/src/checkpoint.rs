//! Neutrality checkpoints: the process counters at a point, and the leak report that names the
//! sites whose live blocks grew since.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, CStr};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

use crate::fatal::{at, fatal};
use crate::site::{sites, totals, Site};

/// `lunet_mem_checkpoint_t`: the process counters at a point, and which checkpoint it was.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Checkpoint {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    pub id: u64,
}

/// Live blocks per site at recent checkpoints, to name the sites that leak.
type SiteSnapshot = Vec<(&'static Site, i64, i64)>;

fn snapshots() -> &'static Mutex<VecDeque<(u64, SiteSnapshot)>> {
    static SNAPSHOTS: OnceLock<Mutex<VecDeque<(u64, SiteSnapshot)>>> = OnceLock::new();
    SNAPSHOTS.get_or_init(Default::default)
}

/// How many checkpoints keep their per-site snapshot.
const SNAPSHOTS_KEPT: usize = 64;

/// `lunet_mem_checkpoint()`: marks a point; compare with [`lunet_mem_check_neutral`].
#[no_mangle]
pub extern "C" fn lunet_mem_checkpoint_take() -> Checkpoint {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Relaxed);
    let snapshot: SiteSnapshot = sites()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|s| {
            let (_, _, blocks, bytes) = s.totals();
            (*s, blocks, bytes)
        })
        .collect();
    {
        let mut kept = snapshots().lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() == SNAPSHOTS_KEPT {
            kept.pop_front();
        }
        kept.push_back((id, snapshot));
    }
    let (allocs, frees, bytes_allocated, bytes_freed, _) = totals();
    Checkpoint {
        allocs,
        frees,
        bytes_allocated,
        bytes_freed,
        id,
    }
}

/// The leak report for `cp`, or None if neutral (as many frees as allocations since, and the
/// same live bytes).
fn leak_report(cp: &Checkpoint, ctx: &str) -> Option<String> {
    let (allocs, frees, bytes_allocated, bytes_freed, _) = totals();
    let (da, df) = (allocs - cp.allocs, frees - cp.frees);
    let (dba, dbf) = (
        bytes_allocated - cp.bytes_allocated,
        bytes_freed - cp.bytes_freed,
    );
    if da == df && dba == dbf {
        return None;
    }
    let mut msg = format!(
        "MEMORY LEAK at {ctx}: allocs={da} frees={df} bytes_allocated={dba} bytes_freed={dbf} \
         (live {:+} bytes in {:+} blocks)",
        dba as i64 - dbf as i64,
        da as i64 - df as i64
    );
    let kept = snapshots().lock().unwrap_or_else(|e| e.into_inner());
    match kept.iter().find(|(id, _)| *id == cp.id) {
        Some((_, snapshot)) => {
            let before: HashMap<usize, (i64, i64)> = snapshot
                .iter()
                .map(|(s, b, n)| (*s as *const Site as usize, (*b, *n)))
                .collect();
            for site in sites().lock().unwrap_or_else(|e| e.into_inner()).values() {
                let (b0, n0) = before
                    .get(&(*site as *const Site as usize))
                    .copied()
                    .unwrap_or((0, 0));
                let (_, _, b1, n1) = site.totals();
                if b1 > b0 {
                    msg.push_str(&format!(
                        "\n  {}:{}: +{} block(s), {:+} bytes live",
                        site.file(),
                        site.line,
                        b1 - b0,
                        n1 - n0
                    ));
                }
            }
        }
        None => msg.push_str("\n  (per-site figures of this checkpoint are no longer kept)"),
    }
    Some(msg)
}

/// Whether nothing leaked since `cp`; if not and `report` is set, prints the report to stderr.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_check_neutral(
    cp: *const Checkpoint,
    ctx: *const c_char,
    report: c_int,
) -> c_int {
    // SAFETY: the caller passes a checkpoint it took (or NULL).
    let Some(cp) = (unsafe { cp.as_ref() }) else {
        return 0;
    };
    let ctx = if ctx.is_null() {
        "?".into()
    } else {
        // SAFETY: a C string from the caller.
        unsafe { CStr::from_ptr(ctx) }.to_string_lossy()
    };
    match leak_report(cp, &ctx) {
        None => 1,
        Some(msg) => {
            if report != 0 {
                let _ = writeln!(std::io::stderr(), "lunet_mem: {msg}");
            }
            0
        }
    }
}

/// `lunet_mem_assert_neutral(&cp, ctx)`: prints the report and aborts if something leaked.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_assert_neutral_at(
    cp: *const Checkpoint,
    ctx: *const c_char,
    file: *const c_char,
    line: c_int,
) {
    // SAFETY: forwarded contract.
    if unsafe { lunet_mem_check_neutral(cp, ctx, 1) } == 0 {
        fatal(&format!(
            "assertion of memory neutrality failed at {}",
            at(file, line)
        ));
    }
}
