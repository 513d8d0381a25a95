// The browser side of zchat_nb.ChatWidget (an anywidget ES module).
//
// The kernel renders and sanitises every message (zchat_nb/render.py: markdown-it with raw HTML
// escaped, then nh3 with a tag allow-list); this view only places the HTML it is given and puts
// every other string in with textContent. The message protocol is described in zchat_nb/widget.py.

const BOTTOM_SLACK_PX = 24; // closer than this to the end counts as "at the bottom"
const SEND_TIMEOUT_MS = 60000; // mark a send "not sent" (with Retry) if the kernel never answers
const NAME_KEY = "zchat_nb.name"; // localStorage key of the name field (ask_name)
// The React menu: zchat_nb.amend.REACTIONS.
const REACTIONS = ["👍", "❤️", "😂", "🎉", "❓", "✅"];
const FLASH_MS = 1500; // how long a message a quote jumped to stays highlighted

function el(tag, className, attrs = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function newId() {
  // crypto.randomUUID exists only in secure contexts; a notebook may be served over plain http.
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
    return globalThis.crypto.randomUUID();
  }
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

function newMessageId() {
  // The kernel keeps it as the message id (at most 32 letters, digits, - or _), so that a Retry of
  // a send whose answer was lost is stored once.
  return newId().replace(/[^A-Za-z0-9_-]/g, "").slice(0, 32);
}

function storedName() {
  try {
    return globalThis.localStorage ? globalThis.localStorage.getItem(NAME_KEY) || "" : "";
  } catch {
    return ""; // storage blocked (private mode, sandboxed frame): the visitor types it again
  }
}

function storeName(name) {
  try {
    if (globalThis.localStorage) globalThis.localStorage.setItem(NAME_KEY, name);
  } catch {
    // remembered for this page only
  }
}

function shortTime(date) {
  const now = new Date();
  const sameDay = date.toDateString() === now.toDateString();
  const options = sameDay
    ? { hour: "2-digit", minute: "2-digit" }
    : { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
  return date.toLocaleString([], options);
}

// -- code blocks: a Copy button each ---------------------------------------------------------

function copyWithSelection(text) {
  // The fallback where navigator.clipboard is missing (plain http) or refused: a hidden textarea.
  const area = el("textarea", "zchat-copy-buffer", { readonly: "", "aria-hidden": "true" });
  area.value = text;
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch (_err) {
    ok = false;
  }
  area.remove();
  return ok;
}

async function copyText(text) {
  if (navigator.clipboard && typeof navigator.clipboard.writeText === "function") {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_err) {
      // denied (no user gesture, no permission): try the old way
    }
  }
  return copyWithSelection(text);
}

function decorateCode(container) {
  for (const pre of container.querySelectorAll("pre")) {
    const wrap = el("div", "zchat-code");
    // The label is drawn by CSS from data-label, so the message's innerText stays the message's.
    const copy = el("button", "zchat-copy", {
      type: "button",
      title: "Copy this code",
      "aria-label": "Copy this code",
      "data-label": "Copy",
    });
    copy.addEventListener("click", async () => {
      const text = pre.textContent.replace(/\n$/, ""); // markdown-it ends every block with a newline
      const ok = await copyText(text);
      copy.dataset.label = ok ? "Copied" : "Copy failed";
      setTimeout(() => {
        copy.dataset.label = "Copy";
      }, 1500);
    });
    pre.replaceWith(wrap);
    wrap.append(copy, pre);
  }
}

// -- reading a busy room: one header per run of messages, a line per day -----------------------

const GROUP_WINDOW_MS = 5 * 60 * 1000; // one author's messages closer than this share a header

function dayLabel(date) {
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (date.toDateString() === today.toDateString()) return "Today";
  if (date.toDateString() === yesterday.toDateString()) return "Yesterday";
  return date.toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" });
}

function regroup(list) {
  // Recomputed over the whole list after each change: batches arrive at both ends (older, append).
  for (const old of list.querySelectorAll(":scope > .zchat-day")) old.remove();
  let prev = null;
  let prevTime = null;
  let prevDay = null;
  let broken = true; // the unread marker (or anything else between messages) starts a new group
  for (const node of [...list.children]) {
    if (!node.classList.contains("zchat-message")) {
      broken = true;
      continue;
    }
    const time = node.dataset.time ? new Date(node.dataset.time) : null;
    const valid = time !== null && !Number.isNaN(time.getTime());
    const day = valid ? time.toDateString() : null;
    if (day !== null && day !== prevDay) {
      const separator = el("div", "zchat-day", { role: "separator", "data-day": day });
      separator.textContent = dayLabel(time);
      node.before(separator);
      prevDay = day;
      broken = true;
    }
    const continued =
      !broken &&
      prev !== null &&
      valid &&
      prevTime !== null &&
      prev.dataset.author === node.dataset.author &&
      prev.dataset.verified === node.dataset.verified && // an unverified namesake starts its own run
      time - prevTime >= 0 &&
      time - prevTime < GROUP_WINDOW_MS;
    node.classList.toggle("zchat-continued", continued);
    prev = node;
    prevTime = valid ? time : null;
    broken = false;
  }
}

function render({ model, el: host }) {
  const viewId = newId();

  const root = el("div", "zchat-widget");
  const header = el("div", "zchat-header");
  const roomsBar = el("div", "zchat-rooms", { role: "tablist", "aria-label": "Rooms" });
  const roomInput = el("input", "zchat-room-input", {
    type: "text",
    maxlength: "64",
    placeholder: "join room…",
    "aria-label": "Join or create a room",
    "data-lm-suppress-shortcuts": "true",
  });
  const presence = el("span", "zchat-presence", { "aria-live": "polite" });
  const nameInput = el("input", "zchat-name", {
    type: "text",
    maxlength: "64",
    placeholder: "your name",
    "aria-label": "Your name, shown with your messages",
    "data-lm-suppress-shortcuts": "true",
  });
  nameInput.hidden = true;
  header.append(nameInput, roomsBar, presence, roomInput);

  const status = el("div", "zchat-status", { role: "status", "aria-live": "polite" });
  const log = el("div", "zchat-log", { role: "log", "aria-live": "polite", tabindex: "0" });
  const older = el("button", "zchat-older", { type: "button" });
  older.textContent = "Load older messages";
  older.hidden = true;
  const list = el("div", "zchat-messages");
  log.append(older, list);

  const jump = el("button", "zchat-jump", { type: "button" });
  jump.hidden = true;
  const error = el("div", "zchat-error", { role: "alert" });
  error.hidden = true;

  // What the box is doing when it is not sending a new message: replying, or editing one.
  const context = el("div", "zchat-context", { role: "status" });
  context.hidden = true;
  const contextText = el("span", "zchat-context-text");
  const contextCancel = el("button", "zchat-context-cancel", {
    type: "button",
    title: "Cancel (Escape)",
    "aria-label": "Cancel",
  });
  contextCancel.textContent = "×";
  context.append(contextText, contextCancel);

  const compose = el("div", "zchat-compose");
  const input = el("textarea", "zchat-input", {
    rows: "2",
    placeholder: "Message — Enter sends, Shift+Enter starts a new line",
    "aria-label": "Message",
    "data-lm-suppress-shortcuts": "true",
  });
  const sendButton = el("button", "zchat-send", { type: "button" });
  sendButton.textContent = "Send";
  compose.append(input, sendButton);

  root.append(header, log, jump, error, context, compose, status);
  host.replaceChildren(root);

  // -- per-view state ------------------------------------------------------------------
  let shownRoom = null; // set by the first "reset"; messages for other rooms are ignored
  const ids = new Set(); // ids of the messages in the DOM: a message is never shown twice
  let unseen = 0; // messages from others that arrived below the visible part
  let marker = null; // the "New messages" line
  // Sends not yet shown as committed, by client id (= message id): {id, text, room, node, state, timer}.
  // state: "pending" (asked), "sent" (committed, its rendered message not here yet), "failed".
  const outbox = new Map();

  const atBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight <= BOTTOM_SLACK_PX;
  const scrollToBottom = () => {
    log.scrollTop = log.scrollHeight;
  };

  function messageNode(m) {
    const node = el("div", m.own ? "zchat-message zchat-own" : "zchat-message", {
      "data-id": m.id,
      "data-ts": String(m.ts),
      "data-author": m.author,
      "data-time": m.time || "",
    });
    node.style.setProperty("--zchat-hue", String(m.hue));
    const avatar = el("span", "zchat-avatar", { "aria-hidden": "true", title: m.author });
    avatar.textContent = m.initials;
    const body = el("div", "zchat-body");
    const meta = el("div", "zchat-meta");
    const author = el("span", "zchat-author");
    author.textContent = m.author;
    const time = el("time", "zchat-time");
    if (m.time) {
      const date = new Date(m.time);
      time.dateTime = m.time;
      time.title = date.toLocaleString([], { dateStyle: "full", timeStyle: "medium" });
      time.textContent = shortTime(date);
    }
    meta.append(author, time);
    const text = el("div", "zchat-text");
    text.innerHTML = m.html; // sanitised in the kernel by zchat_nb.render (nh3 allow-list)
    decorateCode(text);
    body.append(meta, text);
    for (const a of Array.isArray(m.attachments) ? m.attachments : []) body.append(attachmentNode(m, a));
    node.append(avatar, body);
    decorateMessage(node, m);
    return node;
  }

  // -- attachments: bytes come from the kernel, which read and checked them; never from a URL ---
  const IMAGE_TYPES = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]);
  const objectUrls = new Set(); // blob: URLs made here, revoked when the messages go
  const waiting = new Map(); // "message id/index" -> the figure waiting for its bytes
  const lazy =
    typeof IntersectionObserver === "function"
      ? new IntersectionObserver(
          (entries) => {
            for (const entry of entries) {
              if (entry.isIntersecting) {
                lazy.unobserve(entry.target);
                requestBytes(entry.target);
              }
            }
          },
          { root: log, rootMargin: "300px" },
        )
      : null;

  function formatSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function requestBytes(figure) {
    waiting.set(`${figure.dataset.message}/${figure.dataset.index}`, figure);
    model.send({
      type: "attachment",
      view: viewId,
      message: figure.dataset.message,
      index: Number(figure.dataset.index),
    });
  }

  function attachmentNode(m, a) {
    const image = a.image === true;
    const figure = el("figure", image ? "zchat-attachment zchat-picture" : "zchat-attachment zchat-file", {
      "data-message": m.id,
      "data-index": String(a.index),
      "data-name": String(a.name),
    });
    const caption = el("figcaption", "zchat-attachment-name");
    caption.textContent = `${a.name} · ${formatSize(Number(a.size) || 0)}`;
    if (image) {
      figure.append(el("div", "zchat-image-placeholder", { "aria-hidden": "true" }), caption);
      if (lazy) lazy.observe(figure);
      else requestBytes(figure);
    } else {
      const download = el("button", "zchat-download", { type: "button" });
      download.textContent = "Download";
      download.addEventListener("click", () => {
        figure.dataset.download = "pending";
        requestBytes(figure);
      });
      figure.append(download, caption);
    }
    return figure;
  }

  function enlarge(url, name) {
    const overlay = el("div", "zchat-lightbox", { role: "dialog", "aria-label": name, tabindex: "-1" });
    const big = el("img", "zchat-lightbox-image", { alt: name });
    big.src = url;
    overlay.append(big);
    const close = () => overlay.remove();
    overlay.addEventListener("click", close);
    overlay.addEventListener("keydown", (event) => {
      event.stopPropagation();
      if (event.key === "Escape") close();
    });
    root.append(overlay);
    overlay.focus();
  }

  function onAttachment(msg, buffers) {
    const key = `${msg.message}/${msg.index}`;
    const figure = waiting.get(key);
    if (!figure) return;
    waiting.delete(key);
    const name = figure.dataset.name;
    if (msg.error || !buffers || buffers.length !== 1) {
      figure.classList.add("zchat-attachment-skipped");
      figure.querySelector(".zchat-image-placeholder")?.remove();
      const note = el("div", "zchat-attachment-error");
      note.textContent = `skipped: ${msg.error || "no bytes came"}`;
      figure.append(note);
      return;
    }
    if (figure.classList.contains("zchat-picture")) {
      if (!IMAGE_TYPES.has(msg.mime)) return;
      const url = URL.createObjectURL(new Blob(buffers, { type: msg.mime }));
      objectUrls.add(url);
      const stick = atBottom();
      const img = el("img", "zchat-image", { alt: name, title: "Click to enlarge" });
      img.addEventListener("load", () => {
        if (stick) scrollToBottom();
      });
      img.addEventListener("click", () => enlarge(url, name));
      img.src = url;
      figure.querySelector(".zchat-image-placeholder")?.replaceWith(img);
    } else if (figure.dataset.download === "pending") {
      delete figure.dataset.download;
      const url = URL.createObjectURL(new Blob(buffers, { type: "text/csv" }));
      const link = el("a", "zchat-download-link", { download: name, href: url });
      root.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    }
  }

  function forgetAttachments() {
    if (lazy) lazy.disconnect();
    waiting.clear();
    for (const url of objectUrls) URL.revokeObjectURL(url);
    objectUrls.clear();
  }

  // Pasting or dropping a picture into the box shares it; the kernel checks the bytes.
  function shareFile(file) {
    if (!IMAGE_TYPES.has(file.type)) {
      error.textContent = `Only PNG, JPEG, GIF and WebP pictures can be shared here, not ${file.type || "this file"}.`;
      error.hidden = false;
      return;
    }
    file.arrayBuffer().then((bytes) => {
      const room = shownRoom ?? model.get("room");
      const name = file.name || `pasted.${file.type.split("/")[1]}`;
      model.send({ type: "share", client_id: newId(), room, name, caption: "" }, undefined, [bytes]);
    });
  }

  function removeMarker() {
    if (marker) marker.remove();
    marker = null;
  }

  function updateJump() {
    if (unseen > 0) {
      jump.textContent = `↓ ${unseen} new message${unseen === 1 ? "" : "s"}`;
      jump.hidden = false;
    } else {
      jump.hidden = true;
    }
  }

  function append(messages, { initial = false } = {}) {
    for (const m of messages) settle(m.id);
    const fresh = messages.filter((m) => !ids.has(m.id));
    if (!fresh.length) return;
    const stick = atBottom();
    const frag = document.createDocumentFragment();
    let firstOther = null;
    let others = 0;
    let own = false;
    for (const m of fresh) {
      ids.add(m.id);
      const node = messageNode(m);
      frag.append(node);
      if (m.own) {
        own = true;
      } else {
        others += 1;
        if (!firstOther) firstOther = node;
      }
    }
    if (!initial && !stick && !own && firstOther) {
      // The reader is looking at older messages: mark where the new ones start.
      if (!marker) {
        marker = el("div", "zchat-unread-marker", { role: "separator" });
        marker.textContent = "New messages";
        frag.insertBefore(marker, firstOther);
      }
      unseen += others;
    } else if (!initial && stick && unseen === 0) {
      removeMarker(); // the reader has seen what was below it
    }
    list.insertBefore(frag, list.querySelector(".zchat-pending, .zchat-sent, .zchat-failed"));
    regroup(list);
    if (stick || own || initial) scrollToBottom();
    updateJump();
  }

  function prepend(messages, more) {
    const fresh = messages.filter((m) => !ids.has(m.id));
    const heightBefore = log.scrollHeight;
    const topBefore = log.scrollTop;
    const frag = document.createDocumentFragment();
    for (const m of fresh) {
      ids.add(m.id);
      frag.append(messageNode(m));
    }
    list.prepend(frag);
    regroup(list);
    log.scrollTop = topBefore + (log.scrollHeight - heightBefore); // keep what the reader looked at
    older.hidden = !more;
    older.disabled = false;
  }

  function reset(msg) {
    forgetAttachments();
    shownRoom = msg.room;
    ids.clear();
    list.replaceChildren();
    marker = null;
    unseen = 0;
    payloads.clear();
    append(msg.messages, { initial: true });
    if (boxMode && !messageById(boxMode.id)) endBoxMode(); // another room: nothing to answer or edit
    restoreOutbox();
    older.hidden = !msg.more;
    older.disabled = false;
    root.dataset.room = msg.room;
    updateRooms();
    updateJump();
  }

  // -- sending -------------------------------------------------------------------------
  // The box clears at once and stays editable; each send shows as a pending message until the
  // kernel's "append" brings the committed one (same id), or as "not sent" with Retry and Edit.

  function unsentNode(entry) {
    const node = el("div", "zchat-message zchat-own zchat-pending", {
      "data-client-id": entry.id,
      "data-author": model.get("user"),
    });
    const avatar = el("span", "zchat-avatar", { "aria-hidden": "true" });
    const body = el("div", "zchat-body");
    const meta = el("div", "zchat-meta");
    const author = el("span", "zchat-author");
    author.textContent = model.get("user");
    const state = el("span", "zchat-send-state");
    meta.append(author, state);
    const text = el("div", "zchat-text zchat-draft");
    text.textContent = entry.text; // shown as typed; the kernel renders the committed one
    const problem = el("div", "zchat-not-sent", { role: "alert" });
    problem.hidden = true;
    const why = el("span", "zchat-not-sent-why");
    const retry = el("button", "zchat-retry", { type: "button" });
    retry.textContent = "Retry";
    retry.addEventListener("click", () => resend(entry));
    const edit = el("button", "zchat-edit", { type: "button" });
    edit.textContent = "Edit";
    edit.addEventListener("click", () => editUnsent(entry));
    problem.append(why, retry, edit);
    body.append(meta, text, problem);
    node.append(avatar, body);
    return node;
  }

  function showState(entry, state, why = "") {
    entry.state = state;
    const node = entry.node;
    node.classList.toggle("zchat-pending", state === "pending");
    node.classList.toggle("zchat-sent", state === "sent");
    node.classList.toggle("zchat-failed", state === "failed");
    node.querySelector(".zchat-send-state").textContent =
      state === "pending" ? "sending…" : state === "sent" ? "sent" : "not sent";
    node.querySelector(".zchat-not-sent").hidden = state !== "failed";
    node.querySelector(".zchat-not-sent-why").textContent = why;
    clearTimeout(entry.timer);
    if (state === "pending") {
      entry.timer = setTimeout(() => {
        if (entry.state === "pending") {
          showState(entry, "failed", "no answer from the kernel. Retry sends it once, even if it did arrive.");
        }
      }, SEND_TIMEOUT_MS);
    }
  }

  function ask(entry) {
    showState(entry, "pending");
    if (entry.replyTo) {
      // A reply is sent like a message (same id on Retry, stored once), naming its parent.
      model.send({
        type: "amend",
        action: "reply",
        id: entry.replyTo,
        arg: entry.text,
        client_id: entry.id,
        room: entry.room,
      });
    } else {
      model.send({ type: "send", text: entry.text, client_id: entry.id, room: entry.room });
    }
  }

  function resend(entry) {
    if (outbox.get(entry.id) === entry && entry.state === "failed") ask(entry); // same id: stored once
  }

  function editUnsent(entry) {
    drop(entry);
    if (entry.replyTo) startReply(entry.replyTo); // still an answer to the same message
    // Nothing typed is lost: the unsent text goes back in front of whatever the box holds now.
    input.value = input.value ? `${entry.text}\n${input.value}` : entry.text;
    input.focus();
  }

  function drop(entry) {
    clearTimeout(entry.timer);
    entry.node.remove();
    outbox.delete(entry.id);
  }

  function settle(messageId) {
    // The committed message is here: the pending one goes (a message is shown once).
    for (const entry of outbox.values()) {
      if (entry.messageId === messageId) drop(entry);
    }
  }

  function restoreOutbox() {
    // After a reset: what is still unsent in this room goes back below the messages.
    for (const entry of [...outbox.values()]) {
      if (entry.room !== shownRoom) {
        entry.node.remove();
      } else if (entry.state === "sent") {
        drop(entry); // committed, and older than what the reset brought: it is in the history
      } else {
        list.append(entry.node);
      }
    }
  }

  function sendNow() {
    const text = input.value;
    if (!text.trim()) return;
    if (model.get("ask_name") && !nameInput.value.trim()) {
      nameInput.focus();
      nameInput.classList.add("zchat-name-missing");
      return; // the text stays in the box
    }
    const id = newMessageId();
    const entry = { id, messageId: id, text, room: shownRoom ?? model.get("room"), state: "", timer: null };
    entry.node = unsentNode(entry);
    if (boxMode && boxMode.kind === "reply") {
      entry.replyTo = boxMode.id;
      const body = entry.node.querySelector(".zchat-body");
      body.insertBefore(quoteNode(boxMode.reply), body.querySelector(".zchat-text"));
      endBoxMode();
    }
    outbox.set(id, entry);
    input.value = ""; // at once: the next message can be typed while this one is committed
    removeMarker();
    if (entry.room === shownRoom) list.append(entry.node);
    ask(entry);
    scrollToBottom();
  }

  function onSent(msg) {
    if (onAmendOutcome(msg)) return;
    const entry = outbox.get(msg.client_id);
    if (!entry) return;
    entry.messageId = msg.id;
    if (ids.has(msg.id)) drop(entry); // its "append" came first
    else showState(entry, "sent");
  }

  function onSendFailed(msg) {
    if (onAmendOutcome(msg)) return;
    const entry = outbox.get(msg.client_id);
    if (entry) showState(entry, "failed", msg.error);
  }

  // -- conversations: replies, edits, deletes, reactions, mentions ---------------------
  // Every action is an "amend" frame; the kernel commits it and every view gets the message's new
  // state in an "update" frame, which is drawn in place here. Names, quotes and first lines are
  // put in with textContent; only the kernel's sanitised message HTML goes in as HTML.

  const payloads = new Map(); // message id -> its latest payload, as shown
  const amends = new Map(); // client id -> the action asked (its outcome arrives as sent/send_failed)
  let boxMode = null; // {kind: "reply"|"edit", id, ...}: what Enter does with the box's text
  // Keys on messages, their buttons and the box's Cancel are the chat's, not notebook commands
  // (Lumino stops looking for a shortcut at the first element carrying this attribute).
  log.setAttribute("data-lm-suppress-shortcuts", "true");
  context.setAttribute("data-lm-suppress-shortcuts", "true");

  function messageById(id) {
    return list.querySelector(`.zchat-message[data-id="${CSS.escape(id)}"]`);
  }

  function amend(action, id, arg) {
    const clientId = newMessageId();
    amends.set(clientId, action);
    model.send({ type: "amend", action, id, arg, client_id: clientId, room: shownRoom });
  }

  function quoteNode(reply) {
    // The parent's author and first line, as text; a click (or Enter) jumps to the parent.
    const quote = el("button", "zchat-quote", { type: "button", "data-reply-to": reply.id });
    fillQuote(quote, reply);
    quote.addEventListener("click", () => jumpTo(reply.id));
    return quote;
  }

  function fillQuote(quote, reply) {
    const who = el("span", "zchat-quote-author");
    const line = el("span", "zchat-quote-text");
    if (reply.known === false) {
      line.textContent = "an earlier message";
    } else {
      who.textContent = reply.author;
      line.textContent = reply.deleted ? "message deleted" : reply.first_line;
    }
    quote.classList.toggle("zchat-quote-deleted", reply.deleted === true);
    quote.title = "Show the message this answers";
    quote.replaceChildren(who, line);
  }

  function jumpTo(id) {
    const target = messageById(id);
    if (!target) {
      error.textContent = "The message this answers is not loaded: use “Load older messages”.";
      error.hidden = false;
      return;
    }
    target.scrollIntoView({ block: "center" });
    target.focus({ preventScroll: true });
    target.classList.add("zchat-flash");
    setTimeout(() => target.classList.remove("zchat-flash"), FLASH_MS);
  }

  function decorateMessage(node, m) {
    // Runs once per message node: the parts a conversation adds, then their state.
    node.tabIndex = 0; // focusable: its actions show and are reachable by Tab
    const body = node.querySelector(".zchat-body");
    const text = node.querySelector(".zchat-text");
    if (m.reply_to) body.insertBefore(quoteNode(m.reply || { id: m.reply_to, known: false }), text);
    // After the text, not in the header: a run of one author's messages may share one header.
    const edited = el("span", "zchat-edited-mark");
    edited.textContent = "(edited)";
    const gone = el("div", "zchat-deleted-mark");
    gone.textContent = "message deleted";
    text.after(edited, gone);
    const reactions = el("div", "zchat-reactions");
    const actions = el("div", "zchat-actions", { role: "toolbar", "aria-label": "Message actions" });
    body.append(reactions, actions);
    showConversation(node, m);
  }

  function showConversation(node, m) {
    // The message's state (marks, reactions, actions) drawn from its payload; run again on updates.
    payloads.set(m.id, m);
    node.classList.toggle("zchat-deleted", m.deleted === true);
    node.classList.toggle("zchat-edited", m.edited === true && m.deleted !== true);
    const user = model.get("user");
    const mentionsMe = Array.isArray(m.mentions) && m.mentions.includes(user);
    node.classList.toggle("zchat-mentions-me", mentionsMe);
    // Drawn by CSS from the payload's boolean, never from the name's text: "bob ✓" stays unmarked.
    const author = node.querySelector(".zchat-author");
    author.classList.toggle("zchat-verified", m.verified === true);
    node.dataset.verified = String(m.verified === true); // a run shares a header only if this matches too
    author.title = m.verified === true ? "verified: signed with this person's classroom certificate" : "";
    const text = node.querySelector(".zchat-text");
    if (mentionsMe && !text.querySelector(".zchat-mention-me")) highlightMentions(text, user);
    showReactions(node, m);
    showActions(node, m);
    if (m.deleted === true) node.querySelector(".zchat-react-menu")?.remove();
  }

  function highlightMentions(container, user) {
    // Wraps each "@user" of the text (outside code) in a span; text nodes only, so nothing is parsed.
    const escaped = user.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const pattern = new RegExp(`(?<![\\w@])@${escaped}(?![A-Za-z0-9_-]|\\.[A-Za-z0-9_-])`, "g");
    const walker = document.createTreeWalker(container, NodeFilter.SHOW_TEXT);
    const found = [];
    for (let t = walker.nextNode(); t; t = walker.nextNode()) {
      if (!t.parentElement.closest("code, pre") && pattern.test(t.data)) found.push(t);
      pattern.lastIndex = 0;
    }
    for (const t of found) {
      const parts = [];
      let last = 0;
      for (const match of t.data.matchAll(pattern)) {
        parts.push(document.createTextNode(t.data.slice(last, match.index)));
        const span = el("span", "zchat-mention-me");
        span.textContent = match[0];
        parts.push(span);
        last = match.index + match[0].length;
      }
      parts.push(document.createTextNode(t.data.slice(last)));
      t.replaceWith(...parts);
    }
  }

  function showReactions(node, m) {
    const box = node.querySelector(".zchat-reactions");
    const user = model.get("user");
    const chips = [];
    for (const [emoji, users] of Object.entries(m.reactions || {})) {
      if (!Array.isArray(users) || !users.length) continue;
      const mine = users.includes(user);
      const chip = el("button", mine ? "zchat-reaction zchat-reaction-mine" : "zchat-reaction", {
        type: "button",
        "data-emoji": emoji,
        "aria-pressed": String(mine),
      });
      chip.title = `${users.join(", ")}${mine ? " (click to take yours back)" : ""}`;
      const face = el("span", "zchat-reaction-emoji");
      face.textContent = emoji;
      const count = el("span", "zchat-reaction-count");
      count.textContent = String(users.length);
      chip.append(face, count);
      chip.disabled = m.deleted === true;
      chip.addEventListener("click", () => amend(mine ? "unreact" : "react", m.id, emoji));
      chips.push(chip);
    }
    box.replaceChildren(...chips);
    box.hidden = chips.length === 0;
  }

  function actionButton(className, label, onClick) {
    const button = el("button", `zchat-action ${className}`, {
      type: "button",
      title: label,
      "aria-label": label,
      "data-label": label, // drawn by CSS: copying a message's text does not copy its buttons
    });
    button.addEventListener("click", onClick);
    return button;
  }

  function showActions(node, m) {
    const actions = node.querySelector(".zchat-actions");
    const buttons = [];
    if (m.deleted !== true) {
      buttons.push(actionButton("zchat-action-reply", "Reply", () => startReply(m.id)));
      buttons.push(actionButton("zchat-action-react", "React", () => toggleReactMenu(node, m.id)));
      if (m.own) buttons.push(actionButton("zchat-action-edit", "Edit", () => startEdit(m.id)));
      if (m.own || model.get("moderator")) {
        buttons.push(actionButton("zchat-action-delete", "Delete", () => amend("delete", m.id, "")));
      }
    }
    actions.replaceChildren(...buttons);
  }

  function toggleReactMenu(node, id) {
    const open = node.querySelector(".zchat-react-menu");
    if (open) {
      open.remove();
      return;
    }
    const menu = el("div", "zchat-react-menu", { role: "menu", "aria-label": "React with" });
    for (const emoji of REACTIONS) {
      const choice = el("button", "zchat-react-choice", {
        type: "button",
        role: "menuitem",
        "data-emoji": emoji,
      });
      choice.textContent = emoji;
      choice.title = `React with ${emoji}`;
      choice.addEventListener("click", () => {
        menu.remove();
        amend("react", id, emoji);
        node.focus({ preventScroll: true });
      });
      menu.append(choice);
    }
    menu.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        menu.remove();
        node.querySelector(".zchat-action-react")?.focus();
      }
    });
    node.querySelector(".zchat-actions").after(menu);
    menu.querySelector("button").focus();
  }

  function applyUpdates(messages) {
    // Messages shown earlier, in their new state: redrawn in place, and so are quotes of them.
    for (const m of messages) {
      const node = messageById(m.id);
      if (!node) continue;
      const text = node.querySelector(".zchat-text");
      text.innerHTML = m.html; // sanitised in the kernel by zchat_nb.render (nh3 allow-list)
      decorateCode(text);
      if (m.deleted) for (const figure of node.querySelectorAll(".zchat-attachment")) figure.remove();
      showConversation(node, m);
      for (const quote of list.querySelectorAll(`.zchat-quote[data-reply-to="${CSS.escape(m.id)}"]`)) {
        fillQuote(quote, { ...m, known: true }); // a quote shows its author, first line and deleted
      }
      if (boxMode && boxMode.id === m.id && m.deleted) endBoxMode(); // nothing left to answer or edit
    }
  }

  function redrawConversations() {
    // The user or the moderator flag changed: who may edit or delete what, whose reactions are whose.
    for (const node of list.querySelectorAll(".zchat-message[data-id]")) {
      const m = payloads.get(node.dataset.id);
      if (m) showConversation(node, m);
    }
  }

  function showBoxMode(label, author, line) {
    const who = el("strong", "zchat-context-author");
    who.textContent = author;
    const what = el("span", "zchat-context-line");
    what.textContent = line;
    const lead = document.createTextNode(label);
    contextText.replaceChildren(lead, who, document.createTextNode(author ? ": " : ""), what);
    context.hidden = false;
    input.focus();
  }

  function startReply(id) {
    const m = payloads.get(id);
    if (!m || m.deleted) return;
    if (boxMode && boxMode.kind === "edit") endBoxMode();
    boxMode = { kind: "reply", id, reply: { id, author: m.author, first_line: m.first_line, known: true } };
    context.dataset.mode = "reply";
    showBoxMode("Replying to ", m.author, m.first_line);
  }

  function startEdit(id) {
    const m = payloads.get(id);
    if (!m || !m.own || m.deleted) return;
    const stash = boxMode && boxMode.kind === "edit" ? boxMode.stash : input.value;
    boxMode = { kind: "edit", id, stash, source: m.source };
    context.dataset.mode = "edit";
    input.value = m.source;
    showBoxMode("Editing your message — Enter saves, Escape cancels", "", "");
    input.setSelectionRange(input.value.length, input.value.length);
  }

  function endBoxMode() {
    // Back to sending new messages; what was in the box before an edit comes back.
    if (boxMode && boxMode.kind === "edit") input.value = boxMode.stash;
    boxMode = null;
    context.hidden = true;
    delete context.dataset.mode;
    contextText.replaceChildren();
  }

  function saveEdit() {
    const { id, source } = boxMode;
    const text = input.value;
    if (!text.trim()) return; // an empty edit is not a delete: the box keeps the mode
    if (text !== source) amend("edit", id, text);
    endBoxMode();
  }

  function editLastOwn() {
    // Up arrow in an empty box: the newest of your messages that is still there.
    const own = list.querySelectorAll(".zchat-message.zchat-own[data-id]:not(.zchat-deleted)");
    if (!own.length) return false;
    startEdit(own[own.length - 1].dataset.id);
    return true;
  }

  function submitBox() {
    if (boxMode && boxMode.kind === "edit") saveEdit();
    else sendNow();
  }

  function onAmendOutcome(msg) {
    // An amend's outcome; a failure also shows in the error line (the kernel sets it).
    return amends.delete(msg.client_id);
  }

  // -- the visitor's name (ask_name) -----------------------------------------------------
  function updateAskName() {
    nameInput.hidden = !model.get("ask_name");
  }

  function chooseName() {
    const name = nameInput.value.trim();
    if (!name || !model.get("ask_name")) return;
    nameInput.classList.remove("zchat-name-missing");
    storeName(name);
    model.send({ type: "name", name });
  }

  function updateUser() {
    if (model.get("ask_name") && document.activeElement !== nameInput && nameInput.value.trim()) {
      nameInput.value = model.get("user"); // what the kernel accepted (trimmed)
    }
  }

  // -- rooms ---------------------------------------------------------------------------
  function switchRoom(name) {
    const room = name.trim();
    if (!room || room.length > 64 || room === model.get("room")) return;
    model.set("room", room);
    model.save_changes();
  }

  function updateRooms() {
    const current = model.get("room");
    const names = [...new Set([...(model.get("rooms") || []), current])].sort();
    const unread = model.get("unread") || {};
    roomsBar.replaceChildren(
      ...names.map((name) => {
        const active = name === current;
        const tab = el("button", active ? "zchat-room zchat-room-active" : "zchat-room", {
          type: "button",
          role: "tab",
          "aria-selected": String(active),
          "data-room": name,
        });
        const label = el("span", "zchat-room-name");
        label.textContent = name;
        tab.append(label);
        const count = unread[name] || 0;
        if (count > 0 && !active) {
          const badge = el("span", "zchat-unread-count", { "aria-label": `${count} unread` });
          badge.textContent = count > 99 ? "99+" : String(count);
          tab.append(badge);
        }
        const mentions = (model.get("unread_mentions") || {})[name] || 0;
        if (mentions > 0 && !active) {
          const badge = el("span", "zchat-mention-count", { "aria-label": `${mentions} mentioning you` });
          badge.textContent = `@${mentions > 99 ? "99+" : mentions}`;
          tab.append(badge);
        }
        tab.addEventListener("click", () => switchRoom(name));
        return tab;
      }),
    );
  }

  function updateStatus() {
    status.dataset.status = model.get("status");
    status.textContent = model.get("status_text");
    root.dataset.status = model.get("status");
  }

  function updatePresence() {
    const names = model.get("present") || [];
    const shown = names.slice(0, 5).join(", ") + (names.length > 5 ? ` +${names.length - 5}` : "");
    presence.textContent = names.length ? `here: ${shown}` : "";
    presence.title = names.join(", ");
  }

  function updateError() {
    const text = model.get("error");
    error.textContent = text;
    error.hidden = !text;
  }

  function updateHeight() {
    log.style.height = model.get("height");
  }

  // -- events --------------------------------------------------------------------------
  function onCustom(msg, buffers) {
    if (!msg || typeof msg !== "object" || typeof msg.type !== "string") return;
    if (msg.view && msg.view !== viewId) return; // an answer to another view
    switch (msg.type) {
      case "reset":
        reset(msg);
        break;
      case "append":
        if (msg.room === shownRoom) append(msg.messages);
        break;
      case "older":
        if (msg.room === shownRoom) prepend(msg.messages, msg.more);
        break;
      case "sent":
        onSent(msg);
        break;
      case "send_failed":
        onSendFailed(msg);
        break;
      case "update":
        if (msg.room === shownRoom && Array.isArray(msg.messages)) applyUpdates(msg.messages);
        break;
      case "attachment":
        onAttachment(msg, buffers);
        break;
    }
  }

  input.addEventListener("keydown", (event) => {
    event.stopPropagation(); // keep JupyterLab's notebook shortcuts out of the text box
    const plainEnter =
      event.key === "Enter" && !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey;
    if (plainEnter && !event.isComposing) {
      event.preventDefault();
      submitBox();
    } else if (event.key === "Escape" && boxMode) {
      event.preventDefault();
      endBoxMode();
    } else if (event.key === "ArrowUp" && input.value === "" && !boxMode && !event.shiftKey) {
      if (editLastOwn()) event.preventDefault();
    }
  });
  sendButton.addEventListener("click", submitBox);
  contextCancel.addEventListener("click", () => {
    endBoxMode();
    input.focus();
  });
  input.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return; // text: the box takes it as usual
    event.preventDefault();
    files.forEach(shareFile);
  });
  input.addEventListener("dragover", (event) => {
    if ([...(event.dataTransfer?.types || [])].includes("Files")) {
      event.preventDefault();
      compose.classList.add("zchat-drop");
    }
  });
  input.addEventListener("dragleave", () => compose.classList.remove("zchat-drop"));
  input.addEventListener("drop", (event) => {
    compose.classList.remove("zchat-drop");
    const files = [...(event.dataTransfer?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    event.stopPropagation(); // not into the notebook, which would open the file
    files.forEach(shareFile);
  });
  nameInput.addEventListener("keydown", (event) => {
    event.stopPropagation();
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      chooseName();
      input.focus();
    }
  });
  nameInput.addEventListener("change", chooseName);
  roomInput.addEventListener("keydown", (event) => {
    event.stopPropagation();
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      switchRoom(roomInput.value);
      roomInput.value = "";
    }
  });
  older.addEventListener("click", () => {
    const first = list.querySelector(".zchat-message");
    if (!first) return;
    older.disabled = true;
    model.send({
      type: "older",
      view: viewId,
      room: shownRoom,
      before: { id: first.dataset.id, ts: Number(first.dataset.ts) },
    });
  });
  jump.addEventListener("click", () => {
    scrollToBottom();
    unseen = 0;
    updateJump();
  });
  log.addEventListener("scroll", () => {
    if (unseen > 0 && atBottom()) {
      unseen = 0;
      updateJump();
    }
  });

  const listeners = [
    ["msg:custom", onCustom],
    ["change:rooms", updateRooms],
    ["change:unread", updateRooms],
    ["change:unread_mentions", updateRooms],
    ["change:moderator", redrawConversations],
    ["change:room", updateRooms],
    ["change:status", updateStatus],
    ["change:status_text", updateStatus],
    ["change:error", updateError],
    ["change:present", updatePresence],
    ["change:height", updateHeight],
    ["change:ask_name", updateAskName],
    ["change:user", updateUser],
    ["change:user", redrawConversations],
  ];
  for (const [name, callback] of listeners) model.on(name, callback);

  updateRooms();
  updateStatus();
  updatePresence();
  updateError();
  updateHeight();
  updateAskName();
  nameInput.value = storedName();
  if (model.get("ask_name") && nameInput.value.trim()) chooseName(); // remembered: nothing is posted
  model.send({ type: "hello", view: viewId }); // the kernel answers with this view's first messages

  return () => {
    for (const [name, callback] of listeners) model.off(name, callback);
    for (const entry of outbox.values()) clearTimeout(entry.timer);
    forgetAttachments();
  };
}

export default { render };
