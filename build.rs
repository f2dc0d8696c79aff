//! Tells the code what the linked OpenSSL was built without, as openssl-sys reports it.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(no_ssl3)");
    println!("cargo:rerun-if-env-changed=DEP_OPENSSL_CONF");
    let conf = std::env::var("DEP_OPENSSL_CONF").unwrap_or_default();
    if conf.split(',').any(|flag| flag == "OPENSSL_NO_SSL3_METHOD") {
        println!("cargo:rustc-cfg=no_ssl3");
    }
}
