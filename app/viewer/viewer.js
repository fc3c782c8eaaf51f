// flow viewer: plain JavaScript, no build step, nothing from outside this server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { file: null, width: 0, height: 0, roi: null, previewUrl: null, targets: [] };

// A token given as #token=... is kept for this tab only and sent as a bearer token.
(function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("flow-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function headers() {
  const t = sessionStorage.getItem("flow-token");
  return t ? { Authorization: "Bearer " + t } : {};
}

function say(text, error) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", !!error);
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({ headers: headers() }, options || {}));
  if (!resp.ok) {
    let detail = resp.status + " " + resp.statusText;
    try {
      const body = await resp.json();
      if (body && body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    if (resp.status === 401) detail += " (open the viewer as /#token=YOUR_TOKEN)";
    throw new Error(detail);
  }
  return resp;
}

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children || []) e.appendChild(c);
  return e;
}

async function loadTargets() {
  const body = await (await api("/api/targets")).json();
  state.targets = body.targets;
  const sel = $("#target");
  sel.textContent = "";
  for (const t of body.targets) {
    const extra = t.kind === "regions" ? `, ${t.regions} regions` : "";
    sel.appendChild(el("option", { value: t.name, text: `${t.name} (${t.kind}, ${t.items} items${extra})` }));
  }
  const regions = body.targets.find((t) => t.kind === "regions");
  if (regions) sel.value = regions.name;
  say(body.targets.length ? "Open or drop a study to search." : "No index built yet.");
}

// -- the query image and its box ---------------------------------------------------

async function openFile(file) {
  state.file = file;
  state.roi = null;
  showRoi();
  say("Reading " + file.name + " …");
  const form = new FormData();
  form.append("file", file);
  form.append("target", $("#target").value);
  try {
    const body = await (await api("/api/preview", { method: "POST", body: form })).json();
    state.width = body.width;
    state.height = body.height;
    state.previewUrl = body.image;
    const img = $("#query-image");
    img.onload = () => { sizeOverlay(); drawRoi(); };
    img.src = body.image;
    $("#query-frame").hidden = false;
    $("#search").disabled = false;
    say(`${file.name}: ${body.width} × ${body.height} px. Drag to mark a region, then Search.`);
  } catch (e) {
    $("#search").disabled = true;
    say(file.name + ": " + e.message, true);
  }
}

function sizeOverlay() {
  const img = $("#query-image"), c = $("#overlay");
  c.width = img.clientWidth;
  c.height = img.clientHeight;
}

function toImage(px, py) {
  const c = $("#overlay");
  return [px * state.width / c.clientWidth, py * state.height / c.clientHeight];
}

function drawRoi(live) {
  const c = $("#overlay"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const r = live || state.roi;
  if (!r) return;
  const sx = c.width / state.width, sy = c.height / state.height;
  ctx.strokeStyle = "#ff4d4d";
  ctx.lineWidth = 2;
  ctx.strokeRect(r[0] * sx, r[1] * sy, r[2] * sx, r[3] * sy);
}

function showRoi() {
  $("#roi").textContent = state.roi ? state.roi.join(",") : "whole image";
  $("#clear-roi").disabled = !state.roi;
}

function setupDrawing() {
  const c = $("#overlay");
  let start = null;
  const pos = (ev) => {
    const b = c.getBoundingClientRect();
    return toImage(Math.min(Math.max(ev.clientX - b.left, 0), b.width),
                   Math.min(Math.max(ev.clientY - b.top, 0), b.height));
  };
  const box = (a, b) => {
    const x = Math.round(Math.min(a[0], b[0])), y = Math.round(Math.min(a[1], b[1]));
    return [x, y, Math.max(1, Math.round(Math.abs(b[0] - a[0]))), Math.max(1, Math.round(Math.abs(b[1] - a[1])))];
  };
  c.addEventListener("pointerdown", (ev) => { start = pos(ev); c.setPointerCapture(ev.pointerId); });
  c.addEventListener("pointermove", (ev) => { if (start) drawRoi(box(start, pos(ev))); });
  c.addEventListener("pointerup", (ev) => {
    if (!start) return;
    const b = box(start, pos(ev));
    start = null;
    state.roi = b[2] >= 3 && b[3] >= 3 ? b : null;  // a click is not a box
    drawRoi();
    showRoi();
  });
  $("#clear-roi").addEventListener("click", () => { state.roi = null; drawRoi(); showRoi(); });
  window.addEventListener("resize", () => { if (state.file) { sizeOverlay(); drawRoi(); } });
}

// -- results ---------------------------------------------------------------------------

async function thumbnail(id, target) {
  const resp = await api(`/api/items/${encodeURIComponent(id)}/image?target=${encodeURIComponent(target)}`);
  return URL.createObjectURL(await resp.blob());
}

function boxDiv(box, size) {
  const d = el("div", { class: "box" });
  d.style.left = (100 * box[0] / size[0]) + "%";
  d.style.top = (100 * box[1] / size[1]) + "%";
  d.style.width = (100 * box[2] / size[0]) + "%";
  d.style.height = (100 * box[3] / size[1]) + "%";
  return d;
}

function framed(src, box, size, alt) {
  const img = el("img", { alt: alt });
  if (src) img.src = src;
  const f = el("div", { class: "frame" }, [img]);
  if (box && size) f.appendChild(boxDiv(box, size));
  return f;
}

async function search() {
  if (!state.file) return;
  const target = $("#target").value, k = $("#k").value || "10";
  const form = new FormData();
  form.append("file", state.file);
  form.append("target", target);
  form.append("k", k);
  if (state.roi) form.append("roi", state.roi.join(","));
  $("#search").disabled = true;
  say("Searching …");
  try {
    const body = await (await api("/api/query", { method: "POST", body: form })).json();
    render(body);
    say(`${body.results.length} results from ${body.target} (index #${body.seq}) in ${(1000 * body.seconds).toFixed(0)} ms.`);
  } catch (e) {
    say(e.message, true);
  } finally {
    $("#search").disabled = false;
  }
}

function render(body) {
  const list = $("#results");
  list.textContent = "";
  $("#summary").textContent = `${body.target} · ${body.kind}` + (body.roi ? ` · region ${body.roi.join(",")}` : " · whole image");
  for (const h of body.results) {
    const frame = framed(null, h.box, h.size, "result " + h.rank);
    const meta = el("div", { class: "meta" }, [
      el("span", { class: "rank", text: "#" + h.rank }),
      el("span", { class: "dist", text: "d " + h.distance.toFixed(3) }),
      el("div", { class: "labels", text: h.labels.join(", ") || "(no labels)" }),
      el("div", { class: "id", text: h.id }),
    ]);
    const li = el("li", { class: "result", tabindex: "0", "data-id": h.id }, [frame, meta]);
    li.addEventListener("click", () => compare(h, body.target, li));
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") compare(h, body.target, li); });
    list.appendChild(li);
    thumbnail(h.id, body.target).then((url) => { frame.querySelector("img").src = url; })
      .catch((e) => { frame.replaceWith(el("div", { class: "hint", text: "(no picture: " + e.message + ")" })); });
  }
  renderStats(body);
  const info = $("#query-info");
  info.textContent = "";
  for (const [k, v] of Object.entries(body.query)) {
    info.appendChild(el("dt", { text: k }));
    info.appendChild(el("dd", { text: String(v) }));
  }
}

function renderStats(body) {
  $("#stats-k").textContent = String(body.results.length);
  const tb = $("#stats tbody");
  tb.textContent = "";
  for (const s of body.stats) {
    const fill = el("div", { class: "fill" });
    fill.style.width = (100 * s.fraction) + "%";
    const base = el("div", { class: "base", title: "archive: " + (100 * s.base_rate).toFixed(1) + "%" });
    base.style.left = (100 * s.base_rate) + "%";
    const bar = el("div", { class: "bar" }, [fill, base]);
    const share = el("td", {}, [bar, el("small", { text: `${(100 * s.fraction).toFixed(0)}% vs ${(100 * s.base_rate).toFixed(0)}%` })]);
    tb.appendChild(el("tr", { "data-label": s.label }, [
      el("td", { text: s.label }), el("td", { text: `${s.count}/${body.results.length}` }), share,
    ]));
  }
}

async function compare(hit, target, li) {
  for (const x of document.querySelectorAll(".result.selected")) x.classList.remove("selected");
  li.classList.add("selected");
  const q = $("#compare-query"), r = $("#compare-result");
  q.textContent = "";
  r.textContent = "";
  q.appendChild(framed(state.previewUrl, state.roi, [state.width, state.height], "query"));
  $("#compare-title").textContent = `#${hit.rank} ${hit.id}`;
  $("#compare-caption").textContent = `${hit.labels.join(", ") || "(no labels)"} · distance ${hit.distance.toFixed(3)}`;
  $("#compare").hidden = false;
  try {
    const resp = await api(`/api/items/${encodeURIComponent(hit.id)}/image?size=1024&target=${encodeURIComponent(target)}`);
    r.appendChild(framed(URL.createObjectURL(await resp.blob()), hit.box, hit.size, hit.id));
  } catch (e) {
    r.appendChild(el("p", { class: "hint", text: "(no picture: " + e.message + ")" }));
  }
  $("#compare").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

// -- wiring ----------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", () => {
  setupDrawing();
  $("#file").addEventListener("change", (ev) => { if (ev.target.files[0]) openFile(ev.target.files[0]); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer.files[0]) openFile(ev.dataTransfer.files[0]);
  });
  $("#search").addEventListener("click", search);
  $("#close-compare").addEventListener("click", () => { $("#compare").hidden = true; });
  $("#target").addEventListener("change", () => { if (state.file) openFile(state.file); });
  loadTargets().catch((e) => say(e.message, true));
});
