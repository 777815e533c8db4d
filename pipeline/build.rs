// The same linking as the stages crate: rpath to libtorch, torch_cuda kept.
include!("../stages/build.rs");
