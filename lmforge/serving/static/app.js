"use strict";
// The chat page of `lmforge serve`: plain JavaScript, no framework, no build step, nothing from the network
// but this server. Model and user text only ever go through textContent, never innerHTML, so nothing a
// model writes can run or render as HTML.

const STORE_CONVERSATIONS = "lmforge.chat.conversations";
const STORE_SETTINGS = "lmforge.chat.settings";
const STORE_API_KEY = "lmforge.chat.apiKey";
const MAX_SAVED_CONVERSATIONS = 50;
const SETTING_IDS = ["temperature", "top-p", "max-tokens"];

const byId = (id) => document.getElementById(id);

let conversations = readStored(STORE_CONVERSATIONS, []);  // {id, title, system, messages, updated, context_start}
let current = null;  // the conversation on screen
let modelId = null;  // from GET /v1/models, sent with every request
let streaming = null;  // {controller, conversation} while a reply streams

// Storage. localStorage can be missing, full or disabled: the page then works without history.

function readStored(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null || value === undefined ? fallback : value;
  } catch {
    return fallback;
  }
}

function store(key, value) {
  try {
    localStorage.setItem(key, typeof value === "string" ? value : JSON.stringify(value));
  } catch {
    // Not saved; the conversation on screen is unaffected.
  }
}

function saveConversations() {
  const kept = conversations.filter((conversation) => conversation.messages.length);
  kept.sort((a, b) => b.updated - a.updated);
  store(STORE_CONVERSATIONS, kept.slice(0, MAX_SAVED_CONVERSATIONS));
}

function apiKey() {
  try {
    return localStorage.getItem(STORE_API_KEY) || "";
  } catch {
    return "";
  }
}

function randomId() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http to a LAN address too.
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

// Talking to the server (same origin only: every URL is a path).

function headers() {
  const key = apiKey();
  return key ? {"Content-Type": "application/json", "Authorization": `Bearer ${key}`} : {"Content-Type": "application/json"};
}

async function errorFrom(response) {
  // The server answers errors as {"error": {"message", "type", "param", "code"}}.
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const data = await response.json();
    if (data && data.error) {
      message = data.error.message || data.error;
      code = data.error.code || null;
    }
  } catch {
    // Not JSON: keep the status line.
  }
  if (response.status === 401) {
    byId("api-key-form").hidden = false;
    message = `${message} (enter the server's API key above)`;
  }
  return Object.assign(new Error(message), {status: response.status, code});
}

async function postJson(path, body, signal) {
  const response = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (!response.ok) throw await errorFrom(response);
    const models = (await response.json()).data || [];
    if (!models.length) throw new Error("the server lists no model");
    modelId = models[0].id;
    byId("model-name").textContent = modelId;
    byId("api-key-form").hidden = true;
  } catch (error) {
    byId("model-name").textContent = "not connected";
    showError(error);
  }
}

// Reads a text/event-stream of chat completion chunks, calling onDelta with each piece of reply text.
// Returns the finish reason; throws if the stream reports an error or ends before `data: [DONE]`.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finishReason = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) throw new Error("the connection closed before the reply was complete");
    buffer += decoder.decode(value, {stream: true});
    const lines = buffer.split("\n");
    buffer = lines.pop();  // an incomplete last line waits for the next read
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;  // blank separators and ": keep-alive" comments
      const data = line.slice(5).trim();
      if (data === "[DONE]") return finishReason;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      const choice = (chunk.choices || [])[0] || {};
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  }
}

// Conversations.

function newConversation() {
  return {id: randomId(), title: "", system: byId("system-prompt").value, messages: [], updated: Date.now()};
}

// What the model sees: the system prompt, then messages[start, end), as role and content only.
function requestMessages(conversation, start, end) {
  const messages = conversation.messages.slice(start, end).map(({role, content}) => ({role, content}));
  return conversation.system.trim() ? [{role: "system", content: conversation.system}, ...messages] : messages;
}

function optionalNumber(id) {
  const value = byId(id).value.trim();
  return value === "" || Number.isNaN(Number(value)) ? undefined : Number(value);
}

function sampling() {
  const settings = {temperature: optionalNumber("temperature"), top_p: optionalNumber("top-p"), max_tokens: optionalNumber("max-tokens")};
  return Object.fromEntries(Object.entries(settings).filter(([, value]) => value !== undefined));
}

async function send(text) {
  clearError();
  const conversation = current;
  if (!conversations.includes(conversation)) conversations.unshift(conversation);
  if (!conversation.title) conversation.title = text.trim().slice(0, 60);
  const reply = {role: "assistant", content: ""};
  conversation.messages.push({role: "user", content: text}, reply);
  renderConversation();
  const view = byId("messages").lastElementChild;
  const replyText = view.querySelector(".text");
  view.dataset.state = "streaming";
  const controller = new AbortController();
  setStreaming({controller, conversation});
  let failure = null;
  try {
    const response = await requestReply(conversation, reply, controller.signal);
    reply.finish_reason = await readStream(response, (delta) => {
      reply.content += delta;
      replyText.textContent = reply.content;
      keepScrolledDown();
    });
  } catch (error) {
    if (error.name === "AbortError") reply.stopped = true;
    else failure = error;
  }
  setStreaming(null);
  if (!reply.content) {
    // Nothing came back (an error, or stopped at once): undo the turn and give the text back to edit or resend.
    conversation.messages.splice(-2, 2);
    if (!byId("message").value) byId("message").value = text;
  }
  if (failure) showError(failure);
  conversation.updated = Date.now();
  saveConversations();
  if (conversation === current) renderConversation();
  renderSidebar();
}

// Asks for the reply to the conversation's last user message. When the server says the conversation no
// longer fits the model's context, the oldest turns are left out of the request (they stay on screen)
// until it fits; reply.context_start records the first message the model was given.
async function requestReply(conversation, reply, signal) {
  const end = conversation.messages.length - 1;  // the reply itself is not sent
  reply.context_start = Math.min(conversation.context_start || 0, end - 1);
  for (;;) {
    const body = {model: modelId, messages: requestMessages(conversation, reply.context_start, end), stream: true, ...sampling()};
    try {
      const response = await postJson("/v1/chat/completions", body, signal);
      conversation.context_start = reply.context_start;
      return response;
    } catch (error) {
      if (error.code !== "context_length_exceeded" || reply.context_start + 2 >= end) throw error;
      reply.context_start += 2;  // a user message and its reply
    }
  }
}

async function rate(conversation, index, rating) {
  clearError();
  const message = conversation.messages[index];
  // The feedback holds the conversation as the model saw it when it wrote this reply.
  const messages = requestMessages(conversation, message.context_start || 0, index + 1);
  try {
    await postJson("/v1/feedback", {conversation_id: conversation.id, messages, rating});
    message.rating = rating;
    saveConversations();
  } catch (error) {
    showError(error);
  }
  if (conversation === current) renderConversation();
}

function stopStreaming() {
  if (streaming) streaming.controller.abort();
}

function openConversation(conversation) {
  stopStreaming();
  current = conversation;
  byId("system-prompt").value = conversation.system;
  clearError();
  renderConversation();
  renderSidebar();
}

function removeConversation(conversation) {
  if (streaming && streaming.conversation === conversation) stopStreaming();
  conversations = conversations.filter((other) => other !== conversation);
  saveConversations();
  if (conversation === current) openConversation(newConversation());
  else renderSidebar();
}

// Rendering: elements built with textContent only.

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function feedbackButtons(conversation, index) {
  const message = conversation.messages[index];
  const box = element("div", undefined, "feedback");
  for (const [rating, caption, label] of [["up", "\u{1F44D} Good", "Good reply"], ["down", "\u{1F44E} Bad", "Bad reply"]]) {
    const button = element("button", caption, `rate rate-${rating}`);
    button.type = "button";
    button.dataset.rating = rating;
    button.setAttribute("aria-label", label);
    button.title = `${label}: save this conversation as feedback`;
    button.setAttribute("aria-pressed", String(message.rating === rating));
    button.addEventListener("click", () => rate(conversation, index, rating));
    box.append(button);
  }
  if (message.rating) box.append(element("span", `Saved: ${message.rating === "up" ? "good" : "bad"} reply`, "feedback-status"));
  return box;
}

function renderConversation() {
  const list = byId("messages");
  list.replaceChildren(...current.messages.map((message, index) => {
    const item = element("li", undefined, `message ${message.role}`);
    item.append(element("div", message.role === "user" ? "You" : "Assistant", "role"), element("div", message.content, "text"));
    if (message.role === "assistant") {
      item.dataset.state = message.stopped ? "stopped" : "done";
      if (message.context_start) {
        item.append(element("div", `The ${message.context_start} oldest messages were left out: the model's context is full.`, "note"));
      }
      if (message.stopped) item.append(element("div", "Stopped.", "note"));
      else if (message.finish_reason === "length") item.append(element("div", "Cut at the token limit.", "note"));
      item.append(feedbackButtons(current, index));
    }
    return item;
  }));
  keepScrolledDown(true);
}

function renderSidebar() {
  const list = byId("conversations");
  const shown = conversations.filter((conversation) => conversation.messages.length).sort((a, b) => b.updated - a.updated);
  list.replaceChildren(...shown.map((conversation) => {
    const item = element("li");
    const openButton = element("button", conversation.title || "(untitled)", "open-conversation");
    openButton.type = "button";
    if (conversation === current) openButton.setAttribute("aria-current", "true");
    openButton.addEventListener("click", () => openConversation(conversation));
    const deleteButton = element("button", "\u00D7", "delete-conversation");
    deleteButton.type = "button";
    deleteButton.setAttribute("aria-label", `Delete conversation: ${conversation.title || "untitled"}`);
    deleteButton.addEventListener("click", () => removeConversation(conversation));
    item.append(openButton, deleteButton);
    return item;
  }));
}

function keepScrolledDown(always) {
  const list = byId("messages");
  // Follow the reply only while the reader is at the bottom; scrolling up to reread is not fought.
  if (always || list.scrollHeight - list.scrollTop - list.clientHeight < 80) list.scrollTop = list.scrollHeight;
}

function setStreaming(value) {
  streaming = value;
  byId("send").disabled = Boolean(value);
  byId("stop").hidden = !value;
  // Screen readers announce the reply once it is complete, not token by token.
  byId("messages").setAttribute("aria-busy", String(Boolean(value)));
  document.querySelectorAll("#messages .rate").forEach((button) => { button.disabled = Boolean(value); });
}

function showError(error) {
  byId("error").textContent = String(error && error.message ? error.message : error);
}

function clearError() {
  byId("error").textContent = "";
}

// Wiring.

function restoreSettings() {
  const settings = readStored(STORE_SETTINGS, {});
  for (const id of SETTING_IDS) {
    if (typeof settings[id] === "string") byId(id).value = settings[id];
    byId(id).addEventListener("change", () => {
      store(STORE_SETTINGS, Object.fromEntries(SETTING_IDS.map((name) => [name, byId(name).value])));
    });
  }
}

// Whatever an older page (or a hand edit) left in storage: keep only conversations this page can show.
function checkedConversations(stored) {
  const isMessage = (message) => message && ["user", "assistant"].includes(message.role);
  return (Array.isArray(stored) ? stored : [])
    .filter((conversation) => conversation && typeof conversation.id === "string" && Array.isArray(conversation.messages))
    .map((conversation) => ({
      ...conversation,
      title: String(conversation.title || ""),
      system: String(conversation.system || ""),
      updated: Number(conversation.updated) || 0,
      context_start: Number(conversation.context_start) || 0,
      messages: conversation.messages.filter(isMessage).map((message) => ({...message, content: String(message.content)})),
    }));
}

function start() {
  conversations = checkedConversations(conversations);
  restoreSettings();
  byId("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = byId("message").value;
    if (streaming || !text.trim()) return;
    byId("message").value = "";
    send(text);
  });
  byId("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      byId("composer").requestSubmit();
    }
  });
  byId("stop").addEventListener("click", stopStreaming);
  byId("new-chat").addEventListener("click", () => openConversation(newConversation()));
  byId("system-prompt").addEventListener("input", () => {
    current.system = byId("system-prompt").value;
    if (current.messages.length) saveConversations();
  });
  byId("api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    store(STORE_API_KEY, byId("api-key").value.trim());
    byId("api-key").value = "";
    clearError();
    loadModel();
  });
  openConversation(newConversation());
  loadModel();
  byId("message").focus();
}

start();
