-- Lua 5.5 makes the control variables of a `for` loop read-only. Debian's busted stack (penlight
-- 1.13's pl.tablex, pl.seq, pl.app, pl.lapp, busted's moonscript loader) assigns to them here
-- and there, so those files do not compile on 5.5 (nor does one file of Debian's luacheck, a
-- workload of bench/run.sh). This searcher, run before lua5.5 starts busted (scripts/test.sh
-- sets LUA_INIT_5_5 to this file for busted's run only; bench/run.sh too), stands in for
-- the Lua file searcher: a file that compiles is loaded as it is; one that fails for that reason
-- only is loaded with every loop's variables copied into fresh locals of the same names
-- (`for k, v in e do` -> `for k_, v_ in e do local k, v = k_, v_`), which 5.4 and earlier do
-- implicitly. Lines are kept, so error positions stay right. A test dependency only.
local searchpath, load, open = package.searchpath, load, io.open

local function fresh(names)
  local copies = names:gsub("([%a_][%w_]*)", "%1_lunet55")
  return copies, names
end

local function rewrite(src)
  src = src:gsub("(%f[%w_]for%s+)([%a_][%w_]*%s*,?[%w_%s,]-)(%s+in%s.-%s)do(%f[^%w_])",
    function(head, names, rest, tail)
      local copies = fresh(names)
      return head .. copies .. rest .. "do local " .. names .. " = " .. copies .. tail
    end)
  src = src:gsub("(%f[%w_]for%s+)([%a_][%w_]*)(%s*=%s*[^\n]-%s)do(%f[^%w_])",
    function(head, name, rest, tail)
      local copy = fresh(name)
      return head .. copy .. rest .. "do local " .. name .. " = " .. copy .. tail
    end)
  return src
end

local function searcher(name)
  local path, err = searchpath(name, package.path)
  if not path then return "\n\t" .. err end
  local file = assert(open(path, "rb"))
  local src = file:read("a")
  file:close()
  local chunk, msg = load(src, "@" .. path)
  if not chunk and msg:find("attempt to assign to const variable", 1, true) then
    chunk, msg = load(rewrite(src), "@" .. path)
  end
  if not chunk then
    error(("error loading module '%s' from file '%s':\n\t%s"):format(name, path, msg), 2)
  end
  return chunk, path
end

package.searchers[2] = searcher
