// Link-time settings for binaries, tests and examples of this crate (see notes/libtorch-setup.md §2b).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    // torch-sys (links = "tch") exports its lib dir as DEP_TCH_LIBTORCH_LIB: embed it as RUNPATH so
    // nothing needs LD_LIBRARY_PATH at run time.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    // Keep libtorch.so (-> libtorch_cuda.so on a CUDA libtorch) in DT_NEEDED; rustc links with
    // --as-needed, which would drop it and leave tch::Cuda::is_available() false on a GPU.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
