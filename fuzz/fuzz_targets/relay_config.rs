//! The relay's config loader (`RelayConfig::from_toml_str`: TOML, then validation) on
//! arbitrary text, and the accessors a starting relay calls on an accepted config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpart_relay::RelayConfig;

fuzz_target!(|text: &str| {
    let label = xpart_fuzz::config_label("relay.toml");
    let Ok(config) = RelayConfig::from_toml_str(text, &label) else {
        return;
    };
    let _ = config.allowed_operations();
    let _ = config.model_patterns();
    let _ = config.connect_timeout();
    let _ = config.first_byte_timeout();
    let _ = config.idle_timeout();
});
