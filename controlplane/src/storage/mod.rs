//! The storage agent (to be written).
