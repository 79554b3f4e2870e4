// The module must stay mapped until the process exits: Lua 5.4 unloads C libraries inside
// `lua_close` (the CLIBS finalizer) while objects whose finalizers and allocator live in this
// library may still be released after it. `-z nodelete` makes `dlclose` keep the code.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
