//! The one pseudo-random generator of this crate: fastrand's seeded `Rng`.
//! The engine and the simulator take all their randomness from a seeded
//! one, so a seed replays a run exactly; nothing here reads a thread-local
//! generator.

/// A seeded generator (`Rng::with_seed`).
pub(crate) type Rng = fastrand::Rng;
