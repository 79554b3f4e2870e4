//! Bad use is never silent: a message that says what happened and where, then abort.

use std::ffi::{c_char, c_int, CStr};
use std::io::Write;

/// Prints `msg` prefixed with the library's name and aborts.
pub(crate) fn fatal(msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "lunet_mem: {msg}");
    std::process::abort()
}

/// `file:line` of a call (`?` without a file).
pub(crate) fn at(file: *const c_char, line: c_int) -> String {
    if file.is_null() {
        return "?".into();
    }
    // SAFETY: `__FILE__` literals.
    let file = unsafe { CStr::from_ptr(file) }.to_string_lossy();
    format!("{file}:{line}")
}
