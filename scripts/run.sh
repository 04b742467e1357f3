#!/usr/bin/env bash
# Development server: services, migrations, a signing key and credentials (created when
# none exist), then `serve`. Prints the URL and the credentials to use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

eval "$(scripts/services.sh start | sed 's/^/export /')"
cargo build --release --bin redpacket-wallet
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release/redpacket-wallet"

# Development credentials live in a gitignored file and are reused across runs.
CREDS="$ROOT/.data/dev-credentials.env"
if [[ ! -f $CREDS ]]; then
  rand() { head -c 24 /dev/urandom | base64 | tr -d '/+=' ; }
  {
    echo "RPW_AUTH__ADMIN_KEY=admin-$(rand)"
    echo "RPW_AUTH__CALLER_KEYS=dev:caller-$(rand)"
    # The dev caller may also post payout results, so the withdraw flow can be tried by hand.
    echo "RPW_AUTH__PAYOUT_CALLERS=dev"
    echo "RPW_AUTH__JWT_SECRET=jwt-$(rand)"
  } >"$CREDS"
  chmod 600 "$CREDS"
fi
set -a; source "$CREDS"; set +a
export RPW_KEYS__DIR="${RPW_KEYS__DIR:-$ROOT/keys}"
export RPW_HTTP__ADDR="${RPW_HTTP__ADDR:-127.0.0.1:8080}"

"$BIN" migrate
if [[ -z "$("$BIN" keys list | grep -w active || true)" ]]; then
  "$BIN" keys generate >/dev/null
fi

cat <<INFO
redpacket-wallet on http://$RPW_HTTP__ADDR
  operator:  Authorization: Bearer $RPW_AUTH__ADMIN_KEY
  caller:    Authorization: Bearer ${RPW_AUTH__CALLER_KEYS#*:}
  user 42:   Authorization: Bearer $("$BIN" dev-jwt 42)
  keys:      curl http://$RPW_HTTP__ADDR/v1/keys
  console:   http://$RPW_HTTP__ADDR/console  (sign in with the operator key)
  wallet:    http://$RPW_HTTP__ADDR/wallet   (paste the user JWT)
INFO
exec "$BIN" serve
