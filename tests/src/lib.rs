//! End-to-end tests of the workspace live in `tests/`. The workspace README's examples are
//! compiled and run here as doctests, so the README cannot drift from the code.
#![doc = include_str!("../../README.md")]
