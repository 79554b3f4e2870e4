std = "max"
max_line_length = 110
globals = { "coroutine" } -- mem.lua wraps coroutine.resume and coroutine.wrap
read_globals = { "jit", "newproxy", "unpack" }
files["spec"] = {
  std = "+busted",
  -- Memory specs keep values alive on purpose (W241, W331) and drop them (W311).
  ignore = { "241", "311", "331" },
}
