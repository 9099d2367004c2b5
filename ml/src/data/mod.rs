//! Data sets: readers for the official layouts and the cached tensor bundle format.
pub mod bundle;
