//! The PROXY protocol v1/v2 header reader, fed arbitrary balancer bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut input = data;
        let _ = tlsbridge::proxy_protocol::read_header(&mut input).await;
    });
});
