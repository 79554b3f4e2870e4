//! Frames and sites: what the traced hook reads of the running thread's stack.

use std::ffi::CStr;
use std::rc::Rc;

use mlua::ffi;

use super::live::{LiveBlock, FILTER_BITS};
use super::{FxMap, MAX_DEPTH};

/// One frame of a recorded stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// `short_src`: `file.lua`, `[C]`, `[string "..."]`.
    pub src: Box<str>,
    /// The line running in that frame (-1 for a C function).
    pub line: i32,
    /// The line where the function was defined (0 for a main chunk, -1 for C).
    pub defined: i32,
    /// The name the caller knows the function by, if any.
    pub name: Option<Box<str>>,
    /// `what`: `b'L'` (Lua function), `b'm'` (main chunk), `b'C'` (C function).
    pub what: u8,
}

impl Frame {
    pub(super) fn special(label: &str) -> Frame {
        Frame {
            src: label.into(),
            line: -1,
            defined: -1,
            name: None,
            what: b'?',
        }
    }
}

/// What identifies a frame cheaply: the addresses of the source and name strings (checked
/// against the bytes on use: an address may be reused by another string) and the lines.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FrameKey {
    source: usize,
    name: usize,
    defined: i32,
    line: i32,
}

/// Everything recorded since `trace.start`. Rust memory only.
pub struct Recorder {
    /// Frames read per allocation (1..=MAX_DEPTH).
    pub(super) depth: usize,
    /// Mean bytes between samples; 0 records every allocation.
    pub(super) sample_bytes: u64,
    /// Bytes to allocate before the next sample (sampling only).
    pub(super) bytes_left: i64,
    /// xorshift64* state.
    pub(super) rng: u64,
    frame_ids: FxMap<FrameKey, u32>,
    pub(super) frames: Vec<Frame>,
    pub(super) site_ids: FxMap<Box<[u32]>, u32>,
    pub(super) sites: Vec<Box<[u32]>>,
    /// Names of the scopes blocks were made in, interned: scope id `i` is `scope_names[i - 1]`
    /// (id 0: no scope).
    pub(super) scope_names: Vec<Rc<str>>,
    scope_ids: FxMap<Rc<str>, u32>,
    /// The last name looked up and its id: a request's blocks skip the hash (compared by
    /// pointer; the clone keeps the name's address from being reused).
    last_scope: Option<(Rc<str>, u32)>,
    /// Recorded live blocks by address.
    pub(super) live: FxMap<usize, LiveBlock>,
    /// A filter of the addresses in `live`: a clear bit means "not recorded", so that the free of
    /// an unrecorded block (almost every free when sampling) looks nothing up. Bits are never
    /// cleared (several addresses share one), so a set bit only means "maybe".
    pub(super) maybe: Box<[u64]>,
}

impl Recorder {
    pub fn new(depth: usize, sample_bytes: u64, seed: u64) -> Recorder {
        let mut rec = Recorder {
            depth: depth.clamp(1, MAX_DEPTH),
            sample_bytes,
            bytes_left: 0,
            rng: seed | 1,
            frame_ids: FxMap::default(),
            frames: Vec::new(),
            site_ids: FxMap::default(),
            sites: Vec::new(),
            scope_names: Vec::new(),
            scope_ids: FxMap::default(),
            last_scope: None,
            live: FxMap::default(),
            maybe: vec![0u64; FILTER_BITS / 64].into_boxed_slice(),
        };
        if sample_bytes > 0 {
            rec.bytes_left = rec.next_interval();
        }
        rec
    }

    /// An exponentially distributed number of bytes with mean `sample_bytes` (at least 1).
    fn next_interval(&mut self) -> i64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let bits = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 random bits
        let u = (bits as f64 + 1.0) / (1u64 << 53) as f64; // in (0, 1]
        ((-u.ln() * self.sample_bytes as f64) as i64).max(1)
    }

    /// Whether a new block of `size` bytes is to be recorded: always without sampling; with
    /// sampling, when one of the sample points of the byte stream falls in it (each byte is a
    /// point with probability 1/N, gaps drawn from the exponential distribution).
    #[inline]
    pub fn sample(&mut self, size: usize) -> bool {
        if self.sample_bytes == 0 {
            return true;
        }
        self.bytes_left -= size as i64;
        if self.bytes_left > 0 {
            return false;
        }
        // Memoryless: the next point is an exponential draw past the end of this block.
        self.bytes_left = self.next_interval();
        true
    }

    /// How many blocks one recorded block of `size` bytes stands for: 1 without sampling, else
    /// 1 / P(sampled) = 1 / (1 - exp(-size / N)).
    pub fn weight(sample_bytes: u64, size: usize) -> f64 {
        if sample_bytes == 0 {
            return 1.0;
        }
        let p = -(-(size as f64) / sample_bytes as f64).exp_m1();
        if p > 0.0 {
            1.0 / p
        } else {
            sample_bytes as f64
        }
    }

    pub(super) fn special_site(&mut self, label: &str) -> u32 {
        let frame = match self
            .frames
            .iter()
            .position(|f| f.what == b'?' && &*f.src == label)
        {
            Some(i) => i as u32,
            None => {
                self.frames.push(Frame::special(label));
                (self.frames.len() - 1) as u32
            }
        };
        self.site_id(&[frame])
    }

    /// The id of the scope named `name` (0 for none), made if new.
    pub fn scope_id(&mut self, name: Option<&Rc<str>>) -> u32 {
        let Some(name) = name else {
            return 0;
        };
        if let Some((last, id)) = &self.last_scope {
            if Rc::ptr_eq(last, name) {
                return *id;
            }
        }
        let id = match self.scope_ids.get(name) {
            Some(&id) => id,
            None => {
                self.scope_names.push(name.clone());
                let id = self.scope_names.len() as u32;
                self.scope_ids.insert(name.clone(), id);
                id
            }
        };
        self.last_scope = Some((name.clone(), id));
        id
    }

    /// The id of the site with these frames (leaf first), made if new.
    pub fn site_id(&mut self, frames: &[u32]) -> u32 {
        if let Some(&id) = self.site_ids.get(frames) {
            return id;
        }
        let id = self.sites.len() as u32;
        self.sites.push(frames.into());
        self.site_ids.insert(frames.into(), id);
        id
    }

    /// The id of the frame `ar` describes.
    ///
    /// # Safety
    /// `ar` was filled by `lua_getinfo` with `S` and `l` (and `n` where asked): its `source`,
    /// `name` and `short_src` are valid C strings or null.
    pub(super) unsafe fn frame_id(&mut self, ar: &ffi::lua_Debug) -> u32 {
        let key = FrameKey {
            source: ar.source as usize,
            name: ar.name as usize,
            defined: ar.linedefined,
            line: ar.currentline,
        };
        // SAFETY: `short_src` is NUL-terminated by lua_getinfo; `name` is a C string or null.
        let (src, name) = unsafe {
            (
                CStr::from_ptr(ar.short_src.as_ptr()).to_bytes(),
                if ar.name.is_null() {
                    None
                } else {
                    Some(CStr::from_ptr(ar.name).to_bytes())
                },
            )
        };
        if let Some(&id) = self.frame_ids.get(&key) {
            let f = &self.frames[id as usize];
            if f.src.as_bytes() == src && f.name.as_deref().map(str::as_bytes) == name {
                return id;
            }
        }
        let what = if ar.what.is_null() {
            b'?'
        } else {
            // SAFETY: `what` is a static C string set by lua_getinfo's `S`.
            unsafe { *ar.what as u8 }
        };
        let frame = Frame {
            src: String::from_utf8_lossy(src).into(),
            line: ar.currentline,
            defined: ar.linedefined,
            name: name.map(|n| String::from_utf8_lossy(n).into()),
            what: if what == b'm' || what == b'C' {
                what
            } else {
                b'L'
            },
        };
        let id = self.frames.len() as u32;
        self.frames.push(frame);
        self.frame_ids.insert(key, id);
        id
    }
}
