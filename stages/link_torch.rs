// Link libtorch so that binaries and tests run as they are built.
//
// torch-sys links libtorch but its link arguments do not reach the crates
// that depend on it, so each crate that produces executables repeats two
// things (this file is included by the stages' and the pipeline's build
// scripts):
// - an rpath to the torch `lib/` folder, so nothing needs `LD_LIBRARY_PATH`;
// - `torch_cuda` linked with `--no-as-needed` when the folder has it, or the
//   linker drops it and `Device::cuda_if_available()` silently picks the CPU
//   (tch-rs issues #907, #980).

/// Emits the link arguments; the torch `lib/` folder, when torch-sys said.
fn link_torch() -> Option<String> {
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?;
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if std::path::Path::new(&lib_dir)
        .join("libtorch_cuda.so")
        .exists()
    {
        println!("cargo:rustc-link-arg=-L{lib_dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    Some(lib_dir)
}
