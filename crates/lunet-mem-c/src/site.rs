//! Allocation sites (`file:line` of a call) and their counts, kept per thread and summed when
//! reported; each thread's peak of live bytes; the process totals they add up to.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

/// Allocation counts written by one thread only (plain load and store: no read-modify-write)
/// and read by reports from any thread.
#[derive(Default)]
pub(crate) struct Counts {
    allocs: AtomicU64,
    frees: AtomicU64,
    bytes_allocated: AtomicU64,
    bytes_freed: AtomicU64,
}

impl Counts {
    /// Counts a block of `size` bytes made by the owning thread.
    #[inline(always)]
    pub(crate) fn made(&self, size: usize) {
        bump(&self.allocs, 1);
        bump(&self.bytes_allocated, size as u64);
    }

    /// Counts a block of `size` bytes freed by the owning thread.
    #[inline(always)]
    pub(crate) fn freed(&self, size: usize) {
        bump(&self.frees, 1);
        bump(&self.bytes_freed, size as u64);
    }

    /// `(allocs, frees, bytes_allocated, bytes_freed)`, read from any thread.
    fn read(&self) -> (u64, u64, u64, u64) {
        (
            self.allocs.load(Relaxed),
            self.frees.load(Relaxed),
            self.bytes_allocated.load(Relaxed),
            self.bytes_freed.load(Relaxed),
        )
    }
}

#[inline(always)]
fn bump(counter: &AtomicU64, by: u64) {
    // Only the owning thread writes: a plain load and store is enough (no read-modify-write).
    counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
}

/// One allocation site (`file:line` of the call). Its counts are kept per thread (each thread
/// writes only its own) and summed when reported.
pub(crate) struct Site {
    pub(crate) file: *const c_char,
    pub(crate) line: c_int,
    /// The site's number, from 1: its index in each thread's table of its counts, and what a
    /// call site's [`SiteSlot`] holds.
    pub(crate) id: usize,
    /// Every thread's counts of this site.
    locals: Mutex<Vec<&'static SiteCounts>>,
}

// SAFETY: `file` points to a string literal (`__FILE__`) that lives as long as the program; the
// counts are behind a mutex and atomics.
unsafe impl Sync for Site {}
// SAFETY: as above.
unsafe impl Send for Site {}

/// One thread's counts of one site. Aligned to a cache line: other threads' counts never share
/// it. Never freed: block headers point to them, and reports sum them after the thread ended.
#[repr(align(64))]
pub(crate) struct SiteCounts {
    pub(crate) counts: Counts,
    /// The serial number of the thread that writes these counts.
    pub(crate) owner: u64,
    pub(crate) site: &'static Site,
}

/// `(allocs, frees, live blocks, live bytes)` of a site.
pub(crate) type SiteTotals = (u64, u64, i64, i64);

impl Site {
    /// The site's figures over every thread.
    pub(crate) fn totals(&self) -> SiteTotals {
        let locals = self.locals.lock().unwrap_or_else(|e| e.into_inner());
        let (mut a, mut f, mut ba, mut bf) = (0u64, 0u64, 0u64, 0u64);
        for l in locals.iter() {
            let (la, lf, lba, lbf) = l.counts.read();
            a += la;
            f += lf;
            ba += lba;
            bf += lbf;
        }
        (a, f, a as i64 - f as i64, ba as i64 - bf as i64)
    }

    pub(crate) fn file(&self) -> String {
        if self.file.is_null() {
            return "?".into();
        }
        // SAFETY: a NUL-terminated string literal (see `Sync`).
        unsafe { CStr::from_ptr(self.file) }
            .to_string_lossy()
            .into_owned()
    }

    /// Makes the counts of the thread with serial number `owner` for this site. They are never
    /// freed (see [`SiteCounts`]).
    pub(crate) fn new_counts(&'static self, owner: u64) -> &'static SiteCounts {
        let counts: &'static SiteCounts = Box::leak(Box::new(SiteCounts {
            counts: Counts::default(),
            owner,
            site: self,
        }));
        self.locals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(counts);
        counts
    }
}

/// Every site seen, by `(file pointer, line)`. Sites are never freed (there are as many as call
/// sites in the program).
pub(crate) fn sites() -> &'static Mutex<HashMap<(usize, c_int), &'static Site>> {
    static SITES: OnceLock<Mutex<HashMap<(usize, c_int), &'static Site>>> = OnceLock::new();
    SITES.get_or_init(Default::default)
}

/// The site `file:line`, made on first use.
pub(crate) fn site_at(file: *const c_char, line: c_int) -> &'static Site {
    let mut sites = sites().lock().unwrap_or_else(|e| e.into_inner());
    let id = sites.len() + 1;
    sites.entry((file as usize, line)).or_insert_with(|| {
        Box::leak(Box::new(Site {
            file,
            line,
            id,
            locals: Mutex::new(Vec::new()),
        }))
    })
}

/// `lunet_mem_site_t`: a call site's slot, a zero-initialised `static` in the caller that
/// remembers the site's number after the first call (0: not known yet).
#[repr(C)]
pub struct SiteSlot {
    pub(crate) id: AtomicUsize,
}

impl SiteSlot {
    /// A slot that knows no site yet (what C's zero-initialised `static` is).
    pub const fn new() -> SiteSlot {
        SiteSlot {
            id: AtomicUsize::new(0),
        }
    }
}

impl Default for SiteSlot {
    fn default() -> SiteSlot {
        SiteSlot::new()
    }
}

/// A new thread's peak of live bytes, registered for reports (see [`peaks`]).
pub(crate) fn new_published_peak() -> &'static AtomicI64 {
    let peak: &'static AtomicI64 = Box::leak(Box::default());
    peaks().lock().unwrap_or_else(|e| e.into_inner()).push(peak);
    peak
}

/// Each thread's peak of live bytes (written only by its thread; never freed: reports read them
/// after the thread ended). A thread's other totals are the sums of its counts of each site.
fn peaks() -> &'static Mutex<Vec<&'static AtomicI64>> {
    static PEAKS: OnceLock<Mutex<Vec<&'static AtomicI64>>> = OnceLock::new();
    PEAKS.get_or_init(Default::default)
}

/// Process totals: `(allocs, frees, bytes_allocated, bytes_freed, peak of any thread)`.
pub(crate) fn totals() -> (u64, u64, u64, u64, i64) {
    let (mut a, mut f, mut ba, mut bf) = (0u64, 0u64, 0u64, 0u64);
    for site in sites().lock().unwrap_or_else(|e| e.into_inner()).values() {
        for l in site.locals.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let (la, lf, lba, lbf) = l.counts.read();
            a += la;
            f += lf;
            ba += lba;
            bf += lbf;
        }
    }
    let peaks = peaks().lock().unwrap_or_else(|e| e.into_inner());
    let peak = peaks.iter().map(|p| p.load(Relaxed)).max().unwrap_or(0);
    (a, f, ba, bf, peak)
}
