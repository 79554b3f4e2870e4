//! Snapshots: copies of the live blocks grouped by site, and `top`.

use std::collections::HashMap;

use super::record::{Frame, Recorder};
use super::FxMap;

impl Recorder {
    /// Live bytes and blocks by site and scope, estimated (scaled up) when sampling.
    pub fn snapshot(&self) -> Snapshot {
        let mut totals: FxMap<(u32, u32), (f64, f64)> = FxMap::default();
        for b in self.live.values() {
            let w = Recorder::weight(self.sample_bytes, b.size);
            let t = totals.entry((b.site, b.scope)).or_insert((0.0, 0.0));
            t.0 += w * b.size as f64;
            t.1 += w;
        }
        let mut sites: Vec<SiteTotal> = totals
            .into_iter()
            .map(|((site, scope), (bytes, blocks))| SiteTotal {
                frames: self.sites[site as usize].clone(),
                scope,
                bytes,
                blocks,
            })
            .collect();
        sites.sort_by(|a, b| a.frames.cmp(&b.frames).then(a.scope.cmp(&b.scope)));
        Snapshot {
            frames: self.frames.clone(),
            scope_names: self.scope_names.iter().map(|n| Box::from(&**n)).collect(),
            sites,
            sample_bytes: self.sample_bytes,
        }
    }
}

/// The live bytes and blocks of one site and scope in a snapshot.
#[derive(Clone, Debug)]
pub struct SiteTotal {
    /// Frame ids, leaf first.
    pub frames: Box<[u32]>,
    /// The scope the blocks were made in: an index into `Snapshot::scope_names` plus 1 (0: none).
    pub scope: u32,
    pub bytes: f64,
    pub blocks: f64,
}

/// What `mem.trace.snapshot()` returns: a copy, unaffected by later recording or `stop`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub frames: Vec<Frame>,
    /// The names of the scopes `SiteTotal::scope` counts from 1.
    pub scope_names: Vec<Box<str>>,
    pub sites: Vec<SiteTotal>,
    pub sample_bytes: u64,
}

/// How `top` groups sites.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Key {
    Line,
    Function,
    Traceback,
}

/// One row of `top`.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    pub site: String,
    pub traceback: Vec<String>,
    pub bytes: f64,
    pub blocks: f64,
}

impl Snapshot {
    pub(super) fn frame(&self, id: u32) -> &Frame {
        &self.frames[id as usize]
    }

    /// The name of the scope `id` (`SiteTotal::scope`), if any.
    pub(super) fn scope_name(&self, id: u32) -> Option<&str> {
        let index = (id as usize).checked_sub(1)?;
        self.scope_names.get(index).map(|n| &**n)
    }

    /// Live bytes and blocks grouped by `key`, biggest first (then most blocks, then by name).
    pub fn top(&self, key: Key) -> Vec<Stat> {
        let mut groups: HashMap<String, Stat> = HashMap::new();
        for s in &self.sites {
            // The line and function keys name the innermost Lua frame (a string made by
            // `string.rep` belongs to the Lua line that called it), the traceback every frame.
            let leaf = s
                .frames
                .iter()
                .map(|&f| self.frame(f))
                .find(|f| f.what == b'L' || f.what == b'm')
                .unwrap_or_else(|| self.frame(s.frames[0]));
            let (site, traceback) = match key {
                Key::Line => (leaf.line_label(), Vec::new()),
                Key::Function => (leaf.function_label(), Vec::new()),
                Key::Traceback => {
                    let tb: Vec<String> = s
                        .frames
                        .iter()
                        .map(|&f| self.frame(f).traceback_label())
                        .collect();
                    (tb.join(" <- "), tb)
                }
            };
            let g = groups.entry(site.clone()).or_insert(Stat {
                site,
                traceback,
                bytes: 0.0,
                blocks: 0.0,
            });
            g.bytes += s.bytes;
            g.blocks += s.blocks;
        }
        let mut stats: Vec<Stat> = groups.into_values().collect();
        stats.sort_by(|a, b| {
            b.bytes
                .total_cmp(&a.bytes)
                .then(b.blocks.total_cmp(&a.blocks))
                .then(a.site.cmp(&b.site))
        });
        stats
    }
}
