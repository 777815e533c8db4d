// The same linking as the stages crate: rpath to libtorch, torch_cuda kept.
include!("../stages/link_torch.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../stages/link_torch.rs");
    link_torch();
}
