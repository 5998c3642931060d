// diffalign label: turns a ranking, a best/worst choice, thumbs or a pair choice into one label line
// {"prompt_id", "annotator", "scores": [one number per image, higher = better], "mode"} and POSTs it.
// No framework, no build step. User strings (prompts, names, server messages) only ever go into textContent.
"use strict";

const NAME_KEY = "diffalign-label-annotator";
const NAME_RE = /^[A-Za-z0-9_. -]{1,64}$/;
const $ = (id) => document.getElementById(id);

const state = {
  annotator: "", mode: "", perPrompt: 0, total: 0, done: 0,
  items: [],      // prompts still to label, the current one first
  sel: null,      // the current prompt's choices so far (shape depends on the mode)
  busy: false,
};

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function api(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(url, init);
  let data = null;
  try { data = await res.json(); } catch (e) { data = { error: `${res.status} ${res.statusText}` }; }
  return { ok: res.ok, status: res.status, data };
}

// ----- modes: each turns clicks/keys into state.sel, and state.sel into scores (null until complete) -----
const digit = (e) => (/^Digit[1-9]$/.test(e.code) ? Number(e.code.slice(5)) - 1 : null);

const MODES = {
  rank: {
    instructions: "Click the images from best to worst (or press their numbers). The last one is placed for you.",
    keys: [["1 … 9", "next place: that image"], ["Backspace", "take back the last place"], ["Esc", "start over"],
           ["Enter", "save the ranking"]],
    start: (k) => ({ order: [], auto: false, k }),
    pick(sel, i) {
      const at = sel.order.indexOf(i);
      if (at >= 0) { sel.order.splice(at, 1); sel.auto = false; return; }
      sel.order.push(i);
      if (sel.order.length === sel.k - 1) {  // one left: its place is known
        for (let j = 0; j < sel.k; j++) if (!sel.order.includes(j)) sel.order.push(j);
        sel.auto = true;
      }
    },
    back(sel) { sel.order.splice(sel.auto ? -2 : -1); sel.auto = false; },
    key(sel, e) {
      const d = digit(e);
      if (d !== null && d < sel.k) { this.pick(sel, d); return true; }
      if (e.key === "Backspace") { this.back(sel); return true; }
      if (e.key === "Escape") { sel.order = []; sel.auto = false; return true; }
      return false;
    },
    badge(sel, i) {
      const at = sel.order.indexOf(i);
      if (at < 0) return ["", ""];
      const name = at === 0 ? " (best)" : at === sel.k - 1 ? " (worst)" : "";
      return ["ranked", `#${at + 1}${name}`];
    },
    scores: (sel) => (sel.order.length === sel.k
      ? Array.from({ length: sel.k }, (_, i) => sel.k - 1 - sel.order.indexOf(i)) : null),
    hint: (sel) => (sel.order.length === sel.k ? "Ranking complete: press Enter to save." :
      `Choose place ${sel.order.length + 1} of ${sel.k}.`),
  },
  "best-worst": {
    instructions: "Choose the best image, then the worst (click or press their numbers).",
    keys: [["1 … 9", "best, then worst: that image"], ["Backspace", "take back the last choice"],
           ["Esc", "start over"], ["Enter", "save"]],
    start: (k) => ({ best: null, worst: null, k }),
    pick(sel, i) {
      if (sel.best === i) { sel.best = null; return; }
      if (sel.worst === i) { sel.worst = null; return; }
      if (sel.best === null) sel.best = i;
      else if (sel.worst === null) sel.worst = i;
      if (sel.k === 2 && sel.best !== null && sel.worst === null) sel.worst = 1 - sel.best;
    },
    back(sel) { if (sel.worst !== null) sel.worst = null; else sel.best = null; },
    key(sel, e) {
      const d = digit(e);
      if (d !== null && d < sel.k) { this.pick(sel, d); return true; }
      if (e.key === "Backspace") { this.back(sel); return true; }
      if (e.key === "Escape") { sel.best = null; sel.worst = null; return true; }
      return false;
    },
    badge: (sel, i) => (i === sel.best ? ["best", "best"] : i === sel.worst ? ["worst", "worst"] : ["", ""]),
    scores: (sel) => (sel.best === null || sel.worst === null ? null
      : Array.from({ length: sel.k }, (_, i) => (i === sel.best ? 1 : i === sel.worst ? 0 : 0.5))),
    hint: (sel) => (sel.best === null ? "Choose the BEST image." : sel.worst === null ? "Now choose the WORST image."
      : "Press Enter to save."),
  },
  thumbs: {
    instructions: "Mark every image up (good) or down (bad). The dashed frame is the cursor for the keys.",
    keys: [["← →", "move the cursor"], ["1 … 9", "cursor to that image"], ["u or ↑", "up, then next"],
           ["d or ↓", "down, then next"], ["Esc", "clear"], ["Enter", "save"]],
    start: (k) => ({ votes: new Array(k).fill(null), cursor: 0, k }),
    pick(sel, i) { sel.cursor = i; },
    vote(sel, i, v) { sel.votes[i] = v; sel.cursor = Math.min(i + 1, sel.k - 1); },
    key(sel, e) {
      const d = digit(e);
      if (d !== null && d < sel.k) { sel.cursor = d; return true; }
      if (e.key === "ArrowLeft") { sel.cursor = Math.max(0, sel.cursor - 1); return true; }
      if (e.key === "ArrowRight") { sel.cursor = Math.min(sel.k - 1, sel.cursor + 1); return true; }
      if (e.key === "u" || e.key === "ArrowUp") { this.vote(sel, sel.cursor, 1); return true; }
      if (e.key === "d" || e.key === "ArrowDown") { this.vote(sel, sel.cursor, 0); return true; }
      if (e.key === "Escape") { sel.votes.fill(null); sel.cursor = 0; return true; }
      return false;
    },
    badge: (sel, i) => (sel.votes[i] === 1 ? ["up", "▲ up"] : sel.votes[i] === 0 ? ["down", "▼ down"] : ["", ""]),
    scores: (sel) => (sel.votes.includes(null) ? null : sel.votes.slice()),
    hint: (sel) => {
      const left = sel.votes.filter((v) => v === null).length;
      return left ? `${left} image(s) left to mark.` : "All marked: press Enter to save.";
    },
  },
  pair: {
    instructions: "Which image is better? Choose left, right, or a tie; it is saved at once.",
    keys: [["1 or ←", "left is better"], ["2 or →", "right is better"], ["t or =", "tie"]],
    start: (k) => ({ k }),
    choose(sel, which) {  // 0 left, 1 right, 2 tie
      submit(which === 2 ? [0.5, 0.5] : which === 0 ? [1, 0] : [0, 1]);
    },
    pick(sel, i) { this.choose(sel, i); },
    key(sel, e) {
      if (e.code === "Digit1" || e.key === "ArrowLeft") { this.choose(sel, 0); return true; }
      if (e.code === "Digit2" || e.key === "ArrowRight") { this.choose(sel, 1); return true; }
      if (e.key === "t" || e.key === "=") { this.choose(sel, 2); return true; }
      return false;
    },
    badge: (sel, i) => ["", i === 0 ? "left (1)" : "right (2)"],
    scores: () => null,  // saved by the choice itself
    hint: () => "",
  },
};
const COMMON_KEYS = [["z", "undo your last label (shows that prompt again)"]];

// ----- rendering -----
function mode() { return MODES[state.mode]; }

function renderKeys() {
  const dl = $("keys");
  dl.replaceChildren();
  for (const [k, what] of [...(mode() ? mode().keys : []), ...COMMON_KEYS]) {
    const dt = el("dt");
    dt.append(el("kbd", {}, k));
    dl.append(dt, el("dd", {}, what));
  }
}

function renderProgress() {
  $("progress").textContent = state.total ? `${state.done} / ${state.total}` : "";
}

function renderItem() {
  const item = state.items[0];
  renderProgress();
  document.body.dataset.promptId = item ? String(item.prompt_id) : "";
  $("task").hidden = !item;
  $("finished").hidden = !!item;
  if (!item) {
    document.body.dataset.state = "finished";
    $("finished").textContent = `All ${state.total} prompts are labelled by ${state.annotator}. ` +
      "The labels are saved; you may close this page (or undo with z).";
    return;
  }
  document.body.dataset.state = "ready";
  $("instructions").textContent = mode().instructions;
  $("prompt-id").textContent = `${item.prompt_id} (${state.done + 1} of ${state.total})`;
  $("prompt").textContent = item.prompt;
  const images = $("images");
  images.replaceChildren();
  item.images.forEach((src, i) => {
    const card = el("div", { class: "card", "data-index": String(i) });
    const pick = el("button", { type: "button", class: "pick", title: `image ${i + 1} (key ${i + 1})` });
    pick.append(el("img", { src, alt: `image ${i + 1} of prompt ${item.prompt_id}` }));
    pick.addEventListener("click", () => { act(() => mode().pick(state.sel, i)); });
    const caption = el("div", { class: "caption" });
    caption.append(el("span", {}, `${i + 1}`), el("span", { class: "badge" }));
    card.append(pick, caption);
    if (state.mode === "thumbs") {
      const votes = el("div", { class: "votes" });
      const up = el("button", { type: "button", class: "up-button" }, "▲ up");
      const down = el("button", { type: "button", class: "down-button" }, "▼ down");
      up.addEventListener("click", () => act(() => mode().vote(state.sel, i, 1)));
      down.addEventListener("click", () => act(() => mode().vote(state.sel, i, 0)));
      votes.append(up, down);
      card.append(votes);
    }
    images.append(card);
  });
  const controls = $("controls");
  controls.replaceChildren();
  if (state.mode === "pair") {
    const tie = el("button", { type: "button", id: "tie" }, "Tie (t)");
    tie.addEventListener("click", () => mode().choose(state.sel, 2));
    controls.append(tie);
  } else {
    const save = el("button", { type: "button", id: "save" }, "Save (Enter)");
    save.addEventListener("click", () => saveCurrent());
    const clear = el("button", { type: "button", id: "clear" }, "Start over (Esc)");
    clear.addEventListener("click", () => act(() => { state.sel = mode().start(state.perPrompt); }));
    controls.append(save, clear, el("span", { id: "hint" }));
  }
  renderSelection();
}

function renderSelection() {
  const m = mode();
  document.querySelectorAll("#images .card").forEach((card) => {
    const i = Number(card.dataset.index);
    const [cls, text] = m.badge(state.sel, i);
    card.className = "card" + (cls ? ` ${cls}` : "") + (state.mode === "thumbs" && state.sel.cursor === i ? " cursor" : "");
    card.querySelector(".badge").textContent = text;
  });
  const save = $("save");
  if (save) save.disabled = m.scores(state.sel) === null;
  const hint = $("hint");
  if (hint) hint.textContent = m.hint(state.sel);
}

function act(change) {  // a click or key on the current prompt: apply, then redraw the choices
  if (!state.items.length || state.busy) return;
  change();
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  renderSelection();
}

// ----- talking to the server -----
async function loadItems(first = null) {
  document.body.dataset.state = "loading";
  const r = await api("GET", `/api/items?annotator=${encodeURIComponent(state.annotator)}`);
  if (!r.ok) { setStatus(r.data.error, true); document.body.dataset.state = "error"; return; }
  Object.assign(state, { mode: r.data.mode, perPrompt: r.data.per_prompt, total: r.data.total,
                         done: r.data.done, items: r.data.items });
  if (first !== null) {  // an undone prompt comes back first
    const at = state.items.findIndex((it) => it.prompt_id === first);
    if (at > 0) state.items.unshift(...state.items.splice(at, 1));
  }
  state.sel = mode().start(state.perPrompt);
  renderKeys();
  renderItem();
}

function saveCurrent() {
  const scores = mode().scores(state.sel);
  if (scores === null) { setStatus(mode().hint(state.sel) || "not complete yet", true); return; }
  submit(scores);
}

async function submit(scores) {
  const item = state.items[0];
  if (!item || state.busy) return;
  state.busy = true;
  try {
    const r = await api("POST", "/api/labels",
                        { prompt_id: item.prompt_id, annotator: state.annotator, scores, mode: state.mode });
    if (r.ok) {
      state.items.shift();
      state.done += 1;
      state.sel = mode().start(state.perPrompt);
      setStatus(`saved prompt ${item.prompt_id}: scores ${JSON.stringify(r.data.scores)}`);
      renderItem();
    } else if (r.status === 409) {  // labelled meanwhile (another tab): move on
      setStatus(r.data.error, true);
      await loadItems();
    } else {
      setStatus(`not saved: ${r.data.error}`, true);
    }
  } catch (e) {
    setStatus(`not saved: the server cannot be reached (${e.message})`, true);
  } finally {
    state.busy = false;
  }
}

async function undo() {
  if (!state.annotator || state.busy) return;
  state.busy = true;
  try {
    const r = await api("DELETE", `/api/labels/last?annotator=${encodeURIComponent(state.annotator)}`);
    if (r.ok) {
      setStatus(`undone: prompt ${r.data.prompt_id}`);
      await loadItems(r.data.prompt_id);
    } else {
      setStatus(r.status === 404 ? "nothing to undo" : r.data.error, r.status !== 404);
    }
  } catch (e) {
    setStatus(`undo failed: the server cannot be reached (${e.message})`, true);
  } finally {
    state.busy = false;
  }
}

// ----- annotator -----
function storedName() {
  try { return localStorage.getItem(NAME_KEY) || ""; } catch (e) { return ""; }
}

function useName(name) {
  name = name.trim();
  if (!NAME_RE.test(name)) {
    setStatus("annotator: 1-64 letters, digits, '_', '-', '.' or spaces", true);
    $("annotator").focus();
    return;
  }
  state.annotator = name;
  $("annotator").value = name;
  try { localStorage.setItem(NAME_KEY, name); } catch (e) { /* private mode: the URL keeps it */ }
  const url = new URL(window.location.href);
  url.searchParams.set("annotator", name);
  history.replaceState(null, "", url);
  $("annotator").blur();
  setStatus("");
  loadItems();
}

// ----- keys -----
function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const t = e.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA")) return;
  if (e.key === "z") { e.preventDefault(); undo(); return; }
  if (!state.items.length || !mode()) return;
  if (e.key === "Enter" && state.mode !== "pair") { e.preventDefault(); saveCurrent(); return; }
  let handled = false;
  act(() => { handled = mode().key(state.sel, e); });
  if (handled) e.preventDefault();
}

document.addEventListener("DOMContentLoaded", () => {
  document.addEventListener("keydown", onKey);
  $("undo").addEventListener("click", () => undo());
  $("who").addEventListener("submit", (e) => { e.preventDefault(); useName($("annotator").value); });
  const name = new URLSearchParams(window.location.search).get("annotator") || storedName();
  if (name) useName(name);
  else { document.body.dataset.state = "who"; setStatus("Enter your name to start."); $("annotator").focus(); }
});
