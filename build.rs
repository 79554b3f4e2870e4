// The module must stay mapped until the process exits: Lua 5.4 unloads C libraries inside
// `lua_close` (the CLIBS finalizer) while objects whose finalizers and allocator live in this
// library may still be released after it. `-z nodelete` makes `dlclose` keep the code.
//
// It also names the Lua-version facts the code branches on, once:
// - `type_tags`: the allocator gets a type tag for new objects (Lua 5.2+);
// - `lua54_gc`: Lua 5.4's collector (generational mode, stacks shrunk only when incremental);
// - `aux_buffers`: lauxlib's string buffers allocate through `lua_getallocf` (5.3+);
// - `c_scope`: `mem.scope` is C, with a continuation on 5.2+ (PUC Lua; LuaJIT's is Lua).
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
    let has = |f: &str| std::env::var_os(format!("CARGO_FEATURE_{}", f.to_uppercase())).is_some();
    let cfgs = [
        (
            "type_tags",
            ["lua52", "lua53", "lua54", "lua55"].iter().any(|f| has(f)),
        ),
        ("lua54_gc", ["lua54", "lua55"].iter().any(|f| has(f))),
        (
            "aux_buffers",
            ["lua53", "lua54", "lua55"].iter().any(|f| has(f)),
        ),
        (
            "c_scope",
            ["lua51", "lua52", "lua53", "lua54", "lua55"]
                .iter()
                .any(|f| has(f)),
        ),
    ];
    for (name, on) in cfgs {
        println!("cargo::rustc-check-cfg=cfg({name})");
        if on {
            println!("cargo::rustc-cfg={name}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
