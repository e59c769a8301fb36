//! Builds the kernel object (podid-ebpf) and tells the crate where it is, so
//! that `cargo build` alone produces an agent with its programs embedded.
//! Set `PODID_EBPF_OBJECT` to a prebuilt object to skip the kernel build.

#[path = "../xtask/src/ebpf_build.rs"]
#[allow(dead_code)]
mod ebpf_build;

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PODID_EBPF_OBJECT");
    let object = match env::var_os("PODID_EBPF_OBJECT") {
        Some(prebuilt) => PathBuf::from(prebuilt),
        None => {
            let manifest_dir =
                PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            let workspace = manifest_dir
                .parent()
                .expect("podid-agent lives in the workspace")
                .to_path_buf();
            for input in ebpf_build::inputs(&workspace) {
                println!("cargo:rerun-if-changed={}", input.display());
            }
            let target_dir = ebpf_build::default_target_dir(&workspace);
            match ebpf_build::build(&workspace, &target_dir, true) {
                Ok(object) => object,
                Err(why) => {
                    println!("cargo::error=podid-agent needs the eBPF object: {why}");
                    std::process::exit(1);
                }
            }
        }
    };
    println!("cargo:rustc-env=PODID_EBPF_OBJECT={}", object.display());
}
