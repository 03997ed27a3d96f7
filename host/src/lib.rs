//! Host library.
