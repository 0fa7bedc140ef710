//! Interop tests live in tests/tests/*.rs.
