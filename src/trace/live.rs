//! The live map: recorded blocks by address, with a filter that lets the free of an unrecorded
//! block look nothing up.

use super::record::Recorder;

/// A live recorded block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveBlock {
    pub size: usize,
    pub site: u32,
    /// The scope active when the block was made ([`Recorder::scope_id`]; 0: none).
    pub scope: u32,
}

/// Bits in [`Recorder::maybe`] (2^16: 8 KiB).
pub(super) const FILTER_BITS: usize = 1 << 16;

/// The filter bit of the block at `addr` (blocks are 16-byte aligned; high bits folded in).
#[inline(always)]
fn filter_bit(addr: usize) -> usize {
    ((addr >> 4) ^ (addr >> 20)) & (FILTER_BITS - 1)
}

impl Recorder {
    /// Records the new block `addr` of `size` bytes made at `site` while `scope` was active.
    #[inline]
    pub fn insert(&mut self, addr: usize, size: usize, site: u32, scope: u32) {
        let bit = filter_bit(addr);
        self.maybe[bit / 64] |= 1 << (bit % 64);
        self.live.insert(addr, LiveBlock { size, site, scope });
    }

    /// Whether `addr` may be recorded (false: surely not).
    #[inline(always)]
    fn may_have(&self, addr: usize) -> bool {
        let bit = filter_bit(addr);
        self.maybe[bit / 64] & (1 << (bit % 64)) != 0
    }

    /// Forgets the block `addr` (freed).
    #[inline]
    pub fn remove(&mut self, addr: usize) -> Option<LiveBlock> {
        if !self.may_have(addr) {
            return None;
        }
        self.live.remove(&addr)
    }

    /// The block `old` is now `new`, of `size` bytes: its record (if any) follows.
    #[inline]
    pub fn moved(&mut self, old: usize, new: usize, size: usize) {
        if !self.may_have(old) {
            return;
        }
        if old == new {
            if let Some(b) = self.live.get_mut(&old) {
                b.size = size;
            }
        } else if let Some(b) = self.live.remove(&old) {
            self.insert(new, size, b.site, b.scope);
        }
    }

    /// Recorded live blocks.
    #[cfg(test)]
    pub fn live(&self) -> &super::FxMap<usize, LiveBlock> {
        &self.live
    }

    /// The line that made the recorded live block at `addr` (its innermost Lua frame), if any.
    pub(crate) fn line_of(&self, addr: usize) -> Option<String> {
        let block = self.live.get(&addr)?;
        let frames = &self.sites[block.site as usize];
        let leaf = frames
            .iter()
            .map(|&f| &self.frames[f as usize])
            .find(|f| f.what == b'L' || f.what == b'm')
            .or_else(|| frames.first().map(|&f| &self.frames[f as usize]))?;
        // (Lua 5.1 may not have saved the pc of a frame yet: no line to tell)
        (leaf.what == b'C' || leaf.line >= 0).then(|| leaf.line_label())
    }
}
