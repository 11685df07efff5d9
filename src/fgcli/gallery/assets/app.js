/* fgcli gallery: a static page over an output tree of `fullgrad dump`.
 *
 * Data arrive by <script> (a file:// page may not fetch): gallery/data.js calls
 * fgcliData() with one compact row per image; gallery/records/NNNNN.js call
 * fgcliChunk() with full manifest records and decomposition terms, loaded when the
 * detail view needs them. The grid shows one page of cards at a time, so the DOM stays
 * small whatever the number of images. Everything the page shows from the data goes
 * through textContent or attributes, never innerHTML.
 *
 * The location's hash names what is open: #image=<encodeURIComponent(key)>[&rank=<r>]
 * a detail view (a link to copy; followed on load and on hashchange), #classes the
 * class view (when the tree had report/report.json at build time).
 */
"use strict";

(function () {
  const T0 = performance.now();
  const timing = (window.fgcliTiming = { script: T0 });
  // image row: [key, status, original (1: originalPrefix + key; {href, text} for a name
  //             that is not UTF-8), error, entries]
  // entry row: [id, rank, target, classIndex, prob, logit, residual, stem (null: the key),
  //             mask, audit?, paths?]
  // audit: the map's statistics in data.stats order, then (a run with boxes) the pointing
  //        game: hit (1 hit, 0 miss, -1 absent: no box of the target's class) and the
  //        energy in the boxes; null (or missing) for a record without them
  const MASK = { overlay: 1, heatmap: 2, map: 4, decomp: 8, thumb: 16 };
  const FOLDER = { overlay: ["overlays/", ".jpg"], heatmap: ["heatmaps/", ".png"],
                   map: ["maps/", ".npy"], decomp: ["decomp/", ".npz"],
                   thumb: ["thumbs/", ".jpg"] };
  const FIRST_THUMBS = 12;
  let data = null;
  let view = [];        // indices into data.images after filter and sort
  let page = 0;
  let detailAt = -1;    // position in view of the open detail, or -1
  let detailRank = 0;
  let typing = 0;       // timer of the search box
  let backOnClose = false;  // the open detail view pushed its history entry
  let HIT = 8, ENERGY = 9;  // positions in an entry's audit array (set from data.stats)
  const chunks = new Map();  // chunk number -> Promise of {records, terms}

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function url(path) {
    return path.split("/").map(encodeURIComponent).join("/");
  }

  function outputPath(img, entry, kind) {
    if (!(entry[8] & MASK[kind])) return null;
    if (entry[10] && entry[10][kind]) return entry[10][kind];
    const [folder, suffix] = FOLDER[kind];
    return folder + (entry[7] === null ? img[0] : entry[7]) + suffix;
  }

  function originalPath(img) {
    return img[2] === 1 ? data.originalPrefix + img[0] : img[2];
  }

  const className = (entry) => (entry[3] === null ? "" : data.classes[entry[3]]);
  const pct = (p) => (p === null ? "–" : (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 2 : 1) + "%");
  const num = (x, d) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d));

  // --------------------------------------------------------------------- filter and sort
  // An audit value of the image's top map: a statistic's index in data.stats, HIT or
  // ENERGY; null when the record has none (an older tree, a failed image).
  function auditValue(img, i) {
    const top = img[4][0];
    const v = top && top[9] ? top[9][i] : null;
    return v === undefined ? null : v;
  }

  // the audit index a sort or range kind reads ("stat:<i>", "energy", "hit"), or -1
  function auditIndex(kind) {
    if (kind.startsWith("stat:")) return Number(kind.slice(5));
    return kind === "energy" ? ENERGY : kind === "hit" ? HIT : -1;
  }

  function auditLabel(kind) {
    const i = auditIndex(kind);
    return i === ENERGY ? "energy" : i === HIT ? "pointing" : data.stats[i];
  }

  function auditText(kind, v) {
    if (auditIndex(kind) === HIT) {
      return v === null ? "–" : { 1: "hit", 0: "miss", "-1": "absent" }[v];
    }
    return num(v, 4);
  }

  function sortValue(kind, img) {
    const top = img[4][0];
    switch (kind) {
      case "prob": return top ? top[4] : -1;
      case "residual":
        return img[4].length ? Math.max(...img[4].map((e) => Math.abs(e[6] || 0))) : -1;
      case "class": return top ? className(top) : "";
      case "path": return img[0];
      default: return auditValue(img, auditIndex(kind));  // null: sorted last
    }
  }

  // The range filter: [audit index, min, max] (an empty bound is open), or null
  function rangeFilter() {
    const kind = $("range-stat").value;
    if (!kind) return null;
    const bound = (id, open) => {
      const v = $(id).value.trim();
      return v === "" || !Number.isFinite(Number(v)) ? open : Number(v);
    };
    return [auditIndex(kind), bound("range-min", -Infinity), bound("range-max", Infinity)];
  }

  const POINTING = { hit: 1, miss: 0, absent: -1 };
  function pointingMatches(img, want) {
    if (!img[4][0]) return false;
    const v = auditValue(img, HIT);
    return want === "none" ? v === null : v === POINTING[want];
  }

  const keyCache = new Map();  // sort kind -> keys of every image (the data never change)
  function sortKeys(kind) {
    if (!keyCache.has(kind)) keyCache.set(kind, data.images.map((img) => sortValue(kind, img)));
    return keyCache.get(kind);
  }

  function applyView(keepPage) {
    const q = $("search").value.trim().toLowerCase();
    const cls = $("class-filter").value;
    const status = $("status-filter").value;
    const kind = $("sort").value;
    const desc = $("descending").checked;
    const range = rangeFilter();
    const pointing = $("pointing-filter").value;
    const out = [];
    data.images.forEach((img, i) => {
      if (status && img[1] !== status) return;
      if (cls !== "" && !(img[4][0] && String(img[4][0][3]) === cls)) return;
      if (q && !img[0].toLowerCase().includes(q)) return;
      if (range) {
        const v = auditValue(img, range[0]);
        if (v === null || v < range[1] || v > range[2]) return;
      }
      if (pointing && !pointingMatches(img, pointing)) return;
      out.push(i);
    });
    const keys = sortKeys(kind);  // one key per image, by image number
    const sign = desc ? -1 : 1;   // ties keep path order either way; no value: last
    out.sort((a, b) => {
      const x = keys[a], y = keys[b];
      if (x === null || y === null) return x === y ? a - b : x === null ? 1 : -1;
      return x < y ? -sign : x > y ? sign : a - b;
    });
    view = out;
    if (!keepPage) page = 0;
    render();
  }

  // ----------------------------------------------------------------------------- grid
  function pageSize() { return Number($("page-size").value) || 100; }

  function card(index, position) {
    const img = data.images[index];
    const [key, status, , error, entries] = img;
    const fig = el("figure", { class: "card " + status, "data-key": key, tabindex: 0,
                               "data-position": position });
    const thumbs = el("div", { class: "thumbs" });
    if (status === "failed" || !entries.length) {
      thumbs.append(el("div", { class: "nothumb", text: status }));
    }
    for (const e of entries) {
      const src = outputPath(img, e, "thumb");
      const box = el("div", { class: "thumb" });
      if (src) {
        box.append(el("img", { src: url(src), alt: `${key}: ${className(e)}`, loading: "lazy",
                               decoding: "async", width: 180, height: 180 }));
      } else {
        box.append(el("div", { class: "nothumb", text: "no image" }));
      }
      if (entries.length > 1) box.append(el("span", { class: "rank", text: "#" + e[1] }));
      thumbs.append(box);
    }
    fig.append(thumbs);
    const cap = el("figcaption");
    cap.append(el("div", { class: "key", text: key, title: key }));
    if (status === "failed") {
      cap.append(el("div", { class: "error", text: error || "failed" }));
    } else {
      for (const e of entries) {
        cap.append(el("div", { class: "cls" },
          el("span", { class: "name", text: className(e) || "class " + e[2] }),
          el("span", { class: "prob", text: " " + pct(e[4]) }),
          el("span", { class: "res", title: "completeness residual",
                       text: " r=" + num(e[6], 2) })));
      }
      // the value the grid is sorted (else filtered) by, of the top map
      const kind = auditIndex($("sort").value) >= 0 ? $("sort").value : $("range-stat").value;
      if (kind) {
        cap.append(el("div", { class: "metric", "data-kind": kind,
          text: `${auditLabel(kind)} ${auditText(kind, auditValue(img, auditIndex(kind)))}` }));
      }
    }
    fig.append(cap);
    fig.addEventListener("click", () => openDetail(position));
    fig.addEventListener("keydown", (ev) => { if (ev.key === "Enter") openDetail(position); });
    return fig;
  }

  function pager(node) {
    node.replaceChildren();
    const pages = Math.max(1, Math.ceil(view.length / pageSize()));
    const go = (p) => { page = Math.min(pages - 1, Math.max(0, p)); render(); };
    const prev = el("button", { type: "button", class: "prev", text: "‹ previous" });
    prev.disabled = page === 0;
    prev.addEventListener("click", () => go(page - 1));
    const next = el("button", { type: "button", class: "next", text: "next ›" });
    next.disabled = page >= pages - 1;
    next.addEventListener("click", () => go(page + 1));
    node.append(prev, el("span", { class: "page", text: ` page ${page + 1} of ${pages} ` }),
                next);
  }

  function render() {
    const size = pageSize();
    const start = page * size;
    const grid = $("grid");
    const cards = view.slice(start, start + size).map((i, k) => card(i, start + k));
    grid.replaceChildren(...cards);
    pager($("pager-top"));
    pager($("pager-bottom"));
    $("status-line").textContent = view.length === data.images.length
      ? `${view.length} images`
      : `${view.length} of ${data.images.length} images match`;
    if (!view.length) grid.append(el("p", { class: "empty", text: "No image matches." }));
    if (timing.grid === undefined) {
      timing.grid = performance.now() - T0;
      watchFirstThumbs(grid);
    }
  }

  function watchFirstThumbs(grid) {
    const imgs = Array.from(grid.querySelectorAll("img")).slice(0, FIRST_THUMBS);
    let left = imgs.length;
    const done = () => {
      if (--left <= 0 && timing.thumbs === undefined) timing.thumbs = performance.now() - T0;
    };
    if (!left) { timing.thumbs = performance.now() - T0; return; }
    for (const im of imgs) {
      if (im.complete) done();
      else { im.addEventListener("load", done); im.addEventListener("error", done); }
    }
  }

  // --------------------------------------------------------------------------- detail
  // A chunk is loaded once: `chunks` holds its promise from the first request on, so a
  // detail view opened while the script is on its way waits for the same load.
  const arrived = new Map();  // chunk number -> resolve() of its pending load
  function loadChunk(n) {
    if (!chunks.has(n)) {
      const name = `gallery/records/${String(n).padStart(5, "0")}.js`;
      chunks.set(n, new Promise((resolve, reject) => {
        const script = el("script", { src: name });
        script.addEventListener("error", () => {
          chunks.delete(n);  // a later view may try again
          reject(new Error(`${name} is missing: rebuild the gallery`));
        });
        arrived.set(n, resolve);
        document.head.append(script);
      }));
    }
    return chunks.get(n);
  }
  window.fgcliChunk = function (n, chunk) {
    const resolve = arrived.get(n);
    arrived.delete(n);
    if (resolve) resolve(chunk);
  };

  async function entryDetail(id) {
    const size = data.chunk;
    const chunk = await loadChunk(Math.floor(id / size));
    return { record: chunk.records[id % size], terms: chunk.terms[id % size] };
  }

  // path: a path in the tree, or {href, text} for an original whose name is not UTF-8
  // (href: its bytes, percent-encoded in Python; a JavaScript string cannot hold them)
  function figure(title, path, note) {
    const fig = el("figure", { class: "full" });
    if (path) {
      const link = typeof path === "object" ? path.href : url(path);
      fig.append(el("a", { href: link, target: "_blank" },
                    el("img", { src: link, alt: title })));
    } else {
      fig.append(el("div", { class: "nothumb", text: note || "not written" }));
    }
    fig.append(el("figcaption", { text: title }));
    return fig;
  }

  // The hash of the open detail view: a link that opens it (see followHash)
  function detailHash() {
    const img = data.images[view[detailAt]];
    const e = img[4][detailRank];
    return "#image=" + encodeURIComponent(img[0]) + (detailRank > 0 && e ? "&rank=" + e[1] : "");
  }

  // Opening a detail view from the page adds a history entry (Back closes it); moving
  // within it (←/→, a rank) replaces that entry's hash, so the URL is always a link to
  // what is shown.
  function writeHash(replace) {
    const hash = detailHash();
    if (location.hash === hash) return;
    if (replace) history.replaceState(null, "", hash);
    else { history.pushState(null, "", hash); backOnClose = true; }
  }

  function openDetail(position, rank) {
    if (position < 0 || position >= view.length) return;
    const wasOpen = detailAt >= 0;
    detailAt = position;
    detailRank = rank || 0;
    notice("");
    showDetail();
    $("detail").hidden = false;
    writeHash(wasOpen);
  }

  function hideDetail() {
    $("detail").hidden = true;
    detailAt = -1;
    backOnClose = false;
  }

  function closeDetail() {
    const back = backOnClose;
    hideDetail();
    if (back) history.back();
    else if (location.hash.startsWith("#image=")) {
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  // ------------------------------------------------------------------------ deep links
  function hashParams() {
    const out = {};
    for (const part of location.hash.replace(/^#/, "").split("&")) {
      const at = part.indexOf("=");
      const name = at < 0 ? part : part.slice(0, at);
      try {
        out[name] = at < 0 ? "" : decodeURIComponent(part.slice(at + 1));
      } catch (err) {
        out[name] = null;  // a malformed %-escape
      }
    }
    return out;
  }

  let keyIndex = null;  // key -> index in data.images, made on the first link
  function imageIndex(key) {
    if (!keyIndex) keyIndex = new Map(data.images.map((img, i) => [img[0], i]));
    return keyIndex.has(key) ? keyIndex.get(key) : -1;
  }

  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = !text;
  }

  // Show what the hash names (on load, hashchange and history moves): #image=<key>
  // [&rank=<r>] a detail view, #classes the class view; no image: no detail view.
  function followHash() {
    const p = hashParams();
    if (p.classes !== undefined && data.report) showView("classes");
    if (p.image === undefined) {
      if (detailAt >= 0) hideDetail();
      return;
    }
    const index = p.image === null ? -1 : imageIndex(p.image);
    if (index < 0) {
      const what = p.image === null ? "a malformed key" : JSON.stringify(p.image);
      notice(`This link names ${what.slice(0, 200)}: no such image in this gallery.`);
      if (detailAt >= 0) hideDetail();
      return;
    }
    const entries = data.images[index][4];
    let rank = 0;
    notice("");
    if (p.rank !== undefined) {
      rank = entries.findIndex((e) => String(e[1]) === p.rank);
      if (rank < 0) {
        notice(`${p.image} has no map of rank ${p.rank}: showing its first.`);
        rank = 0;
      }
    }
    if (detailAt >= 0 && view[detailAt] === index && detailRank === rank) return;
    if (!view.includes(index)) resetFilters();  // the link shows it in the whole gallery
    backOnClose = false;  // this history entry is the link's: closing clears its hash
    detailAt = view.indexOf(index);
    detailRank = rank;
    showDetail();
    $("detail").hidden = false;
  }

  function resetFilters() {
    for (const id of ["search", "class-filter", "status-filter", "range-stat", "range-min",
                      "range-max", "pointing-filter"]) $(id).value = "";
    applyView(false);
  }

  let detailTicket = 0;  // which showDetail() call is the latest
  async function showDetail() {
    const ticket = ++detailTicket;
    const img = data.images[view[detailAt]];
    const [key, status, , error, entries] = img;
    const original = originalPath(img);
    $("detail-title").textContent = key;
    const body = $("detail-body");
    body.replaceChildren();
    if (status === "failed") {
      body.append(el("p", { class: "error", text: "failed: " + (error || "") }));
    }
    if (entries.length > 1) {
      const tabs = el("div", { class: "ranks" });
      entries.forEach((e, r) => {
        const b = el("button", { type: "button", class: r === detailRank ? "on" : "",
          text: `#${e[1]} ${className(e)} ${pct(e[4])}` });
        b.addEventListener("click", () => { detailRank = r; showDetail(); writeHash(true); });
        tabs.append(b);
      });
      body.append(tabs);
      const side = el("div", { class: "side-by-side" });
      for (const e of entries) {
        side.append(figure(`#${e[1]} ${className(e)} (${pct(e[4])})`,
                           outputPath(img, e, "overlay") || outputPath(img, e, "heatmap")));
      }
      body.append(side);
    }
    const e = entries[detailRank];
    const row = el("div", { class: "images" });
    row.append(figure("original", original, "original not found when the gallery was built"));
    if (e) {
      row.append(figure("heatmap", outputPath(img, e, "heatmap")));
      row.append(figure("overlay", outputPath(img, e, "overlay")));
    }
    body.append(row);
    const recordBox = el("pre", { class: "record", id: "detail-record", text: "loading…" });
    const chart = el("div", { class: "chart", id: "detail-chart" });
    const audit = el("div", { class: "audit", id: "detail-audit" });
    if (data.audit.stats || data.audit.objects) {
      body.append(el("h3", { text: "Statistics" }), audit);
    }
    body.append(el("h3", { text: "Decomposition" }), chart,
                el("h3", { text: "Manifest record" }), recordBox);
    const id = e ? e[0] : null;
    if (id === null) {
      recordBox.textContent = JSON.stringify({ key, status, error }, null, 2);
      chart.append(el("p", { text: "No map for this image." }));
      return;
    }
    let got;
    try {
      got = await entryDetail(id);
    } catch (err) {
      recordBox.textContent = String(err.message || err);
      return;
    }
    if (ticket !== detailTicket) return;  // the user moved on
    recordBox.textContent = JSON.stringify(got.record, null, 2);
    audit.append(auditTable(got.record));
    if (got.terms) chart.append(waterfall(data.layers[got.terms[0]], got.terms[1]));
    else chart.append(el("p", { text: "No decomp/ file for this map (dump with --save …,decomp)." }));
  }

  // The record's statistics and pointing game, as the manifest has them
  function auditTable(record) {
    const stats = record.stats && typeof record.stats === "object" ? record.stats : null;
    const objects = record.objects && typeof record.objects === "object" ? record.objects : null;
    if (!stats && !objects) {
      return el("p", { text: "No statistics in this record (written before fgcli " +
                             "recorded them)." });
    }
    const table = el("table", { class: "kv" });
    const row = (name, value) => table.append(el("tr", { "data-field": name },
      el("th", { text: name }),
      el("td", { text: value === null || value === undefined ? "–" : String(value) })));
    if (stats) for (const name of data.stats) row(name, stats[name]);
    if (objects) for (const [k, v] of Object.entries(objects)) row("objects." + k, v);
    else row("objects", "no annotation for this image");
    return table;
  }

  // A horizontal waterfall: each term's bar starts where the previous one ended, so the
  // last bar ends at the sum; the total bar from 0 is the logit.
  function waterfall(layers, values) {
    const NS = "http://www.w3.org/2000/svg";
    const svgEl = (tag, attrs) => {
      const n = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
      return n;
    };
    const logit = values[values.length - 1];
    const names = ["input", ...layers, "residual"];
    const terms = values.slice(0, values.length - 1);
    let cum = 0;
    const spans = terms.map((v) => { const a = cum; cum += v; return [a, cum]; });
    const sum = cum;
    const ends = spans.flat().concat([0, logit]);
    const lo = Math.min(...ends), hi = Math.max(...ends);
    const W = 760, LABEL = 230, VALUE = 90, ROW = 16, PAD = 6;
    const plotW = W - LABEL - VALUE;
    const x = (v) => LABEL + (hi > lo ? ((v - lo) / (hi - lo)) * plotW : 0);
    const H = (names.length + 1) * ROW + 2 * PAD + 20;
    const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`,
                               class: "waterfall", id: "decomp-chart",
                               "data-sum": sum, "data-logit": logit, role: "img" });
    const title = svgEl("title", {});
    title.textContent = "input term + every layer's bias term + residual = logit";
    svg.append(title);
    svg.append(svgEl("line", { x1: x(0), x2: x(0), y1: PAD, y2: H - PAD - 20,
                                class: "zero" }));
    const row = (i, label, a, b, kind, value) => {
      const y = PAD + i * ROW;
      const t = svgEl("text", { x: LABEL - 6, y: y + ROW - 4, "text-anchor": "end",
                                class: "label" });
      t.textContent = label.length > 34 ? "…" + label.slice(-33) : label;
      const full = svgEl("title", {});
      full.textContent = `${label}: ${value}`;
      const rect = svgEl("rect", { x: Math.min(x(a), x(b)), y: y + 2,
                                   width: Math.max(1, Math.abs(x(b) - x(a))),
                                   height: ROW - 4, class: "bar " + kind,
                                   "data-term": label, "data-value": value });
      rect.append(full);
      const v = svgEl("text", { x: W - 4, y: y + ROW - 4, "text-anchor": "end", class: "value" });
      v.textContent = num(value, 4);
      svg.append(t, rect, v);
    };
    names.forEach((n, i) => row(i, n, spans[i][0], spans[i][1],
                                terms[i] >= 0 ? "pos" : "neg", terms[i]));
    row(names.length, "= logit", 0, logit, "total", logit);
    svg.append(svgEl("line", { x1: x(logit), x2: x(logit), y1: PAD, y2: H - PAD - 20,
                                class: "logit" }));
    const foot = svgEl("text", { x: LABEL, y: H - 8, class: "foot", id: "decomp-sum" });
    foot.textContent = `input + Σ ${layers.length} layers + residual = ${num(sum, 7)}` +
                       ` · logit ${num(logit, 7)}`;
    svg.append(foot);
    return svg;
  }

  // ----------------------------------------------------------------------------- eval
  function evalTable(ev) {
    const box = $("eval-table");
    if (!box || !ev) return;
    const methods = Object.keys(ev.results);
    const metrics = Object.keys(ev.results[methods[0]] || {});
    const head = el("tr", {}, el("th", { text: "method" }));
    const cols = [];
    for (const m of metrics) {
      const n = ev.results[methods[0]][m].mean.length;
      for (let j = 0; j < n; j++) {
        const label = n > 1 && ev.ks ? `${m} k=${ev.ks[j]}%` : `${m} AUC`;
        head.append(el("th", { text: label, title: (ev.metrics || {})[m] || "" }));
        cols.push([m, j]);
      }
    }
    const table = el("table", { class: "eval-table" }, el("thead", {}, head));
    const tbody = el("tbody");
    for (const method of methods) {
      const tr = el("tr", {}, el("th", { text: method }));
      for (const [m, j] of cols) {
        const r = (ev.results[method] || {})[m];
        tr.append(el("td", { text: r ? `${num(r.mean[j], 3)} ± ${num(r.se[j], 2)}` : "–" }));
      }
      tbody.append(tr);
    }
    table.append(tbody);
    box.append(el("p", { text: `${ev.images} images; mean ± standard error. ` +
                               "Perturbation and deletion: lower is better; insertion: higher." }),
               table);
    if (ev.plot) box.append(el("img", { src: url(ev.plot), alt: "eval curves", class: "eval-plot" }));
  }

  // ------------------------------------------------------------ statistics controls
  // Sort by, and filter by a range of, every statistic (and energy, pointing) when some
  // record has them; a tree from before them keeps the controls hidden.
  function auditControls(d) {
    const kinds = [];
    if (d.audit.stats) d.stats.forEach((name, i) => kinds.push(["stat:" + i, name]));
    if (d.audit.objects) kinds.push(["energy", "energy in boxes"]);
    if (!kinds.length) return;
    const group = el("optgroup", { label: "map statistics" });
    for (const [value, text] of kinds) group.append(el("option", { value, text }));
    if (d.audit.objects) group.append(el("option", { value: "hit", text: "pointing hit" }));
    $("sort").append(group);
    for (const [value, text] of kinds) $("range-stat").append(el("option", { value, text }));
    $("range-controls").hidden = false;
    $("pointing-label").hidden = !d.audit.objects;
  }

  // ------------------------------------------------------------------------- classes
  // The class view (report/report.json at build time): a sortable table of the classes
  // with their class-mean tiles; a click shows the class's images in the grid.
  const CLASS_COLUMNS = [  // [label, value, text, title]
    ["class", (c) => c.name === null ? "" : c.name.toLowerCase(),
     (c) => c.name === null ? `class ${c.target}` : c.name],
    ["target", (c) => c.target, (c) => String(c.target)],
    ["records", (c) => c.records, (c) => num0(c.records)],
    ["pointing", (c) => c.pointing,
     (c) => c.pointing === null ? "–" : `${pct(c.pointing)} ± ${pct(c.pointing_se)}`,
     (c) => `${num0(c.hits)} hits of ${num0(c.located)} located (± standard error)`],
    ["energy", (c) => c.energy,
     (c) => c.energy === null ? "–" : `${num(c.energy, 3)} ± ${num(c.energy_se, 2)}`,
     () => "mean energy in the boxes ± standard error"],
    ["absent", (c) => c.absent, (c) => num0(c.absent),
     () => "records whose image has no box of this class"],
  ];
  const num0 = (x) => (x === null || x === undefined ? "–" : String(x));
  let classSort = [2, true];  // column, descending

  function classColumns() {
    return CLASS_COLUMNS.concat(data.stats.map((name, i) => [
      "mean " + name, (c) => c.mean[i], (c) => num(c.mean[i], 4),
      (c) => `standard deviation ${num(c.std[i], 3)}`]));
  }

  function classTile(c) {
    const g = data.report.grid;
    if (!g || !c.tile) return el("div", { class: "tile none" });
    const [row, col] = c.tile;  // its top-left pixel in the grid image:
    const x = g.gap + col * (g.tile + g.gap), y = g.gap + row * (g.tile + g.label + g.gap);
    return el("div", { class: "tile", role: "img", "aria-label": `class mean of ${c.name}`,
      style: `width:${g.tile}px;height:${g.tile}px;background-image:url("${url(g.file)}");` +
             `background-position:${-x}px ${-y}px` });
  }

  function renderClasses() {
    const report = data.report;
    const cols = classColumns();
    const [at, desc] = classSort;
    const value = cols[at][1];
    const rows = report.classes.map((c, i) => [value(c), i]);
    rows.sort(([x, a], [y, b]) => {  // no value: last either way
      if (x === null || y === null) return x === y ? a - b : x === null ? 1 : -1;
      return x < y ? (desc ? 1 : -1) : x > y ? (desc ? -1 : 1) : a - b;
    });
    const head = el("tr", {}, el("th", { text: "class mean" }));
    cols.forEach(([label], i) => {
      const b = el("button", { type: "button", "data-column": i,
        text: label + (i === at ? (desc ? " ▼" : " ▲") : "") });
      b.addEventListener("click", () => {
        classSort = [i, i === at ? !desc : i > 1];  // numbers: largest first
        renderClasses();
      });
      head.append(el("th", {}, b));
    });
    const body = el("tbody");
    for (const [, i] of rows) {
      const c = report.classes[i];
      const tr = el("tr", { class: "class-row", "data-target": c.target, tabindex: 0 },
                    el("td", {}, classTile(c)));
      for (const col of cols) {
        tr.append(el("td", { text: col[2](c), title: col[3] ? col[3](c) : null }));
      }
      tr.addEventListener("click", () => showClass(c));
      tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") showClass(c); });
      body.append(tr);
    }
    $("class-table").replaceChildren(el("thead", {}, head), body);
  }

  // the class's images in the grid: the class filter (images whose top map is of it)
  function showClass(c) {
    let index = c.name === null ? -1 : data.classes.indexOf(c.name);
    if (index < 0) {
      const img = data.images.find((im) => im[4][0] && im[4][0][2] === c.target);
      index = img ? img[4][0][3] : -1;
    }
    const option = index < 0 ? null : $("class-filter").querySelector(`option[value="${index}"]`);
    showView("images");
    if (!option) {
      const name = c.name === null ? c.target : c.name;
      notice(`No image's top map is of class ${name} in this gallery.`);
      return;
    }
    notice("");
    $("class-filter").value = String(index);
    applyView(false);
  }

  function showView(which) {
    if (!data.report) return;
    const classes = which === "classes";
    $("class-view").hidden = !classes;
    for (const id of ["grid", "pager-top", "pager-bottom"]) $(id).hidden = classes;
    $("view-images").classList.toggle("on", !classes);
    $("view-classes").classList.toggle("on", classes);
    const hash = classes ? "#classes" : "";
    if (detailAt < 0 && (location.hash === "#classes") !== classes) {
      history.replaceState(null, "", location.pathname + location.search + hash);
    }
  }

  function classView(report) {
    if (!report) return;
    const n = report.classes.length;
    const what = `${n} class${n === 1 ? "" : "es"} from report/report.json` +
      (report.records === null ? "" : ` (${report.records} records)`);
    $("class-note").replaceChildren(what + ". Click a class to see its images; " +
                                    "click a heading to sort. ");
    if (report.index) $("class-note").append(el("a", { href: report.index, text: "the report" }));
    $("view-images").addEventListener("click", () => showView("images"));
    $("view-classes").addEventListener("click", () => showView("classes"));
    renderClasses();
  }

  // ---------------------------------------------------------------------------- start
  window.fgcliData = function (d) {
    data = d;
    HIT = d.stats.length;
    ENERGY = HIT + 1;
    timing.data = performance.now() - T0;
    const counts = new Map();
    for (const img of d.images) {
      const top = img[4][0];
      if (top && top[3] !== null) counts.set(top[3], (counts.get(top[3]) || 0) + 1);
    }
    const options = Array.from(counts.entries())
      .sort((a, b) => (d.classes[a[0]] < d.classes[b[0]] ? -1 : 1))
      .map(([c, n]) => el("option", { value: c, text: `${d.classes[c]} (${n})` }));
    const ready = () => {
      $("class-filter").append(...options);
      for (const id of ["search", "class-filter", "status-filter", "sort", "descending",
                        "page-size", "range-stat", "range-min", "range-max",
                        "pointing-filter"]) {
        const typed = id === "search" || id === "range-min" || id === "range-max";
        $(id).addEventListener(typed ? "input" : "change", () => {
          // typing re-filters once it pauses: 100,000 images take ~0.1 s to filter and sort
          clearTimeout(typing);
          typing = setTimeout(() => applyView(false), typed ? 120 : 0);
        });
      }
      $("detail-close").addEventListener("click", closeDetail);
      $("detail-prev").addEventListener("click", () => openDetail(detailAt - 1));
      $("detail-next").addEventListener("click", () => openDetail(detailAt + 1));
      $("detail").addEventListener("click", (ev) => { if (ev.target === $("detail")) closeDetail(); });
      document.addEventListener("keydown", (ev) => {
        if (detailAt < 0) return;
        if (ev.key === "Escape") closeDetail();
        else if (ev.key === "ArrowLeft") openDetail(detailAt - 1);
        else if (ev.key === "ArrowRight") openDetail(detailAt + 1);
      });
      window.addEventListener("popstate", followHash);
      window.addEventListener("hashchange", followHash);
      $("notice").addEventListener("click", () => notice(""));
      evalTable(d.eval);
      auditControls(d);
      classView(d.report);
      applyView(false);
      followHash();
      document.body.dataset.ready = "1";
    };
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready);
    else ready();
  };
})();
