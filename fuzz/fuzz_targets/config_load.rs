//! The config loader on arbitrary text, in each format, with environment
//! overrides taken from the input: it answers a config or an error, never a
//! panic; what `forkd check` prints for a valid config renders too.
#![no_main]

use forkd::config::{Config, ConfigFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let format = match ctl % 3 {
        0 => ConfigFormat::Toml,
        1 => ConfigFormat::Yaml,
        _ => ConfigFormat::Json,
    };
    // After a 0xFF byte: lines of KEY=VALUE environment overrides.
    let (text, env) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let vars: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("FORKD__{k}"), v.to_owned()))
        .collect();
    let lookup = |name: &str| (name == "FUZZ_SET").then(|| "value".to_owned());
    if let Ok(config) = Config::from_text(&text, format, lookup, vars) {
        let _ = config.normalized_redacted();
    }
});
