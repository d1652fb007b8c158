#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The CI equivalents of the cargo-fuzz targets in `fuzz/`: the spool's frame
//! decoder and segment scanner, and the config loader, fed arbitrary and
//! damaged input. They never panic; the decoder and the scanner never return
//! a record whose checksum does not verify, and the scanner finds every
//! record that the damage did not touch.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use forkd::config::{Config, ConfigFormat};
use forkd::spool::Record;
use forkd::spool::fuzzing::{self, decode_frame, scan_data};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;

// ---------------------------------------------------------------- spool decoding

/// The fuzz target's checks (`forkd::spool::fuzzing::check_decoders`), as a
/// proptest failure.
fn check_decoders(base: u64, data: &[u8]) -> Result<(), TestCaseError> {
    fuzzing::check_decoders(base, data).map_err(TestCaseError::fail)
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        0u64..4_000_000_000_000,
        "[A-Za-z0-9-]{0,40}",
        prop::sample::select(vec!["POST", "PUT", "PATCH"]),
        "/[a-z0-9/._-]{0,30}(\\?[a-z=&0-9]{0,20})?",
        prop::collection::vec(("x-[a-z]{1,10}", "[ -~]{0,30}"), 0..4),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(ms, id, method, path, headers, body)| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(&v).unwrap(),
                );
            }
            Record {
                accepted_at: UNIX_EPOCH + Duration::from_millis(ms),
                request_id: id,
                method: Method::from_bytes(method.as_bytes()).unwrap(),
                path_and_query: PathAndQuery::try_from(path).unwrap(),
                headers: map,
                body: Bytes::from(body),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder_or_the_scanner_and_nothing_unverified_comes_back(
        base in any::<u64>().prop_map(|b| b >> 1),
        data in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        check_decoders(base, &data)?;
    }

    #[test]
    fn frames_with_a_forged_valid_header_and_arbitrary_payloads_never_panic_the_payload_decoder(
        payload in prop::collection::vec(any::<u8>(), 0..512),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        // A header and CRC that check, over bytes that are not a record
        // payload: only the payload decoder stands between them and a Record.
        let mut frame = b"FKR1".to_vec();
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let hcrc = crc32c::crc32c(&frame[0..8]);
        frame.extend_from_slice(&hcrc.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[0..12]), &payload);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(&tail);
        check_decoders(0, &frame)?;
    }

    #[test]
    fn a_damaged_segment_keeps_every_record_the_damage_did_not_touch_and_invents_none(
        records in prop::collection::vec(arb_record(), 1..12),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let base = 4096u64;
        let mut data = Vec::new();
        let mut extents = Vec::new();
        for r in &records {
            let start = data.len();
            r.encode_into(&mut data);
            extents.push((start, data.len()));
        }
        let mut damaged = vec![false; records.len()];
        for (at, mask) in &flips {
            let p = at.index(data.len());
            data[p] ^= mask;
            if let Some(i) = extents.iter().position(|&(s, e)| (s..e).contains(&p)) {
                damaged[i] = true;
            }
        }
        if let Some(at) = cut {
            let len = at.index(data.len() + 1);
            data.truncate(len);
            for (i, &(_, e)) in extents.iter().enumerate() {
                if e > len {
                    damaged[i] = true;
                }
            }
        }
        check_decoders(base, &data)?;
        let scan = scan_data(base, &data, true);
        let found: Vec<u64> = scan.records.iter().map(|r| r.lsn - base).collect();
        for (i, &(s, e)) in extents.iter().enumerate() {
            if !damaged[i] {
                prop_assert!(found.contains(&(s as u64)), "undamaged record {} lost", i);
                let frame = Bytes::copy_from_slice(&data[s..e]);
                let (back, _) = decode_frame(&frame).unwrap();
                prop_assert_eq!(&back, &records[i]);
            }
        }
        for lsn in found {
            prop_assert!(
                extents.iter().any(|&(s, _)| s as u64 == lsn),
                "a record found where none was written"
            );
        }
    }
}

// ---------------------------------------------------------------- config loading

const SECTIONS: &[&str] = &[
    "server",
    "admin",
    "log",
    "routing",
    "buffer",
    "retry",
    "targets.primary",
    "targets.backup",
    "targets.primary.buffer",
    "targets.primary.headers",
    "targets.Bad_Name",
    "server.tls",
    "nonsense",
];

const KEYS: &[&str] = &[
    "listen",
    "methods",
    "max_body_size",
    "max_inflight_bytes",
    "request_timeout",
    "header_read_timeout",
    "max_connections",
    "shutdown_timeout",
    "auth_tokens",
    "token",
    "level",
    "format",
    "mode",
    "active",
    "secondary_wait",
    "spooled_status",
    "url",
    "timeout",
    "connect_timeout",
    "retry_statuses",
    "ca_file",
    "dir",
    "max_size",
    "when_full",
    "fsync",
    "drain_concurrency",
    "segment_size",
    "rejected_max_size",
    "initial_backoff",
    "max_backoff",
    "cert",
    "key",
    "Authorization",
    "typo",
];

fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop::sample::select(vec![
            "\"127.0.0.1:0\"",
            "\"0.0.0.0:99999\"",
            "\"[::1]:8080\"",
            "\"http://127.0.0.1:9/x?sig=1\"",
            "\"ftp://x\"",
            "\"https://\"",
            "\"http://[::1\"",
            "\"250ms\"",
            "\"0s\"",
            "\"-1s\"",
            "\"1000000000000000h\"",
            "\"18446744073709551615s\"",
            "\"64KiB\"",
            "\"0B\"",
            "\"18446744073709551615B\"",
            "\"16EiB\"",
            "\"1.5GiB\"",
            "\"always\"",
            "\"never\"",
            "\"reject\"",
            "\"drop_oldest\"",
            "\"active-passive\"",
            "\"primary\"",
            "\"backup\"",
            "\"${FUZZ_SET}\"",
            "\"${FUZZ_UNSET}\"",
            "\"${\"",
            "\"${}\"",
            "\"${A-B}\"",
            "\"/nonexistent/forkd.pem\"",
            "\"\"",
            "\"\\u0000\"",
            "0",
            "1",
            "-1",
            "65536",
            "18446744073709551615",
            "9223372036854775807",
            "1e308",
            "nan",
            "true",
            "1979-05-27T07:32:00Z",
        ])
        .prop_map(str::to_owned),
        "\"[ -~]{0,20}\"".prop_map(|s| s.replace('\\', "")),
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..3).prop_map(|v| {
                let kv: Vec<String> = v.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

/// Values that suit `key` (mostly valid, some at the edges), else anything.
fn value_for(key: &'static str) -> BoxedStrategy<String> {
    let pool: &[&str] = match key {
        "listen" => &[
            "\"127.0.0.1:0\"",
            "\"[::1]:0\"",
            "\"0.0.0.0:70000\"",
            "\"localhost:80\"",
        ],
        "methods" => &[
            "[\"POST\", \"PUT\"]",
            "[]",
            "[\"GET\"]",
            "[\"P O S T\"]",
            "\"POST,PUT\"",
        ],
        "max_body_size" | "max_inflight_bytes" | "max_size" | "segment_size"
        | "rejected_max_size" => &[
            "\"64KiB\"",
            "\"1MiB\"",
            "\"2GiB\"",
            "\"0B\"",
            "\"16EiB\"",
            "\"18446744073709551615B\"",
            "1024",
        ],
        "request_timeout"
        | "header_read_timeout"
        | "shutdown_timeout"
        | "secondary_wait"
        | "timeout"
        | "connect_timeout"
        | "initial_backoff"
        | "max_backoff" => &[
            "\"250ms\"",
            "\"30s\"",
            "\"0s\"",
            "\"1ns\"",
            "\"5000000000000000h\"",
            "\"18446744073709551615s\"",
            "\"soon\"",
        ],
        "max_connections" | "drain_concurrency" => {
            &["1", "0", "10000", "-1", "18446744073709551615", "\"7\""]
        }
        "spooled_status" => &["202", "200", "99", "600", "65536", "-202"],
        "retry_statuses" => &["[503]", "[]", "[200]", "[99, 1000]", "\"503,429\""],
        "auth_tokens" => &["[\"${FUZZ_SET}\"]", "[\"\"]", "[\"${FUZZ_UNSET}\"]"],
        "token" => &["\"t\"", "\"\"", "\"${FUZZ_SET}\""],
        "level" => &["\"info\"", "\"warn,forkd=debug\"", "\"[[[\"", "\"\""],
        "format" => &["\"text\"", "\"json\"", "\"xml\""],
        "mode" => &["\"active-active\"", "\"active-passive\"", "\"both\""],
        "active" => &["\"primary\"", "\"backup\"", "\"nobody\""],
        "url" => &[
            "\"http://127.0.0.1:9\"",
            "\"https://example.invalid/v1?sig=${FUZZ_SET}\"",
            "\"http://[::1]:65535/a/b?x=1&x=2\"",
            "\"ftp://x\"",
            "\"http://\"",
            "\"http://h:99999\"",
            "\"http://[::1\"",
        ],
        "ca_file" | "cert" | "key" => &["\"/nonexistent/forkd.pem\"", "\"\""],
        "dir" => &["\"/nonexistent/spool\"", "\"\"", "\"relative/spool\""],
        "when_full" => &[
            "\"reject\"",
            "\"drop_oldest\"",
            "\"drop_newest\"",
            "\"explode\"",
        ],
        "fsync" => &[
            "\"always\"",
            "\"never\"",
            "\"100ms\"",
            "\"0s\"",
            "\"sometimes\"",
        ],
        _ => &["\"x\""],
    };
    prop_oneof![
        4 => prop::sample::select(pool).prop_map(str::to_owned),
        1 => toml_value(),
    ]
    .boxed()
}

/// The keys of each section, as forkd reads them.
fn section_keys(section: &str) -> &'static [&'static str] {
    match section {
        "server" => &[
            "listen",
            "methods",
            "max_body_size",
            "max_inflight_bytes",
            "request_timeout",
            "header_read_timeout",
            "max_connections",
            "shutdown_timeout",
            "auth_tokens",
        ],
        "admin" => &["listen", "token"],
        "log" => &["level", "format"],
        "routing" => &["mode", "active", "secondary_wait", "spooled_status"],
        "buffer" | "targets.primary.buffer" => &[
            "dir",
            "max_size",
            "when_full",
            "fsync",
            "drain_concurrency",
            "segment_size",
            "rejected_max_size",
        ],
        "retry" => &["initial_backoff", "max_backoff"],
        "targets.primary.headers" => &["Authorization", "X-Token"],
        "server.tls" => &["cert", "key"],
        s if s.starts_with("targets.") => &[
            "url",
            "timeout",
            "connect_timeout",
            "retry_statuses",
            "ca_file",
        ],
        _ => KEYS,
    }
}

/// TOML-ish text: sections of forkd's config with their keys and values of
/// the right type (mostly), now and then a key forkd does not know, a value
/// of any type, or a broken line; so that much of it gets past parsing to
/// validation.
fn toml_text() -> impl Strategy<Value = String> {
    let section = prop::sample::select(SECTIONS).prop_flat_map(|name| {
        let keys = section_keys(name);
        let line = prop_oneof![
            10 => prop::sample::select(keys)
                .prop_flat_map(|k| value_for(k).prop_map(move |v| format!("{k} = {v}"))),
            1 => (prop::sample::select(KEYS), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => "[ -~]{0,30}",
        ];
        prop::collection::vec(line, 0..6)
            .prop_map(move |lines| format!("[{name}]\n{}", lines.join("\n")))
    });
    prop::collection::vec(section, 0..8).prop_map(|sections| {
        // Every config needs a target; most get one.
        let mut text = String::from("[targets.primary]\nurl = \"http://127.0.0.1:9\"\n");
        text.push_str(&sections.join("\n"));
        text
    })
}

fn env_vars() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![
                "FORKD__SERVER__LISTEN",
                "FORKD__SERVER__METHODS",
                "FORKD__SERVER__MAX_CONNECTIONS",
                "FORKD__ROUTING__SPOOLED_STATUS",
                "FORKD__ROUTING__MODE",
                "FORKD__TARGETS__PRIMARY__URL",
                "FORKD__TARGETS__PRIMARY__RETRY_STATUSES",
                "FORKD__BUFFER__MAX_SIZE",
                "FORKD__BUFFER__DRAIN_CONCURRENCY",
                "FORKD__",
                "FORKD____",
                "FORKD__NONSENSE__X",
            ]),
            "[ -~]{0,16}",
        ),
        0..3,
    )
    .prop_map(|v| v.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn load(text: &str, format: ConfigFormat, vars: Vec<(String, String)>) {
    let lookup = |name: &str| (name == "FUZZ_SET").then(|| "set-value".to_owned());
    if let Ok(config) = Config::from_text(text, format, lookup, vars) {
        // What `forkd check` prints must render too.
        let _ = config.normalized_redacted();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn toml_ish_text_and_overrides_make_the_config_loader_answer_ok_or_an_error_never_panic(
        text in toml_text(),
        vars in env_vars(),
    ) {
        load(&text, ConfigFormat::Toml, vars);
    }

    #[test]
    fn arbitrary_text_in_any_format_never_panics_the_config_loader(
        text in any::<String>(),
        format in prop::sample::select(vec![ConfigFormat::Toml, ConfigFormat::Yaml, ConfigFormat::Json]),
    ) {
        load(&text, format, Vec::new());
    }
}

#[test]
fn a_valid_config_text_loads_so_the_properties_above_reach_validation() {
    let text = r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[targets.primary]
url = "http://127.0.0.1:9"
[buffer]
dir = "/nonexistent/spool"
"#;
    let lookup = |_: &str| None;
    Config::from_text(text, ConfigFormat::Toml, lookup, Vec::new()).unwrap();
}
