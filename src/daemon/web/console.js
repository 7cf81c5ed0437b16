// switchboard agent console: everything live over the agent WebSocket; history and lists over REST.
// Customer texts are rendered with textContent only, never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
const element = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};
let agent = sessionStorage.getItem("switchboard.agent");
let token = sessionStorage.getItem("switchboard.token");
let socket = null;
let requests = 0;
const waiting = new Map(); // request_id → resolve
let selected = null;
const unread = new Map(); // conversation id → count
let offers = [];

async function api(path) {
  const response = await fetch(path, { headers: { authorization: "Bearer " + token } });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(body && body.error ? body.error.message : response.statusText);
  return body;
}

function command(frame) {
  return new Promise((resolve) => {
    const request_id = String(++requests);
    waiting.set(request_id, resolve);
    socket.send(JSON.stringify({ ...frame, request_id }));
  });
}

async function act(frame) {
  const answer = await command(frame);
  $("action-error").textContent = answer.type === "error" ? answer.error.message : "";
  return answer;
}

function showAgent(view) {
  if (!view) return;
  $("who").textContent = `${view.name} (${view.id})`;
  $("presence").value = view.presence === "disconnected" ? "offline" : view.presence;
  $("load").textContent = view.load.map((l) => `${l.channel} ${l.load}/${l.capacity}`).join(" · ");
  $("wrapup").classList.toggle("hidden", !view.wrap_up);
}

async function refresh() {
  const [view, mine] = await Promise.all([api(`/v1/agents/${agent}`), api(`/v1/agents/${agent}/conversations`)]);
  showAgent(view);
  offers = mine.offers;
  const offerList = $("offers");
  offerList.replaceChildren();
  for (const offer of mine.offers) {
    const item = element("li", "item offer");
    item.dataset.conversation = offer.id;
    item.append(element("span", "badge", offer.channel), element("span", "", ` ${offer.queue} · priority ${offer.priority} `));
    const countdown = element("span", "countdown meta");
    countdown.dataset.deadline = offer.detail && offer.detail.deadline ? offer.detail.deadline : "";
    const accept = element("button", "primary accept", "Accept");
    accept.addEventListener("click", (event) => { event.stopPropagation(); accept_(offer.id); });
    const reject = element("button", "reject", "Reject");
    reject.addEventListener("click", (event) => { event.stopPropagation(); act({ type: "reject", conversation_id: offer.id }).then(refresh); });
    item.append(countdown, accept, reject);
    offerList.appendChild(item);
  }
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of mine.assigned) {
    const item = element("li", "item" + (conversation.id === selected ? " selected" : ""));
    item.dataset.conversation = conversation.id;
    item.append(element("span", "badge", conversation.channel), element("span", "", conversation.id.slice(-8)));
    const count = unread.get(conversation.id) || 0;
    if (count) item.append(element("span", "badge unread", String(count)));
    item.addEventListener("click", () => open(conversation.id));
    list.appendChild(item);
  }
  tick();
}

function tick() {
  for (const countdown of document.querySelectorAll(".countdown")) {
    if (!countdown.dataset.deadline) continue;
    const left = Math.max(0, Math.round((Date.parse(countdown.dataset.deadline) - Date.now()) / 1000));
    countdown.textContent = `${left}s `;
  }
}

async function accept_(conversation) {
  const answer = await act({ type: "accept", conversation_id: conversation });
  await refresh();
  if (answer.type === "ack") open(conversation);
}

async function open(conversation) {
  selected = conversation;
  unread.delete(conversation);
  $("empty").classList.add("hidden");
  $("detail").classList.remove("hidden");
  $("detail-title").textContent = "Conversation " + conversation.slice(-8);
  $("customer-typing").textContent = "";
  await showHistory();
  refresh();
}

async function showHistory() {
  if (!selected) return;
  const history = await api(`/v1/agents/${agent}/conversations/${selected}/messages`);
  $("detail-channel").textContent = history.reply_channel || "";
  $("reply-channel").textContent = history.reply_channel ? `goes out on ${history.reply_channel}` : "";
  const log = $("log");
  log.replaceChildren();
  for (const message of history.messages) {
    const inbound = message.direction === "inbound";
    const bubble = element("div", "msg " + (inbound ? "in" : "out"));
    bubble.appendChild(element("div", "meta", `${message.channel} · ${inbound ? message.from : message.agent_id || "agent"} · ${new Date(message.created_at).toLocaleTimeString()}${message.delivery_status ? " · " + message.delivery_status : ""}`));
    bubble.appendChild(element("div", "text", (message.body && message.body.text) || ""));
    log.appendChild(bubble);
  }
  log.scrollTop = log.scrollHeight;
}

function notice(text) {
  $("notices").prepend(element("div", "notice", text));
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  socket = new WebSocket(`${scheme}${location.host}/v1/agents/${encodeURIComponent(agent)}/stream?access_token=${encodeURIComponent(token)}`);
  socket.addEventListener("message", (event) => {
    const frame = JSON.parse(event.data);
    if ((frame.type === "ack" || frame.type === "error") && waiting.has(frame.request_id)) {
      waiting.get(frame.request_id)(frame);
      waiting.delete(frame.request_id);
      return;
    }
    switch (frame.type) {
      case "hello": showAgent(frame.agent); refresh(); break;
      case "offer": case "offer_withdrawn": case "assigned": refresh(); break;
      case "message":
        if (frame.conversation_id === selected) showHistory();
        else { unread.set(frame.conversation_id, (unread.get(frame.conversation_id) || 0) + 1); refresh(); }
        break;
      case "reply_status": if (frame.conversation_id === selected) showHistory(); break;
      case "follow_up": notice(`Conversation ${frame.conversation_id.slice(-8)} you escalated was resolved.`); break;
      case "presence": refresh(); break;
      case "customer_typing":
        if (frame.conversation_id === selected) $("customer-typing").textContent = frame.active ? "customer is typing…" : "";
        break;
    }
  });
  socket.addEventListener("close", () => setTimeout(connect, 1000));
}

function start() {
  $("signin").classList.add("hidden");
  $("app").classList.remove("hidden");
  connect();
  setInterval(tick, 1000);
}

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  agent = $("agent-id").value.trim();
  token = $("agent-token").value.trim();
  try {
    await api(`/v1/agents/${encodeURIComponent(agent)}`);
  } catch (error) {
    $("signin-error").textContent = error.message;
    return;
  }
  sessionStorage.setItem("switchboard.agent", agent);
  sessionStorage.setItem("switchboard.token", token);
  start();
});

$("presence").addEventListener("change", () => act({ type: "presence", presence: $("presence").value }).then(refresh));
$("reply-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("reply").value.trim();
  if (!text || !selected) return;
  const answer = await act({ type: "reply", conversation_id: selected, text });
  command({ type: "typing", conversation_id: selected, active: false });
  typingSent = 0;
  if (answer.type === "ack") { $("reply").value = ""; showHistory(); }
});
let typingSent = 0;
$("reply").addEventListener("input", () => {
  if (!selected || Date.now() - typingSent < 2000) return;
  typingSent = Date.now();
  command({ type: "typing", conversation_id: selected, active: true });
});
const closeSelected = () => { selected = null; $("detail").classList.add("hidden"); $("empty").classList.remove("hidden"); refresh(); };
$("resolve").addEventListener("click", async () => { if ((await act({ type: "resolve", conversation_id: selected })).type === "ack") closeSelected(); });
$("escalate").addEventListener("click", async () => { if ((await act({ type: "escalate", conversation_id: selected })).type === "ack") closeSelected(); });
$("transfer").addEventListener("click", async () => {
  const target = $("transfer-target").value.trim();
  if (!target) return;
  const frame = { type: "transfer", conversation_id: selected };
  if (target.startsWith("queue:")) frame.to_queue = target.slice(6); else frame.to_agent = target;
  if ((await act(frame)).type === "ack") closeSelected();
});
document.addEventListener("keydown", (event) => {
  const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement;
  if (event.key === "Enter" && event.ctrlKey && event.target === $("reply")) { $("reply-form").requestSubmit(); return; }
  if (event.altKey && event.key === "d" && selected) { $("resolve").click(); return; }
  if (typing) return;
  if (event.key === "a" && offers.length) { accept_(offers[0].id); event.preventDefault(); }
  if (event.key === "r" && selected) { $("reply").focus(); event.preventDefault(); }
});

if (agent && token) start();
