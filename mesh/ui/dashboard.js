// skybridge dashboard: renders the gateway's snapshots, streamed as
// server-sent events. Data is only ever inserted as text (or as the
// server's SVG, parsed as XML), never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function ago(t, now) {
  if (!t) return "never";
  const s = Math.max(0, Math.round((now - new Date(t)) / 1000));
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function duration(ns) {
  const s = ns / 1e9;
  if (s < 60) return s.toFixed(1) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

function clock(t) { return t ? new Date(t).toLocaleTimeString() : ""; }

function fill(table, rows, empty) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr", null, "empty");
    const td = el("td", empty);
    td.colSpan = table.tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const r of rows) body.append(r);
}

function row(cells, data) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(data || {})) tr.dataset[k] = v;
  for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
  return tr;
}

function card(k, v, cls) {
  const c = el("div", null, "card");
  c.append(el("div", v, "v " + (cls || "")), el("div", k, "k"));
  return c;
}

let lastSVG = "";

function render(d) {
  const st = d.status, now = new Date(d.time);
  $("#whoami").textContent = `${st.node} · ${st.site} (${st.jurisdiction}, ${st.region}) · ${st.mode} · policy ${st.policy || "none"}`;
  document.title = `skybridge · ${st.node}`;

  const members = st.members || [];
  const verified = members.filter((m) => m.state === "verified").length;
  const peers = members.filter((m) => m.peer);
  const running = (d.sending || []).filter((m) => m.running).length + (d.receiving || []).length;
  const denied = (d.decisions || []).filter((x) => x.outcome === "denied").length;
  // What the metrics say (skybridge_site_reachable): a site whose
  // gateways crashed or were stopped is counted, and unreachable.
  const reach = Object.values(st.reachable || {});
  const cut = reach.filter((r) => !r).length;
  // Pending newcomers are on their way in, and a gateway stopped on
  // purpose is counted with its site: neither is refused or lost.
  const lost = members.filter((m) => m.state === "refused" || (m.state === "dead" && !m.left)).length;
  $("#overview").replaceChildren(
    card("sites", reach.length || (d.graph.sites || []).length),
    card("sites unreachable", cut, cut ? "state-refused" : ""),
    card("gateways verified", verified + 1),
    card("tunnels from here", peers.length),
    card("refused or dead", lost, lost ? "state-refused" : ""),
    card("migrations running", running, running ? "state-running" : ""),
    card("recent denials", denied, denied ? "outcome-denied" : ""),
  );

  if (d.svg !== lastSVG) {
    const doc = new DOMParser().parseFromString(d.svg, "image/svg+xml");
    const svg = doc.documentElement;
    if (svg.nodeName === "svg") $("#mesh").replaceChildren(document.importNode(svg, true));
    lastSVG = d.svg;
  }

  // Each peer's own tunnel, as status judges it: the graph's tunnels
  // include those between two other gateways, of no health here.
  fill($("#peers"), members.map((m) => row([
    m.node, m.site || "", m.jurisdiction || "",
    el("td", m.state, "state-" + m.state),
    m.overlay_ip || "", m.endpoint || "",
    m.peer ? el("td", ago(m.last_handshake, now), "health-" + (m.health || "idle")) : el("td", "no tunnel"),
    el("td", bytes(m.rx_bytes), "num"), el("td", bytes(m.tx_bytes), "num"),
    el("td", m.reason || "", "reasons"),
  ], { node: m.node, state: m.state })), "no other gateway yet");

  fill($("#sending"), (d.sending || []).map((m) => {
    const p = el("td", null, "progress");
    if (m.running || m.stats.chunks > 0) {
      const bar = document.createElement("progress");
      bar.max = 100;
      bar.value = m.percent;
      p.append(bar, " " + m.percent.toFixed(1) + " %");
    } else {
      p.textContent = "—"; // refused before anything was read
    }
    const state = m.running ? m.phase : m.state;
    const image = el("td", m.image.split("/").pop());
    image.title = m.image;
    return row([
      m.id, image, `${m.to} (${m.to_site})`, m.class,
      el("td", state, "state-" + (m.running ? "running" : m.state)),
      p, el("td", bytes(m.stats.bytes_sent), "num"), clock(m.started),
      m.stats.duration_ns ? duration(m.stats.duration_ns) : "",
      el("td", (m.reasons || []).join("; ") || m.error || "", "reasons"),
    ], { id: m.id, state: m.running ? "running" : m.state, percent: m.percent.toFixed(2) });
  }), "no migration sent from this gateway yet");

  fill($("#receiving"), (d.receiving || []).map((m) => row([
    m.id, m.name, `${m.from} (${m.from_site})`, m.class,
    el("td", m.durable_chunks, "num"), el("td", bytes(m.received_bytes), "num"), clock(m.started),
  ], { id: m.id })), "nothing being received");

  fill($("#decisions"), (d.decisions || []).map((x) => row([
    clock(x.time), x.role, x.migration_id, x.class, x.action, (x.sites || []).join(" → "),
    el("td", x.outcome, "outcome-" + x.outcome), x.rule,
    el("td", (x.reasons || []).join("; "), "reasons"),
  ], { outcome: x.outcome, class: x.class })), "no residency decision yet");

  $("#footer").textContent = `updated ${now.toLocaleTimeString()} · up ${duration(st.uptime_ns)} · reconciles ${st.reconcile.runs} (${st.reconcile.errors} failed)`;
  document.body.dataset.updated = d.time;
}

function connect() {
  const live = $("#live");
  const es = new EventSource("/api/v1/events");
  es.addEventListener("snapshot", (ev) => {
    live.className = "live up";
    live.textContent = "live";
    render(JSON.parse(ev.data));
  });
  // The gateway could not take a snapshot: its words, not the
  // browser's "error" event, which says only that the stream broke.
  es.addEventListener("failure", (ev) => {
    live.className = "live down";
    live.textContent = "gateway error: " + ev.data;
  });
  es.addEventListener("error", () => {
    live.className = "live down";
    live.textContent = es.readyState === EventSource.CLOSED ? "disconnected: reload (the session may have ended)" : "reconnecting…";
  });
}

connect();
