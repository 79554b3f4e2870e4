//! Which scopes get the arena they ask for: placement gives up on a route whose arenas outlive
//! their requests.
//!
//! An arena pays off when what a request made dies with it: the collector frees the arena's
//! blocks at its next cycle and the chunks go back to the pool. When a request's result is kept
//! (a response in a send queue, an entry in a cache), each arena stays alive, holding its
//! chunks, for as long as the result does: a server keeping the last 256 results holds 256
//! arenas, most of each chunk empty, and spends its time making and reclaiming them. Such an
//! arena is *pinned* (objects alive a whole GC cycle after its scope ended).
//!
//! Each scope name (a route) has a score: a pinned arena adds [`PINNED`], an arena reclaimed
//! without having been pinned takes one off. While the score is at [`GIVE_UP`] or more, the
//! route's scopes run without an arena of their own (as a scope without the option: counted,
//! budgeted, in their parent's arena if it has one), but for one in [`PROBE_EVERY`], whose
//! arena tells whether the route changed. The break-even is one arena in five pinned.
//!
//! The state keeps the same score over all its routes: a route seen for the first time starts
//! from it (a program that names each request apart, as one scope per file, has no route to
//! learn from), and so do the routes beyond [`MAX_ROUTES`].

use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, BuildHasherDefault};

use crate::fxhash::{FxHasher, FxMap};

/// What a pinned arena adds to its route's score.
const PINNED: u8 = 4;
/// The score from which the route's scopes get no arena.
const GIVE_UP: u8 = 8;
/// The highest score: a route that stops pinning gets arenas back after this many clean ones.
const MAX_SCORE: u8 = 16;
/// While a route is given up, one scope in this many still gets its arena.
const PROBE_EVERY: u32 = 32;
/// Routes with a score kept; the scopes of other names always get their arena.
const MAX_ROUTES: usize = 1024;

#[derive(Default, Clone, Copy)]
struct Route {
    score: u8,
    /// Scopes opened without an arena since the last probe.
    skipped: u32,
}

/// The routes' scores and the arenas not made. Single-threaded, like the state.
///
/// Routes are keyed by a hash of their name, not the name: names can be long, or unique to a
/// request, and this map must not keep them. Two names with the same hash share a score.
pub struct Routes {
    routes: RefCell<FxMap<u64, Route>>,
    /// The score over every route: where a new route starts.
    all: Cell<Route>,
    /// Whether placement gives up at all (`mem.arena_policy`).
    pub adaptive: Cell<bool>,
    /// Arena scopes opened without their arena so far.
    pub skipped: Cell<u64>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            routes: RefCell::default(),
            all: Cell::default(),
            adaptive: Cell::new(true),
            skipped: Cell::new(0),
        }
    }
}

impl Routes {
    /// Whether a scope named `name` that asks for an arena gets one now.
    pub fn admits(&self, name: &str) -> bool {
        if !self.adaptive.get() {
            return true;
        }
        let key = key_of(name);
        let mut routes = self.routes.borrow_mut();
        let room = routes.len() < MAX_ROUTES;
        let admitted = match routes.get_mut(&key) {
            Some(route) => route.admits(),
            None if room => {
                let mut route = Route {
                    score: self.all.get().score,
                    skipped: 0,
                };
                let admitted = route.admits();
                routes.insert(key, route);
                admitted
            }
            None => {
                let mut all = self.all.get();
                let admitted = all.admits();
                self.all.set(all);
                admitted
            }
        };
        if !admitted {
            self.skipped.set(self.skipped.get() + 1);
        }
        admitted
    }

    /// An arena of `name` was found pinned.
    pub fn pinned(&self, name: &str) {
        self.update(name, |score| score.saturating_add(PINNED).min(MAX_SCORE));
    }

    /// An arena of `name` was reclaimed without having been pinned.
    pub fn clean(&self, name: &str) {
        self.update(name, |score| score.saturating_sub(1));
    }

    fn update(&self, name: &str, f: impl Fn(u8) -> u8) {
        let mut all = self.all.get();
        all.score = f(all.score);
        self.all.set(all);
        // (A lookup only: this runs inside the allocator, which must not allocate. The free that
        // reclaims an arena may come while `admits` holds the map: then the outcome is dropped.)
        if let Ok(mut routes) = self.routes.try_borrow_mut() {
            if let Some(route) = routes.get_mut(&key_of(name)) {
                route.score = f(route.score);
            }
        }
    }
}

impl Route {
    /// Whether the route's next scope gets its arena (a probe counted when it does not).
    fn admits(&mut self) -> bool {
        if self.score < GIVE_UP {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= PROBE_EVERY {
            self.skipped = 0;
            return true;
        }
        false
    }
}

/// A route's key: its name's hash.
fn key_of(name: &str) -> u64 {
    BuildHasherDefault::<FxHasher>::default().hash_one(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_whose_arenas_pin_gives_up_then_probes_then_comes_back() {
        let routes = Routes::default();
        let name = "GET /cache";
        assert!(routes.admits(name));
        routes.pinned(name);
        assert!(routes.admits(name), "one pinned arena is not enough");
        routes.pinned(name);
        let admitted = (0..PROBE_EVERY).filter(|_| routes.admits(name)).count();
        assert_eq!(admitted, 1, "given up: one probe in {PROBE_EVERY}");
        assert_eq!(routes.skipped.get(), u64::from(PROBE_EVERY) - 1);
        for _ in 0..MAX_SCORE {
            routes.clean(name);
        }
        assert!(routes.admits(name), "clean arenas bring it back");
    }

    #[test]
    fn one_arena_in_five_pinned_keeps_the_route() {
        let routes = Routes::default();
        let name = "GET /users";
        for i in 0..1000 {
            assert!(routes.admits(name), "request {i}");
            if i % 5 == 0 {
                routes.pinned(name);
            } else {
                routes.clean(name);
            }
        }
    }

    #[test]
    fn a_new_route_starts_from_the_score_of_all() {
        let routes = Routes::default();
        for i in 0..2 {
            let name = format!("file {i}");
            assert!(routes.admits(&name), "{name}");
            routes.pinned(&name);
        }
        let admitted = (0..64)
            .filter(|i| routes.admits(&format!("new file {i}")))
            .count();
        assert_eq!(admitted, 0, "new routes start given up");
        for _ in 0..MAX_SCORE {
            routes.clean("file 0");
        }
        assert!(routes.admits("another file"));
    }

    #[test]
    fn off_always_admits() {
        let routes = Routes::default();
        routes.adaptive.set(false);
        let name = "r";
        for _ in 0..10 {
            routes.pinned(name);
        }
        assert!((0..100).all(|_| routes.admits(name)));
    }
}
