// The stages crate's build: libtorch's link arguments (link_torch.rs), and
// the c10d shim (`csrc/c10d_shim.cpp`) compiled against the same libtorch.

include!("link_torch.rs");

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link_torch.rs");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/autocast_shim.cpp");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    if let Some(lib_dir) = link_torch() {
        compile_shim(Path::new(&lib_dir));
    }
}

/// The gloo headers ProcessGroupGloo.hpp needs to parse (declarations
/// only; see the shim's comment): `GLOO_INCLUDE_DIR`, else Debian's.
fn gloo_include() -> Option<PathBuf> {
    let dirs = std::env::var("GLOO_INCLUDE_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/include")]);
    dirs.into_iter()
        .find(|d| d.join("gloo/rendezvous/store.h").exists())
}

fn compile_shim(lib_dir: &Path) {
    let include = lib_dir.join("../include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/c10d_shim.cpp")
        .file("csrc/autocast_shim.cpp");
    match gloo_include() {
        Some(dir) => {
            println!(
                "cargo:rerun-if-changed={}",
                dir.join("gloo/rendezvous/store.h").display()
            );
            build
                .include(dir)
                .define("USE_C10D_GLOO", None)
                .define("RLHF_WITH_GLOO", None);
        }
        None => println!(
            "cargo:warning=no gloo headers found (install libgloo-dev or set GLOO_INCLUDE_DIR): \
             data-parallel stages on CPU will be unavailable"
        ),
    }
    if let Some(dirs) = nccl_includes(lib_dir) {
        build
            .includes(dirs)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("RLHF_WITH_NCCL", None);
    }
    build.compile("rlhf_c10d");
    check_no_gloo_code();
}

/// NCCL's header from the nvidia wheel torch installed beside itself (the
/// NCCL this libtorch was built with), and a complete set of CUDA headers
/// (`CUDA_HOME`, else `/usr/local/cuda`, else the venv's nvidia wheels when
/// they hold the whole set), when this libtorch has CUDA. Without them the
/// shim is built for Gloo alone.
fn nccl_includes(lib_dir: &Path) -> Option<Vec<PathBuf>> {
    println!("cargo:rerun-if-env-changed=RLHF_NO_NCCL");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("RLHF_NO_NCCL").is_some() || !lib_dir.join("libtorch_cuda.so").exists() {
        return None;
    }
    // torch/lib -> site-packages/nvidia/...
    let nvidia = lib_dir.parent()?.parent()?.join("nvidia");
    let nccl = nvidia.join("nccl/include");
    let complete = |p: &PathBuf| {
        ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"]
            .iter()
            .all(|h| p.join(h).exists())
    };
    let wheels = std::fs::read_dir(&nvidia)
        .ok()?
        .flatten()
        .map(|e| e.path().join("include"));
    let cuda = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .into_iter()
        .chain([PathBuf::from("/usr/local/cuda/include")])
        .chain(wheels)
        .find(complete)?;
    nccl.join("nccl.h").exists().then(|| vec![nccl, cuda])
}

/// The ABI argument of the shim holds only if it holds and calls no gloo
/// code: every gloo function it reaches must be torch's, and no inline gloo
/// code from the headers found here may be compiled into it. Any symbol,
/// defined or undefined, that names gloo fails the build.
fn check_no_gloo_code() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let lib = Path::new(&out).join("librlhf_c10d.a");
    let Ok(nm) = std::process::Command::new("nm")
        .args(["--demangle"])
        .arg(&lib)
        .output()
    else {
        println!("cargo:warning=nm not found: the shim's gloo-free check was skipped");
        return;
    };
    let text = String::from_utf8_lossy(&nm.stdout);
    let gloo: Vec<&str> = text.lines().filter(|l| l.contains("gloo::")).collect();
    assert!(
        gloo.is_empty(),
        "the c10d shim references gloo code directly, which the gloo headers \
         found at build time may not match: {gloo:?}"
    );
}
