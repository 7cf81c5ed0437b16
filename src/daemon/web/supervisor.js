// switchboard supervisor view: queues, agents and open conversations, refreshed every 2 s.
// Every value is rendered with textContent.
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

const seconds = (value) => `${Math.round(value)} s`;

async function refresh() {
  const [queues, agents, open] = await Promise.all([
    api("/v1/admin/queues"),
    api("/v1/admin/agents"),
    api("/v1/admin/conversations?status=open&limit=50"),
  ]);
  $("queues").replaceChildren(...queues.queues.map((q) => row([
    q.name, q.open ? "open" : "closed", String(q.waiting), seconds(q.oldest_wait_seconds),
    `${q.oldest_wait_seconds <= q.sla_seconds ? "within" : "breached"} (${seconds(q.sla_seconds)})`,
    String(q.agents_available), seconds(q.average_handle_seconds),
  ])));
  $("agents").replaceChildren(...agents.agents.map((a) => row([
    `${a.name} (${a.id})`, a.presence + (a.wrap_up ? " · wrap-up" : ""),
    a.load.map((l) => `${l.channel} ${l.load}/${l.capacity}`).join(", "),
    String(a.offers.length), String(a.missed_offers),
  ])));
  const details = await Promise.all(open.conversations.map((c) => api(`/v1/admin/conversations/${c.id}`).catch(() => null)));
  $("waiting").replaceChildren(...details.filter((d) => d && d.routing).map((d) => row([
    d.conversation.id.slice(-8), d.conversation.reply_channel, d.routing.state + (d.routing.agent_id ? ` · ${d.routing.agent_id}` : ""),
    d.routing.queue, String(d.routing.priority), d.routing.priority_reasons.join(", "),
    new Date(d.routing.waiting_since).toLocaleTimeString(),
  ])));
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function start() {
  $("signin").classList.add("hidden");
  $("app").classList.remove("hidden");
  refresh().catch((error) => { $("updated").textContent = error.message; });
  setInterval(() => refresh().catch((error) => { $("updated").textContent = error.message; }), 2000);
}

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  token = $("admin-token").value.trim();
  try { await api("/v1/admin/queues"); } catch (error) { $("signin-error").textContent = error.message; return; }
  sessionStorage.setItem("switchboard.admin", token);
  start();
});

if (token) start();
