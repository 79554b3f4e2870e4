//! Reports: the process totals (`lunet_mem_c_stats`) and the table by allocation site
//! (`lunet_mem_report`).

use std::ffi::{c_int, c_void};
use std::io::Write;

use crate::site::{sites, totals, Site, SiteTotals};

/// `lunet_mem_stats_t`: process totals of the tracked C allocations.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CStats {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    pub live_bytes: i64,
    pub peak_bytes: i64,
}

/// Fills `out` with the process totals (peak: the highest of any thread's own live bytes).
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_c_stats(out: *mut CStats) {
    let (allocs, frees, bytes_allocated, bytes_freed, peak_bytes) = totals();
    let live_bytes = bytes_allocated as i64 - bytes_freed as i64;
    // SAFETY: the caller passes a writable struct (or NULL).
    if let Some(out) = unsafe { out.as_mut() } {
        *out = CStats {
            allocs,
            frees,
            bytes_allocated,
            bytes_freed,
            live_bytes,
            peak_bytes,
        };
    }
}

/// `lunet_mem_report(FILE *)`: allocs, frees and live bytes by allocation site.
///
/// # Safety
/// `file` is NULL or a NUL-terminated string that lives as long as the program (`__FILE__`);
/// pointer arguments are NULL or what the header says they are.
#[no_mangle]
pub unsafe extern "C" fn lunet_mem_report(out: *mut libc_file) {
    let (allocs, frees, bytes_allocated, bytes_freed, peak) = totals();
    let mut text = format!(
        "lunet_mem: {allocs} allocs, {frees} frees, {bytes_allocated} bytes allocated, \
         {bytes_freed} bytes freed, {} live, peak {peak} (largest of one thread)\n",
        bytes_allocated as i64 - bytes_freed as i64
    );
    let sites: Vec<&Site> = sites()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .copied()
        .collect();
    let mut rows: Vec<(&Site, SiteTotals)> = sites.into_iter().map(|s| (s, s.totals())).collect();
    rows.sort_by_key(|(s, t)| (std::cmp::Reverse(t.3), s.file(), s.line));
    for (s, (allocs, frees, blocks, bytes)) in rows {
        text.push_str(&format!(
            "  {}:{}: {allocs} allocs, {frees} frees, {bytes} live bytes in {blocks} blocks\n",
            s.file(),
            s.line,
        ));
    }
    write_to(out, &text);
}

/// C's `FILE`, only passed through.
#[allow(non_camel_case_types)]
pub type libc_file = c_void;

extern "C" {
    fn fwrite(p: *const c_void, size: usize, n: usize, f: *mut libc_file) -> usize;
    fn fflush(f: *mut libc_file) -> c_int;
}

fn write_to(out: *mut libc_file, text: &str) {
    if out.is_null() {
        let _ = std::io::stderr().write_all(text.as_bytes());
        return;
    }
    // SAFETY: `out` is a FILE* from the caller.
    unsafe {
        fwrite(text.as_ptr().cast(), 1, text.len(), out);
        fflush(out);
    }
}
