//! `snap:pprof(path)` round trip: a profile written by the module in a real Lua state (mlua's
//! vendored Lua), gunzipped and decoded with this file's own profile.proto structs (written
//! from github.com/google/pprof `proto/profile.proto`, apart from the module's), then checked:
//! sample types, values, the `scope` label, and that every id resolves.
#![cfg(feature = "vendored")]

use std::collections::HashMap;
use std::io::Read;

use prost::Message;

mod common;
use common::new_lua;

#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(message, optional, tag = "11")]
    period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    period: i64,
    #[prost(int64, tag = "14")]
    default_sample_type: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Label {
    #[prost(int64, tag = "1")]
    key: i64,
    #[prost(int64, tag = "2")]
    str: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
    #[prost(int64, tag = "2")]
    line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
    #[prost(int64, tag = "4")]
    filename: i64,
    #[prost(int64, tag = "5")]
    start_line: i64,
}

/// Allocates new strings on line 5 in scope "GET /a" and on line 8 in scope "GET /b", writes the
/// profile to `path` and returns the snapshot's live bytes.
const SCRIPT: &str = r#"local mem = require "lunet.mem"
local path, sample_bytes = ...
kept = {}
local function a()
  for i = 1, 300 do kept[#kept + 1] = string.rep("a", 100) .. i end
end
local function b()
  for i = 1, 100 do kept[#kept + 1] = string.rep("b", 1000) .. i end
end
mem.trace.start({ sample_bytes = sample_bytes })
mem.scope("GET /a", a)
mem.scope("GET /b", b)
collectgarbage("collect")
collectgarbage("collect")
local snap = mem.trace.snapshot()
mem.trace.stop()
assert(snap:pprof(path))
local live = 0
for _, s in ipairs(snap:top()) do live = live + s.bytes end
return live
"#;

/// Runs [`SCRIPT`] and decodes its profile.
fn profile_of(sample_bytes: Option<u64>) -> (Profile, i64) {
    let lua = new_lua();
    let dir = std::env::temp_dir().join(format!(
        "lunet-mem-pprof-{}-{}",
        std::process::id(),
        sample_bytes.unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap.pb.gz");
    let live: i64 = lua
        .load(SCRIPT)
        .set_name("@pprof_test.lua")
        .call((path.to_str().unwrap(), sample_bytes))
        .unwrap();
    let gz = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    (Profile::decode(&raw[..]).unwrap(), live)
}

#[test]
fn an_exact_profile_decodes_to_the_snapshot() {
    let (p, live) = profile_of(None);
    let s = |i: i64| p.string_table[i as usize].as_str();
    assert_eq!(s(0), "");
    let types: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| (s(t.r#type), s(t.unit)))
        .collect();
    assert_eq!(
        types,
        [
            ("alloc_objects", "count"),
            ("alloc_space", "bytes"),
            ("inuse_objects", "count"),
            ("inuse_space", "bytes")
        ]
    );
    assert_eq!(s(p.default_sample_type), "inuse_space");
    assert_eq!(p.period, 1);
    let period_type = p.period_type.as_ref().unwrap();
    assert_eq!(
        (s(period_type.r#type), s(period_type.unit)),
        ("space", "bytes")
    );

    let functions: HashMap<u64, &Function> = p.function.iter().map(|f| (f.id, f)).collect();
    let locations: HashMap<u64, &Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let mut inuse = 0;
    let mut by_scope: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut leaf_lines: HashMap<&str, Vec<i64>> = HashMap::new();
    for sample in &p.sample {
        assert_eq!(sample.value.len(), 4);
        assert_eq!(
            sample.value[0], sample.value[2],
            "alloc_objects = inuse_objects"
        );
        assert_eq!(
            sample.value[1], sample.value[3],
            "alloc_space = inuse_space"
        );
        inuse += sample.value[3];
        // Every id resolves; the innermost Lua frame is the allocating line.
        let mut lua_line = None;
        for id in &sample.location_id {
            let location = locations[id];
            let line = &location.line[0];
            let function = functions[&line.function_id];
            if lua_line.is_none() && s(function.filename) == "pprof_test.lua" {
                lua_line = Some(line.line);
            }
        }
        for label in &sample.label {
            assert_eq!(s(label.key), "scope");
            let t = by_scope.entry(s(label.str)).or_default();
            t.0 += sample.value[2];
            t.1 += sample.value[3];
            leaf_lines.entry(s(label.str)).or_default().extend(lua_line);
        }
    }
    assert_eq!(inuse, live, "inuse_space sums to the snapshot's live bytes");
    let (a_blocks, a_bytes) = by_scope["GET /a"];
    let (b_blocks, b_bytes) = by_scope["GET /b"];
    assert!(
        a_blocks >= 300 && a_bytes >= 300 * 100,
        "{a_blocks} {a_bytes}"
    );
    assert!(
        b_blocks >= 100 && b_bytes >= 100 * 1000,
        "{b_blocks} {b_bytes}"
    );
    assert!(leaf_lines["GET /a"].contains(&5), "{leaf_lines:?}");
    assert!(leaf_lines["GET /b"].contains(&8), "{leaf_lines:?}");
    assert!(!leaf_lines["GET /a"].contains(&8), "{leaf_lines:?}");
}

#[test]
fn a_sampled_profile_has_its_period_and_scaled_figures() {
    let (p, live) = profile_of(Some(1024));
    assert_eq!(p.period, 1024);
    let inuse: i64 = p.sample.iter().map(|s| s.value[3]).sum();
    // Scaled up as the snapshot is: the same estimate, up to the rounding of each sample.
    assert!(
        (inuse - live).abs() <= p.sample.len() as i64,
        "{inuse} vs {live}"
    );
    // About 140 KB live, estimated with a standard deviation near 10 KB; the unscaled sum of the
    // sampled blocks would be near 66 KB. 90 KB is five deviations from both.
    assert!(inuse > 90 * 1000, "{inuse}");
}
