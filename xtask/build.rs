//! Empty: present so that the feature-unification `[build-dependencies]` in Cargo.toml take
//! part in the build (see the comment there).
fn main() {}
