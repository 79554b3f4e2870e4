//! `mem.metrics`: per-scope-name aggregates kept as scopes close, and their rendering in the
//! Prometheus text exposition format (0.0.4).
//!
//! A leaf: a closing scope hands its figures to [`Metrics::record`] (see `Scope::close`), the
//! bindings (`src/bindings/metrics.rs`) hand the state's totals to [`Metrics::render`]. One
//! `Metrics` per state, a field of its tracker; off until `mem.metrics.enable`, and then a scope
//! opened while it is off is not counted (its open checked one flag, `Tracker::metrics_for`).

use std::cell::{Cell, RefCell};
use std::fmt::Write;
use std::rc::Rc;

use crate::fxhash::FxMap;

/// Distinct scope names kept apart by default; the rest share the label `scope="other"`.
pub const DEFAULT_MAX_SCOPES: usize = 256;

/// The label value of the names beyond `max_scopes` (a scope named so shares it).
const OTHER: &str = "other";

/// The default bucket bounds, in bytes: powers of 4 from 1 KiB to 1 GiB.
pub fn default_buckets() -> Vec<i64> {
    (0..11).map(|i| 1024i64 << (2 * i)).collect()
}

/// Observations by bucket (not cumulative: the rendering sums them), and their sum.
struct Histogram {
    /// `counts[i]`: observations `<= bounds[i]` and above the bound before; the last slot
    /// counts those above every bound.
    counts: Box<[u64]>,
    sum: i64,
}

impl Histogram {
    fn new(buckets: usize) -> Histogram {
        Histogram {
            counts: vec![0; buckets + 1].into_boxed_slice(),
            sum: 0,
        }
    }

    #[inline]
    fn observe(&mut self, bounds: &[i64], value: i64) {
        let slot = bounds.partition_point(|&b| b < value);
        self.counts[slot] += 1;
        self.sum = self.sum.wrapping_add(value);
    }
}

/// Which histogram of a slot a family renders.
type HistogramOf = fn(&ScopeSlot) -> &Histogram;

/// The aggregates of one scope name (or of the names past `max_scopes`).
struct ScopeSlot {
    name: Rc<str>,
    requests: u64,
    budget_refusals: u64,
    allocated_bytes: Histogram,
    retained_bytes: Histogram,
    peak_bytes: Histogram,
}

impl ScopeSlot {
    fn new(name: Rc<str>, buckets: usize) -> ScopeSlot {
        ScopeSlot {
            name,
            requests: 0,
            budget_refusals: 0,
            allocated_bytes: Histogram::new(buckets),
            retained_bytes: Histogram::new(buckets),
            peak_bytes: Histogram::new(buckets),
        }
    }
}

/// What a closing scope hands to the aggregates.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScopeFigures {
    pub bytes_allocated: u64,
    /// `net_bytes` when the scope closed: what the request kept.
    pub retained_bytes: i64,
    pub peak_bytes: i64,
    pub budget_refusals: u64,
}

struct Aggregates {
    max_scopes: usize,
    /// Bucket upper bounds, strictly increasing.
    bounds: Vec<i64>,
    slots: Vec<ScopeSlot>,
    /// Slot of each name seen, the overflow's included under [`OTHER`].
    by_name: FxMap<Rc<str>, usize>,
    /// Names with a slot of their own (not counting [`OTHER`]).
    named: usize,
}

impl Aggregates {
    /// The slot of `name`, made at its first close (the only allocation).
    fn slot_of(&mut self, name: &Rc<str>) -> usize {
        if let Some(&slot) = self.by_name.get(&**name) {
            return slot;
        }
        let key = if self.named < self.max_scopes {
            self.named += 1;
            name.clone()
        } else {
            // (a name past the limit is not remembered: the map stays bounded)
            if let Some(&slot) = self.by_name.get(OTHER) {
                return slot;
            }
            Rc::from(OTHER)
        };
        let slot = self.slots.len();
        self.slots
            .push(ScopeSlot::new(key.clone(), self.bounds.len()));
        self.by_name.insert(key, slot);
        slot
    }
}

/// The state's totals, read by the bindings when the text is asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct StateTotals {
    pub live_bytes: u64,
    pub peak_bytes: u64,
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub arena_bytes: u64,
    pub arenas_pinned: u64,
}

/// Process totals of the C ledger (`lunet_malloc`).
#[derive(Clone, Copy, Debug, Default)]
pub struct CTotals {
    pub live_bytes: i64,
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
}

/// One state's metrics: off, or on with their aggregates.
#[derive(Default)]
pub struct Metrics {
    on: Cell<bool>,
    aggregates: RefCell<Option<Aggregates>>,
}

impl Metrics {
    /// Whether scopes opened now are counted.
    #[inline(always)]
    pub fn is_on(&self) -> bool {
        self.on.get()
    }

    /// Turns aggregation on with these options, starting over from nothing.
    pub fn enable(&self, max_scopes: usize, bounds: Vec<i64>) {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        *self.aggregates.borrow_mut() = Some(Aggregates {
            max_scopes,
            bounds,
            slots: Vec::new(),
            by_name: FxMap::default(),
            named: 0,
        });
        self.on.set(true);
    }

    /// Turns aggregation off and drops the aggregates.
    pub fn disable(&self) {
        self.on.set(false);
        *self.aggregates.borrow_mut() = None;
    }

    /// Forgets every aggregate and name, keeping the options.
    pub fn reset(&self) {
        if let Some(a) = self.aggregates.borrow_mut().as_mut() {
            a.slots.clear();
            a.by_name.clear();
            a.named = 0;
        }
    }

    /// A scope named `name` closed with `figures`: O(1) in the number of names (a hash of the
    /// name and a search of the bucket bounds); allocates only at a name's first close.
    pub fn record(&self, name: &Rc<str>, figures: ScopeFigures) {
        if !self.on.get() {
            return; // (turned off since the scope opened)
        }
        let Ok(mut guard) = self.aggregates.try_borrow_mut() else {
            return;
        };
        let Some(a) = guard.as_mut() else { return };
        let slot = a.slot_of(name);
        let bounds = &a.bounds;
        let s = &mut a.slots[slot];
        s.requests += 1;
        s.budget_refusals += figures.budget_refusals;
        s.allocated_bytes
            .observe(bounds, figures.bytes_allocated.min(i64::MAX as u64) as i64);
        s.retained_bytes.observe(bounds, figures.retained_bytes);
        s.peak_bytes.observe(bounds, figures.peak_bytes);
    }

    /// The label value `pinned_by_name` counts an arena of scope `name` under, if any.
    fn label_for<'a>(a: &'a Aggregates, name: &str) -> Option<&'a str> {
        match a.by_name.get(name) {
            Some(&slot) => Some(&a.slots[slot].name),
            None if a.named >= a.max_scopes => Some(OTHER),
            None => None,
        }
    }

    /// The text exposition: the state's totals, the C ledger's, then (when on) each scope name's
    /// families. `pinned_arenas` names the scope of each pinned arena.
    pub fn render(&self, state: &StateTotals, c: &CTotals, pinned_arenas: &[Rc<str>]) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, value: i64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            );
        };
        let s = state;
        gauge(
            &mut out,
            "lunet_mem_live_bytes",
            "Bytes in the Lua state's live blocks.",
            s.live_bytes as i64,
        );
        gauge(
            &mut out,
            "lunet_mem_peak_bytes",
            "Highest live bytes of the Lua state.",
            s.peak_bytes as i64,
        );
        counter(
            &mut out,
            "lunet_mem_allocs_total",
            "Blocks the Lua state allocated.",
            s.allocs,
        );
        counter(
            &mut out,
            "lunet_mem_frees_total",
            "Blocks the Lua state freed.",
            s.frees,
        );
        counter(
            &mut out,
            "lunet_mem_allocated_bytes_total",
            "Bytes the Lua state allocated (new blocks and new sizes of resized ones).",
            s.bytes_allocated,
        );
        gauge(
            &mut out,
            "lunet_mem_arena_bytes",
            "Bytes of arena chunks in use.",
            s.arena_bytes as i64,
        );
        gauge(
            &mut out,
            "lunet_mem_arenas_pinned",
            "Arenas whose scope ended two or more GC cycles ago and that still hold objects.",
            s.arenas_pinned as i64,
        );
        gauge(
            &mut out,
            "lunet_mem_c_live_bytes",
            "Bytes in live lunet_malloc blocks (the process).",
            c.live_bytes,
        );
        counter(
            &mut out,
            "lunet_mem_c_allocs_total",
            "Blocks lunet_malloc made (the process).",
            c.allocs,
        );
        counter(
            &mut out,
            "lunet_mem_c_frees_total",
            "lunet_malloc blocks freed (the process).",
            c.frees,
        );
        counter(
            &mut out,
            "lunet_mem_c_allocated_bytes_total",
            "Bytes lunet_malloc allocated (the process).",
            c.bytes_allocated,
        );
        let guard = self.aggregates.borrow();
        let Some(a) = guard.as_ref().filter(|_| self.on.get()) else {
            return out;
        };
        let labels: Vec<String> = a.slots.iter().map(|s| escape_label(&s.name)).collect();
        let mut pinned = vec![0u64; a.slots.len()];
        for name in pinned_arenas {
            if let Some(slot) = Metrics::label_for(a, name).and_then(|l| a.by_name.get(l)) {
                pinned[*slot] += 1;
            }
        }
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        };
        family(
            &mut out,
            "lunet_mem_scope_requests_total",
            "counter",
            "Scopes of this name that closed.",
        );
        for (s, label) in a.slots.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "lunet_mem_scope_requests_total{{scope=\"{label}\"}} {}",
                s.requests
            );
        }
        let histograms: [(&str, &str, HistogramOf); 3] = [
            (
                "lunet_mem_scope_allocated_bytes",
                "Bytes each scope of this name allocated.",
                |s| &s.allocated_bytes,
            ),
            (
                "lunet_mem_scope_retained_bytes",
                "Net bytes each scope of this name kept when it closed.",
                |s| &s.retained_bytes,
            ),
            (
                "lunet_mem_scope_peak_bytes",
                "Highest net bytes of each scope of this name while it was open.",
                |s| &s.peak_bytes,
            ),
        ];
        for (name, help, of) in histograms {
            family(&mut out, name, "histogram", help);
            for (s, label) in a.slots.iter().zip(&labels) {
                let h = of(s);
                let mut cumulative = 0;
                for (bound, count) in a.bounds.iter().zip(h.counts.iter()) {
                    cumulative += count;
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{scope=\"{label}\",le=\"{bound}\"}} {cumulative}"
                    );
                }
                cumulative += h.counts[a.bounds.len()];
                let _ = writeln!(
                    out,
                    "{name}_bucket{{scope=\"{label}\",le=\"+Inf\"}} {cumulative}"
                );
                let _ = writeln!(out, "{name}_sum{{scope=\"{label}\"}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{scope=\"{label}\"}} {cumulative}");
            }
        }
        family(
            &mut out,
            "lunet_mem_scope_budget_refusals_total",
            "counter",
            "Allocations refused by a budget while a scope of this name was open.",
        );
        for (s, label) in a.slots.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "lunet_mem_scope_budget_refusals_total{{scope=\"{label}\"}} {}",
                s.budget_refusals
            );
        }
        family(
            &mut out,
            "lunet_mem_scope_pinned_arenas",
            "gauge",
            "Pinned arenas of scopes of this name (see lunet_mem_arenas_pinned).",
        );
        for (count, label) in pinned.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "lunet_mem_scope_pinned_arenas{{scope=\"{label}\"}} {count}"
            );
        }
        out
    }
}

/// A label value as the text format writes it: backslash, double quote and line feed escaped.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(allocated: u64) -> ScopeFigures {
        ScopeFigures {
            bytes_allocated: allocated,
            retained_bytes: 0,
            peak_bytes: allocated as i64,
            budget_refusals: 0,
        }
    }

    #[test]
    fn names_past_max_scopes_share_other() {
        let m = Metrics::default();
        m.enable(2, vec![10, 100]);
        for name in ["a", "b", "c", "d", "a"] {
            m.record(&Rc::from(name), figures(5));
        }
        let text = m.render(&StateTotals::default(), &CTotals::default(), &[]);
        assert!(text.contains("lunet_mem_scope_requests_total{scope=\"a\"} 2\n"));
        assert!(text.contains("lunet_mem_scope_requests_total{scope=\"other\"} 2\n"));
        assert!(!text.contains("scope=\"c\""));
        assert_eq!(m.aggregates.borrow().as_ref().unwrap().by_name.len(), 3);
    }

    #[test]
    fn buckets_are_cumulative_and_inf_is_the_count() {
        let m = Metrics::default();
        m.enable(8, vec![10, 100]);
        for bytes in [1, 10, 11, 1000] {
            m.record(&Rc::from("r"), figures(bytes));
        }
        let text = m.render(&StateTotals::default(), &CTotals::default(), &[]);
        for line in [
            "lunet_mem_scope_allocated_bytes_bucket{scope=\"r\",le=\"10\"} 2\n",
            "lunet_mem_scope_allocated_bytes_bucket{scope=\"r\",le=\"100\"} 3\n",
            "lunet_mem_scope_allocated_bytes_bucket{scope=\"r\",le=\"+Inf\"} 4\n",
            "lunet_mem_scope_allocated_bytes_sum{scope=\"r\"} 1022\n",
            "lunet_mem_scope_allocated_bytes_count{scope=\"r\"} 4\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn off_records_nothing() {
        let m = Metrics::default();
        m.record(&Rc::from("r"), figures(1));
        m.enable(8, default_buckets());
        m.disable();
        m.record(&Rc::from("r"), figures(1));
        let text = m.render(&StateTotals::default(), &CTotals::default(), &[]);
        assert!(!text.contains("lunet_mem_scope_"));
    }
}
