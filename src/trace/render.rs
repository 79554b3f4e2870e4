//! Rendering: the labels of frames, folded stacks, the dump file and the flame graph.

use std::collections::HashMap;
use std::io::Write;

use super::record::Frame;
use super::snapshot::Snapshot;

impl Frame {
    /// The `"line"` key: `file.lua:12` (`[C] name` for C functions).
    pub fn line_label(&self) -> String {
        match self.what {
            b'?' => self.src.to_string(),
            b'C' => self.function_label(),
            _ => format!("{}:{}", self.src, self.line),
        }
    }

    /// The `"function"` key: `name (file.lua:10)`, `function <file.lua:10>`, `main chunk
    /// (file.lua)`, `[C] name`.
    pub fn function_label(&self) -> String {
        match (self.what, &self.name) {
            (b'?', _) => self.src.to_string(),
            (b'C', Some(name)) => format!("[C] {name}"),
            (b'C', None) => "[C]".into(),
            (b'm', _) => format!("main chunk ({})", self.src),
            (_, Some(name)) => format!("{name} ({}:{})", self.src, self.defined),
            (_, None) => format!("function <{}:{}>", self.src, self.defined),
        }
    }

    /// A frame of a traceback: `file.lua:12 in name (file.lua:10)`.
    pub fn traceback_label(&self) -> String {
        match self.what {
            b'?' | b'C' => self.function_label(),
            _ => format!("{}:{} in {}", self.src, self.line, self.function_label()),
        }
    }

    /// A frame of a folded stack or flame graph: `name (file.lua:12)`, with no `;`.
    pub fn folded_label(&self) -> String {
        let label = match (self.what, &self.name) {
            (b'?', _) | (b'C', _) => self.function_label(),
            (b'm', _) => format!("main chunk ({}:{})", self.src, self.line),
            (_, Some(name)) => format!("{name} ({}:{})", self.src, self.line),
            (_, None) => format!(
                "function <{}:{}> ({}:{})",
                self.src, self.defined, self.src, self.line
            ),
        };
        label.replace([';', '\n'], "_")
    }
}

impl Snapshot {
    /// Folded stacks (`root;...;leaf bytes`), one line per stack, sorted.
    pub fn folded(&self) -> Vec<String> {
        let mut lines: HashMap<String, f64> = HashMap::new();
        for s in &self.sites {
            let stack: Vec<String> = s
                .frames
                .iter()
                .rev()
                .map(|&f| self.frame(f).folded_label())
                .collect();
            *lines.entry(stack.join(";")).or_insert(0.0) += s.bytes;
        }
        let mut out: Vec<String> = lines
            .into_iter()
            .filter(|(_, bytes)| bytes.round() >= 1.0)
            .map(|(stack, bytes)| format!("{stack} {}", bytes.round() as u64))
            .collect();
        out.sort();
        out
    }

    /// Writes the folded stacks to `path`.
    pub fn dump(&self, path: &str) -> std::io::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        for line in self.folded() {
            writeln!(file, "{line}")?;
        }
        file.flush()
    }

    /// Writes an interactive SVG flame graph of live bytes by stack to `path`.
    pub fn flamegraph(&self, path: &str, title: &str) -> std::io::Result<()> {
        let lines = self.folded();
        if lines.is_empty() {
            return Err(std::io::Error::other("no live traced allocation to draw"));
        }
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_string();
        opts.count_name = if self.sample_bytes > 0 {
            "bytes (estimated)".into()
        } else {
            "bytes".into()
        };
        opts.name_type = "Lua:".into();
        opts.colors = inferno::flamegraph::color::Palette::Basic(
            inferno::flamegraph::color::BasicPalette::Mem,
        );
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), file)
    }
}
