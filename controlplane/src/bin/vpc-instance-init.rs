//! An instance's first process (to be written).

fn main() {}
