use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn environment_overrides_defaults() {
    let s = Settings::load_with(
        None,
        env(&[
            ("RPW_HTTP__ADDR", "127.0.0.1:9999"),
            ("RPW_SETTLE__MAX_TPS", "250"),
            (
                "RPW_AUTH__CALLER_KEYS",
                "rain:secret-key-1,cards:secret-key-2",
            ),
        ]),
    )
    .unwrap();
    assert_eq!(s.http.addr.port(), 9999);
    assert_eq!(s.settle.max_tps, 250);
    let callers = s.caller_keys();
    assert_eq!(callers.len(), 2);
    assert_eq!(callers[1].0, "cards");
    assert_eq!(callers[1].1.expose(), "secret-key-2");
}

#[test]
fn a_bad_value_names_its_key() {
    let err = Settings::load_with(None, env(&[("RPW_SETTLE__MAX_TPS", "fast")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("settle.max_tps"), "{err}");
    let err = Settings::load_with(None, env(&[("RPW_REDIS__PARTITIONS", "0")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis.partitions"), "{err}");
    let err = Settings::load_with(
        None,
        env(&[
            ("RPW_AUTH__CALLER_KEYS", "upstream:k1"),
            ("RPW_AUTH__PAYOUT_CALLERS", "paymnets"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("auth.payout_callers") && err.contains("paymnets"),
        "{err}"
    );
    let err = Settings::load_with(
        None,
        env(&[
            ("RPW_MYSQL__MAX_CONNECTIONS", "4"),
            ("RPW_MYSQL__MIN_CONNECTIONS", "5"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mysql.min_connections"), "{err}");
    // A sub-stock in every partition: more than 1,024 partitions would be more
    // sub-stocks than `issue.sub_stocks` may ever be.
    let err = Settings::load_with(
        None,
        env(&[
            ("RPW_REDIS__PARTITIONS", "2048"),
            ("RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS", "true"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("issue.sub_stocks_in_partitions"), "{err}");
}

#[test]
fn sub_stocks_placed_in_the_partitions_are_a_multiple_of_them() {
    let load = |pairs: &[(&str, &str)]| Settings::load_with(None, env(pairs)).unwrap();
    let s = load(&[
        ("RPW_ISSUE__SUB_STOCKS", "6"),
        ("RPW_REDIS__PARTITIONS", "4"),
    ]);
    assert_eq!(s.issue.stocks_per_generation(4), 6, "spread: as configured");
    let s = load(&[
        ("RPW_ISSUE__SUB_STOCKS", "6"),
        ("RPW_REDIS__PARTITIONS", "4"),
        ("RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS", "true"),
    ]);
    assert_eq!(s.issue.stocks_per_generation(4), 8);
    assert_eq!(s.issue.stocks_per_generation(64), 64);
    let s = load(&[
        ("RPW_REDIS__PARTITIONS", "1024"),
        ("RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS", "true"),
    ]);
    assert_eq!(s.issue.stocks_per_generation(1024), 1024);
}

#[test]
fn secrets_never_show_in_debug_output() {
    let s = Settings::load_with(
        None,
        env(&[
            ("RPW_AUTH__ADMIN_KEY", "very-secret-admin"),
            ("RPW_AUTH__JWT_SECRET", "very-secret-jwt"),
            ("RPW_MYSQL__URL", "mysql://u:very-secret-pw@127.0.0.1/db"),
        ]),
    )
    .unwrap();
    let printed = format!("{s:?}");
    assert!(!printed.contains("very-secret"), "{printed}");
}

/// `config/example.toml` holds every setting with its default and nothing else, and
/// loads: it cannot fall behind a new setting or a changed default.
#[test]
fn the_example_file_is_every_default_and_loads() {
    fn as_json(toml: &str) -> serde_json::Value {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }
    let example = include_str!("../../config/example.toml");
    assert_eq!(as_json(example), as_json(super::DEFAULTS));
    // Every setting has a comment saying what it does.
    let mut commented = false;
    for line in example.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            commented = true;
        } else if line.contains('=') {
            assert!(commented, "no comment above `{line}`");
            commented = false;
        } else if line.starts_with('[') || line.is_empty() {
            commented = commented && line.is_empty();
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let s = Settings::load_with(Some(&path), Vec::<(String, String)>::new()).unwrap();
    assert_eq!(s.settle.max_tps, 2000);
}
