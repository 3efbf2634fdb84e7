//! Puts libtorch's directory into the binary's rpath (torch-sys passes it only to
//! its own C++ glue, so without this the trainer would need LD_LIBRARY_PATH),
//! records libtorch's version for the model provenance, and compiles the few
//! libtorch calls tch cannot make (`src/ops.cpp`, see `src/ops.rs`) against the
//! headers of the libtorch that torch-sys links.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let mut version = "unknown".to_string();
    // torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=...`.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // A PyPI wheel has torch/version.py next to torch/lib; a libtorch zip has build-version.
        let lib = Path::new(&dir);
        if let Some(root) = lib.parent() {
            if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
                if let Some(line) = text.lines().find(|l| l.starts_with("__version__")) {
                    version = line.split(['\'', '"']).nth(1).unwrap_or("unknown").to_string();
                }
            } else if let Ok(text) = std::fs::read_to_string(root.join("build-version")) {
                version = text.trim().to_string();
            }
        }
    }
    println!("cargo:rustc-env=GANOMALY_LIBTORCH_VERSION={version}");
    compile_ops();
}

/// `src/ops.cpp` with the headers and C++ ABI torch-sys used for its own glue: the
/// headers of `LIBTORCH_INCLUDE`, else of the libtorch whose `lib/` torch-sys
/// links, else of `LIBTORCH`; `LIBTORCH_CXX11_ABI`, default 1 as torch-sys's.
fn compile_ops() {
    println!("cargo:rerun-if-changed=src/ops.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let linked =
        || std::env::var_os("DEP_TCH_LIBTORCH_LIB").and_then(|l| Path::new(&l).parent().map(Path::to_path_buf));
    let root = std::env::var_os("LIBTORCH_INCLUDE")
        .map(PathBuf::from)
        .or_else(linked)
        .or_else(|| std::env::var_os("LIBTORCH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/usr"));
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/ops.cpp")
        .compile("ganomaly_ops");
}
