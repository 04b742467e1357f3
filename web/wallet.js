// The wallet page: a user's balance, history, withdrawals and their copy of their award
// tokens. Every action is a call to /v1/wallet* or /v1/withdrawals with the user's JWT,
// kept in this tab's sessionStorage only.
"use strict";

(() => {
  const { api, ApiError, money, el, time, requestId, showFigures } = RPW;
  const JWT = "rpw.wallet.jwt";
  const PAGE = 20;
  const $ = (id) => document.getElementById(id);
  const state = { user: null, cursor: null, withdraw: null, busy: false };

  const jwt = () => sessionStorage.getItem(JWT);
  const call = (method, path, body) => api(method, path, { bearer: jwt(), body });

  // The user id a JWT names (its `sub`), read without checking it: the service checks.
  function subject(token) {
    const parts = token.split(".");
    if (parts.length !== 3) return null;
    try {
      const json = atob(parts[1].replace(/-/g, "+").replace(/_/g, "/"));
      const sub = JSON.parse(json).sub;
      return /^[1-9][0-9]*$/.test(String(sub)) ? String(sub) : null;
    } catch (_) {
      return null;
    }
  }

  // ---- sign-in --------------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const token = $("jwt").value.trim();
    $("sign-in-error").textContent = "";
    const user = subject(token);
    if (!user) {
      $("sign-in-error").textContent = "That is not a user token (a JWT whose subject is a user id).";
      return;
    }
    try {
      await api("GET", "/v1/wallet", { bearer: token });
    } catch (err) {
      $("sign-in-error").textContent = err.words();
      return;
    }
    sessionStorage.setItem(JWT, token);
    $("jwt").value = "";
    open();
  }

  function signOut(message) {
    sessionStorage.removeItem(JWT);
    state.user = null;
    $("wallet").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    $("user-label").textContent = "";
    $("sign-in-error").textContent = message || "";
  }

  function open() {
    state.user = subject(jwt());
    $("user-label").textContent = `user ${state.user}`;
    $("sign-in").hidden = true;
    $("wallet").hidden = false;
    $("sign-out").hidden = false;
    refresh();
    renderTokens();
  }

  function refused(err) {
    if (err.code === "unauthorized") {
      signOut("The token was refused (wrong or expired); paste a new one.");
      return true;
    }
    return false;
  }

  async function refresh() {
    await Promise.all([loadWallet(), loadFlows(false)]);
  }

  // ---- balance --------------------------------------------------------------------------

  async function loadWallet() {
    let w;
    try {
      w = await call("GET", "/v1/wallet");
    } catch (err) {
      if (!refused(err)) $("withdraw-error").textContent = `Could not load the balance: ${err.words()}`;
      return;
    }
    $("balance").textContent = money(w.balance_cents);
    const figures = [
      ["Booked", money(w.booked_cents), "booked"],
      ["Pending", `${money(w.pending_cents)} (${w.pending_count})`, "pending"],
      ["Total income", money(w.total_income_cents), "income"],
      ["Withdrawn", money(w.withdrawn_cents), "withdrawn"],
    ];
    showFigures($("wallet-figures"), figures);
    $("degraded").hidden = !w.degraded;
  }

  // ---- history --------------------------------------------------------------------------

  const KIND = { award: "Red packet", withdraw: "Withdrawal", reversal: "Withdrawal returned" };

  async function loadFlows(more) {
    const cursor = more ? state.cursor : null;
    const q = `?limit=${PAGE}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
    let page;
    try {
      page = await call("GET", `/v1/wallet/flows${q}`);
    } catch (err) {
      if (!refused(err)) $("withdraw-error").textContent = `Could not load the history: ${err.words()}`;
      return;
    }
    const items = page.items.map((f) =>
      el(
        "li",
        { class: `flow ${f.status}`, "data-otn": f.out_trade_no, "data-status": f.status },
        el(
          "div",
          { class: "what" },
          el("span", { class: "kind", text: KIND[f.kind] || f.kind }),
          f.activity_id ? el("span", { class: "where", text: `${f.activity_id} · ${f.scene_id}` }) : null,
          el("span", { class: "when", text: time(f.at) }),
        ),
        el(
          "div",
          { class: "amount-col" },
          el("span", { class: f.amount_cents < 0 ? "amount out" : "amount in", text: (f.amount_cents > 0 ? "+" : "") + money(f.amount_cents) }),
          f.status === "pending" ? el("span", { class: "badge", text: "pending" }) : null,
        ),
      ),
    );
    if (more) $("flows").append(...items);
    else $("flows").replaceChildren(...items);
    state.cursor = page.next_cursor;
    $("flows-more").hidden = !page.next_cursor;
    $("flows-empty").hidden = $("flows").children.length > 0;
  }

  // ---- withdraw -------------------------------------------------------------------------

  // "5", "5.5", "5.50" -> cents, exactly (no floating point); null when not an amount.
  function cents(text) {
    const m = /^\s*(\d{1,12})(?:\.(\d{1,2}))?\s*$/.exec(text);
    if (!m) return null;
    return Number(m[1]) * 100 + Number((m[2] || "").padEnd(2, "0"));
  }

  async function withdraw(event) {
    event.preventDefault();
    if (state.busy) return; // a second click while the first is on its way
    $("withdraw-error").textContent = "";
    $("withdraw-result").textContent = "";
    const amount = cents($("withdraw-amount").value);
    if (amount === null || amount <= 0) {
      $("withdraw-error").textContent = "Enter an amount in yuan, like 5 or 5.20.";
      return;
    }
    // The same request id until this withdrawal's outcome is known: a retry after a
    // lost answer is the same withdrawal, never a second one.
    if (!state.withdraw || state.withdraw.amount !== amount) state.withdraw = { amount, id: requestId() };
    const pending = state.withdraw;
    state.busy = true;
    $("withdraw-submit").disabled = true;
    try {
      const w = await call("POST", "/v1/withdrawals", { request_id: pending.id, amount_cents: amount });
      state.withdraw = null;
      const settled = w.forced_settled_count;
      $("withdraw-result").textContent =
        `Withdrawal of ${money(w.amount_cents)} ${w.status}` +
        (settled > 0 ? `; ${settled} pending award${settled === 1 ? "" : "s"} booked first` : "") +
        `. Balance now ${money(w.balance_cents)}.`;
      $("withdraw-amount").value = "";
      await refresh();
    } catch (err) {
      if (refused(err)) return;
      // Only an answer that changed nothing ends this request id; a lost answer or an
      // outage keeps it for the retry.
      if (!(err instanceof ApiError) || !["network", "unavailable", "internal"].includes(err.code)) state.withdraw = null;
      $("withdraw-error").textContent = err.words();
    } finally {
      state.busy = false;
      $("withdraw-submit").disabled = false;
    }
  }

  // ---- tokens (the client copy) -----------------------------------------------------------

  const storeKey = () => `rpw.wallet.tokens.${state.user}`;
  const kept = () => JSON.parse(localStorage.getItem(storeKey()) || "[]");
  const keep = (tokens) => localStorage.setItem(storeKey(), JSON.stringify(tokens));

  // Reads the fields this page shows from a token (SignedToken.payload, a RedPacketToken):
  // a protobuf decoder for varints and length-delimited fields, which is all they use.
  function decode(b64url) {
    const bin = atob(b64url.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((b64url.length + 3) % 4));
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const fields = (buf) => {
      const out = {};
      let i = 0;
      const varint = () => {
        let v = 0, mul = 1, b;
        do {
          if (i >= buf.length) throw new Error("truncated");
          b = buf[i++];
          v += (b & 0x7f) * mul;
          mul *= 128;
        } while (b & 0x80);
        return v;
      };
      while (i < buf.length) {
        const tag = varint();
        const field = Math.floor(tag / 8), wire = tag % 8;
        if (wire === 0) out[field] = varint();
        else if (wire === 2) {
          const len = varint();
          if (i + len > buf.length) throw new Error("truncated");
          out[field] = buf.subarray(i, i + len);
          i += len;
        } else if (wire === 1) i += 8;
        else if (wire === 5) i += 4;
        else throw new Error("bad wire type");
      }
      return out;
    };
    const signed = fields(bytes);
    if (!(signed[1] instanceof Uint8Array)) throw new Error("no payload");
    const t = fields(signed[1]);
    const str = (f) => (t[f] instanceof Uint8Array ? new TextDecoder().decode(t[f]) : "");
    return { user: String(t[2] || 0), activity: str(3), scene: str(4), amount: t[5] || 0, otn: str(6) };
  }

  function renderTokens() {
    const tokens = kept();
    let total = 0;
    const items = tokens.map((tok) => {
      try {
        const d = decode(tok);
        total += d.amount;
        return el("li", { "data-otn": d.otn }, el("span", { class: "otn", text: d.otn }), el("span", { class: "amount in", text: money(d.amount) }));
      } catch (_) {
        return el("li", {}, el("span", { class: "otn", text: "unreadable token" }));
      }
    });
    $("token-list").replaceChildren(...items);
    $("token-count").textContent = tokens.length;
    $("token-total").textContent = money(total);
  }

  function addTokens(event) {
    event.preventDefault();
    $("token-error").textContent = "";
    const lines = $("token-input").value.split(/\s+/).filter(Boolean);
    const tokens = kept();
    let added = 0;
    for (const line of lines) {
      let d;
      try {
        d = decode(line);
      } catch (_) {
        $("token-error").textContent = "A line is not a token; the readable ones were kept.";
        continue;
      }
      if (d.user !== state.user) {
        $("token-error").textContent = `A token for another user (${d.user}) was not kept.`;
        continue;
      }
      if (!tokens.includes(line)) {
        tokens.push(line);
        added++;
      }
    }
    keep(tokens);
    $("token-input").value = "";
    $("sync-result").textContent = `${added} token${added === 1 ? "" : "s"} kept.`;
    renderTokens();
  }

  async function sync() {
    const tokens = kept();
    $("token-error").textContent = "";
    if (tokens.length === 0) {
      $("sync-result").textContent = "No token to sync.";
      return;
    }
    const MAX = 1000; // the API's list limit
    let restored = 0, known = 0;
    const rejected = [];
    try {
      for (let start = 0; start < tokens.length; start += MAX) {
        const r = await call("POST", "/v1/wallet/tokens:sync", { tokens: tokens.slice(start, start + MAX) });
        restored += r.restored;
        known += r.known;
        for (const x of r.rejected) rejected.push({ index: start + x.index, code: x.code });
      }
    } catch (err) {
      if (!refused(err)) $("token-error").textContent = err.words();
      return;
    }
    $("sync-result").textContent =
      `Synced: ${restored} restored, ${known} already known, ${rejected.length} rejected` +
      (rejected.length ? ` (${rejected.map((r) => `#${r.index + 1}: ${RPW.ERROR_WORDS[r.code] || r.code}`).join("; ")})` : "") +
      ".";
    if (restored > 0) refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut("Signed out."));
    $("refresh").addEventListener("click", refresh);
    $("withdraw-form").addEventListener("submit", withdraw);
    $("flows-more").addEventListener("click", () => loadFlows(true));
    $("token-form").addEventListener("submit", addTokens);
    $("token-sync").addEventListener("click", sync);
    if (jwt() && subject(jwt())) open();
  });
})();
