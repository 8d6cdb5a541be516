// cxr-lung-risk web page: plain JavaScript, no build step, no network beyond this server.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const uploads = new Map(); // local id -> {name, loaded, total, error}
  const cardsShown = new Set();
  let uploadQueue = [];
  let uploading = false;
  let lastState = "";
  let localId = 0;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }

  function setMessage(text) { $("message").textContent = text || ""; }

  // ---------------------------------------------------------------- PHI notice gates the upload
  $("phi-ack").addEventListener("change", () => {
    const on = $("phi-ack").checked;
    $("upload").classList.toggle("disabled", !on);
    $("file-input").disabled = !on;
  });

  // ---------------------------------------------------------------- drop / choose
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (!$("phi-ack").checked) { setMessage("Please read the notice above and tick the box first."); return; }
    addFiles(ev.dataTransfer.files);
  });
  $("file-input").addEventListener("change", (ev) => { addFiles(ev.target.files); ev.target.value = ""; });

  function addFiles(list) {
    setMessage("");
    for (const f of Array.from(list)) {
      const id = "u" + (++localId);
      uploads.set(id, { name: f.name, loaded: 0, total: f.size || 1, error: "" });
      uploadQueue.push([id, f]);
    }
    render(JSON.parse(lastState || "{}"));
    pump();
  }

  // one request per file: a progress bar per file while it travels, then the server's progress
  function pump() {
    if (uploading || uploadQueue.length === 0) return;
    uploading = true;
    const [id, f] = uploadQueue.shift();
    const u = uploads.get(id);
    const form = new FormData();
    form.append("files", f, f.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "api/upload");
    xhr.upload.addEventListener("progress", (ev) => { if (ev.lengthComputable) { u.loaded = ev.loaded; u.total = ev.total; drawUploads(); } });
    xhr.addEventListener("load", () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = { error: "the server answered " + xhr.status }; }
      if (xhr.status >= 400) { u.error = body.error || ("the server answered " + xhr.status); setMessage(f.name + ": " + u.error); }
      else uploads.delete(id);
      done();
    });
    xhr.addEventListener("error", () => { u.error = "the upload failed (is the server still running?)"; setMessage(f.name + ": " + u.error); done(); });
    function done() { uploading = false; poll(); pump(); }
    xhr.send(form);
  }

  // ---------------------------------------------------------------- polling the server's state
  async function poll() {
    try {
      const r = await fetch("api/state", { cache: "no-store" });
      const text = await r.text();
      if (text !== lastState) { lastState = text; render(JSON.parse(text)); }
    } catch (e) { /* the next poll tries again */ }
  }
  setInterval(poll, 500);
  poll();

  function drawUploads() { render(JSON.parse(lastState || "{}")); }

  function render(state) {
    const items = state.items || [];
    $("models-state").textContent = state.models === "failed" ? "failed: " + (state.error || "") : (state.models || "loading…");
    const w = $("weights");
    w.textContent = (state.weights || []).map((x) => x.text).join("; ");
    w.classList.toggle("synthetic-text", !!state.synthetic);
    $("synthetic-banner").hidden = !state.synthetic;
    $("folder").textContent = state.folder ? "(kept in " + state.folder + " until you delete them or stop the server)" : "";
    const tbody = $("rows");
    tbody.replaceChildren();
    for (const [id, u] of uploads) {
      const bar = el("progress", { max: "1", value: String(Math.min(1, u.loaded / u.total) * 0.3) });
      tbody.append(el("tr", { "data-upload": id },
        el("td", { class: "name", text: u.name }), el("td", {}, bar),
        el("td", { class: u.error ? "status-failed" : "", text: u.error ? "refused" : "uploading" },
          u.error ? el("span", { class: "reason", text: u.error }) : null),
        el("td"), el("td"), el("td"), el("td")));
    }
    for (const it of items) tbody.append(row(it, state));
    for (const it of items) {
      if (it.status === "ok" && it.files.includes("card")) { if (!cardsShown.has(it.id)) addCard(it); else updateCard(it); }
    }
    for (const id of Array.from(cardsShown)) if (!items.find((x) => x.id === id)) { cardsShown.delete(id); const c = $("card-" + id); if (c) c.remove(); }
  }

  function row(it, state) {
    const progress = 0.3 + 0.7 * it.progress;
    const status = el("td", { class: "status status-" + it.status, text: it.status },
      it.reason ? el("span", { class: "reason", text: it.reason }) : null,
      ...(it.warnings || []).map((w) => el("span", { class: "reason", text: "warning: " + w })));
    const scores = el("td", {}, ...(it.scores || []).map((s) =>
      el("div", { class: "score", "data-column": s.column, "data-value": String(s.value), text: s.title + ": " + s.value.toFixed(1) + " " + s.unit })));
    const weights = el("td", { class: state.synthetic ? "synthetic-text" : "" },
      it.status === "ok" ? (state.weights || []).map((x) => x.kind + (x.sha256 ? " (" + x.sha256.slice(0, 12) + "…)" : "")).join("; ") : "");
    const links = el("td", { class: "links" });
    const names = { sr: "SR", result: "result image", card: "card (PNG)" };
    for (const k of ["sr", "result", "card"]) {
      if (it.files.includes(k)) {
        if (links.childNodes.length) links.append(" · ");
        links.append(el("a", { href: "api/items/" + it.id + "/" + k + "?download=1", class: "dl-" + k, text: names[k] }));
      }
    }
    return el("tr", { "data-id": it.id, "data-status": it.status },
      el("td", { class: "name", text: it.name }),
      el("td", {}, el("progress", { max: "1", value: String(progress) })),
      status, scores, el("td", { class: "risk-group", text: it.risk_group || "—" }), weights, links);
  }

  function addCard(it) {
    cardsShown.add(it.id);
    const img = el("img", { src: "api/items/" + it.id + "/card", alt: "result card of " + it.name, class: "card-img" });
    const toggle = el("input", { type: "checkbox", class: "overlay-toggle" });
    const note = el("span", { class: "dim overlay-note" });
    const label = el("label", {}, toggle, " saliency overlay ", note);
    toggle.addEventListener("change", () => {
      img.src = "api/items/" + it.id + "/" + (toggle.checked ? "card_overlay" : "card");
    });
    $("cards").append(el("div", { class: "card", id: "card-" + it.id }, el("h3", { text: it.name }), label, img));
    updateCard(it);
  }

  // the overlay comes a little after the scores: the toggle is enabled when it is there
  function updateCard(it) {
    const card = $("card-" + it.id);
    if (!card) return;
    const toggle = card.querySelector(".overlay-toggle");
    const ready = it.files.includes("card_overlay");
    toggle.disabled = !ready;
    card.querySelector(".overlay-note").textContent = ready ? "" : it.overlay === "pending" ? "(computing…)" :
      (it.overlay ? "(" + it.overlay + ")" : "(off)");
  }

  // ---------------------------------------------------------------- delete my results
  $("delete").addEventListener("click", async () => {
    const r = await fetch("api/delete", { method: "POST" });
    if (r.ok) {
      uploads.clear();
      uploadQueue = [];
      $("cards").replaceChildren();
      cardsShown.clear();
      setMessage("Your uploads and results were deleted.");
      lastState = "";
      poll();
    }
  });
})();
