//! Heap profiles in pprof's format (`snap:pprof(path)`): the messages of
//! github.com/google/pprof `proto/profile.proto` that a heap profile uses, encoded by `prost`
//! from the structs below (no generated code), gzipped by `flate2`.
//!
//! What a profile holds: one sample per site and scope of the snapshot, with the values
//! `alloc_objects`, `alloc_space`, `inuse_objects`, `inuse_space` and a `scope` label (the
//! name of the scope active when the blocks were made; no label outside any scope). The trace
//! keeps live blocks only, not what was allocated and freed since, so `alloc_*` equal
//! `inuse_*` (a comment in the profile says so). One location per frame (leaf first in a
//! sample), each with one line that names a function (name, file, line defined). A sampled
//! trace writes its estimates, scaled up as the snapshot is (Go's heap profiles do the same:
//! pprof does not scale values by the period), with the period set to the mean bytes between
//! samples; an exact trace has period 1.

use std::collections::HashMap;
use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use prost::Message;

use super::record::Frame;
use super::snapshot::Snapshot;

/// `Profile` of profile.proto (the fields a heap profile uses).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// `string_table[0]` is always "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    /// Indices into `string_table`.
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// Index into `string_table` of the type shown by default.
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `ValueType`: the type and unit of a value (indices into the string table).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `Sample`: a stack (leaf first), one value per sample type, labels.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `Label`: a string label (`key` and `str` are indices into the string table).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
}

/// `Mapping`: one, for the Lua code, saying that the locations are symbolized already (else
/// pprof looks for a binary to read symbols from).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
}

/// `Location`: one frame (ids start at 1).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// `Line`: a function and the line running in it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// `Function`: name, file (indices into the string table) and the line it is defined at.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// The sample types, in the order of each sample's values.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// The id of the one mapping.
const LUA_MAPPING: u64 = 1;

/// The string table being built: each string once, "" first.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        let mut strings = Strings {
            table: Vec::new(),
            index: HashMap::new(),
        };
        strings.id("");
        strings
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.index.get(s) {
            return id;
        }
        let id = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), id);
        id
    }
}

impl Frame {
    /// The function of this frame as pprof shows it: its `"function"` key of `snap:top` (unique
    /// where a bare name is not: two files may each have an `f`), file, line defined.
    fn pprof_function(&self) -> (String, &str, i64) {
        match self.what {
            b'?' | b'C' => (self.function_label(), "", 0),
            _ => (self.function_label(), &self.src, self.defined.max(0) as i64),
        }
    }
}

impl Snapshot {
    /// The snapshot as a profile (see the module doc); `time_nanos` is when it is written.
    pub fn profile(&self, time_nanos: i64) -> Profile {
        let mut strings = Strings::new();
        let sample_type = SAMPLE_TYPES
            .iter()
            .map(|(t, unit)| ValueType {
                r#type: strings.id(t),
                unit: strings.id(unit),
            })
            .collect();
        let scope_key = strings.id("scope");
        let mut functions: Vec<Function> = Vec::new();
        let mut function_ids: HashMap<(String, String, i64), u64> = HashMap::new();
        // Location id of frame id `f`: `location_ids[f]` (0: not made yet).
        let mut location_ids = vec![0u64; self.frames.len()];
        let mut locations: Vec<Location> = Vec::new();
        let mut samples = Vec::with_capacity(self.sites.len());
        for site in &self.sites {
            let mut location_id = Vec::with_capacity(site.frames.len());
            for &f in site.frames.iter() {
                if location_ids[f as usize] == 0 {
                    let frame = self.frame(f);
                    let (name, file, start_line) = frame.pprof_function();
                    let key = (name, file.to_string(), start_line);
                    let function_id = match function_ids.get(&key) {
                        Some(&id) => id,
                        None => {
                            let id = functions.len() as u64 + 1;
                            let name = strings.id(&key.0);
                            functions.push(Function {
                                id,
                                // (no system name: pprof would take the name for a mangled
                                // C++ one and cut what is in <...> and (...))
                                name,
                                system_name: 0,
                                filename: strings.id(&key.1),
                                start_line,
                            });
                            function_ids.insert(key, id);
                            id
                        }
                    };
                    let id = locations.len() as u64 + 1;
                    locations.push(Location {
                        id,
                        mapping_id: LUA_MAPPING,
                        line: vec![Line {
                            function_id,
                            line: frame.line.max(0) as i64,
                        }],
                    });
                    location_ids[f as usize] = id;
                }
                location_id.push(location_ids[f as usize]);
            }
            let (blocks, bytes) = (site.blocks.round() as i64, site.bytes.round() as i64);
            let label = self
                .scope_name(site.scope)
                .map(|name| Label {
                    key: scope_key,
                    str: strings.id(name),
                })
                .into_iter()
                .collect();
            samples.push(Sample {
                location_id,
                value: vec![blocks, bytes, blocks, bytes],
                label,
            });
        }
        let kind = if self.sample_bytes > 0 {
            format!(
                "sampled every {} bytes on average, figures scaled up",
                self.sample_bytes
            )
        } else {
            "exact".to_string()
        };
        let comment = vec![strings.id(&format!(
            "lunet-mem: live blocks of a mem.trace snapshot ({kind}); \
                 the trace keeps no freed blocks, so alloc_* = inuse_*"
        ))];
        let period_type = Some(ValueType {
            r#type: strings.id("space"),
            unit: strings.id("bytes"),
        });
        let default_sample_type = strings.id("inuse_space");
        let mapping = vec![Mapping {
            id: LUA_MAPPING,
            filename: strings.id("[lua]"),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
        }];
        Profile {
            sample_type,
            mapping,
            sample: samples,
            location: locations,
            function: functions,
            string_table: strings.table,
            time_nanos,
            period_type,
            period: self.sample_bytes.max(1) as i64,
            comment,
            default_sample_type,
        }
    }

    /// Writes the snapshot to `path` as a gzipped profile.proto heap profile.
    pub fn pprof(&self, path: &str) -> std::io::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let encoded = self.profile(now).encode_to_vec();
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut gz = GzEncoder::new(file, Compression::default());
        gz.write_all(&encoded)?;
        gz.finish()?.flush()
    }
}
