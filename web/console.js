// The operator console: every action is a call to /v1/admin/* with the operator key the
// user typed in, kept in this tab's sessionStorage only.
"use strict";

(() => {
  const { api, money, count, el, time, showFigures } = RPW;
  const KEY = "rpw.console.operatorKey";
  const POLL_MS = 3000;
  const CHART_WINDOW_MS = 10 * 60 * 1000;

  const $ = (id) => document.getElementById(id);
  const state = {
    tab: "activities",
    selected: null, // activity id
    view: null, // the selected activity's last view
    samples: [], // {t, issued, booked, pending} of the selected activity
    timer: null,
    lastBooked: null, // {t, n} for the booking rate
  };

  const key = () => sessionStorage.getItem(KEY);
  const admin = (method, path, body) => api(method, path, { bearer: key(), body });

  // ---- sign-in ----------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const candidate = $("admin-key").value.trim();
    $("sign-in-error").textContent = "";
    if (!candidate) {
      $("sign-in-error").textContent = "Enter the operator key.";
      return;
    }
    try {
      await api("GET", "/v1/admin/switches", { bearer: candidate });
    } catch (err) {
      $("sign-in-error").textContent = err.words();
      return;
    }
    sessionStorage.setItem(KEY, candidate);
    $("admin-key").value = "";
    showConsole();
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    clearInterval(state.timer);
    state.timer = null;
    $("console").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    $("sign-in-error").textContent = message || "";
  }

  function showConsole() {
    $("sign-in").hidden = true;
    $("console").hidden = false;
    $("sign-out").hidden = false;
    openTab(state.tab);
    clearInterval(state.timer);
    state.timer = setInterval(poll, POLL_MS);
  }

  // An error from any call: a refused credential signs out; anything else is shown.
  function failed(err, where) {
    if (err.code === "unauthorized") {
      signOut("The operator key was refused; sign in again.");
      return;
    }
    const banner = $("console-error");
    banner.textContent = `${where}: ${err.words ? err.words() : err}`;
    banner.hidden = false;
  }

  function clearError() {
    $("console-error").hidden = true;
  }

  // ---- tabs and polling ---------------------------------------------------------------

  function openTab(name) {
    state.tab = name;
    for (const b of document.querySelectorAll(".tabs button")) {
      b.classList.toggle("active", b.dataset.tab === name);
      b.setAttribute("aria-selected", b.dataset.tab === name);
    }
    for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== `tab-${name}`;
    refreshTab();
  }

  function refreshTab() {
    if (state.tab === "activities") {
      loadActivities();
      if (state.selected) loadDetail();
    } else if (state.tab === "reconciliation") loadReports();
    else if (state.tab === "switches") loadSwitches();
    else if (state.tab === "health") {
      loadHealth();
      loadGuards();
    }
  }

  function poll() {
    if (!key()) return;
    if (state.tab === "activities" && state.selected) loadDetail();
    if (state.tab === "health") loadHealth();
  }

  // ---- activities -----------------------------------------------------------------------

  async function loadActivities() {
    let body;
    try {
      body = await admin("GET", "/v1/admin/activities");
    } catch (err) {
      return failed(err, "Loading activities");
    }
    const tbody = $("activity-list").tBodies[0];
    tbody.replaceChildren(
      ...body.activities.map((a) =>
        el(
          "tr",
          { class: a.id === state.selected ? "selected" : "", "data-activity": a.id },
          el("td", {}, el("button", { type: "button", class: "link", text: a.id, onclick: () => select(a.id) })),
          el("td", { text: a.name }),
          el("td", {}, el("span", { class: `stage stage-${a.stage}`, text: a.stage })),
          el("td", { class: "wide-only", text: `${time(a.starts_at)} – ${time(a.ends_at)}` }),
          el("td", { class: "num", text: money(a.budget_cents) }),
        ),
      ),
    );
    $("activity-list-empty").hidden = body.activities.length > 0;
    const select_ = $("recon-activity");
    const current = select_.value;
    select_.replaceChildren(
      el("option", { value: "", text: "all" }),
      ...body.activities.map((a) => el("option", { value: a.id, text: a.id })),
    );
    select_.value = current;
  }

  function select(id) {
    if (state.selected !== id) state.samples = [];
    state.selected = id;
    for (const tr of $("activity-list").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.activity === id);
    $("action-result").textContent = "";
    loadDetail();
  }

  async function loadDetail() {
    const id = state.selected;
    let v;
    try {
      v = await admin("GET", `/v1/admin/activities/${encodeURIComponent(id)}`);
    } catch (err) {
      return failed(err, `Loading ${id}`);
    }
    if (state.selected !== id) return;
    clearError();
    state.view = v;
    const now = Date.now();
    state.samples.push({ t: now, issued: v.issued_count, booked: v.booked_count, pending: v.pending_count });
    state.samples = state.samples.filter((s) => s.t >= now - CHART_WINDOW_MS);
    $("activity-detail").hidden = false;
    $("detail-title").textContent = `${v.name} (${v.id})`;
    $("detail-window").textContent = `${v.stage} · ${time(v.starts_at)} – ${time(v.ends_at)} · cap ${money(v.max_award_cents)} per award`;
    const figures = [
      ["Budget", money(v.budget_cents), "budget"],
      ["Granted to Redis", money(v.budget_granted_cents), "granted"],
      ["Remaining", money(v.budget_remaining_cents), "remaining"],
      ["In doubt", money(v.budget_in_doubt_cents), "in-doubt", v.budget_in_doubt_cents > 0],
      ["Issued", `${money(v.issued_cents)} · ${count(v.issued_count)}`, "issued"],
      ["Booked", `${money(v.booked_cents)} · ${count(v.booked_count)}`, "booked"],
      ["Pending", `${money(v.pending_cents)} · ${count(v.pending_count)}`, "pending"],
    ];
    showFigures($("figures"), figures);
    $("scene-list").tBodies[0].replaceChildren(
      ...v.scenes.map((s) =>
        el(
          "tr",
          {},
          el("td", { text: s.id }),
          el("td", { text: s.name }),
          el("td", { text: s.award_type }),
          el("td", { class: "num", text: s.rate_limit_per_s ?? "–" }),
        ),
      ),
    );
    drawChart();
  }

  // Issued, booked and backlog (pending) token counts over the last minutes, as SVG.
  function drawChart() {
    const W = 640, H = 180, PAD = 34;
    const svgNs = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNs, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    const samples = state.samples;
    const max = Math.max(1, ...samples.map((s) => Math.max(s.issued, s.booked, s.pending)));
    // The time axis spans the samples held (one minute at least, ten at most).
    const t1 = samples.length ? samples[samples.length - 1].t : Date.now();
    const span = Math.min(CHART_WINDOW_MS, Math.max(60 * 1000, samples.length ? t1 - samples[0].t : 0));
    const t0 = t1 - span;
    const x = (t) => PAD + ((t - t0) / span) * (W - PAD - 8);
    const y = (v) => H - 20 - (v / max) * (H - 34);
    const line = (x1, y1, x2, y2, cls) => {
      const l = document.createElementNS(svgNs, "line");
      for (const [k, v] of Object.entries({ x1, y1, x2, y2 })) l.setAttribute(k, v);
      l.setAttribute("class", cls);
      svg.append(l);
    };
    const text = (tx, ty, s, cls) => {
      const t = document.createElementNS(svgNs, "text");
      t.setAttribute("x", tx);
      t.setAttribute("y", ty);
      t.setAttribute("class", cls);
      t.textContent = s;
      svg.append(t);
    };
    line(PAD, y(0), W - 8, y(0), "axis");
    line(PAD, y(max), W - 8, y(max), "grid");
    text(2, y(max) + 4, count(max), "tick");
    text(2, y(0) + 4, "0", "tick");
    text(PAD, H - 4, `-${Math.round(span / 60000)} min`, "tick");
    text(W - 40, H - 4, "now", "tick");
    const series = [
      ["issued", "issued"],
      ["booked", "booked"],
      ["pending", "backlog"],
    ];
    series.forEach(([field, label], i) => {
      const p = document.createElementNS(svgNs, "polyline");
      p.setAttribute("points", samples.map((s) => `${x(s.t).toFixed(1)},${y(s[field]).toFixed(1)}`).join(" "));
      p.setAttribute("class", `series series-${field}`);
      p.setAttribute("data-series", field);
      svg.append(p);
      const last = samples.length ? samples[samples.length - 1][field] : 0;
      text(PAD + 8 + i * 150, 14, `■ ${label} ${count(last)}`, `legend series-${field}`);
    });
    $("chart").replaceChildren(svg);
  }

  // The API's validation message goes beside the field it names (the earliest one it
  // mentions), else beside the submit button.
  function showFieldError(form, err, fallback) {
    for (const span of form.querySelectorAll(".field-error")) span.textContent = "";
    const message = err.message || "";
    let best = null;
    for (const span of form.querySelectorAll(".field-error")) {
      const m = new RegExp(`(^|[^a-z_])${span.dataset.field}([^a-z_]|$)`).exec(message);
      if (m && (!best || m.index < best.index)) best = { span, index: m.index };
    }
    const text = err.code === "invalid_request" ? message.replace(/^malformed JSON body: /, "") : err.words();
    if (best && err.code === "invalid_request") best.span.textContent = text;
    else fallback.textContent = err.words();
  }

  const intOrRaw = (s) => (/^-?\d+$/.test(s.trim()) ? Number(s.trim()) : s);
  const isoOrNull = (s) => (s ? new Date(s).toISOString() : null);

  async function createActivity(event) {
    event.preventDefault();
    const form = $("create-form");
    $("create-error").textContent = "";
    const body = {
      id: $("new-id").value.trim(),
      name: $("new-name").value,
      stage: $("new-stage").value,
      starts_at: isoOrNull($("new-starts").value),
      ends_at: isoOrNull($("new-ends").value),
      budget_cents: intOrRaw($("new-budget").value),
      max_award_cents: intOrRaw($("new-cap").value),
    };
    let created;
    try {
      created = await admin("POST", "/v1/admin/activities", body);
    } catch (err) {
      if (err.code === "unauthorized") return failed(err, "");
      return showFieldError(form, err, $("create-error"));
    }
    for (const span of form.querySelectorAll(".field-error")) span.textContent = "";
    form.reset();
    defaultWindow();
    $("create-activity").open = false;
    await loadActivities();
    select(created.id);
  }

  async function addBudget(event) {
    event.preventDefault();
    const form = $("budget-form");
    const delta = intOrRaw($("budget-delta").value);
    try {
      await admin("POST", `/v1/admin/activities/${encodeURIComponent(state.selected)}/budget`, { delta_cents: delta });
    } catch (err) {
      if (err.code === "unauthorized") return failed(err, "");
      form.querySelector(".field-error").textContent = err.code === "invalid_request" ? err.message : err.words();
      return;
    }
    form.querySelector(".field-error").textContent = "";
    $("budget-delta").value = "";
    $("action-result").textContent = `Added ${money(delta)} to the budget.`;
    loadDetail();
    loadActivities();
  }

  async function addScene(event) {
    event.preventDefault();
    const form = $("scene-form");
    const body = { id: $("scene-id").value.trim(), name: $("scene-name").value, award_type: $("scene-type").value };
    try {
      await admin("POST", `/v1/admin/activities/${encodeURIComponent(state.selected)}/scenes`, body);
    } catch (err) {
      if (err.code === "unauthorized") return failed(err, "");
      form.querySelector(".field-error").textContent = err.code === "invalid_request" ? err.message : err.words();
      return;
    }
    form.querySelector(".field-error").textContent = "";
    form.reset();
    $("action-result").textContent = `Scene ${body.id} added.`;
    loadDetail();
  }

  // A modal confirmation; resolves true when confirmed.
  function confirmDialog(text) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  async function repairLeak() {
    const v = state.view;
    // What the budget lost beyond the tokens issued: the most a repair can return (what
    // awards in flight still hold is kept for them).
    const suspect = Math.max(0, v.budget_taken_cents - v.issued_cents);
    const ok = await confirmDialog(
      `Repair the leak of ${v.id}? Up to ${money(suspect)} was taken from the budget without becoming a token; ` +
        `only what is provably never a token is returned. The live budget generation is drained first.`,
    );
    if (!ok) return;
    try {
      const r = await admin("POST", `/v1/admin/activities/${encodeURIComponent(v.id)}/repair-leak`);
      $("action-result").textContent =
        `Repaired ${money(r.repaired_cents)} (drained ${money(r.drained_cents)}; ` +
        `${r.settling_generations} generation(s) still within their in-flight grace).`;
    } catch (err) {
      return failed(err, "Repair leak");
    }
    loadDetail();
  }

  async function releaseInDoubt() {
    const v = state.view;
    const ok = await confirmDialog(
      `Release the in-doubt budget of ${v.id}? ${money(v.budget_in_doubt_cents)} is in doubt; ` +
        `only what the ledger and synced tokens prove unspent is released.`,
    );
    if (!ok) return;
    try {
      const r = await admin("POST", `/v1/admin/activities/${encodeURIComponent(v.id)}/release-in-doubt`);
      $("action-result").textContent =
        `Released ${money(r.released_cents)} (${r.resolved_generations} generation(s) resolved, ` +
        `${r.waiting_generations} waiting).`;
    } catch (err) {
      return failed(err, "Release in-doubt");
    }
    loadDetail();
  }

  // ---- reconciliation -------------------------------------------------------------------

  async function loadReports() {
    const activity = $("recon-activity").value;
    const q = activity ? `?activity_id=${encodeURIComponent(activity)}` : "";
    let body;
    try {
      body = await admin("GET", `/v1/admin/reconciliation${q}`);
    } catch (err) {
      return failed(err, "Loading reports");
    }
    const onlyBad = $("recon-mismatch-only").checked;
    const reports = body.reports.filter((r) => !onlyBad || !r.ok);
    $("recon-list").tBodies[0].replaceChildren(
      ...reports.map((r) =>
        el(
          "tr",
          { class: r.ok ? "ok" : "mismatch", "data-report": r.id },
          el("td", { text: r.activity_id }),
          el("td", { text: r.hour_start.replace("T", " ").replace(/:00(\.000)?Z$/, "") }),
          el("td", { text: r.kind }),
          el("td", { class: "num", text: `${money(r.issued_cents)} · ${count(r.issued_count)}` }),
          el("td", { class: "num", text: `${money(r.booked_cents)} · ${count(r.booked_count)}` }),
          el("td", { class: "num", text: `${money(r.settled_cents)} · ${count(r.settled_count)}` }),
          el("td", { class: "num", text: `${money(r.pending_cents)} · ${count(r.pending_count)}` }),
          el("td", { class: "num", text: money(r.leak_cents) }),
          el("td", { class: "result", text: r.ok ? "ok" : `mismatch: ${Array.isArray(r.problems) ? r.problems.join("; ") : r.problems}` }),
        ),
      ),
    );
    $("recon-empty").hidden = reports.length > 0;
  }

  // ---- switches -------------------------------------------------------------------------

  async function loadSwitches() {
    let body;
    try {
      body = await admin("GET", "/v1/admin/switches");
    } catch (err) {
      return failed(err, "Loading switches");
    }
    renderSwitches(body.switches);
  }

  function renderSwitches(switches) {
    $("switch-list").tBodies[0].replaceChildren(
      ...switches.map((s) =>
        el(
          "tr",
          { "data-switch": s.name, class: s.on ? "on" : "" },
          el("td", { text: s.name }),
          el("td", { text: s.effect }),
          el("td", { class: "state", text: s.on ? "ON" : "off" }),
          el(
            "td",
            {},
            el("button", { type: "button", class: s.on ? "" : "warn", text: s.on ? "Turn off…" : "Turn on…", onclick: () => toggle(s) }),
          ),
        ),
      ),
    );
  }

  async function toggle(s) {
    const to = !s.on;
    const ok = await confirmDialog(
      `Turn ${s.name} ${to ? "ON" : "off"}? When on: ${s.effect}. It takes effect on every instance.`,
    );
    if (!ok) return;
    try {
      const body = await admin("PUT", `/v1/admin/switches/${encodeURIComponent(s.name)}`, { on: to });
      renderSwitches(body.switches);
    } catch (err) {
      failed(err, `Switch ${s.name}`);
    }
  }

  // ---- health ---------------------------------------------------------------------------

  async function loadHealth() {
    let h;
    try {
      h = await admin("GET", "/v1/admin/health");
    } catch (err) {
      return failed(err, "Loading health");
    }
    clearError();
    const t = Date.parse(h.at);
    let rate = null;
    if (state.lastBooked && state.lastBooked.instance === h.booking.instance_id && t > state.lastBooked.t) {
      rate = ((h.booking.booked_tokens - state.lastBooked.n) * 1000) / (t - state.lastBooked.t);
    }
    state.lastBooked = { t, n: h.booking.booked_tokens, instance: h.booking.instance_id };
    const bound = h.booking.max_tps > 0 ? `${count(h.booking.max_tps)} /s` : "unbounded";
    const booking = !h.booking.worker_enabled ? "worker off here" : h.booking.paused ? "paused (switch)" : "running";
    const figures = [
      ["Redis", h.redis, "redis", h.redis !== "ok"],
      ["MySQL", h.mysql, "mysql", h.mysql !== "ok"],
      ["Backlog (entries)", count(h.backlog.entries), "backlog", false],
      ["Booking", booking, "booking", h.booking.paused],
      ["Booking rate (this instance)", rate === null ? "measuring…" : `${rate.toFixed(1)} /s`, "rate", false],
      ["Bound (settle.max_tps)", bound, "bound", false],
    ];
    showFigures($("health-figures"), figures);
    $("backlog-list").tBodies[0].replaceChildren(
      ...h.backlog.partitions
        .filter((p) => p.entries > 0)
        .map((p) =>
          el(
            "tr",
            {},
            el("td", { text: p.partition }),
            el("td", { class: "num", text: count(p.entries) }),
            el("td", { class: "num", text: p.oldest_age_ms === null ? "–" : `${(p.oldest_age_ms / 1000).toFixed(1)} s` }),
          ),
        ),
    );
  }

  async function loadGuards() {
    let packets, flagged, coupons;
    try {
      [packets, flagged, coupons] = await Promise.all([
        admin("GET", "/v1/admin/packets"),
        admin("GET", "/v1/admin/flagged?limit=100"),
        admin("GET", "/v1/admin/coupon-templates"),
      ]);
    } catch (err) {
      return failed(err, "Loading red packets, coupons and flagged users");
    }
    $("coupon-list").tBodies[0].replaceChildren(
      ...coupons.templates.map((t) =>
        el(
          "tr",
          { "data-template": t.id, class: t.conserved ? "ok" : "mismatch" },
          el("td", { text: `${t.id} (${t.name})` }),
          el("td", { class: "num", text: count(t.stock) }),
          el("td", { class: "num", text: count(t.issued) }),
          el("td", { class: "num", text: count(t.remaining) }),
          el("td", { class: "num", text: count(t.active) }),
          el("td", { class: "num", text: count(t.used) }),
          el("td", { class: "num", text: count(t.expired) }),
          el("td", { text: t.conserved ? "yes" : "NO" }),
        ),
      ),
    );
    $("coupon-empty").hidden = coupons.templates.length > 0;
    const conserved = packets.sent_cents === packets.opened_cents + packets.refunded_cents + packets.open_remainder_cents;
    showFigures($("packet-figures"), [
      ["Packets", count(packets.packets), "packets", false],
      ["Sent", money(packets.sent_cents), "sent", !conserved],
      ["Opened", money(packets.opened_cents), "opened", false],
      ["Refunded", money(packets.refunded_cents), "refunded", false],
      ["Still open", money(packets.open_remainder_cents), "open-remainder", false],
    ]);
    $("flagged-list").tBodies[0].replaceChildren(
      ...flagged.users.map((u) =>
        el(
          "tr",
          {},
          el("td", { text: u.user_id }),
          el("td", { text: u.reason }),
          el("td", { text: time(new Date(u.flagged_at_ms).toISOString()) }),
        ),
      ),
    );
    $("flagged-empty").hidden = flagged.users.length > 0;
  }

  // ---- wiring ---------------------------------------------------------------------------

  function localInput(d) {
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function defaultWindow() {
    const now = new Date();
    $("new-starts").value = localInput(new Date(now.getTime() - 60 * 1000));
    $("new-ends").value = localInput(new Date(now.getTime() + 24 * 3600 * 1000));
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut("Signed out."));
    for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => openTab(b.dataset.tab));
    $("create-form").addEventListener("submit", createActivity);
    $("budget-form").addEventListener("submit", addBudget);
    $("scene-form").addEventListener("submit", addScene);
    $("repair-leak").addEventListener("click", repairLeak);
    $("release-in-doubt").addEventListener("click", releaseInDoubt);
    $("recon-activity").addEventListener("change", loadReports);
    $("recon-mismatch-only").addEventListener("change", loadReports);
    defaultWindow();
    if (key()) showConsole();
  });
})();
