//! The AWS SDK for Rust as an xpart caller. The client lives in `examples/sdk_client.rs`, which
//! `tests/e2e/test_sdk_rust.py` runs against a running agent with only environment settings
//! (`AWS_ENDPOINT_URL_BEDROCK_RUNTIME`, `AWS_ENDPOINT_URL_BEDROCK`, `AWS_CA_BUNDLE`,
//! `AWS_REGION` and the credentials variables), as an application would be configured.
