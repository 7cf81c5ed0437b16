// switchboard web chat widget. Embed with one line:
//   <script src="https://switchboard.example/widget.js" data-title="Chat with us" async></script>
// Optional: data-name, data-customer-id + data-customer-signature (hex HMAC-SHA256 of the id, made
// by the host site's server with chat.customer_secret), data-open="true".
// Every text from the server is rendered with textContent, never as HTML.
(() => {
  "use strict";
  const script = document.currentScript;
  if (!script || window.__switchboardChat) return;
  window.__switchboardChat = true;
  const data = script.dataset;
  const server = new URL(script.src, location.href);
  const wsUrl = (server.protocol === "https:" ? "wss://" : "ws://") + server.host + "/v1/chat/stream";
  const store = {
    get(key) { try { return JSON.parse(localStorage.getItem("switchboard." + key)); } catch { return null; } },
    set(key, value) { try { localStorage.setItem("switchboard." + key, JSON.stringify(value)); } catch { /* private mode */ } },
  };
  let visitor = store.get("visitor");
  if (typeof visitor !== "string" || visitor.length < 16) {
    visitor = "v_" + crypto.randomUUID().replaceAll("-", "");
    store.set("visitor", visitor);
  }
  let conversation = store.get("conversation");
  // The highest sequence number shown on this page; a fresh page asks for the whole history.
  let lastSeq = 0;
  // Messages sent and not yet acknowledged: sent again, same ids, after a reconnect.
  let pending = store.get("pending") || [];
  const seen = new Set();

  const css = `
  .sb-launcher{position:fixed;right:20px;bottom:20px;width:56px;height:56px;border-radius:50%;border:0;background:#2457d6;color:#fff;display:flex;align-items:center;justify-content:center;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25);z-index:2147483000}
  .sb-window{position:fixed;right:20px;bottom:88px;width:340px;max-width:calc(100vw - 40px);height:460px;display:none;flex-direction:column;background:#fff;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.25);font:14px/1.4 system-ui,sans-serif;color:#1c1c1c;overflow:hidden;z-index:2147483000}
  .sb-window.sb-open{display:flex}
  .sb-head{background:#2457d6;color:#fff;padding:12px 14px;font-weight:600;display:flex;justify-content:space-between}
  .sb-head button{background:none;border:0;color:#fff;font-size:18px;cursor:pointer}
  .sb-status{padding:6px 14px;font-size:12px;color:#555;background:#f3f5fa;min-height:18px}
  .sb-log{flex:1;overflow-y:auto;padding:10px 14px;display:flex;flex-direction:column;gap:6px}
  .sb-msg{max-width:80%;padding:7px 10px;border-radius:10px;white-space:pre-wrap;word-wrap:break-word}
  .sb-customer{align-self:flex-end;background:#2457d6;color:#fff}
  .sb-agent{align-self:flex-start;background:#eef0f4}
  .sb-pending{opacity:.6}
  .sb-note{align-self:center;font-size:12px;color:#666}
  .sb-form{display:flex;border-top:1px solid #e3e6ee}
  .sb-form input{flex:1;border:0;padding:12px;font:inherit;outline:none}
  .sb-form button{border:0;background:#2457d6;color:#fff;padding:0 16px;font:inherit;cursor:pointer}
  .sb-panel{display:flex;flex-direction:column;gap:6px;padding:10px 14px;border-top:1px solid #e3e6ee}
  .sb-panel input,.sb-panel textarea{border:1px solid #cfd4df;border-radius:6px;padding:7px;font:inherit}
  .sb-panel textarea{resize:vertical;min-height:54px}
  .sb-panel button.sb-primary{border:0;border-radius:6px;background:#2457d6;color:#fff;padding:8px;font:inherit;cursor:pointer}
  .sb-stars{display:flex;gap:4px}
  .sb-star{flex:1;border:1px solid #cfd4df;border-radius:6px;background:#fff;padding:6px 0;font:inherit;cursor:pointer}
  .sb-star.sb-chosen{background:#2457d6;color:#fff;border-color:#2457d6}
  .sb-hidden{display:none}`;
  const style = document.createElement("style");
  style.textContent = css;
  document.head.appendChild(style);

  const element = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const launcher = element("button", "sb-launcher");
  // A speech bubble drawn as SVG: an emoji depends on the visitor's fonts.
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "26");
  svg.setAttribute("height", "26");
  const bubble = document.createElementNS("http://www.w3.org/2000/svg", "path");
  bubble.setAttribute("d", "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z");
  bubble.setAttribute("fill", "currentColor");
  svg.appendChild(bubble);
  launcher.appendChild(svg);
  launcher.setAttribute("aria-label", "Open chat");
  const panel = element("div", "sb-window");
  panel.setAttribute("role", "dialog");
  const head = element("div", "sb-head");
  head.appendChild(element("span", "", data.title || "Chat with us"));
  const closeButton = element("button", "", "×");
  closeButton.setAttribute("aria-label", "Close chat");
  head.appendChild(closeButton);
  const status = element("div", "sb-status", "");
  const log = element("div", "sb-log");
  const form = element("form", "sb-form");
  const input = element("input");
  input.placeholder = "Write a message…";
  input.maxLength = 2000;
  const send = element("button", "", "Send");
  send.type = "submit";
  form.append(input, send);

  // Offline form: shown when nobody can answer now; becomes a conversation answered later.
  const offline = element("form", "sb-panel sb-offline sb-hidden");
  offline.appendChild(element("div", "", "We are offline right now. Leave a message and we will get back to you."));
  const offlineName = element("input", "sb-offline-name");
  offlineName.placeholder = "Your name";
  offlineName.maxLength = 200;
  const offlineEmail = element("input", "sb-offline-email");
  offlineEmail.type = "email";
  offlineEmail.placeholder = "Email (to get the answer by mail)";
  const offlineText = element("textarea", "sb-offline-text");
  offlineText.placeholder = "Your message";
  offlineText.required = true;
  const offlineSend = element("button", "sb-primary", "Send message");
  offlineSend.type = "submit";
  offline.append(offlineName, offlineEmail, offlineText, offlineSend);

  // Rating after resolve: 1–5 and a comment.
  const rating = element("form", "sb-panel sb-rating sb-hidden");
  rating.appendChild(element("div", "", "How did we do?"));
  const stars = element("div", "sb-stars");
  let score = 0;
  for (let value = 1; value <= 5; value++) {
    const star = element("button", "sb-star", String(value));
    star.type = "button";
    star.dataset.score = String(value);
    star.setAttribute("aria-label", `${value} of 5`);
    star.addEventListener("click", () => {
      score = value;
      for (const other of stars.children) other.classList.toggle("sb-chosen", Number(other.dataset.score) <= value);
    });
    stars.appendChild(star);
  }
  const ratingComment = element("textarea", "sb-rating-comment");
  ratingComment.placeholder = "Anything to add? (optional)";
  ratingComment.maxLength = 1000;
  const ratingSend = element("button", "sb-primary sb-rating-send", "Send rating");
  ratingSend.type = "submit";
  rating.append(stars, ratingComment, ratingSend);
  panel.append(head, status, log, offline, rating, form);
  document.body.append(panel, launcher);

  const setOpen = (open) => {
    panel.classList.toggle("sb-open", open);
    if (open) { input.focus(); markRead(); }
  };
  launcher.addEventListener("click", () => setOpen(!panel.classList.contains("sb-open")));
  closeButton.addEventListener("click", () => setOpen(false));

  const scroll = () => { log.scrollTop = log.scrollHeight; };
  const note = (text) => { log.appendChild(element("div", "sb-note", text)); scroll(); };
  const bubbles = new Map(); // client_message_id → element, while pending

  const showMessage = (frame) => {
    if (seen.has(frame.seq)) return;
    seen.add(frame.seq);
    const own = frame.client_message_id && bubbles.get(frame.client_message_id);
    if (own) { own.classList.remove("sb-pending"); bubbles.delete(frame.client_message_id); }
    else log.appendChild(element("div", "sb-msg " + (frame.from === "agent" ? "sb-agent" : "sb-customer"), frame.text));
    if (frame.seq > lastSeq) lastSeq = frame.seq;
    scroll();
    if (frame.from === "agent") markRead();
  };

  let socket = null;
  let started = false;
  let retry = 500;
  const transmit = (frame) => {
    if (socket && socket.readyState === WebSocket.OPEN && started) { socket.send(JSON.stringify(frame)); return true; }
    return false;
  };
  function markRead() {
    if (panel.classList.contains("sb-open") && lastSeq > 0) transmit({ type: "read", seq: lastSeq });
  }

  const connect = () => {
    socket = new WebSocket(wsUrl);
    started = false;
    socket.addEventListener("open", () => {
      const start = { type: "start", visitor_id: visitor, after_seq: lastSeq };
      if (conversation) start.conversation_id = conversation;
      if (data.name) start.name = data.name;
      if (data.customerId && data.customerSignature) start.customer = { id: data.customerId, signature: data.customerSignature };
      socket.send(JSON.stringify(start));
    });
    socket.addEventListener("message", (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      switch (frame.type) {
        case "session":
          started = true;
          retry = 500;
          status.textContent = "Connected";
          offlineEmail.placeholder = frame.offline_reply_by_email ? "Email (to get the answer by mail)" : "Email";
          if (!frame.online && !conversation && !offlineSent) {
            status.textContent = "Offline";
            offline.classList.remove("sb-hidden");
            form.classList.add("sb-hidden");
          }
          input.maxLength = frame.max_message_chars || 2000;
          for (const message of pending) transmit({ type: "message", client_message_id: message.id, text: message.text });
          break;
        case "ack":
          pending = pending.filter((message) => message.id !== frame.client_message_id);
          store.set("pending", pending);
          if (frame.conversation_id && frame.conversation_id !== conversation) {
            conversation = frame.conversation_id;
            store.set("conversation", conversation);
          }
          showMessage({ seq: frame.seq, from: "customer", client_message_id: frame.client_message_id, text: "" });
          break;
        case "message": showMessage(frame); break;
        case "queued":
          status.textContent = `You are number ${frame.position} in the queue · about ${Math.max(1, Math.round(frame.estimated_wait_seconds / 60))} min`;
          break;
        case "agent_joined": status.textContent = `${frame.agent_id} is with you`; note(`${frame.agent_id} joined the chat`); break;
        case "agent_left": note(`${frame.agent_id} left the chat`); break;
        case "resolved":
          status.textContent = "This conversation is resolved. Write again any time.";
          if (frame.rating) { score = 0; rating.classList.remove("sb-hidden"); }
          break;
        case "rated":
          rating.classList.add("sb-hidden");
          note("Thank you for your rating!");
          break;
        case "offline_received":
          offlineSent = true;
          offline.classList.add("sb-hidden");
          form.classList.remove("sb-hidden");
          if (frame.reply_by === "chat" && frame.conversation_id) {
            conversation = frame.conversation_id;
            store.set("conversation", conversation);
          }
          note(frame.reply_by === "email" ? "Thanks! We will answer by email." : "Thanks! We will answer here as soon as we are back.");
          break;
        case "typing": status.textContent = frame.active ? "The agent is typing…" : "Connected"; break;
        case "error":
          if (frame.error.code === "unknown_conversation") {
            // Not ours (or forgotten): start afresh on a new connection.
            conversation = null; lastSeq = 0; store.set("conversation", null);
            socket.close();
          } else {
            if (frame.client_message_id) {
              pending = pending.filter((message) => message.id !== frame.client_message_id);
              store.set("pending", pending);
            }
            note(frame.error.message);
            if (frame.error.code === "already_rated") rating.classList.add("sb-hidden");
          }
          break;
      }
    });
    socket.addEventListener("close", () => {
      started = false;
      status.textContent = "Reconnecting…";
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    });
  };

  let offlineSent = false;
  offline.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = offlineText.value.trim();
    if (!text) return;
    transmit({ type: "offline", client_message_id: crypto.randomUUID(), name: offlineName.value.trim() || undefined,
      email: offlineEmail.value.trim() || undefined, text });
  });
  rating.addEventListener("submit", (event) => {
    event.preventDefault();
    if (score < 1) { note("Choose 1 to 5 first."); return; }
    transmit({ type: "rate", score, comment: ratingComment.value.trim() });
  });

  let typingSent = 0;
  input.addEventListener("input", () => {
    const now = Date.now();
    if (now - typingSent > 2000) { typingSent = now; transmit({ type: "typing", active: true }); }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const message = { id: crypto.randomUUID(), text };
    pending.push(message);
    store.set("pending", pending);
    const bubble = element("div", "sb-msg sb-customer sb-pending", text);
    bubbles.set(message.id, bubble);
    log.appendChild(bubble);
    scroll();
    transmit({ type: "typing", active: false });
    transmit({ type: "message", client_message_id: message.id, text });
  });

  // Pending messages from before a reload are shown until their ack arrives.
  for (const message of pending) {
    const bubble = element("div", "sb-msg sb-customer sb-pending", message.text);
    bubbles.set(message.id, bubble);
    log.appendChild(bubble);
  }
  connect();
  if (data.open === "true") setOpen(true);
})();
