package = "lunet-mem"
version = "dev-1"
source = {
   url = "git+https://github.com/lunet-io/lunet-mem",
}
description = {
   summary = "Exact memory tracking, neutrality checks and coroutine-aware scopes for Lua",
   detailed = [[
      A Rust module (mlua) that wraps the Lua state's allocator and counts every allocation
      exactly: stats, memory-neutrality checkpoints, repeat-and-compare leak checks, scopes that
      follow coroutines, and busted assertions. LuaJIT 2.1 and Lua 5.1 to 5.5.
   ]],
   license = "MIT",
}
dependencies = {
   "lua >= 5.1, < 5.6",
}
build = {
   -- Built with cargo (no rock needed): scripts/rock-build.sh picks the Lua version from the
   -- interpreter luarocks targets.
   type = "command",
   build_command = [[LUA="$(LUA)" sh scripts/rock-build.sh]],
   install = {
      lib = {
         ["lunet.mem"] = "target/rock/mem.so",
      },
      -- The helpers, compiled into the library too (offered in package.preload, behind these
      -- files). Not lua/lunet/mem.lua: the library is `lunet.mem` and carries its own copy.
      lua = {
         ["lunet.mem.busted"] = "lua/lunet/mem/busted.lua",
         ["lunet.mem.holders"] = "lua/lunet/mem/holders.lua",
         ["lunet.mem.run"] = "lua/lunet/mem/run.lua",
      },
      bin = {
         ["lunet-mem"] = "bin/lunet-mem",
      },
   },
}
