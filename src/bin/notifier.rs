//! notifier
fn main() {}
