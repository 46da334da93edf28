//! Multi-process integration tests live in `tests/`. Not written yet.
