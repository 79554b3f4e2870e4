/*
 * Stand-ins for the native helpers busted needs, for Lua 5.5 (Debian builds luasystem,
 * lua-term and luafilesystem for 5.1-5.4 only): the few functions busted and penlight call,
 * with the same results, so that busted's own Lua code (Debian's, for 5.4) runs on 5.5.
 *
 *   system.core  gettime(), monotime(), sleep(seconds)           (busted.core's timers)
 *   term.core    isatty(file)                                     (busted's output handlers)
 *   lfs          attributes, symlinkattributes, currentdir, chdir, mkdir, rmdir, dir
 *                                                                 (pl.path, pl.dir: the specs)
 *
 * Built by scripts/lua55.sh into .lua55/lib/lua/5.5 (one library, three names). Not part of
 * the module: a test dependency only.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lauxlib.h"
#include "lua.h"

/* ---- system.core ---------------------------------------------------------------------- */

static double seconds_of(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int sys_gettime(lua_State *L) {
  lua_pushnumber(L, seconds_of(CLOCK_REALTIME));
  return 1;
}

static int sys_monotime(lua_State *L) {
  lua_pushnumber(L, seconds_of(CLOCK_MONOTONIC));
  return 1;
}

static int sys_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  struct timespec ts;
  if (s < 0) s = 0;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
  return 0;
}

int luaopen_system_core(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"gettime", sys_gettime}, {"monotime", sys_monotime}, {"sleep", sys_sleep}, {NULL, NULL}};
  luaL_newlib(L, fns);
  return 1;
}

/* ---- term.core ------------------------------------------------------------------------ */

static int term_isatty(lua_State *L) {
  luaL_Stream *stream = (luaL_Stream *)luaL_checkudata(L, 1, LUA_FILEHANDLE);
  lua_pushboolean(L, stream->closef != NULL && isatty(fileno(stream->f)));
  return 1;
}

int luaopen_term_core(lua_State *L) {
  static const luaL_Reg fns[] = {{"isatty", term_isatty}, {NULL, NULL}};
  luaL_newlib(L, fns);
  return 1;
}

/* ---- lfs ------------------------------------------------------------------------------ */

/* nil, message, errno: the failure triple lfs returns. */
static int fs_fail(lua_State *L, const char *path) {
  int e = errno;
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", path, strerror(e));
  lua_pushinteger(L, e);
  return 3;
}

static const char *mode_name(mode_t m) {
  if (S_ISREG(m)) return "file";
  if (S_ISDIR(m)) return "directory";
  if (S_ISLNK(m)) return "link";
  if (S_ISSOCK(m)) return "socket";
  if (S_ISFIFO(m)) return "named pipe";
  if (S_ISCHR(m)) return "char device";
  if (S_ISBLK(m)) return "block device";
  return "other";
}

/* Pushes the attribute `name` of `st`; returns 0 if there is no such attribute. */
static int push_attribute(lua_State *L, const struct stat *st, const char *name) {
  if (strcmp(name, "mode") == 0) lua_pushstring(L, mode_name(st->st_mode));
  else if (strcmp(name, "size") == 0) lua_pushinteger(L, (lua_Integer)st->st_size);
  else if (strcmp(name, "modification") == 0) lua_pushinteger(L, (lua_Integer)st->st_mtime);
  else if (strcmp(name, "access") == 0) lua_pushinteger(L, (lua_Integer)st->st_atime);
  else if (strcmp(name, "change") == 0) lua_pushinteger(L, (lua_Integer)st->st_ctime);
  else if (strcmp(name, "dev") == 0) lua_pushinteger(L, (lua_Integer)st->st_dev);
  else if (strcmp(name, "ino") == 0) lua_pushinteger(L, (lua_Integer)st->st_ino);
  else if (strcmp(name, "nlink") == 0) lua_pushinteger(L, (lua_Integer)st->st_nlink);
  else if (strcmp(name, "uid") == 0) lua_pushinteger(L, (lua_Integer)st->st_uid);
  else if (strcmp(name, "gid") == 0) lua_pushinteger(L, (lua_Integer)st->st_gid);
  else return 0;
  return 1;
}

static const char *const ATTRIBUTES[] = {"mode", "size", "modification", "access", "change",
                                         "dev",  "ino",  "nlink",        "uid",    "gid",
                                         NULL};

/* attributes(path [, name | table]): a table of the attributes, or the one named. */
static int stat_with(lua_State *L, int (*statf)(const char *, struct stat *)) {
  const char *path = luaL_checkstring(L, 1);
  struct stat st;
  int i;
  if (statf(path, &st) != 0) return fs_fail(L, path);
  if (lua_type(L, 2) == LUA_TSTRING) {
    const char *name = lua_tostring(L, 2);
    if (!push_attribute(L, &st, name)) return luaL_argerror(L, 2, "invalid attribute name");
    return 1;
  }
  if (lua_type(L, 2) == LUA_TTABLE) lua_settop(L, 2);
  else lua_newtable(L);
  for (i = 0; ATTRIBUTES[i] != NULL; i++) {
    push_attribute(L, &st, ATTRIBUTES[i]);
    lua_setfield(L, -2, ATTRIBUTES[i]);
  }
  return 1;
}

static int fs_attributes(lua_State *L) { return stat_with(L, stat); }
static int fs_symlinkattributes(lua_State *L) { return stat_with(L, lstat); }

static int fs_currentdir(lua_State *L) {
  char buf[PATH_MAX];
  if (getcwd(buf, sizeof buf) == NULL) return fs_fail(L, ".");
  lua_pushstring(L, buf);
  return 1;
}

static int fs_result(lua_State *L, int rc, const char *path) {
  if (rc != 0) return fs_fail(L, path);
  lua_pushboolean(L, 1);
  return 1;
}

static int fs_chdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  return fs_result(L, chdir(path), path);
}

static int fs_mkdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  return fs_result(L, mkdir(path, 0777), path);
}

static int fs_rmdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  return fs_result(L, rmdir(path), path);
}

#define DIR_MT "lunet.mem.busted55.dir"

typedef struct {
  DIR *dir; /* NULL once closed */
} DirBox;

static int dir_close(lua_State *L) {
  DirBox *box = (DirBox *)luaL_checkudata(L, 1, DIR_MT);
  if (box->dir != NULL) {
    closedir(box->dir);
    box->dir = NULL;
  }
  return 0;
}

/* The iterator: the next entry's name, or nil (and the directory closed) at the end. */
static int dir_next(lua_State *L) {
  DirBox *box = (DirBox *)luaL_checkudata(L, 1, DIR_MT);
  struct dirent *entry;
  if (box->dir == NULL) return luaL_error(L, "calling 'next' on a closed directory");
  entry = readdir(box->dir);
  if (entry == NULL) {
    closedir(box->dir);
    box->dir = NULL;
    return 0;
  }
  lua_pushstring(L, entry->d_name);
  return 1;
}

/* dir(path): iterator, state (`for name in lfs.dir(path)`). */
static int fs_dir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  DirBox *box;
  lua_pushcfunction(L, dir_next);
  box = (DirBox *)lua_newuserdatauv(L, sizeof(DirBox), 0);
  box->dir = NULL;
  if (luaL_newmetatable(L, DIR_MT)) {
    lua_pushcfunction(L, dir_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, dir_close);
    lua_setfield(L, -2, "__close");
  }
  lua_setmetatable(L, -2);
  box->dir = opendir(path);
  if (box->dir == NULL) return luaL_error(L, "cannot open %s: %s", path, strerror(errno));
  return 2;
}

int luaopen_lfs(lua_State *L) {
  static const luaL_Reg fns[] = {{"attributes", fs_attributes},
                                 {"symlinkattributes", fs_symlinkattributes},
                                 {"currentdir", fs_currentdir},
                                 {"chdir", fs_chdir},
                                 {"mkdir", fs_mkdir},
                                 {"rmdir", fs_rmdir},
                                 {"dir", fs_dir},
                                 {NULL, NULL}};
  luaL_newlib(L, fns);
  lua_pushliteral(L, "lunet-mem stand-in for LuaFileSystem (Lua 5.5)");
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
