// Shared by the console and the wallet page: calls to the service's own HTTP API, the
// API's error codes in words, and money formatting. Nothing here is loaded from outside
// the service (the pages' Content-Security-Policy would refuse it).
"use strict";

const RPW = (() => {
  // What each stable error code of API.md means to a person.
  const ERROR_WORDS = {
    invalid_request: "The request was refused as malformed or out of range",
    unauthorized: "Not signed in, or the credential is wrong or has expired",
    forbidden: "This credential may not do that",
    not_found: "Not found",
    idempotency_conflict: "That request id was already used for a different request",
    budget_exhausted: "The activity's budget cannot cover this award",
    insufficient_balance: "The balance is lower than the amount asked for",
    activity_closed: "The activity is not open for this",
    amount_over_cap: "The amount is above the activity's cap",
    payload_too_large: "The request is too large",
    rate_limited: "Too many requests; try again shortly",
    unavailable: "The service cannot do this right now (a dependency is down or a switch is off); try again shortly",
    internal: "The service failed; nothing was changed",
    network: "The service could not be reached",
  };

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
    // The code in words, with the service's own message when it adds something.
    words() {
      const base = ERROR_WORDS[this.code] || `Error ${this.status}`;
      let text = this.message && this.message !== base ? `${base}: ${this.message}` : base;
      if (this.retryAfter) text += ` (retry after ${this.retryAfter} s)`;
      return text;
    }
  }

  // One call to the API with a bearer credential. Resolves to the JSON body; rejects
  // with an ApiError carrying the envelope's code.
  async function api(method, path, { bearer, body } = {}) {
    const headers = { Accept: "application/json" };
    if (bearer) headers.Authorization = `Bearer ${bearer}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      throw new ApiError(0, "network", String(err.message || err));
    }
    if (response.status === 204) return null;
    let json = null;
    try {
      json = await response.json();
    } catch (_) {
      json = null;
    }
    if (!response.ok) {
      const e = (json && json.error) || {};
      throw new ApiError(response.status, e.code || "internal", e.message || "", response.headers.get("Retry-After"));
    }
    return json;
  }

  // Cents as yuan with two decimals and thousands separators: 128800 -> "¥1,288.00".
  function money(cents) {
    if (cents === null || cents === undefined || Number.isNaN(Number(cents))) return "–";
    const n = Number(cents);
    const sign = n < 0 ? "-" : "";
    const abs = Math.abs(n);
    const yuan = Math.floor(abs / 100).toLocaleString("en-US");
    const fen = String(abs % 100).padStart(2, "0");
    return `${sign}¥${yuan}.${fen}`;
  }

  function count(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }

  // Builds an element: el("td", {class: "x", text: "y"}, child, ...).
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  // Fills a <dl> with figures: [label, value, name (data-figure), alert?] each.
  function showFigures(container, figures) {
    container.replaceChildren(
      ...figures.map(([label, value, name, alert]) =>
        el("div", { class: alert ? "figure alert" : "figure", "data-figure": name }, el("dt", { text: label }), el("dd", { text: value })),
      ),
    );
  }

  function time(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
  }

  // A request id for an operation the user may submit twice (a double click, a retry
  // after a network error): the same id until the operation is known to be done.
  function requestId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  return { api, ApiError, money, count, el, time, requestId, showFigures, ERROR_WORDS };
})();
