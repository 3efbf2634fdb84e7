//! Puts libtorch's directory into the binary's rpath (torch-sys passes it only to
//! its own C++ glue, so without this the trainer would need LD_LIBRARY_PATH), and
//! records libtorch's version for the model provenance.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let mut version = "unknown".to_string();
    // torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=...`.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // A PyPI wheel has torch/version.py next to torch/lib; a libtorch zip has build-version.
        let lib = std::path::Path::new(&dir);
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
}
