// switchboard supervisor view: queues, agents, unanswered conversations and recent CSAT, live over
// the supervisor WebSocket (/v1/admin/stream): the server pushes a fresh snapshot when something
// changes. Every value is rendered with textContent.
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("switchboard.admin");

async function api(path) {
  const response = await fetch(path, { headers: { authorization: "Bearer " + token } });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(body && body.error ? body.error.message : response.statusText);
  return body;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell;
    tr.appendChild(td);
  }
  return tr;
}

const seconds = (value) => value >= 120 ? `${Math.round(value / 60)} min` : `${Math.round(value)} s`;

function show(snapshot) {
  $("queues").replaceChildren(...snapshot.queues.map((q) => row([
    q.name, q.open ? "open" : "closed", String(q.waiting), seconds(q.oldest_wait_seconds),
    `${q.service_level === null ? "–" : `${Math.round(q.service_level * 100)} %`} of ${q.answered} in ${seconds(q.sla_seconds)} · oldest ${q.oldest_wait_seconds <= q.sla_seconds ? "within" : "breached"}`,
    String(q.agents_available), seconds(q.average_handle_seconds),
  ])));
  $("agents").replaceChildren(...snapshot.agents.map((a) => row([
    `${a.name} (${a.id})`, a.presence + (a.wrap_up ? " · wrap-up" : ""), seconds(a.in_state_seconds),
    a.load.map((l) => `${l.channel} ${l.load}/${l.capacity}`).join(", "),
    String(a.offers.length), String(a.missed_offers),
  ])));
  $("waiting-count").textContent = snapshot.unanswered_total > snapshot.unanswered.length
    ? `the first ${snapshot.unanswered.length} of ${snapshot.unanswered_total}` : "";
  $("waiting").replaceChildren(...snapshot.unanswered.map((c) => row([
    c.id.slice(-8), c.channel, c.state + (c.agent_id ? ` · ${c.agent_id}` : ""), c.queue, String(c.priority),
    c.priority_reasons.join(", "), new Date(c.waiting_since).toLocaleTimeString(),
  ])));
  const csat = snapshot.csat;
  $("csat-summary").textContent = csat.count === 0 ? "no ratings yet"
    : `average ${csat.average.toFixed(2)} of 5 over ${csat.count} rating${csat.count === 1 ? "" : "s"}`;
  $("csat").replaceChildren(...csat.recent.map((r) => row([
    "★".repeat(r.score) + "☆".repeat(5 - r.score), r.comment, r.agent_id || "", r.conversation_id.slice(-8),
    new Date(r.rated_at).toLocaleTimeString(),
  ])));
  $("updated").textContent = "live · " + new Date(snapshot.at).toLocaleTimeString();
}

let retry = 500;
function connect() {
  const url = new URL("/v1/admin/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("access_token", token);
  const socket = new WebSocket(url);
  socket.addEventListener("message", (event) => {
    retry = 500;
    try { show(JSON.parse(event.data)); } catch (error) { $("updated").textContent = error.message; }
  });
  socket.addEventListener("close", () => {
    $("updated").textContent = "reconnecting…";
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 10000);
  });
}

function start() {
  $("signin").classList.add("hidden");
  $("app").classList.remove("hidden");
  connect();
}

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  token = $("admin-token").value.trim();
  try { await api("/v1/admin/queues"); } catch (error) { $("signin-error").textContent = error.message; return; }
  sessionStorage.setItem("switchboard.admin", token);
  start();
});

if (token) start();
