# The project's tasks, one line each (every one is a script you can also run by hand).
#   make test          everything CI runs; ends with "N passed, N failed"   (scripts/test.sh)
#   make demo          builds the rock and runs examples/demo.lua           (scripts/demo.sh)
#   make spec LUA=lua5.4   the busted specs on one interpreter, with the rock built for it
#   make fuzz          the seeded random-program fuzzer on every interpreter (scripts/fuzz.sh)
#   make conformance   the upstream Lua and LuaJIT suites with the module    (scripts/conformance.sh)
#   make sanitize      the C API under ASan+LSan and valgrind                (scripts/c-tests.sh)
#   make bench         workload ratios, bare vs each mode, one interleaved run (bench/run.sh)
#   make bench-scope LUA=lua5.4   ns per scope switch (bench/scope_cost.lua), with the rock
#   make bench-c       the C side: tracked malloc and worker arenas against glibc (bench/c_malloc.sh),
#                      request arenas against malloc/free and charging a scope from another thread
#                      (bench/c_arena.sh)
#   make fmt / lint    rustfmt; clippy for every Lua version and luacheck
#   make rust-test     the Rust tests of both crates (vendored Lua 5.4; `cargo test` runs the module's)
LUA ?= lua5.4
FEATURES := luajit lua51 lua52 lua53 lua54 lua55
INTERPRETERS := luajit luajit-current lua5.1 lua5.2 lua5.3 lua5.4 lua5.5

.PHONY: test demo spec fuzz conformance sanitize bench bench-scope bench-c fmt lint rust-test setup

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

spec:
	eval "$$(bash scripts/rock.sh $(LUA))" && LUNET_MEM_LUA=$(LUA) \
	  LUA_INIT_5_5="@$$PWD/tests/busted55/compat.lua" busted --lua=$(LUA) spec/

fuzz:
	for lua in $(INTERPRETERS); do \
	  (eval "$$(bash scripts/rock.sh $$lua)" && bash scripts/fuzz.sh --lua $$lua) || exit 1; done

conformance:
	for lua in luajit luajit-current lua5.3 lua5.4 lua5.5; do \
	  (eval "$$(bash scripts/rock.sh $$lua)" && bash scripts/conformance.sh --lua $$lua) || exit 1; done

sanitize:
	bash scripts/c-tests.sh asan
	bash scripts/c-tests.sh valgrind

bench:
	bash bench/run.sh

bench-scope:
	eval "$$(bash scripts/rock.sh $(LUA))" && $(LUA) bench/scope_cost.lua

bench-c:
	bash bench/c_malloc.sh
	bash bench/c_arena.sh

fmt:
	cargo fmt

lint:
	for f in $(FEATURES); do cargo clippy --locked --no-default-features --features "$$f,module" \
	  --target-dir "target/clippy-$$f" -- -D warnings || exit 1; done
	luacheck --no-color lua spec examples bench tests

rust-test:
	cargo test --locked --workspace
