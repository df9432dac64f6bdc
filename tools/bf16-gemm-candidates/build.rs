fn main() {
    // oneDNN (Debian: libdnnl-dev). OpenBLAS is opened at run time, so that a build without
    // `cblas_sbgemm` (Debian 12's) is reported instead of failing to link.
    println!("cargo:rustc-link-lib=dnnl");
}
