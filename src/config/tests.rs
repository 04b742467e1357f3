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
