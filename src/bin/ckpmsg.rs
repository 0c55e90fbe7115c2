//! ckpmsg
fn main() {}
